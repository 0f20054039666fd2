"""The score of a noise-prediction network, and the denoising score matching loss.

The network predicts the noise ε of X_t = α(t) X_0 + σ(t) ε, so its score is s_θ(x, t) = −ε_θ(x, t)/σ(t)
(Tweedie: ∇ log p_t(x) = −E[ε | X_t = x]/σ(t)). Denoising score matching with the weight σ(t)²
(Vincent 2011; Song et al. 2021) is

    L(θ) = E_{t, X_0, ε} ‖σ(t) s_θ(X_t, t) + ε‖² / d  =  E ‖ε_θ(X_t, t) − ε‖² / d,

minimised by the true score ∇ log p_t; d is the number of pixels × channels. Times are drawn by
`sde.sample_time` (its warping only reweights the loss over t, so the minimiser is unchanged).

Preconditioning (Karras et al. 2022, EDM §5, written for ε): with v(t) = α²σ_d² + σ² the variance of
X_t for data of scale σ_d = 0.5, the network F sees the unit-variance input x/√v and predicts only what
the best linear guess σx/v of ε misses,

    ε_θ(x, t) = (σ/v) x + (α σ_d/√v) F_θ(x/√v, t).

So ε_θ → x/σ at high noise whatever F: each image's per-channel mean is carried through the sampler
exactly. Without it the ~1 M-parameter cpu-preset U-Net barely predicts the noise in that mean at high
noise, the reverse SDE amplifies the error e^t-fold, and colored-MNIST samples saturate into flat
squares (README, pretrain section).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from idiff_cli.diffusion.sde import NoiseProcess, _expand


DATA_STD = 0.5  # σ_d: the scale of images in [−1, 1] (EDM's value)


def score_function(apply_fn: Callable, sde: NoiseProcess, precondition: bool = False) -> Callable:
    """s(params, x [B, ...], t [B], labels [B] or None) = −ε_θ(x, t)/σ(t), where ε_θ is the network
    apply_fn(params, x, noise_level(t), labels) or, with `precondition`, its preconditioned form above."""

    def score(params, x: jax.Array, t: jax.Array, labels: jax.Array | None = None) -> jax.Array:
        sigma = _expand(sde.sigma(t), x)
        if not precondition:
            return -apply_fn(params, x, sde.noise_level(t), labels) / sigma
        alpha = _expand(sde.alpha(t), x)
        v = alpha**2 * DATA_STD**2 + sigma**2
        f = apply_fn(params, x * jax.lax.rsqrt(v), sde.noise_level(t), labels)
        eps = sigma / v * x + alpha * DATA_STD * jax.lax.rsqrt(v) * f
        return -eps / sigma

    return score


def denoising_loss(score: Callable, sde: NoiseProcess, x0: jax.Array, key: jax.Array) -> jax.Array:
    """Per-example σ²-weighted denoising score matching loss [B] of `score(x_t, t)` on data x0 [B, ...]."""
    t_key, eps_key = jax.random.split(key)
    t = sde.sample_time(t_key, x0.shape[0])
    eps = jax.random.normal(eps_key, x0.shape, x0.dtype)
    xt = sde.marginal(x0, t, eps)
    residual = _expand(sde.sigma(t), x0) * score(xt, t) + eps
    return jnp.mean(residual.reshape(x0.shape[0], -1) ** 2, axis=1)
