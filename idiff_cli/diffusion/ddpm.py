"""The discrete DDPM noise process of a diffusers `DDPMScheduler` config, and its respaced samplers.

Training steps n = 0 … N − 1 with betas β_n (`linear`: evenly spaced from beta_start to beta_end;
`scaled_linear`: the squares of evenly spaced √β; `squaredcos_cap_v2`: β_n = min(1 − ᾱ(n+1)/ᾱ(n), 0.999)
with ᾱ(s) = cos²((s/N + 0.008)/1.008 · π/2); or `trained_betas`), ᾱ_n = Π_{m≤n} (1 − β_m) and

    x_n = √ᾱ_n x_0 + √(1 − ᾱ_n) ε                                        (Ho et al. 2020, eq. 4).

A sampler with T steps visits the respaced timesteps τ_0 > … > τ_{T−1} of diffusers' `set_timesteps(T)`
(`timestep_spacing` linspace / leading / trailing, `steps_offset`), then τ_T = −1 with ᾱ_{−1} = 1: the
time grid [τ_0, …, τ_{T−1}, −1]. `DiscreteDDPM` is a `NoiseProcess` on this grid: its "time" is the
training timestep (the network's input), α(t) = √ᾱ_t, σ(t) = √(1 − ᾱ_t), so a score
s(x, t) = −ε_θ(x, t)/σ(t) and the steps of samplers.py work unchanged.

The tables are diffusers' to the last bit: the betas of `linear` and `scaled_linear` are torch's float32
`linspace` (`torch_linspace`), ᾱ the products of the float32 factors 1 − β_m accumulated in float64 and
rounded once, as torch's CPU `cumprod` computes them (tests/test_ddpm_scheduler.py checks every entry
and every step of the 1,000-step chain against diffusers' own output).

Steps from t = τ_k to t' = τ_{k+1}, with a = ᾱ_t/ᾱ_t', b = 1 − a and x̂0 = `predicted_x0` (x − σ(t) ε)/α(t)
clipped to ±clip_sample_range when `clip_sample`:

* `ddpm_step` (ancestral, Ho et al. eq. 7 on the respaced chain, as `DDPMScheduler.step`): the
  `posterior_mean` √ᾱ_t' b/(1 − ᾱ_t) x̂0 + √a (1 − ᾱ_t')/(1 − ᾱ_t) x and the `posterior_variance`,
  `fixed_small` b (1 − ᾱ_t')/(1 − ᾱ_t) or `fixed_large` b; no noise from t = 0 nor, with `fixed_small`,
  into t' = −1 (variance 0). A `GaussianStep`: two parameters θ, θ0 give Gaussian transitions with the
  same variance v, whose KL is ‖Δmean‖²/2v (girsanov.py), Δmean taken between the two clipped x̂0.
  Without clipping the mean is (x + b s)/√a and the KL b² ‖sθ − sθ0‖²/(2 a v).
* DDIM (Song et al. 2021, as `DDIMScheduler.step`): x' = √ᾱ_t' x̂0 + √(1 − ᾱ_t' − σ_η²) ε̂ + σ_η ξ with
  σ_η² = η² (1 − ᾱ_t')/(1 − ᾱ_t) (1 − ᾱ_t/ᾱ_t') (the network's ε̂, x̂0 clipped; `ddim_moments`), where
  the discrete chain's t' is t − N // T, not the next grid element: the two agree for `leading` spacing;
  for `linspace` and `trailing` DDIM lands between grid elements and the next step starts from the next
  one, as in diffusers. Below 0, ᾱ is 1, or ᾱ_0 when the config's `set_alpha_to_one` is false (SD's
  schedulers). η = 0 is deterministic (`DDIMStep`); η > 0 a Gaussian transition like the ancestral
  step's (`GaussianStep(DDIMMoments)`). On the continuous processes of sde.py the sampler "ddim"
  (`ddim_step`) steps to the next grid element.

The process is a frozen dataclass (hashable: a static jit argument); its tables are float32 numpy arrays
computed from the config fields.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from idiff_cli.diffusion.samplers import GaussianStep, Sampler, Score
from idiff_cli.diffusion.sde import NoiseProcess, _expand
from idiff_cli.errors import UserError
from idiff_cli.registry import register

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "linspace", "trailing")
VARIANCES = ("fixed_small", "fixed_large")
PREDICTIONS = ("epsilon", "v_prediction")


def torch_linspace(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=float32) on a CPU, bit for bit [n]: the step
    (end − start)/(n − 1) in float32, then start + step · i for the first n // 2 entries and
    end − step · (n − 1 − i) for the others, each a fused multiply-add (one rounding to float32; the
    product of a float32 and an integer below 2²⁴ is exact in float64)."""
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    values = np.where(i < n // 2, np.float64(start32) + step * i, np.float64(end32) - step * (n - 1 - i))
    return values.astype(np.float32)


def make_betas(num_train_timesteps: int, beta_schedule: str, beta_start: float, beta_end: float) -> np.ndarray:
    """β_n [N] float32 of a named schedule, as diffusers computes them (module docstring)."""
    n = num_train_timesteps
    if beta_schedule == "linear":
        return torch_linspace(beta_start, beta_end, n)
    if beta_schedule == "scaled_linear":
        return torch_linspace(beta_start**0.5, beta_end**0.5, n) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        def abar(s):
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], np.float32)
    raise ValueError(f"unknown beta schedule {beta_schedule!r}; supported: {', '.join(BETA_SCHEDULES)}")


