"""Expectations under π*(θ) by self-normalised weights on points placed by its Laplace approximation,
independent of Langevin: the reference θ of a potential without closed forms (docs/bilevel.md).

    ŵ = argmin_w V(w, θ) (Newton's method),  H = ∇²_w V(ŵ, θ),  w_i = ŵ + L u_i (L Lᵀ = H⁻¹),
    E_{π*(θ)}[f] ≈ Σ_i ω_i f(w_i) / Σ_i ω_i,  ω_i ∝ exp(−V(w_i, θ)) / q(u_i).

The points u_i are either a regular grid on [−R, R]^d with q uniform (the midpoint rule: exponentially
accurate for the smooth, fast-decaying integrands here; d ≤ 3), or normal draws of scale κ with q their
density (importance sampling; any d, error ∝ 1/√ESS). The u_i are fixed, so an estimate is a smooth
function of θ and a root-finder sees no noise. Valid for a unimodal π*(θ) (V convex in w, as a
log-concave likelihood with a Gaussian prior gives) that the points cover: `Weighted.ess`, the
effective sample size (Σω)²/Σω², says how well.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import optimize

NEWTON_STEPS = 25  # quadratic convergence from w = 0 for the strongly convex V of `bayes`
GRID_MAX_DIM = 3  # a grid of GRID_N^d points up to this d, normal draws above
GRID_N, GRID_HALF_WIDTH = 61, 10.0  # spacing 1/3 of a Laplace standard deviation, 10 of them each side
DRAWS, KAPPA = 2**18, 1.5  # importance sampling: the proposal N(ŵ, κ² H⁻¹), wider than π* in its tails


class Points(NamedTuple):
    u: np.ndarray  # [d, N] in the Laplace approximation's standard coordinates
    log_q: np.ndarray  # [N] log of their density, up to a constant


class Weighted(NamedTuple):
    w: jax.Array  # [d, N] the points w_i
    weights: jax.Array  # [N] self-normalised ω_i (sum 1)

    @property
    def ess(self) -> jax.Array:
        return 1.0 / jnp.sum(self.weights**2)


def points(dim: int, seed: int = 0) -> Points:
    """The grid for d ≤ GRID_MAX_DIM, else DRAWS normal draws of scale KAPPA from key `seed`."""
    if dim <= GRID_MAX_DIM:
        axis = np.linspace(-GRID_HALF_WIDTH, GRID_HALF_WIDTH, GRID_N)
        u = np.stack(np.meshgrid(*[axis] * dim, indexing="ij")).reshape(dim, -1)
        return Points(u, np.zeros(u.shape[1]))
    u = KAPPA * np.asarray(jax.random.normal(jax.random.key(seed), (dim, DRAWS)))
    return Points(u, -0.5 * np.sum(u**2, axis=0) / KAPPA**2)


def laplace(potential, theta: jax.Array, dim: int) -> tuple[jax.Array, jax.Array]:
    """(ŵ [d], H [d, d]): the mode of π*(θ) by Newton's method from 0 and the Hessian of V there."""
    energy = lambda w: potential(w, theta)  # noqa: E731 - w [d] -> []
    hessian = jax.hessian(energy)

    def newton(_, w):
        return w - jnp.linalg.solve(hessian(w), jax.grad(energy)(w))

    w = jax.lax.fori_loop(0, NEWTON_STEPS, newton, jnp.zeros(dim))
    return w, hessian(w)


def weighted(potential, theta: jax.Array, pts: Points) -> Weighted:
    """The points w_i = ŵ + L u_i at θ with their weights ω_i."""
    mode, h = laplace(potential, theta, pts.u.shape[0])
    w = mode[:, None] + jnp.linalg.cholesky(jnp.linalg.inv(h)) @ pts.u
    return Weighted(w, jax.nn.softmax(-potential(w, theta) - pts.log_q))


def objective_gradient(potential, reward: Callable | None, draws: Weighted, theta: jax.Array) -> jax.Array:
    """∇ℓ(θ) under the weights: E[∇θV] for the evidence (`reward` None), Cov[R, ∇θV] for a reward — the
    expectations of Γ_evidence and Γ_reward at π*(θ), each one reverse pass as in `estimators`."""
    coef = draws.weights
    if reward is not None:
        r = reward(draws.w)
        coef = coef * (r - jnp.sum(coef * r))
    return jax.grad(lambda th: jnp.sum(coef * potential(draws.w, th)))(theta)


def optimum(potential, reward: Callable | None, dim: int, bracket: tuple[float, float]) -> tuple[float, float]:
    """(θ_ref, the effective sample size there): the root of the scalar θ's `objective_gradient` in
    `bracket` (brentq to 1e-6)."""
    pts = points(dim)

    @jax.jit
    def slope_and_ess(t):
        theta = jnp.reshape(t, (1,))
        draws = weighted(potential, theta, pts)
        return objective_gradient(potential, reward, draws, theta)[0], draws.ess

    theta = optimize.brentq(lambda t: float(slope_and_ess(t)[0]), *bracket, xtol=1e-6)
    return theta, float(slope_and_ess(theta)[1])
