"""The six methods of the Langevin reward experiment (Appendix A.1), composed from ULA and Γ.

Every method is the same outer step with different pieces: T ULA steps under a sampling energy
(V(·, θ), or V(·, θ0) − λ R_smooth for guidance), then an optional θ update from the new samples:

    implicit            T = 1, θ ← θ − η Γ_reward(p_k, θ)       (Algorithm 1)
    nested              T inner steps, then the same update       (T = 1 is `implicit`)
    unrolled            T steps; the reward is differentiated through the last step only
    langevin-theta0     T = 1 at fixed θ0 (no reward)
    guidance            T = 1 with V(·, θ0) − λ R_smooth (no θ update)
    langevin-theta-opt  T = 1 at fixed θ_opt, the final θ of `implicit`
    short-run           chains restarted from N(0, I), T steps, then the update (short-run MCMC)

The update is Γ_reward (reward training), Γ_ref (training to a reference distribution, i.e.
energy-based models, `idiff ebm-train`), or Γ_reward + β Γ_ref (reward with a KL penalty).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from idiff_cli.langevin.estimators import reference_gradient, reward_gradient
from idiff_cli.langevin.rewards import smooth_version
from idiff_cli.langevin.ula import ula_chain, ula_step
from idiff_cli.registry import register


class LangevinState(NamedTuple):
    x: jax.Array  # [d, B] particles
    theta: jax.Array  # [p]
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class Method:
    """One outer step: `inner_steps` ULA steps, then the θ update named by `update`."""

    name: str
    inner_steps: int = 1  # T: sampling steps (gradient evaluations of V) per outer step
    update: str = "none"  # "covariance" (Γ_reward), "reference" (Γ_ref), "unrolled", or "none" (θ fixed)
    guidance: float = 0.0  # λ: sample V(·, θ) − λ R_smooth
    start: str = "theta0"  # initial θ: "theta0", or "theta_opt" (needs the result of `implicit`)
    lr_scale: float = 1.0  # multiplies η (the unrolled baseline uses 2/γ, Appendix A.1)
    restart: bool = False  # short-run MCMC: chains restart from N(0, I) at every outer step
    kl_weight: float = 0.0  # β: the update adds β Γ_ref, the gradient of β KL(p_ref ‖ π*(θ))


# Streams of an outer step's key besides the inner ULA steps (which use fold_in(key, t), t < T).
REFERENCE_STREAM = 2**31 - 1  # draws of p_ref
RESTART_STREAM = 2**31 - 2  # N(0, I) restarts of short-run chains


def make_step(method: Method, potential, reward, gamma: float, optimizer: optax.GradientTransformation,
              reference: Callable[[jax.Array], jax.Array] | None = None
              ) -> Callable[[LangevinState, jax.Array], LangevinState]:
    """The jittable outer step (state, key) -> state. Inner step t uses noise fold_in(key, t).

    `reference(key) -> x_ref [d, B]` draws the reference samples of Γ_ref (update "reference" or
    kl_weight > 0), with key fold_in(key, REFERENCE_STREAM). θ may be any pytree (e.g. Flax params).
    """
    smooth = smooth_version(reward)
    if (method.update == "reference" or method.kl_weight) and reference is None:
        raise ValueError(f"method {method.name} needs reference samples")

    def energy(theta):
        if method.guidance:
            return lambda y: potential(y, theta) - method.guidance * smooth(y)
        return lambda y: potential(y, theta)

    n_plain = method.inner_steps - (method.update == "unrolled")

    def step(state: LangevinState, key: jax.Array) -> LangevinState:
        theta = state.theta
        x = state.x
        if method.restart:
            x = jax.random.normal(jax.random.fold_in(key, RESTART_STREAM), x.shape, x.dtype)
        x = ula_chain(energy(theta), x, key, gamma, n_plain)
        if method.update == "none":
            return state._replace(x=x)
        x_ref = reference(jax.random.fold_in(key, REFERENCE_STREAM)) if reference is not None else None
        if method.update == "covariance":
            grad = reward_gradient(potential, reward, x, theta)
        elif method.update == "reference":
            grad = reference_gradient(potential, x, x_ref, theta)
        else:  # unrolled: differentiate −mean R through the last ULA step only
            last_key = jax.random.fold_in(key, n_plain)

            def loss(th):
                y = ula_step(energy(th), x, last_key, gamma)
                return -jnp.mean(reward(y)), y

            (_, x), grad = jax.value_and_grad(loss, has_aux=True)(theta)
        if method.kl_weight:
            kl_grad = reference_gradient(potential, x, x_ref, theta)
            grad = jax.tree.map(lambda g, k: g + method.kl_weight * k, grad, kl_grad)
        updates, opt_state = optimizer.update(grad, state.opt_state, theta)
        return LangevinState(x, optax.apply_updates(theta, updates), opt_state)

    return step


def make_optimizer(eta: float, schedule: str, name: str = "sgd") -> optax.GradientTransformation:
    """SGD (the paper's Langevin experiments) or Adam on θ, with η constant or η/√(k+1)
    ("inv-sqrt", the rate of the paper's theorems)."""
    rate = (lambda k: eta / jnp.sqrt(k + 1.0)) if schedule == "inv-sqrt" else eta
    return {"sgd": optax.sgd, "adam": optax.adam}[name](rate)


# Registered builders: (T, λ, γ) -> Method. A plug-in method is any such callable.
METHOD_BUILDERS: dict[str, Callable[..., Method]] = {
    "implicit": lambda T, lam, gamma: Method("implicit", 1, "covariance"),
    "langevin-theta0": lambda T, lam, gamma: Method("langevin-theta0"),
    "nested": lambda T, lam, gamma: Method(f"nested-T{T}", T, "covariance"),
    "unrolled": lambda T, lam, gamma: Method(f"unrolled-T{T}", T, "unrolled", lr_scale=2.0 / gamma),
    "guidance": lambda T, lam, gamma: Method("guidance", guidance=lam),
    "langevin-theta-opt": lambda T, lam, gamma: Method("langevin-theta-opt", start="theta_opt"),
    "short-run": lambda T, lam, gamma: Method(f"short-run-T{T}", T, "covariance", restart=True),
}
for _name, _builder in METHOD_BUILDERS.items():
    register("method", _name, _builder)
