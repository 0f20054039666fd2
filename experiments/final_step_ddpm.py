"""What the DDPM chain's last step allows when the KL penalty does not cover it, and --final-step noisy.

A discrete DDPM chain (diffusers' DDPMScheduler defaults: linear betas 1e-4..0.02 over N = 1,000,
fixed_small, leading spacing; no clipping) sampled in T = 10 ancestral steps 900, 800, …, 0 and then
the step from t = 0 into x_0, which diffusers takes without noise. The data law is N(0, I_d), whose
exact noise prediction is ε*(x, t) = σ_t x, and the finetuned model shifts it by a constant in two
places:

    ε_θ(x, t) = σ_t x − θ_high 1[t > 0] − θ_low 1[t = 0],      θ0 = (0, 0),

so θ_high moves the nine noisy steps and θ_low only the last one. The reward is the mean of x_0 over
its d coordinates (a "brightness"); finetune's own problem (finetune.bind_problem, Algorithm 2 with
M = 2, Adam) minimises −λ E R + β KL with λ = β = 1. Everything is affine in x, so each chain's x_0 is
Gaussian with a covariance that θ does not change: the KL between the two models' final images is
d (Δμ)² / 2 var(x_0), computed exactly here by propagating the mean and variance through the chain.

* --final-step tweedie (the default; on this chain the last step is the same as with `none`): the
  penalty is the Girsanov sum over the nine noisy steps. θ_low costs nothing, its gradient never
  vanishes, and it grows for as long as the run lasts: the reward rises without bound while the
  logged KL stays at the noisy steps' share, far below the KL of the rewarded images.
* --final-step noisy: the step into x_0 draws noise of variance 1 − ᾱ_0 = β_0, its KL is counted, and
  θ_low settles where its reward and its KL balance; the logged KL is then the whole chains' KL, which
  bounds the KL between the final images (data processing).

    python experiments/final_step_ddpm.py [--steps 300]     # prints the table

docs/results.md ("The final step of a DDPM chain") holds its output and time; tests/test_final_step_ddpm.py
runs it for 60 steps.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

from idiff_cli.diffusion import ddpm
from idiff_cli.implicit import finetune, methods

SDE = ddpm.DiscreteDDPM(clip_sample=False)
T, M, DIM, BATCH = 10, 2, 4, 64
LAM, BETA, LR = 1.0, 1.0, 0.05


def score(params, x, t, labels=None):
    """s_θ(x, t) = −ε_θ(x, t)/σ_t for the shifted exact model of the module docstring; x [B, DIM]."""
    del labels
    sigma = SDE.sigma(t)[:, None]
    shift = jnp.where(t > 0, params["high"], params["low"])[:, None]
    return -(sigma * x - shift) / sigma


def sampler(final_step: str):
    """The chain's T-step ancestral sampler, its step into x_0 noisy with --final-step noisy."""
    base = SDE.sampler(T, "ddpm")
    return ddpm.with_noisy_last_step(base) if final_step == "noisy" else base


def image_law(params, final_step: str) -> tuple[float, float]:
    """(mean, variance) of each coordinate of x_0 under θ, exactly: each step is x' = A x + c + std ξ."""
    run = sampler(final_step)
    grid = np.asarray(run.grid)
    mean, var = 0.0, 1.0
    for k in range(T):
        t, t_next = jnp.float32(grid[k]), jnp.float32(grid[k + 1])
        step = lambda x: run.step_fn.moments(SDE, score(params, x, jnp.full((1,), t)), x, t, t_next)  # noqa: E731
        (at_one, std), (at_zero, _) = step(jnp.ones((1, 1))), step(jnp.zeros((1, 1)))
        slope, offset = float(at_one[0, 0] - at_zero[0, 0]), float(at_zero[0, 0])
        mean, var = slope * mean + offset, slope**2 * var + float(std) ** 2
    return mean, var


def run(final_step: str, steps: int, log_every: int) -> list[dict]:
    """Finetunes θ = (θ_high, θ_low) from θ0 = 0 for `steps` outer steps; a row every `log_every`."""
    chain = sampler(final_step)
    paths = finetune.run_paths(chain, score, (BATCH, DIM), None, final_step, clip=False)
    reward = lambda x: jnp.mean(x, axis=1)  # noqa: E731
    bind_problem = finetune.bind_problem(paths, SDE, chain.grid, reward, True)

    def bind(params0, lam=LAM, beta=BETA):
        problem = bind_problem(params0, lam, beta)
        return problem, methods.make_method("implicit", problem, T, M)

    params0 = {"high": jnp.float32(0.0), "low": jnp.float32(0.0)}
    optimizer = optax.adam(LR)
    state = finetune.start_state(bind(params0)[1], optimizer, params0, jax.random.key(0), 0)
    step = finetune.make_outer_step(bind, optimizer, params0, (LAM, BETA))
    kl_of = finetune.make_kl_estimator(chain, lambda _: paths, jax.random.split(jax.random.key(1), 16))
    mean0, var0 = image_law(params0, final_step)
    rows = []
    for i in range(1, steps + 1):
        state, _ = step(state, i)
        if i % log_every == 0:
            mean, var = image_law(state.params, final_step)
            kl, se = map(float, kl_of(state.params, params0))
            rows.append({"final_step": final_step, "step": i, "theta_high": float(state.params["high"]),
                         "theta_low": float(state.params["low"]), "reward": mean - mean0, "penalty": kl,
                         "penalty_se": se, "image_kl": DIM * (mean - mean0) ** 2 / (2 * var0)})
            assert abs(var - var0) < 1e-5 * var0  # θ shifts the law of x_0, never its variance
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--log-every", type=int, default=100)
    args = parser.parse_args()
    print("| --final-step | step | θ_high | θ_low | reward gain | penalty (logged KL ± SE) | KL of the final images |")
    print("|---|---|---|---|---|---|---|")
    for final_step in ("tweedie", "noisy"):
        for r in run(final_step, args.steps, args.log_every):
            print(f"| {final_step} | {r['step']} | {r['theta_high']:.4f} | {r['theta_low']:.3f} | {r['reward']:.4f} | "
                  f"{r['penalty']:.2g} ± {r['penalty_se']:.1g} | {r['image_kl']:.2g} |")


if __name__ == "__main__":
    main()
