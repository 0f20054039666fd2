"""Potentials V(x, θ) of Gibbs measures π*(θ) ∝ exp(−V(·, θ)) (paper eq. 4).

A potential maps x of shape [d, ...] and θ of shape [p] to energies of shape [...]. Mixture
potentials also expose their exact normalised log-density, used by the log-likelihood metric.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from idiff_cli.errors import UserError, first_line
from idiff_cli.registry import register


@dataclasses.dataclass(frozen=True)
class GaussianMixture:
    """V(x, θ) = −log Σ_i softmax(θ)_i exp(−‖x − c_i‖² / (2 s²))  (Appendix A.1).

    Each well is an isotropic Gaussian N(c_i, s² I), so π*(θ) is exactly the mixture with weights
    softmax(θ) and Z = (2π s²)^{d/2} does not depend on θ.
    """

    centres: tuple[tuple[float, ...], ...]  # [K, d]
    scale: float  # s

    @property
    def dim(self) -> int:
        return len(self.centres[0])

    @property
    def n_params(self) -> int:
        return len(self.centres)

    def _component_logits(self, x: jax.Array, theta: jax.Array) -> jax.Array:
        """log softmax(θ)_i − ‖x − c_i‖²/(2s²), shape [K, ...]."""
        c = jnp.asarray(self.centres, dtype=x.dtype)  # [K, d]
        extra = (1,) * (x.ndim - 1)
        sq = sum((x[j][None] - c[:, j].reshape((-1,) + extra)) ** 2 for j in range(self.dim))
        log_w = jax.nn.log_softmax(theta).reshape((-1,) + extra)
        return log_w - sq / (2 * self.scale**2)

    def __call__(self, x: jax.Array, theta: jax.Array) -> jax.Array:
        return -jax.nn.logsumexp(self._component_logits(x, theta), axis=0)

    def log_density(self, x: jax.Array, theta: jax.Array) -> jax.Array:
        """log π*(θ)[x], exactly normalised."""
        return -self(x, theta) - 0.5 * self.dim * math.log(2 * math.pi * self.scale**2)

    def sample(self, key: jax.Array, theta: jax.Array, n: int) -> jax.Array:
        """n exact draws from π*(θ), shape [d, n] (components by inverse CDF: one uniform per draw)."""
        k_comp, k_noise = jax.random.split(key)
        cdf = jnp.cumsum(jax.nn.softmax(theta))
        comp = jnp.minimum(jnp.searchsorted(cdf, jax.random.uniform(k_comp, (n,)) * cdf[-1]), len(self.centres) - 1)
        c = jnp.asarray(self.centres)[comp].T  # [d, n]
        return c + self.scale * jax.random.normal(k_noise, (self.dim, n))


def hexagon(radius: float) -> tuple[tuple[float, float], ...]:
    """The vertices (r cos kπ/3, r sin kπ/3), k = 0..5: (r,0), (r/2, r√3/2), ... ."""
    angles = np.arange(6) * np.pi / 3
    return tuple((float(radius * np.cos(a)), float(radius * np.sin(a))) for a in angles)


def grad_x(potential, x: jax.Array, theta: jax.Array) -> jax.Array:
    """∇_x V(x, θ) for a batch x of shape [d, B]."""
    return jax.grad(lambda y: jnp.sum(potential(y, theta)))(x)


# The authors' released implementation (made the paper's figures): radius 4, unit-variance wells.
register("potential", "hexagon", GaussianMixture(hexagon(4.0), 1.0))
# The text of Appendix A.1: unit radius, exp(−‖x − μ_i‖²), i.e. s² = 1/2.
register("potential", "hexagon-paper", GaussianMixture(hexagon(1.0), math.sqrt(0.5)))
# "Training from scratch" (Appendix A.1, Figs 11-12): the six wells of `hexagon` and a 7th at the origin.
register("potential", "seven-wells", GaussianMixture(hexagon(4.0) + ((0.0, 0.0),), 1.0))


def probe(fn, name: str, what: str, x: jax.Array, *theta: Any) -> None:
    """One-line UserError unless `fn` (a potential or energy V(x, θ), or a reward R(x) when no θ) maps
    x [d, B] (and θ) to [B] values with a gradient in x: a plug-in checked on the real shapes before a
    run starts (jax.eval_shape, no computation)."""
    shapes = f"x [{', '.join(map(str, x.shape))}]" + (" and the run's θ" if theta else "")
    try:
        out = jax.eval_shape(fn, x, *theta)
        jax.eval_shape(jax.grad(lambda y: jnp.sum(fn(y, *theta))), x)
    except Exception as e:  # the user's code: its failure in one line
        raise UserError(f"{what} '{name}' fails on {shapes}: {type(e).__name__}: {first_line(e)}") from None
    if getattr(out, "shape", None) != (x.shape[1],):
        raise UserError(f"{what} '{name}' must map {shapes} to [{x.shape[1]}] values (one per point); it gives "
                        f"{getattr(out, 'shape', type(out).__name__)}")
