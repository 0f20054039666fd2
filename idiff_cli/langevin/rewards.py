"""Rewards R(x) on points x of shape [d, ...] -> [...] (paper §5.1, Appendix A.1).

Implicit Diffusion only evaluates R, so R may be discontinuous; the guidance baseline needs a
differentiable surrogate, `smooth`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from idiff_cli.registry import register


@dataclasses.dataclass(frozen=True)
class CornerReward:
    """R(x) = 1(x_0 ≥ 0) · exp(−‖x − μ‖²/τ) / α;  smooth: sigmoid(x_0/t) · exp(−‖x − μ‖²/τ) / α_s."""

    centre: tuple[float, float]
    tau: float
    alpha: float
    smooth_temperature: float
    smooth_alpha: float

    def _bump(self, x: jax.Array) -> jax.Array:
        return jnp.exp(-((x[0] - self.centre[0]) ** 2 + (x[1] - self.centre[1]) ** 2) / self.tau)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.where(x[0] >= 0, self._bump(x), 0.0) / self.alpha

    def smooth(self, x: jax.Array) -> jax.Array:
        return jax.nn.sigmoid(x[0] / self.smooth_temperature) * self._bump(x) / self.smooth_alpha


def smooth_version(reward):
    """The differentiable surrogate of `reward` (the reward itself for plug-ins)."""
    return getattr(reward, "smooth", reward)


# The authors' released implementation: μ = (4, 3.8), τ = 20, α = 2.5; smooth: t = 0.5, α_s = 0.7.
register("reward", "corner", CornerReward((4.0, 3.8), 20.0, 2.5, 0.5, 0.7))
# The text of Appendix A.1: R(x) = 1(x_1 > 0) exp(−‖x − μ‖²), μ = (1, 0.95).
register("reward", "corner-paper", CornerReward((1.0, 0.95), 1.0, 1.0, 0.5, 1.0))
