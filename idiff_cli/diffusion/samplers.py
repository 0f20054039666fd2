"""Samplers of the reverse process, each one pure step over a fixed decreasing time grid.

With a score s(x, t) ≈ ∇ log p_t(x) and the process dX = −½β X dt + √β dB (sde.py), one step goes
from t = grid[k] to t' = grid[k + 1] (h = t − t' > 0):

* `euler-maruyama`: the reverse SDE dY = [½β Y + β s] dt + √β dB (paper eq. 5 for OU, β = 2):
  y' = y + (½β y + β s) h + √(β h) ξ.
* `probability-flow`: Euler on the ODE dY = [½β Y + ½β s] dt: y' = y + ½β (y + s) h.
* `ddpm`: ancestral sampling (Ho et al. 2020) with the step's own coefficients
  a² = ᾱ(t)/ᾱ(t'), b = 1 − a²: y' = (y + b s)/a + √(b (1 − ᾱ(t'))/(1 − ᾱ(t))) ξ.

The stochastic steps are `GaussianStep`s: their `moments` give the mean and standard deviation of the
Gaussian transition y -> y' from the score's value at y, which is what the Girsanov KL between two
scores' chains needs (implicit/girsanov.py). `Sampler.stochastic` says whether a sampler's step is one.

A `Sampler` bundles a step with its process and grid: `init(key, shape)` draws y_{t_max}, `step(score, y, k, key)`
advances by step k, `finalize(score, y)` returns the Tweedie denoised mean (y + σ² s)/α at t_min, and
`sample(...)` scans all steps. Step k uses the key `fold_in(key, k)`, so the same key under different
parameters gives the "same seed" trajectories of the paper's figures; finetuning methods call `step`
directly (one sampling step per outer step, Algorithm 2).

A score is a function `score(y [B, ...], t [B]) -> [B, ...]`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from idiff_cli.diffusion.sde import NoiseProcess, _expand
from idiff_cli.registry import register

Score = Callable[[jax.Array, jax.Array], jax.Array]


def euler_maruyama_moments(sde: NoiseProcess, s: jax.Array, y: jax.Array, t, t_next):
    """y' ~ N(y + (½β y + β s) h, β h) given s = s(y, t)."""
    h = t - t_next
    beta = sde.beta(t)
    return y + (0.5 * beta * y + beta * s) * h, jnp.sqrt(beta * h)


def probability_flow_step(sde: NoiseProcess, score: Score, y: jax.Array, t, t_next, key: jax.Array) -> jax.Array:
    del key  # deterministic
    h = t - t_next
    beta = sde.beta(t)
    return y + 0.5 * beta * (y + score(y, jnp.full(y.shape[:1], t))) * h


def ddpm_moments(sde: NoiseProcess, s: jax.Array, y: jax.Array, t, t_next):
    """y' ~ N((y + b s)/√(1 − b), b σ(t')²/σ(t)²) given s = s(y, t), with 1 − b = α(t)²/α(t')²."""
    a = sde.alpha(t) / sde.alpha(t_next)
    b = jnp.minimum(1.0 - a**2, 0.999)  # Nichol & Dhariwal's clip of β_t
    var = b * sde.sigma(t_next) ** 2 / sde.sigma(t) ** 2  # posterior variance β̃
    return (y + b * s) / jnp.sqrt(1.0 - b), jnp.sqrt(var)


