"""The paper's 1-D Gaussian diffusion (§4), shared by the implicit-diffusion oracle tests.

OU process dX = −X dt + √2 dB and the score s_θ(x, t) = −c (x − m e^{−t}), params θ = {m, c}. For
c = 1 it is the exact score of N(m e^{−t}, 1), the OU marginal started from N(m, 1), so π*(θ) =
N(m(1 − e^{−2T}), 1) (paper §4). With c ≠ 1 the drift difference to θ0 depends on x, which makes the
Girsanov and adjoint oracles non-trivial. Every Euler–Maruyama step is affine in x:
x' = a_k x + b_k + √(2 h_k) ξ, a_k = 1 + h_k (1 − 2c), b_k = 2 c m h_k e^{−t_k}, so the chain's law is
an explicit Gaussian (`chain_moments`, `chain_joint`). The Tweedie step at t_min is affine too:
D(x) = (x + σ² s(x, t_min))/α = ((1 − σ² c) x + σ² c m e^{−t_min})/α (`tweedie_mean`).
Every function takes the OU process `sde` (default t_min = 1e-3; a larger t_min makes the Tweedie
step a map far from the identity).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from idiff_cli.diffusion.samplers import Sampler, euler_maruyama_step, probability_flow_step
from idiff_cli.diffusion.sde import OrnsteinUhlenbeck
from idiff_cli.implicit import adjoint, girsanov, methods
from idiff_cli.implicit.adjoint import rollout
from idiff_cli.implicit.paths import sampler_paths


def score(params, x, t, labels=None):
    t = t.reshape(t.shape + (1,) * (x.ndim - 1))
    return -params["c"] * (x - params["m"] * jnp.exp(-t))


SDE = OrnsteinUhlenbeck()


def paths(n_steps: int, batch: int, deterministic: bool = False, sde=SDE, denoise_final: bool = False,
          split_axis: str | None = None):
    """(sampler, its SamplerPaths) of batches [batch, 1]; with `split_axis`, the Euler–Maruyama step draws
    a device's rows of the whole batch's noise under shard_map (samplers.GaussianStep.split_axis)."""
    step_fn = probability_flow_step if deterministic else euler_maruyama_step
    if split_axis is not None:
        step_fn = dataclasses.replace(step_fn, split_axis=split_axis)
    sampler = Sampler(sde, n_steps, step_fn, denoise_final=denoise_final)
    return sampler, sampler_paths(sampler, score, (batch, 1))


def finetune_problem(T: int, batch: int = 6, deterministic: bool = False, beta: float = 0.3, quadratic: float = 0.1,
                     split_axis: str | None = None, **parts):
    """(methods.Problem, θ0) of a finetuning on T-step paths: terminal cost −2 sin(x_T) + quadratic·x_T²,
    reward x, with β > 0 the Girsanov KL to θ0 = (0.5, 1) as running cost; `parts`: the Problem's walk
    and advance (per device on a mesh, with `split_axis` for the sampler's noise)."""
    _, p = paths(T, batch, deterministic, split_axis=split_axis)
    params0 = theta(0.5, 1.0)
    transition = (girsanov.kl_transition(p, SDE, SDE.time_grid(T), params0, beta) if beta
                  else adjoint.transition(p.step))
    terminal = lambda params, x, key: -2.0 * jnp.sin(x[:, 0]) + quadratic * x[:, 0] ** 2  # noqa: E731
    return methods.Problem(p, terminal, transition, lambda x, prompts: x[:, 0], bool(beta), **parts), params0


def outer_steps(method, params, key, n_steps: int):
    """(Γ, completed states) of outer steps 1..n_steps of `method` with θ frozen at `params`."""
    estimate = jax.jit(lambda carry: method.estimate(params, carry, None))
    carry, out = method.init(params, key), []
    for _ in range(n_steps):
        carry, est = estimate(carry)
        out.append((est.grad, est.states))
    return out


def theta(m: float, c: float = 1.0, dtype=jnp.float64):
    return {"m": jnp.asarray(m, dtype), "c": jnp.asarray(c, dtype)}


def coefficients(n_steps: int, m: float, c: float, sde=SDE):
    """(a_k, b_k, s_k) of the affine EM steps, numpy float64 [n]."""
    grid = np.asarray(sde.time_grid(n_steps), np.float64)
    h = grid[:-1] - grid[1:]
    return 1 + h * (1 - 2 * c), 2 * c * m * h * np.exp(-grid[:-1]), np.sqrt(2 * h)


def chain_moments(n_steps: int, m: float, c: float = 1.0, sde=SDE):
    """Mean and variance of x_k, k = 0..n, from x_0 ~ N(0, 1)."""
    a, b, s = coefficients(n_steps, m, c, sde)
    mean, var = [0.0], [1.0]
    for k in range(n_steps):
        mean.append(a[k] * mean[-1] + b[k])
        var.append(a[k] ** 2 * var[-1] + s[k] ** 2)
    return np.array(mean), np.array(var)


def chain_joint(n_steps: int, m: float, c: float = 1.0, sde=SDE):
    """Mean [n+1] and covariance [n+1, n+1] of the whole path (x_0, ..., x_n): x = μ + L ζ, ζ ~ N(0, I)."""
    a, b, s = coefficients(n_steps, m, c, sde)
    L = np.zeros((n_steps + 1, n_steps + 1))
    mu = np.zeros(n_steps + 1)
    L[0, 0] = 1.0
    for k in range(n_steps):
        L[k + 1] = a[k] * L[k]
        L[k + 1, k + 1] = s[k]
        mu[k + 1] = a[k] * mu[k] + b[k]
    return mu, L @ L.T


def path_kl(n_steps: int, theta_: tuple[float, float], theta0: tuple[float, float], sde=SDE) -> float:
    """KL between the laws of the whole discrete paths (x_0..x_n) of the θ and θ0 chains, (m, c) each:
    two (n+1)-dimensional Gaussians (the chains are affine in x)."""
    return gaussian_kl(*chain_joint(n_steps, *theta_, sde), *chain_joint(n_steps, *theta0, sde))


def tweedie_mean(x_mean: float, m: float, c: float, sde=SDE) -> float:
    """E[D(x_n)] of the Tweedie step D(x) = (x + σ² s(x, t_min))/α, affine in x, for E[x_n] = x_mean."""
    t = sde.t_min
    var, alpha = -np.expm1(-2 * t), np.exp(-t)
    return ((1 - var * c) * x_mean + var * c * m * np.exp(-t)) / alpha


def gaussian_kl(mu_p, cov_p, mu_q, cov_q) -> float:
    """KL(N(μp, Σp) ‖ N(μq, Σq)) in closed form."""
    d = len(mu_p)
    inv_q = np.linalg.inv(cov_q)
    diff = mu_q - mu_p
    _, logdet_p = np.linalg.slogdet(cov_p)
    _, logdet_q = np.linalg.slogdet(cov_q)
    return 0.5 * (np.trace(inv_q @ cov_p) + diff @ inv_q @ diff - d + logdet_q - logdet_p)


def draw(p, params, key, n_steps):
    """The stored states [n+1, B, 1] of one batch of paths named by `key`."""
    return rollout(p.step, params, p.init(key), key, n_steps)


def as_float64(params):
    return jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), params)
