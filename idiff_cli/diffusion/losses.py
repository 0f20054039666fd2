"""The score of a noise-prediction network, and the denoising score matching loss.

The network predicts the noise ε of X_t = α(t) X_0 + σ(t) ε, so its score is s_θ(x, t) = −ε_θ(x, t)/σ(t)
(Tweedie: ∇ log p_t(x) = −E[ε | X_t = x]/σ(t)). Denoising score matching with the weight σ(t)²
(Vincent 2011; Song et al. 2021) is

    L(θ) = E_{t, X_0, ε} ‖σ(t) s_θ(X_t, t) + ε‖² / d  =  E ‖ε_θ(X_t, t) − ε‖² / d,

minimised by the true score ∇ log p_t; d is the number of pixels × channels. Times are drawn by
`sde.sample_time` (its warping only reweights the loss over t, so the minimiser is unchanged).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from idiff_cli.diffusion.sde import NoiseProcess, _expand


def score_function(apply_fn: Callable, sde: NoiseProcess) -> Callable:
    """s(params, x [B, ...], t [B], labels [B] or None) = −ε_θ(x, noise_level(t), labels)/σ(t)."""

    def score(params, x: jax.Array, t: jax.Array, labels: jax.Array | None = None) -> jax.Array:
        eps = apply_fn(params, x, sde.noise_level(t), labels)
        return -eps / _expand(sde.sigma(t), x)

    return score


def denoising_loss(score: Callable, sde: NoiseProcess, x0: jax.Array, key: jax.Array) -> jax.Array:
    """Per-example σ²-weighted denoising score matching loss [B] of `score(x_t, t)` on data x0 [B, ...]."""
    t_key, eps_key = jax.random.split(key)
    t = sde.sample_time(t_key, x0.shape[0])
    eps = jax.random.normal(eps_key, x0.shape, x0.dtype)
    xt = sde.marginal(x0, t, eps)
    residual = _expand(sde.sigma(t), x0) * score(xt, t) + eps
    return jnp.mean(residual.reshape(x0.shape[0], -1) ** 2, axis=1)
