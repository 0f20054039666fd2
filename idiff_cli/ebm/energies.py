"""Energies V(x, θ) trained by `idiff ebm-train --energy` (kind "energy").

    wells  the seven-well Gaussian mixture of Appendix A.1, θ ∈ R⁷ the logits of its weights
    mlp    a Flax Linen MLP f_θ plus a fixed confining term: V(x, θ) = f_θ(x) + ‖x‖² / (2 s0²)

Like every potential, an energy maps x [d, ...] and θ to energies [...]. An energy with `init(key)`
draws its own initial θ (a parameter pytree); the others start from --theta0.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from idiff_cli import registry
from idiff_cli.registry import register


class MLP(nn.Module):
    """[N, d] -> [N]: swish hidden layers, a scalar output layer initialised to zero."""

    hidden: tuple[int, ...]

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        for width in self.hidden:
            z = nn.swish(nn.Dense(width)(z))
        return nn.Dense(1, kernel_init=nn.initializers.zeros)(z)[:, 0]


@dataclasses.dataclass(frozen=True)
class MLPEnergy:
    """V(x, θ) = f_θ(x) + ‖x‖²/(2 s0²).

    The zero output layer makes π*(θ_init) exactly N(0, s0² I), a known starting density; the
    quadratic term keeps exp(−V) integrable whatever f_θ learns (swish grows at most linearly).
    """

    hidden: tuple[int, ...] = (64, 64)
    base_scale: float = 3.0  # s0
    dim: int = 2

    @property
    def module(self) -> MLP:
        return MLP(self.hidden)

    def init(self, key: jax.Array):
        return self.module.init(key, jnp.zeros((1, self.dim)))

    def __call__(self, x: jax.Array, params) -> jax.Array:
        points = x.reshape(self.dim, -1).T  # [N, d]
        f = self.module.apply(params, points).reshape(x.shape[1:])
        return f + jnp.sum(x**2, axis=0) / (2 * self.base_scale**2)


register("energy", "wells", registry.get("potential", "seven-wells"))
register("energy", "mlp", MLPEnergy())
