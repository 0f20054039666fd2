"""Bayesian linear regression in closed form (numpy, float64): the oracle of Algorithm 1 (paper §3.3) on
`bayes.LinearModel` with a Gaussian likelihood (noise σ) and the prior N(0, e^{2θ} I) (docs/bilevel.md).

    posterior  N(μ, A⁻¹),  A = XᵀX/σ² + e^{−2θ} I,  μ = A⁻¹Xᵀy/σ²
    evidence   log p(y | θ) = log N(y; 0, e^{2θ} XXᵀ + σ² I)
    held-out   J(θ) = E_{π*(θ)}[R] = −½ tr(P A⁻¹) − ½ μᵀPμ + bᵀμ + c for the reward
               R(w) = −½ wᵀPw + bᵀw + c, P = X'ᵀX'/(σ² m), b = X'ᵀy'/(σ² m)

ULA with step γ < 2/λ_max(A) has the Gaussian stationary law N(μ, S_γ), S_γ = (A − γA²/2)⁻¹, the
solution of S = (I − γA) S (I − γA) + 2γ I (γ = 0: the posterior). Under q = N(μ, S) the expectations
of the two estimators are (Gaussian moments: Cov(wᵀPw, wᵀw) = 2 tr(PS²) + 4 μᵀPSμ, Cov(bᵀw, wᵀw) = 2 bᵀSμ)

    E_q[Γ_evidence] = E_q[∂θV]        = d − e^{−2θ} (‖μ‖² + tr S)
    E_q[Γ_reward]   = Cov_q[R, ∂θV]   = e^{−2θ} (tr(P S²) + 2 (Pμ − b)ᵀ S μ).

At γ = 0 they are the slopes of the losses ℓ(θ) = −log p(y | θ) and −J(θ), whose roots θ* are the
optima; at γ > 0 their roots θ*_γ are where Algorithm 1 with ULA step γ settles.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize

from idiff_cli.langevin.bayes import Gaussian, LinearModel

XTOL = 1e-12  # root tolerance of θ*: far below the 1e-8 the docs promise


class Conjugate:
    """The closed forms of the module docstring for one `LinearModel` with a Gaussian likelihood; θ is a float."""

    def __init__(self, model: LinearModel):
        if not isinstance(model.likelihood, Gaussian):
            raise ValueError("closed forms need the Gaussian likelihood")
        s2 = model.likelihood.noise**2
        self.x, self.y = np.asarray(model.features, float), np.asarray(model.targets, float)
        self.s2, self.dim = s2, model.dim
        x_val, y_val = np.asarray(model.val_features, float), np.asarray(model.val_targets, float)
        self.p, self.b = x_val.T @ x_val / (s2 * len(y_val)), x_val.T @ y_val / (s2 * len(y_val))
        self.c = -0.5 * y_val @ y_val / (s2 * len(y_val)) - 0.5 * math.log(2 * math.pi * s2)

    def law(self, theta: float, gamma: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """(μ [d], S_γ [d, d]): the stationary law of ULA with step γ on π*(θ) (γ = 0: the posterior)."""
        a = self.x.T @ self.x / self.s2 + math.exp(-2 * theta) * np.eye(self.dim)
        mu = np.linalg.solve(a, self.x.T @ self.y / self.s2)
        if gamma * np.linalg.eigvalsh(a)[-1] >= 2:
            raise ValueError(f"ULA with step {gamma} diverges at θ = {theta}: γ λ_max(A) ≥ 2")
        return mu, np.linalg.inv(a - 0.5 * gamma * a @ a)

    def loss(self, objective: str, theta: float) -> float:
        """ℓ(θ): −log p(y | θ) (from the marginal N(y; 0, e^{2θ}XXᵀ + σ²I)) or −J(θ)."""
        if objective == "evidence":
            cov = math.exp(2 * theta) * self.x @ self.x.T + self.s2 * np.eye(len(self.y))
            return 0.5 * (self.y @ np.linalg.solve(cov, self.y) + np.linalg.slogdet(cov)[1]
                          + len(self.y) * math.log(2 * math.pi))
        mu, cov = self.law(theta)
        return 0.5 * np.trace(self.p @ cov) + 0.5 * mu @ self.p @ mu - self.b @ mu - self.c

    def slope(self, objective: str, theta: float, gamma: float = 0.0) -> float:
        """E_q[Γ] under ULA's stationary law q (γ = 0: ℓ'(θ))."""
        mu, s = self.law(theta, gamma)
        if objective == "evidence":
            return self.dim - math.exp(-2 * theta) * (mu @ mu + np.trace(s))
        return math.exp(-2 * theta) * (np.trace(self.p @ s @ s) + 2 * (self.p @ mu - self.b) @ s @ mu)

    def optimum(self, objective: str, gamma: float = 0.0) -> float:
        """θ*_γ, the root of `slope` (brentq, to XTOL): θ* in [−3, 3] (α ∈ [0.05, 20]), θ*_γ within 1 of θ*."""
        centre = 0.0 if gamma == 0 else self.optimum(objective)
        half = 3.0 if gamma == 0 else 1.0
        return optimize.brentq(lambda t: self.slope(objective, t, gamma), centre - half, centre + half, xtol=XTOL)
