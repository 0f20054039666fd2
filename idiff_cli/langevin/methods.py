"""The six methods of the Langevin reward experiment (Appendix A.1), composed from ULA and Γ.

Every method is the same outer step with different pieces: T ULA steps under a sampling energy
(V(·, θ), or V(·, θ0) − λ R_smooth for guidance), then an optional θ update from the new samples:

    implicit            T = 1, θ ← θ − η Γ_reward(p_k, θ)       (Algorithm 1)
    nested              T inner steps, then the same update       (T = 1 is `implicit`)
    unrolled            T steps; the reward is differentiated through the last step only
    langevin-theta0     T = 1 at fixed θ0 (no reward)
    guidance            T = 1 with V(·, θ0) − λ R_smooth (no θ update)
    langevin-theta-opt  T = 1 at fixed θ_opt, the final θ of `implicit`
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from idiff_cli.langevin.estimators import reward_gradient
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
    update: str = "none"  # "covariance" (Γ_reward), "unrolled", or "none" (θ fixed)
    guidance: float = 0.0  # λ: sample V(·, θ) − λ R_smooth
    start: str = "theta0"  # initial θ: "theta0", or "theta_opt" (needs the result of `implicit`)
    lr_scale: float = 1.0  # multiplies η (the unrolled baseline uses 2/γ, Appendix A.1)


def make_step(method: Method, potential, reward, gamma: float, optimizer: optax.GradientTransformation
              ) -> Callable[[LangevinState, jax.Array], LangevinState]:
    """The jittable outer step (state, key) -> state. Inner step t uses noise fold_in(key, t)."""
    smooth = smooth_version(reward)

    def energy(theta):
        if method.guidance:
            return lambda y: potential(y, theta) - method.guidance * smooth(y)
        return lambda y: potential(y, theta)

    n_plain = method.inner_steps - (method.update == "unrolled")

    def step(state: LangevinState, key: jax.Array) -> LangevinState:
        theta = state.theta
        x = ula_chain(energy(theta), state.x, key, gamma, n_plain)
        if method.update == "none":
            return state._replace(x=x)
        if method.update == "covariance":
            grad = reward_gradient(potential, reward, x, theta)
        else:  # unrolled: differentiate −mean R through the last ULA step only
            last_key = jax.random.fold_in(key, n_plain)

            def loss(th):
                y = ula_step(energy(th), x, last_key, gamma)
                return -jnp.mean(reward(y)), y

            (_, x), grad = jax.value_and_grad(loss, has_aux=True)(theta)
        updates, opt_state = optimizer.update(grad, state.opt_state, theta)
        return LangevinState(x, optax.apply_updates(theta, updates), opt_state)

    return step


def make_optimizer(eta: float, schedule: str) -> optax.GradientTransformation:
    """Plain SGD on θ with η constant or η/√(k+1) ("inv-sqrt", the rate of the paper's theorems)."""
    if schedule == "inv-sqrt":
        return optax.sgd(lambda k: eta / jnp.sqrt(k + 1.0))
    return optax.sgd(eta)


# Registered builders: (T, λ, γ) -> Method. A plug-in method is any such callable.
METHOD_BUILDERS: dict[str, Callable[..., Method]] = {
    "implicit": lambda T, lam, gamma: Method("implicit", 1, "covariance"),
    "langevin-theta0": lambda T, lam, gamma: Method("langevin-theta0"),
    "nested": lambda T, lam, gamma: Method(f"nested-T{T}", T, "covariance"),
    "unrolled": lambda T, lam, gamma: Method(f"unrolled-T{T}", T, "unrolled", lr_scale=2.0 / gamma),
    "guidance": lambda T, lam, gamma: Method("guidance", guidance=lam),
    "langevin-theta-opt": lambda T, lam, gamma: Method("langevin-theta-opt", start="theta_opt"),
}
for _name, _builder in METHOD_BUILDERS.items():
    register("method", _name, _builder)
