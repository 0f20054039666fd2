"""The unadjusted Langevin algorithm (ULA), the sampling operator Σ of the Langevin experiments.

x ← x − γ ∇_x U(x) + √(2γ) ξ,  ξ ∼ N(0, I)   (discretisation of eq. 3, paper §2.2).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Energy = Callable[[jax.Array], jax.Array]  # U(x) for x of shape [d, B] -> [B]


def ula_step(energy: Energy, x: jax.Array, key: jax.Array, gamma: float) -> jax.Array:
    """One ULA step for a batch x of shape [d, B]."""
    drift = jax.grad(lambda y: jnp.sum(energy(y)))(x)
    return x - gamma * drift + jnp.sqrt(2.0 * gamma) * jax.random.normal(key, x.shape, x.dtype)


def ula_chain(energy: Energy, x: jax.Array, key: jax.Array, gamma: float, n_steps: int, first: int = 0) -> jax.Array:
    """`n_steps` ULA steps in one `lax.scan`; step t draws its noise from fold_in(key, first + t)."""

    def body(y, t):
        return ula_step(energy, y, jax.random.fold_in(key, t), gamma), None

    x, _ = jax.lax.scan(body, x, jnp.arange(first, first + n_steps))
    return x
