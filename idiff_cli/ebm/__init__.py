"""Energy-based models trained by Implicit Diffusion (paper §3.2 and Appendix A.1, "training from scratch").

F(p) = KL(p_data ‖ p) has the explicit gradient Γ_ref(p, θ) = E_data[∇θV] − E_p[∇θV]; with one ULA
step per θ update on persistent chains this is persistent-contrastive-divergence training of V.
Points are [d, B] arrays (coordinates first), as in `idiff_cli.langevin`.
"""
