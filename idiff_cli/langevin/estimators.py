"""Implicit gradient estimators Γ(p, θ) for Langevin processes (paper §3.2, talk: "Example: Langevin").

Each takes a batch x ~ p of shape [d, B] and returns an array shaped like θ. Each is one reverse pass
through V: the covariance and the means are gradients of a scalar average.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def reward_gradient(potential, reward, x: jax.Array, theta: jax.Array) -> jax.Array:
    """Γ_reward(p, θ) = Cov_{X∼p}[R(X), ∇_θ V(X, θ)], the gradient of ℓ(θ) = −E_{π*(θ)}[R] at p = π*(θ).

    Cov[R, ∇V] = E[(R − E R) ∇V], so Γ = ∇_θ mean((R − R̄) V(X, θ)). R need not be differentiable.
    """
    r = reward(x)
    r = jax.lax.stop_gradient(r - jnp.mean(r))
    return jax.grad(lambda th: jnp.mean(r * potential(x, th)))(theta)


def reference_gradient(potential, x: jax.Array, x_ref: jax.Array, theta: jax.Array) -> jax.Array:
    """Γ_ref(p, θ) = E_{p_ref}[∇_θ V(X, θ)] − E_p[∇_θ V(X, θ)], the gradient of KL(p_ref ‖ π*(θ))."""
    return jax.grad(lambda th: jnp.mean(potential(x_ref, th)) - jnp.mean(potential(x, th)))(theta)


def evidence_gradient(potential, x: jax.Array, theta: jax.Array) -> jax.Array:
    """Γ_evidence(p, θ) = E_{X∼p}[∇_θ V(X, θ)], the gradient of ℓ(θ) = −log Z_θ at p = π*(θ) (Definition 3.1).

    ∇_θ log Z_θ = −E_{π*(θ)}[∇_θ V] (Fisher's identity). With V(w, θ) = −log p(y, w | θ), Z_θ is the
    marginal likelihood p(y | θ): V must keep every term that depends on θ (the prior's normaliser).
    """
    return jax.grad(lambda th: jnp.mean(potential(x, th)))(theta)