@dataclasses.dataclass(frozen=True)
class GaussianStep:
    """A stochastic step whose transition is Gaussian given the score's value s = s(y, t) at the current
    state: y' ~ N(mean, std² I) with (mean [B, ...], std [] or [B]) = `moments(sde, s, y, t, t_next)`, a
    std of 0 marking a deterministic step. Called as a step function, it evaluates the score once and
    draws y' = mean + std ξ; the Girsanov KL reads the transition's mean and std from `moments`.

    With `split_axis`, a step called inside `shard_map` with that mesh axis manual, on one device's
    rows of a batch split evenly along it, draws those rows of the whole batch's ξ: a row's path does
    not depend on how the batch is split (the device's rows are cut from the whole draw, which costs
    one batch of normals per device and step)."""

    moments: Callable
    __name__: str
    split_axis: str | None = None

    def __call__(self, sde: NoiseProcess, score: Score, y: jax.Array, t, t_next, key: jax.Array) -> jax.Array:
        mean, std = self.moments(sde, score(y, jnp.full(y.shape[:1], t)), y, t, t_next)
        return mean + _expand(std, y) * self.noise(key, y)

    def noise(self, key: jax.Array, y: jax.Array) -> jax.Array:
        """ξ ~ N(0, I) shaped like y [B, ...]: this device's rows of the whole batch's draw when y is a
        part of a batch split along `split_axis`."""
        if self.split_axis is None or self.split_axis not in jax.sharding.get_abstract_mesh().manual_axes:
            return jax.random.normal(key, y.shape, y.dtype)
        rows = y.shape[0]
        whole = jax.random.normal(key, (rows * jax.lax.axis_size(self.split_axis), *y.shape[1:]), y.dtype)
        return jax.lax.dynamic_slice_in_dim(whole, jax.lax.axis_index(self.split_axis) * rows, rows)


euler_maruyama_step = GaussianStep(euler_maruyama_moments, "euler_maruyama_step")
ddpm_step = GaussianStep(ddpm_moments, "ddpm_step")

StepFn = Callable[[NoiseProcess, Score, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Sampler:
    """`n_steps` steps of `step_fn` on `sde.time_grid(n_steps)`; hashable (a static jit argument).

    `step_fn(sde, score, y, t, t_next, key)` is one of the steps above, registered as kind "sampler",
    or a user's function of the same signature.
    """

    sde: NoiseProcess
    n_steps: int
    step_fn: StepFn = euler_maruyama_step
    denoise_final: bool = True

    @property
    def stochastic(self) -> bool:
        """Whether each step is a Gaussian transition (a GaussianStep, declaring its mean and std), so that the
        Girsanov KL (implicit/girsanov.py) and DDPO's policy (implicit/ddpo.py) apply; probability-flow, ddim
        and a user's plain step function are deterministic maps."""
        return isinstance(self.step_fn, GaussianStep)

    @property
    def grid(self) -> jax.Array:
        return self.sde.time_grid(self.n_steps)

    def init(self, key: jax.Array, shape) -> jax.Array:
        return self.sde.prior_sample(key, shape)

    def step(self, score: Score, y: jax.Array, k, key: jax.Array) -> jax.Array:
        """Step k (0 ≤ k < n_steps): from grid[k] to grid[k + 1]; `key` is used as given."""
        grid = self.grid
        return self.step_fn(self.sde, score, y, grid[k], grid[k + 1], key)

    def finalize(self, score: Score, y: jax.Array) -> jax.Array:
        """Tweedie's denoised mean E[X_0 | X_{t_min} = y] = (y + σ² s)/α, or y itself."""
        if not self.denoise_final:
            return y
        t = self.sde.t_min
        s = score(y, jnp.full(y.shape[:1], t))
        return (y + self.sde.sigma(t) ** 2 * s) / self.sde.alpha(t)

    def sample(self, score: Score, key: jax.Array, shape, trajectory_every: int = 0, init: jax.Array | None = None):
        """Runs all steps from y ~ N(0, I) (or from `init` [shape], the same key then driving the steps);
        returns x0 [shape], and with `trajectory_every` > 0 also the states after every that many steps
        [n_steps // trajectory_every, *shape]."""
        init_key, step_key = jax.random.split(key)

        def body(y, k):
            y = self.step(score, y, k, jax.random.fold_in(step_key, k))
            keep = y if trajectory_every else None
            return y, keep

        y0 = self.init(init_key, shape) if init is None else init
        y, traj = jax.lax.scan(body, y0, jnp.arange(self.n_steps))
        x0 = self.finalize(score, y)
        if trajectory_every:
            return x0, traj[trajectory_every - 1 :: trajectory_every]
        return x0


register("sampler", "euler-maruyama", euler_maruyama_step)
register("sampler", "probability-flow", probability_flow_step)
register("sampler", "ddpm", ddpm_step)
