"""`idiff langevin-reward`: reward training of Langevin processes (paper §5.1 / Appendix A.1).

Each method is a resumable unit of the run loop (checkpoints/<method>/), all seeds run together
(`runner`). `implicit` runs first: its final θ is θ_opt, the start of `langevin-theta-opt` and the
parameter of the log-likelihood columns, log π*(θ_opt)[x] averaged over the batch. The methods after
`implicit` log it as they run; `implicit`'s own rows get it once implicit has finished, from the
samples its unit keeps. Growing `--steps` continues every method from its checkpoint; the methods
after `implicit` keep the θ_opt they started from.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from idiff_cli import registry
from idiff_cli.errors import UserError
from idiff_cli.langevin import figures, quadrature
from idiff_cli.langevin.methods import Components, add, covariance, make_optimizer, reference, scaled
from idiff_cli.langevin.options import SCHEMA, method_names
from idiff_cli.langevin.potentials import probe
from idiff_cli.langevin.runner import (MethodRunner, Recording, Track, build_methods, final_metrics, log_index,
                                       print_table, seed_stats, snapshot_steps)
from idiff_cli.loop import Run
from idiff_cli.runs import RunDir, default_run_dir
from idiff_cli.sharding import seed_mesh


def components(cfg: Any, potential, reward) -> Components:
    """The pieces of every method: Γ_reward, plus β Γ_ref with exact draws of π*(θ0) when β > 0."""
    theta0 = jnp.asarray(cfg.theta0, jnp.float32)
    penalty = scaled(cfg.beta, reference(potential, lambda key: potential.sample(key, theta0, cfg.batch))) \
        if cfg.beta else None
    return Components(potential, reward, cfg.gamma, cfg.lam,
                      lambda scale: make_optimizer(cfg.lr * scale, cfg.lr_schedule),
                      add(covariance(potential, reward), penalty), penalty)


def check(cfg: Any, potential, reward) -> None:
    """The config against its potential and reward (plug-ins probed on the run's shapes), before the run."""
    n_params = getattr(potential, "n_params", None)
    if n_params is not None and len(cfg.theta0) != n_params:
        raise UserError(f"--theta0 has {len(cfg.theta0)} entries; potential '{cfg.potential}' takes {n_params}")
    x = jnp.zeros((getattr(potential, "dim", 2), cfg.batch))
    probe(potential, cfg.potential, "potential", x, jnp.asarray(cfg.theta0, jnp.float32))
    probe(reward, cfg.reward, "reward", x)
    if cfg.beta and not hasattr(potential, "sample"):
        raise UserError(f"--beta needs exact draws of π*(θ0); potential '{cfg.potential}' has no sample(); "
                        "valid choices: a Gaussian mixture potential (hexagon, hexagon-paper, seven-wells)")


def loglik_fn(potential):
    """(x [c, S, d, B], θ_opt [S, p]) -> batch-mean log π*(θ_opt)[x] [c, S]."""
    log_density = getattr(potential, "log_density", None) or quadrature.log_density_fn(potential)
    per_seed = jax.vmap(lambda x, th: jnp.mean(log_density(x, th)))
    return jax.jit(jax.vmap(per_seed, in_axes=(0, None)))


def recording(loglik, theta_opt) -> Recording:
    """θ per logged step and seed 0's samples at the Fig. 10 steps; the reward per logged step and, once
    θ_opt is known, the log-likelihood under π*(θ_opt). The method that defines θ_opt keeps all its
    samples [L, S, d, B] instead: its log-likelihood needs its final θ."""
    tracks = (Track("theta", lambda x, theta: theta), Track("snapshots_seed0", lambda x, theta: x[:, 0], "snapshots"),
              Track("final_x", lambda x, theta: x, "final"))
    if theta_opt is None:
        return Recording((*tracks, Track("x", lambda x, theta: x, saved=False)),
                         lambda steps, x, theta, rewards: {"reward": rewards})
    return Recording(tracks, lambda steps, x, theta, rewards: {
        "reward": rewards, "loglik": np.asarray(loglik(jnp.asarray(x), theta_opt))})


def main(cfg: Any, out: pathlib.Path | None) -> dict[str, dict[str, np.ndarray]]:
    """Runs every method of `cfg` into `out`; writes methods/*.npz, arrays.npz, figures and a summary."""
    potential = registry.get("potential", cfg.potential)
    reward = registry.get("reward", cfg.reward)
    check(cfg, potential, reward)
    methods = build_methods(method_names(cfg.method), components(cfg, potential, reward), cfg.T)
    run_dir = RunDir(out or default_run_dir("langevin-reward"))
    dim = getattr(potential, "dim", 2)
    k_init, k_run = jax.random.split(jax.random.key(cfg.seed))
    x0 = jax.random.normal(k_init, (cfg.seeds, dim, cfg.batch))  # p0 = N(0, I), shared by all methods
    theta0 = jnp.tile(jnp.asarray(cfg.theta0, jnp.float32), (cfg.seeds, 1))
    loglik = loglik_fn(potential)
    # Fig. 10's snapshots of seed 0: the first logged step and ~100, ~1000, ~2500
    runner = MethodRunner(run_dir, x0, jax.random.split(k_run, cfg.seeds), cfg.steps, cfg.log_every,
                          snapshot_steps((cfg.log_every, *figures.SNAPSHOT_TARGETS), cfg.log_every),
                          statistic=lambda x: jnp.mean(reward(x)), finite=("reward_mean",), progress=("reward_mean",))

    def add_loglik(name: str, history: dict, theta_opt) -> None:
        """Writes the log-likelihood columns of method `name`'s rows, from the samples it kept."""
        values = loglik(history["x"], theta_opt)

        def with_loglik(row: dict) -> dict:
            if row.get("method") != name:
                return row
            return {**row, **seed_stats("loglik", values[log_index(cfg.steps, cfg.log_every, row["step"])])}

        run_dir.edit_metrics(with_loglik)

    with Run(SCHEMA, cfg, run_dir, cfg.ckpt_every) as run:
        run.print(f"[bold]langevin-reward[/]: {cfg.seeds} seeds x {cfg.batch} particles x {cfg.steps} steps "
                  f"on {seed_mesh(cfg.seeds).size} device(s) -> {run_dir.path}")
        per_method = runner.run(run, methods, theta0, lambda theta_opt: recording(loglik, theta_opt), add_loglik)
        run_dir.save_arrays("arrays.npz", _arrays(per_method))
        figures.make_all(run_dir, potential, cfg.theta0)
        _print_summary(run_dir, cfg)
        run.done("config.json, metrics.jsonl, methods/, arrays.npz, figures/, checkpoints/")
    return per_method


def _arrays(per_method: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """arrays.npz: every method's θ trajectory and final samples, keyed `<method>/<array>`."""
    first = next(iter(per_method.values()))
    out = {"steps": first["steps"], "theta_opt": first["theta"][-1], "snapshot_steps": first["snapshot_steps"]}
    for name, arrays in per_method.items():
        out.update({f"{name}/{key}": arrays[key] for key in ("theta", "final_x", "snapshots_seed0")})
    return out


def _print_summary(run_dir: RunDir, cfg) -> None:
    """Per method: the reward (min..max over seeds) and log-likelihood over the last 2% of the steps."""
    final = final_metrics(run_dir.read_metrics(), ("reward", "loglik"), cfg.steps * 0.98)
    print_table(f"langevin-reward: last 2% of {cfg.steps} steps, {cfg.seeds} seeds (min..max)",
                ("method", "T", "reward", "log-lik under π*(θ_opt)", "grad evals", "wall s"),
                [(name, str(last["T"]), "{:.3f} ({:.3f}..{:.3f})".format(*m["reward"]), f"{m['loglik'][0]:.3f}",
                  f"{last['grad_evals']:,}", f"{last['wall_s']:.1f}") for name, (last, m) in final.items()])
