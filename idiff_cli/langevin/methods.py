"""Methods of the Langevin experiments (Appendix A.1) as (init, update) pairs built from small pieces.

A method's outer step is a *sampler step* (T ULA steps under V(·, θ), or V(·, θ0) − λ R_smooth for
guidance, optionally restarted from N(0, I)) followed, for trained methods, by a θ update with a
*gradient estimator* Γ(x, θ, key) -> (Γ, x) and an optax optimiser:

    implicit            T = 1, θ ← θ − η Γ(p_k, θ)                (Algorithm 1)
    nested              T inner steps, then the same update       (T = 1 is `implicit`)
    unrolled            T steps; −E[R] is differentiated through the last step only, step 2η/γ
    short-run           chains restarted from N(0, I), T steps, then the update (short-run MCMC)
    langevin-theta0     T = 1 at fixed θ0
    guidance            T = 1 under V(·, θ0) − λ R_smooth, θ fixed
    langevin-theta-opt  T = 1 at fixed θ_opt, the final θ of `implicit`

Γ is the objective's estimator: Γ_reward (reward training, paper §3.2), Γ_ref (energy-based models,
`idiff ebm-train`), Γ_evidence (a marginal likelihood: Bayesian hyperparameters, docs/bilevel.md), and
a KL penalty β Γ_ref adds to either (`add`), so reward training with a KL penalty is Γ_reward + β Γ_ref,
the gradient of −E[R] + β KL(π*(θ0) ‖ π*(θ)).

A method is registered (kind "method") as a builder `builder(c: Components, T: int) -> Method`;
`--method package.module:builder` runs a plug-in with that signature, nothing else to edit.

Keys: the outer step's key k draws inner step t from fold_in(k, t), the reference samples from
fold_in(k, REFERENCE_STREAM) and short-run restarts from fold_in(k, RESTART_STREAM).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from idiff_cli.langevin.estimators import evidence_gradient, reference_gradient, reward_gradient
from idiff_cli.langevin.rewards import smooth_version
from idiff_cli.langevin.ula import ula_chain, ula_step
from idiff_cli.registry import register

REFERENCE_STREAM = 2**31 - 1  # draws of p_ref
RESTART_STREAM = 2**31 - 2  # N(0, I) restarts of short-run chains

Energy = Callable[[Any], Callable[[jax.Array], jax.Array]]  # θ -> (x [d, B] -> U(x) [B])
Sampler = Callable[[jax.Array, Any, jax.Array], jax.Array]  # (x, θ, key) -> x after the inner steps
Estimator = Callable[[jax.Array, Any, jax.Array], tuple[Any, jax.Array]]  # (x, θ, key) -> (Γ like θ, x)


class LangevinState(NamedTuple):
    x: jax.Array  # [d, B] particles
    theta: Any  # [p] or a pytree (Flax params)
    opt_state: Any


class Method(NamedTuple):
    """An (init, update) pair and what the run needs to know about it.

    init(x [d, B], θ) -> LangevinState; update(state, key) -> state (one outer step, jittable).
    T: sampling steps (gradient evaluations of V) per outer step; start: "theta0", or "theta_opt"
    (the final θ of the first trained method); trains: whether update changes θ."""

    name: str
    T: int
    init: Callable[[jax.Array, Any], LangevinState]
    update: Callable[[LangevinState, jax.Array], LangevinState]
    start: str = "theta0"
    trains: bool = True


class Components(NamedTuple):
    """What a builder composes a method from.

    potential V(x, θ); reward R(x) (None for energy-based models); gamma: ULA step; lam: guidance λ;
    optimizer(scale) -> optax transformation at learning rate scale·η; gradient: the objective's
    estimator Γ (penalty included); penalty: the KL penalty β Γ_ref alone (None: no penalty)."""

    potential: Any
    reward: Callable | None
    gamma: float
    lam: float
    optimizer: Callable[[float], optax.GradientTransformation]
    gradient: Estimator
    penalty: Estimator | None = None


# ---- sampler steps ----

def potential_energy(potential) -> Energy:
    return lambda theta: (lambda y: potential(y, theta))


def ula_sampler(energy: Energy, gamma: float, T: int, restart: bool = False) -> Sampler:
    """T ULA steps under energy(θ) (inner step t: fold_in(key, t)); `restart`: from N(0, I) first."""

    def sample(x, theta, key):
        if restart:
            x = jax.random.normal(jax.random.fold_in(key, RESTART_STREAM), x.shape, x.dtype)
        return ula_chain(energy(theta), x, key, gamma, T)

    return sample


# ---- gradient estimators ----

def covariance(potential, reward) -> Estimator:
    """Γ_reward(p, θ) = Cov_p[R, ∇θV] (paper §3.2)."""
    return lambda x, theta, key: (reward_gradient(potential, reward, x, theta), x)


def evidence(potential) -> Estimator:
    """Γ_evidence(p, θ) = E_p[∇θV], the gradient of −log Z_θ (Fisher's identity)."""
    return lambda x, theta, key: (evidence_gradient(potential, x, theta), x)


def reference(potential, draw: Callable[[jax.Array], jax.Array]) -> Estimator:
    """Γ_ref(p, θ) = E_{p_ref}[∇θV] − E_p[∇θV], p_ref drawn by draw(fold_in(key, REFERENCE_STREAM))."""
    return lambda x, theta, key: (reference_gradient(potential, x, draw(jax.random.fold_in(key, REFERENCE_STREAM)),
                                                     theta), x)


def scaled(weight: float, estimate: Estimator) -> Estimator:
    def scaled_estimate(x, theta, key):
        g, x = estimate(x, theta, key)
        return jax.tree.map(lambda a: weight * a, g), x

    return scaled_estimate


def add(*estimates: Estimator | None) -> Estimator:
    """Γ_1 + Γ_2 + …: each term sees the samples the previous one returned (unrolled's last step)."""
    terms = [e for e in estimates if e is not None]

    def total(x, theta, key):
        g, x = terms[0](x, theta, key)
        for estimate in terms[1:]:
            extra, x = estimate(x, theta, key)
            g = jax.tree.map(jnp.add, g, extra)
        return g, x

    return total


def unrolled(energy: Energy, reward, gamma: float, step_index: int) -> Estimator:
    """∇θ of −mean R(y), y one ULA step from x under energy(θ) with key fold_in(key, step_index);
    returns y as the new samples."""

    def estimate(x, theta, key):
        last_key = jax.random.fold_in(key, step_index)

        def loss(th):
            y = ula_step(energy(th), x, last_key, gamma)
            return -jnp.mean(reward(y)), y

        (_, y), g = jax.value_and_grad(loss, has_aux=True)(theta)
        return g, y

    return estimate


# ---- methods ----

def trained(name: str, T: int, sample: Sampler, estimate: Estimator, optimizer: optax.GradientTransformation,
            start: str = "theta0") -> Method:
    """Sample, then θ ← optimizer(Γ(x, θ))."""

    def update(state, key):
        x = sample(state.x, state.theta, key)
        g, x = estimate(x, state.theta, key)
        updates, opt_state = optimizer.update(g, state.opt_state, state.theta)
        return LangevinState(x, optax.apply_updates(state.theta, updates), opt_state)

    return Method(name, T, lambda x, theta: LangevinState(x, theta, optimizer.init(theta)), update, start)


def sampling(name: str, sample: Sampler, start: str = "theta0") -> Method:
    """Sample with θ fixed (T = 1)."""
    return Method(name, 1, lambda x, theta: LangevinState(x, theta, ()),
                  lambda state, key: state._replace(x=sample(state.x, state.theta, key)), start, trains=False)


def _implicit(c: Components, T: int) -> Method:
    return trained("implicit", 1, ula_sampler(potential_energy(c.potential), c.gamma, 1), c.gradient, c.optimizer(1.0))


def _nested(c: Components, T: int) -> Method:
    return trained(f"nested-T{T}", T, ula_sampler(potential_energy(c.potential), c.gamma, T), c.gradient,
                   c.optimizer(1.0))


def _short_run(c: Components, T: int) -> Method:
    return trained(f"short-run-T{T}", T, ula_sampler(potential_energy(c.potential), c.gamma, T, restart=True),
                   c.gradient, c.optimizer(1.0))


def _unrolled(c: Components, T: int) -> Method:
    """Appendix A.1: the unrolled baseline's step is 2η/γ."""
    energy = potential_energy(c.potential)
    return trained(f"unrolled-T{T}", T, ula_sampler(energy, c.gamma, T - 1),
                   add(unrolled(energy, c.reward, c.gamma, T - 1), c.penalty), c.optimizer(2.0 / c.gamma))


def _langevin_theta0(c: Components, T: int) -> Method:
    return sampling("langevin-theta0", ula_sampler(potential_energy(c.potential), c.gamma, 1))


def _langevin_theta_opt(c: Components, T: int) -> Method:
    return sampling("langevin-theta-opt", ula_sampler(potential_energy(c.potential), c.gamma, 1), start="theta_opt")


def _guidance(c: Components, T: int) -> Method:
    """Langevin under V(·, θ) − λ R_smooth with θ fixed at θ0 (the guidance baseline)."""
    smooth = smooth_version(c.reward)
    energy = lambda theta: (lambda y: c.potential(y, theta) - c.lam * smooth(y))  # noqa: E731
    return sampling("guidance", ula_sampler(energy, c.gamma, 1))


def make_optimizer(lr: float, schedule: str, name: str = "sgd") -> optax.GradientTransformation:
    """SGD (the paper's Langevin experiments) or Adam on θ, with η constant or η/√(k+1)
    ("inv-sqrt", the rate of the paper's theorems)."""
    rate = (lambda k: lr / jnp.sqrt(k + 1.0)) if schedule == "inv-sqrt" else lr
    return {"sgd": optax.sgd, "adam": optax.adam}[name](rate)


for _name, _builder in {"implicit": _implicit, "langevin-theta0": _langevin_theta0, "nested": _nested,
                        "unrolled": _unrolled, "guidance": _guidance, "langevin-theta-opt": _langevin_theta_opt,
                        "short-run": _short_run}.items():
    register("method", _name, _builder)