def respaced_timesteps(num_train_timesteps: int, n_steps: int, spacing: str, steps_offset: int) -> np.ndarray:
    """The T = n_steps decreasing training timesteps of diffusers' `set_timesteps` [T] int64. UserError
    when they leave the chain: more steps than training timesteps, or `leading` spacing whose
    steps_offset pushes the first one to N or beyond (diffusers fails there too, at the first step)."""
    n = num_train_timesteps
    if n_steps > n:
        raise UserError(f"{n_steps} sampling steps exceed the model's {n} training timesteps")
    if spacing == "linspace":
        return np.linspace(0, n - 1, n_steps).round()[::-1].astype(np.int64)
    if spacing == "leading":
        steps = (np.arange(n_steps) * (n // n_steps)).round()[::-1].astype(np.int64) + steps_offset
        if steps[0] >= n:
            fits = max(k for k in range(1, n_steps) if (k - 1) * (n // k) + steps_offset < n)
            raise UserError(f"{n_steps} sampling steps of leading spacing with steps_offset {steps_offset} start at "
                            f"timestep {steps[0]}, past the model's last training timestep {n - 1}; use at most "
                            f"{fits} steps")
        return steps
    if spacing == "trailing":
        return np.round(np.arange(n, 0, -n / n_steps)).astype(np.int64) - 1
    raise ValueError(f"unknown timestep spacing {spacing!r}; supported: {', '.join(SPACINGS)}")


@dataclasses.dataclass(frozen=True)
class DiscreteDDPM(NoiseProcess):
    """The noise process of a `DDPMScheduler` config (module docstring); times are training timesteps."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    trained_betas: tuple[float, ...] = ()
    prediction_type: str = "epsilon"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    variance_type: str = "fixed_small"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    rho: float = 1.0

    @property
    def t_min(self) -> float:
        return 0.0

    @property
    def t_max(self) -> float:
        return float(self.num_train_timesteps - 1)

    @functools.cached_property
    def betas(self) -> np.ndarray:
        if self.trained_betas:
            return np.asarray(self.trained_betas, np.float32)
        return make_betas(self.num_train_timesteps, self.beta_schedule, self.beta_start, self.beta_end)

    @functools.cached_property
    def alphas_cumprod(self) -> np.ndarray:
        """ᾱ_n [N] float32: the float32 factors 1 − β_m multiplied in float64, rounded once (as torch)."""
        return np.cumprod((1.0 - self.betas).astype(np.float32), dtype=np.float64).astype(np.float32)

    def abar(self, t) -> jax.Array:
        """ᾱ_t at timesteps t (any shape; t = −1 gives 1): the respaced chain's table."""
        table = jnp.asarray(np.concatenate([[1.0], self.alphas_cumprod]).astype(np.float32))
        return table[jnp.round(jnp.asarray(t)).astype(jnp.int32) + 1]

    def alpha(self, t):
        return jnp.sqrt(self.abar(t))

    def sigma(self, t):
        return jnp.sqrt(1.0 - self.abar(t))

    def beta(self, t):
        """β_t = 1 − ᾱ_t/ᾱ_{t−1}, per training step: the rate of the VP SDE the chain discretises."""
        return 1.0 - self.abar(t) / self.abar(jnp.asarray(t) - 1)

    def time_grid(self, n_steps: int) -> jax.Array:
        """[τ_0, …, τ_{T−1}, −1] for T = n_steps (module docstring)."""
        steps = respaced_timesteps(self.num_train_timesteps, n_steps, self.timestep_spacing, self.steps_offset)
        return jnp.asarray(np.append(steps, -1), jnp.float32)

    def sample_time(self, key: jax.Array, n: int) -> jax.Array:
        """Uniform training timesteps [n] (Ho et al. 2020, Algorithm 1)."""
        return jax.random.randint(key, (n,), 0, self.num_train_timesteps).astype(jnp.float32)

    def noise_level(self, t):
        """The network's input is the timestep itself."""
        return t

    def ddim_abar(self, t) -> jax.Array:
        """ᾱ_t of DDIM's target timestep t ≥ −1: below 0, 1 or ᾱ_0 (`set_alpha_to_one`)."""
        final = 1.0 if self.set_alpha_to_one else float(self.alphas_cumprod[0])
        return jnp.where(jnp.asarray(t) < 0, jnp.float32(final), self.abar(jnp.maximum(t, 0)))

    def sampler(self, n_steps: int, name: str, eta: float = 0.0) -> Sampler:
        """`n_steps` respaced steps of "ddpm" (ancestral) or "ddim" with `eta` (`DDIMStep` for η = 0, else
        a `GaussianStep`); the last step lands on x_0. UserError when the respaced timesteps leave the
        chain (`respaced_timesteps`)."""
        if name not in DISCRETE_STEPS:
            raise ValueError(f"unknown sampler {name!r} of a discrete chain; supported: {', '.join(DISCRETE_STEPS)}")
        respaced_timesteps(self.num_train_timesteps, n_steps, self.timestep_spacing, self.steps_offset)
        stride = self.num_train_timesteps // n_steps
        if name == "ddpm":
            step = ddpm_step
        elif eta:
            step = GaussianStep(DDIMMoments(stride, float(eta)), "ddim_step")
        else:
            step = DDIMStep(stride)
        return Sampler(self, n_steps, step, denoise_final=False)


def predicted_x0(sde: NoiseProcess, eps: jax.Array, y: jax.Array, t) -> jax.Array:
    """x̂0 = (y − σ(t) ε)/α(t) [B, ...], clipped to ±clip_sample_range when the (discrete) process's
    config says `clip_sample` (DDPMScheduler.step's pred_original_sample)."""
    x0 = (y - _expand(sde.sigma(t), y) * eps) / _expand(sde.alpha(t), y)
    if getattr(sde, "clip_sample", False):
        return jnp.clip(x0, -sde.clip_sample_range, sde.clip_sample_range)
    return x0


def posterior_mean(sde: DiscreteDDPM, x0: jax.Array, y: jax.Array, t, t_next) -> jax.Array:
    """The mean of q(x_t' | x_t = y, x_0 = x0) between respaced timesteps t > t' (Ho et al. eq. 7):
    √ᾱ_t' b/(1 − ᾱ_t) x0 + √a (1 − ᾱ_t')/(1 − ᾱ_t) y with a = ᾱ_t/ᾱ_t', b = 1 − a."""
    abar, abar_next = sde.abar(t), sde.abar(t_next)
    a = abar / abar_next
    return jnp.sqrt(abar_next) * (1.0 - a) / (1.0 - abar) * x0 + jnp.sqrt(a) * (1.0 - abar_next) / (1.0 - abar) * y


def posterior_variance(sde: DiscreteDDPM, t, t_next) -> jax.Array:
    """The ancestral step's variance from t to t' (DDPMScheduler._get_variance, before its 1e-20
    floor): `fixed_small` b (1 − ᾱ_t')/(1 − ᾱ_t), the posterior's; `fixed_large` b = 1 − ᾱ_t/ᾱ_t'."""
    abar, abar_next = sde.abar(t), sde.abar(t_next)
    b = 1.0 - abar / abar_next
    return b if sde.variance_type == "fixed_large" else b * (1.0 - abar_next) / (1.0 - abar)


def ddpm_mean_std(sde: DiscreteDDPM, eps: jax.Array, y: jax.Array, t, t_next) -> tuple[jax.Array, jax.Array]:
    """The ancestral step's Gaussian transition from timestep t to t_next given ε̂ = eps: (mean [B, ...],
    standard deviation []). The std is 0 on a step without noise: from t = 0, and with `fixed_small` into
    t_next = −1, whose posterior variance is 0 (diffusers floors it at 1e-20, a std of 1e-10 that float32
    images do not resolve)."""
    mean = posterior_mean(sde, predicted_x0(sde, eps, y, t), y, t, t_next)
    var = posterior_variance(sde, t, t_next)
    return mean, jnp.where((t > 0) & (var > 0), jnp.sqrt(jnp.maximum(var, 1e-20)), 0.0)


def ancestral_moments(sde: DiscreteDDPM, s: jax.Array, y: jax.Array, t, t_next) -> tuple[jax.Array, jax.Array]:
    """`ddpm_mean_std` given the score's value s = −ε̂/σ(t) (the samplers.GaussianStep interface)."""
    return ddpm_mean_std(sde, -_expand(sde.sigma(t), y) * s, y, t, t_next)


# One ancestral step y_t -> y_{t_next} (module docstring).
ddpm_step = GaussianStep(ancestral_moments, "ddpm_step")


def noisy_last_moments(sde: DiscreteDDPM, s: jax.Array, y: jax.Array, t, t_next) -> tuple[jax.Array, jax.Array]:
    """`ancestral_moments`, except that the step into x_0 (t_next = −1) draws noise of `fixed_large`'s
    variance 1 − ᾱ_t (β_0 = 1e-4, a std of 0.01 on [−1, 1], from t = 0 with the common configs): a
    Gaussian transition like the others, so the Girsanov KL counts it and the penalty is the KL between
    the θ and θ0 chains x_{τ_0}, …, x_0, which bounds the KL between their final images (data
    processing). Diffusers' step into x_0 draws none (from t = 0, or into t' = −1 with fixed_small)."""
    mean, std = ancestral_moments(sde, s, y, t, t_next)
    return mean, jnp.where(t_next < 0, jnp.sqrt(1.0 - sde.abar(t)), std)


def with_noisy_last_step(sampler: Sampler) -> Sampler:
    """An ancestral `sampler` of a DiscreteDDPM whose step into x_0 draws noise (`noisy_last_moments`);
    its step keeps its other settings (the axis of a split batch)."""
    step = dataclasses.replace(sampler.step_fn, moments=noisy_last_moments, __name__="ddpm_noisy_last_step")
    return dataclasses.replace(sampler, step_fn=step)


def ddim_from_eps(sde: NoiseProcess, eps: jax.Array, y: jax.Array, t, t_next) -> jax.Array:
    """The deterministic DDIM update from t to t_next given ε̂ = eps (module docstring)."""
    return _expand(sde.alpha(t_next), y) * predicted_x0(sde, eps, y, t) + _expand(sde.sigma(t_next), y) * eps


def _eps(sde: NoiseProcess, score: Score, y: jax.Array, t) -> jax.Array:
    """ε̂ = −σ(t) s(y, t)."""
    return -_expand(sde.sigma(t), y) * score(y, jnp.full(y.shape[:1], t))


def ddim_step(sde: NoiseProcess, score: Score, y: jax.Array, t, t_next, key: jax.Array) -> jax.Array:
    """One DDIM (η = 0) step y_t -> y_{t_next} to the next grid element; `key` is unused (deterministic)."""
    del key
    return ddim_from_eps(sde, _eps(sde, score, y, t), y, t, t_next)


@dataclasses.dataclass(frozen=True)
class DDIMMoments:
    """`DDIMScheduler.step` with η from timestep t to t − `stride` (stride = N // T), whatever the next
    grid element, as the Gaussian transition (mean [B, ...], std []) given the score's value s = −ε̂/σ(t)
    (module docstring; the GaussianStep interface)."""

    stride: int
    eta: float = 0.0

    def __call__(self, sde: DiscreteDDPM, s: jax.Array, y: jax.Array, t, t_next) -> tuple[jax.Array, jax.Array]:
        del t_next
        eps = -_expand(sde.sigma(t), y) * s
        target = jnp.maximum(t - self.stride, -1)
        abar, abar_next = sde.abar(t), sde.ddim_abar(target)
        var = (1.0 - abar_next) / (1.0 - abar) * (1.0 - abar / abar_next)
        std = self.eta * jnp.sqrt(var)
        mean = jnp.sqrt(abar_next) * predicted_x0(sde, eps, y, t) + jnp.sqrt(1.0 - abar_next - std**2) * eps
        return mean, std


@dataclasses.dataclass(frozen=True)
class DDIMStep:
    """One deterministic (η = 0) DDIM step of the discrete chain, as `DDIMScheduler.step` takes it
    (`DDIMMoments`' mean); `key` is unused."""

    stride: int
    __name__: str = "ddim_step"

    def __call__(self, sde: DiscreteDDPM, score: Score, y: jax.Array, t, t_next, key: jax.Array) -> jax.Array:
        del key
        return DDIMMoments(self.stride)(sde, score(y, jnp.full(y.shape[:1], t)), y, t, t_next)[0]


# The discrete process's samplers (`DiscreteDDPM.sampler`): the continuous-time steps of samplers.py
# (Euler–Maruyama and Euler on the probability flow) take differences of times and rates of a
# continuous process, which the chain of training timesteps does not have.
DISCRETE_STEPS = ("ddpm", "ddim")

register("sampler", "ddim", ddim_step)
