"""Noise processes of denoising diffusion, all of the variance-preserving form

    dX_t = −½ β(t) X_t dt + √β(t) dB_t,    X_t | X_0 ~ N(α(t) X_0, σ(t)² I),   α² + σ² = 1,

behind one interface: `alpha`, `sigma` (the marginal), `drift`, `diffusion`, `beta`, the time range
[t_min, t_max], the time grid of the samplers and the distribution of training times.

* `OrnsteinUhlenbeck`: dX = −X dt + √2 dB (β = 2), α = e^{−t} — paper §2.2 and Table 1 (MNIST).
* `Cosine`: ᾱ(t) = α(t)² = f(t)/f(0), f(t) = cos²((t + s)/(1 + s) · π/2), s = 0.008 — Nichol & Dhariwal
  (2021), Table 3 (CIFAR-10, LSUN); t ∈ [0, 1], stopped at t_max = 0.99 where β(t) → ∞.

Times are warped by `rho`: the sampler grid is t_k = t_min + (t_max − t_min)·(1 − k/N)^rho and training
times are t_min + (t_max − t_min)·u^rho with u uniform, so with rho = 2 (OU) steps and training effort
concentrate at low noise, where the images form. The processes are frozen dataclasses: hashable, so
they close over jitted functions as static configuration.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from idiff_cli.registry import register


def _expand(v: jax.Array, x: jax.Array) -> jax.Array:
    """Broadcasts per-example values v [B] (or a scalar) against x [B, ...]."""
    v = jnp.asarray(v)
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


class NoiseProcess:
    """The interface; subclasses define `alpha`, `beta` and the time range."""

    t_min: float
    t_max: float
    rho: float

    def alpha(self, t):
        raise NotImplementedError  # pragma: no cover - abstract

    def beta(self, t):
        raise NotImplementedError  # pragma: no cover - abstract

    def sigma(self, t):
        return jnp.sqrt(1.0 - self.alpha(t) ** 2)

    def drift(self, x: jax.Array, t) -> jax.Array:
        """f(x, t) = −½ β(t) x."""
        return -0.5 * _expand(self.beta(t), x) * x

    def diffusion(self, t):
        """g(t) = √β(t)."""
        return jnp.sqrt(self.beta(t))

    def marginal(self, x0: jax.Array, t, eps: jax.Array) -> jax.Array:
        """A sample of X_t given X_0 = x0: α(t) x0 + σ(t) ε."""
        return _expand(self.alpha(t), x0) * x0 + _expand(self.sigma(t), x0) * eps

    def prior_sample(self, key: jax.Array, shape) -> jax.Array:
        """The reverse process starts from N(0, I) (σ(t_max) ≈ 1)."""
        return jax.random.normal(key, shape)

    def time_grid(self, n_steps: int) -> jax.Array:
        """n_steps + 1 decreasing times from t_max to t_min."""
        u = 1.0 - jnp.arange(n_steps + 1) / n_steps
        return self.t_min + (self.t_max - self.t_min) * u**self.rho

    def sample_time(self, key: jax.Array, n: int) -> jax.Array:
        """Training times [n], warped like the sampler grid."""
        u = jax.random.uniform(key, (n,))
        return self.t_min + (self.t_max - self.t_min) * u**self.rho

    def noise_level(self, t):
        """The network's time input, in [0, 1]."""
        return t / self.t_max


@dataclasses.dataclass(frozen=True)
class OrnsteinUhlenbeck(NoiseProcess):
    """dX = −X dt + √2 dB: α(t) = e^{−t}, σ(t)² = 1 − e^{−2t} (paper §2.2, Table 1)."""

    t_min: float = 1e-3
    t_max: float = 5.0  # α(5) = 0.0067: X_T is N(0, I) up to 0.7% of the data
    rho: float = 2.0

    def alpha(self, t):
        return jnp.exp(-jnp.asarray(t))

    def sigma(self, t):
        return jnp.sqrt(-jnp.expm1(-2.0 * jnp.asarray(t)))

    def beta(self, t):
        return jnp.full(jnp.shape(t), 2.0)


@dataclasses.dataclass(frozen=True)
class Cosine(NoiseProcess):
    """The cosine schedule of Nichol & Dhariwal (2021) in continuous time (Table 3)."""

    t_min: float = 1e-3
    t_max: float = 0.99  # β(0.99) ≈ 200; α(0.99) = 0.016
    rho: float = 1.0
    s: float = 0.008

    @property
    def _a0(self) -> float:
        return self.s / (1.0 + self.s) * (math.pi / 2)

    def _angle(self, t):
        return (jnp.asarray(t) + self.s) / (1.0 + self.s) * (math.pi / 2)

    def alpha(self, t):
        return jnp.cos(self._angle(t)) / math.cos(self._a0)

    def sigma(self, t):
        # 1 − ᾱ = (cos²a0 − cos²a)/cos²a0 = sin(a − a0) sin(a + a0)/cos²a0: no cancellation at small t
        a, a0 = self._angle(t), self._a0
        return jnp.sqrt(jnp.sin(a - a0) * jnp.sin(a + a0)) / math.cos(a0)

    def beta(self, t):
        # −d/dt log ᾱ(t) = 2 tan(angle) · π / (2 (1 + s))
        return jnp.tan(self._angle(t)) * math.pi / (1.0 + self.s)


register("sde", "ou", OrnsteinUhlenbeck)
register("sde", "cosine", Cosine)
