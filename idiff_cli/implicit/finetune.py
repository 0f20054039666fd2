"""`idiff finetune`: reward training of a pretrained diffusion model (paper §5.2, Appendix A.2).

Minimises F(p) = −λ E_{x∼p}[R(x)] + β KL(p ‖ π*(θ0)) over the U-Net weights θ, starting from the
pretrained θ0, with one of the methods of methods.py (default: Implicit Diffusion, Algorithm 2) and
optax Adam. The host dispatches one jitted outer step at a time and logs once per `log_every` steps:
metrics.jsonl, figures/reward_kl.png, same-seed sample grids samples/step_XXXXXX.png (the noise keys
are fixed for the whole run, Figs 7, 13, 14, 16) and orbax checkpoints; re-running into the
same --out resumes from the last checkpoint. The weights θ of every checkpoint are also kept on their
own in weights/ with finetuned.json, so `load_pretrained` (hence `idiff sample`, `idiff evaluate-fid`)
reads a finetuned run like a pretrained one.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from idiff_cli import config as cfglib
from idiff_cli import registry
from idiff_cli.errors import UserError
from idiff_cli.implicit.methods import ADJOINTS
from idiff_cli.runs import RunDir, atomic_path, console, progress_bar

SAMPLERS = ("euler-maruyama", "probability-flow")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """`idiff finetune` settings. Fields left at 0 take the dataset's default (Tables 2 and 4)."""

    preset: str = "cpu"
    from_run: str = dataclasses.field(default="", metadata={"flag": "--from"})
    reward: str = "brightness"
    lam: float = dataclasses.field(default=10.0, metadata={"flag": "--lambda"})
    beta: float = 0.1  # λ/β = 100: at λ/β = 10 the reward gained at the reward/KL balance is ~0.01 (README)
    method: str = "implicit"
    adjoint: str = "full"
    sampler: str = "euler-maruyama"
    clip: bool = True
    M: int = 0
    T: int = 0
    batch: int = 0
    lr: float = 1e-4
    steps: int = 200
    log_every: int = 10
    sample_every: int = 50
    ckpt_every: int = 50
    grid_n: int = 16
    fid_every: int = 0
    fid_n: int = 64
    fid_features: str = "mnist-classifier"
    seed: int = 0

    def validate(self) -> None:
        for name in ("M", "T", "batch"):
            cfglib.require_int(self, name, minimum=0)
        for name in ("steps", "log_every", "sample_every", "ckpt_every", "grid_n", "fid_n"):
            cfglib.require_int(self, name)
        cfglib.require_int(self, "fid_every", minimum=0)
        cfglib.require_int(self, "seed", minimum=0)
        cfglib.require_float(self, "lr")
        cfglib.require_float(self, "lam", positive=False)
        cfglib.require_float(self, "beta", positive=False)
        if self.beta < 0:
            raise UserError(f"--beta must be >= 0, got {self.beta}")
        cfglib.require_choice(self, "sampler", SAMPLERS)
        cfglib.require_choice(self, "adjoint", ADJOINTS)
        if self.adjoint == "continuous" and self.sampler != "probability-flow":
            raise UserError("--adjoint continuous is the adjoint ODE of the probability flow: it needs "
                            "--sampler probability-flow (and --beta 0)")
        if self.sampler == "probability-flow" and self.beta:
            raise UserError("--sampler probability-flow is deterministic: the Girsanov KL needs noise; "
                            "use --beta 0 or --sampler euler-maruyama")
        for name in ("steps", "sample_every", "ckpt_every", "fid_every"):
            if getattr(self, name) % self.log_every:
                raise UserError(f"{cfglib.flag(self, name)} ({getattr(self, name)}) must be a multiple of "
                                f"--log-every ({self.log_every})")
        registry.get("image-reward", self.reward)


# Tables 2 and 4 (M, T, batch) per dataset; the cpu preset shortens the sampler and the batch.
DATASET_DEFAULTS = {"mnist": (4, 64, 32), "colored-mnist": (4, 64, 32), "cifar10": (4, 64, 32),
                    "lsun-bedroom": (2, 64, 16)}
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"T": 16, "M": 4, "batch": 8},
    "paper": {},
}


def latest_pretrain_run(root: pathlib.Path = pathlib.Path("runs")) -> pathlib.Path:
    """The most recently modified run under `root` holding a pretrained model (pretrained.json)."""
    found = sorted(root.glob("*/pretrained.json"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    if not found:
        raise UserError(f"no pretrained model under '{root}/' (no */pretrained.json); run `idiff pretrain mnist` "
                        "first or pass --from RUN_DIR")
    return found[-1].parent


def complete(cfg: FinetuneConfig, dataset: str) -> FinetuneConfig:
    """Fills M, T, batch left at 0 from the dataset's defaults and checks that M divides T."""
    from idiff_cli.implicit.queue import check_divides

    M, T, batch = DATASET_DEFAULTS.get(dataset.split(":")[0], DATASET_DEFAULTS["mnist"])
    cfg = dataclasses.replace(cfg, M=cfg.M or M, T=cfg.T or T, batch=cfg.batch or batch)
    check_divides(cfg.M, cfg.T)
    return cfg


class FinetuneState(NamedTuple):
    params: Any
    opt_state: Any
    carry: Any  # the method's carry (the queue for `implicit`)
    step: jax.Array


def build(cfg: FinetuneConfig, pre):
    """`bind(params0, lam, beta) -> (problem, method, kl)` for a run on the pretrained model `pre`, and
    the optimiser.

    θ0 enters the KL term; `bind` is called inside the jitted outer step with θ0, λ and β as arguments,
    so neither the weights nor λ and β are baked into the compiled program as constants."""
    from idiff_cli.implicit import adjoint, girsanov, methods
    from idiff_cli.implicit.paths import sampler_paths
    from idiff_cli.implicit.rewards import check_reward

    reward = registry.get("image-reward", cfg.reward)
    check_reward(reward, cfg.reward, pre.image_shape)
    labels = jnp.arange(cfg.batch) % pre.num_classes if pre.num_classes else None
    sampler = pre.sampler(cfg.T, cfg.sampler)
    paths = sampler_paths(sampler, pre.score, (cfg.batch, *pre.image_shape), labels)
    if cfg.clip:  # the reward sees the images as they are shown: clipped to [-1, 1] (no gradient for
        # pushing a pixel beyond white or black, so brightness cannot be gained by unbounded pixel values)
        denoise = paths.denoise
        paths = paths._replace(denoise=lambda params, x: jnp.clip(denoise(params, x), -1.0, 1.0))

    def bind(params0, lam=cfg.lam, beta=cfg.beta):
        terminal = lambda params, x: -lam * reward(paths.denoise(params, x))  # noqa: E731
        kl = girsanov.kl_running_cost(pre.score, pre.sde, sampler.grid, params0, labels)
        transition = (girsanov.kl_transition(paths, pre.score, pre.sde, sampler.grid, params0, beta, labels)
                      if cfg.beta else adjoint.transition(paths.step))
        problem = methods.Problem(paths, terminal, transition, reward, bool(cfg.beta))
        return problem, methods.make_method(cfg.method, problem, cfg.T, cfg.M, cfg.adjoint), kl

    return bind, optax.adam(cfg.lr)


def make_chunk(bind, optimizer, n_steps: int, coef: tuple[float, float]):
    """(state, θ0) -> n_steps outer steps with (λ, β) = `coef` -> (state, per-step metrics [n_steps]
    each, KL of the last completed batch). One jitted outer step per dispatch (asynchronous: the host
    reads the metrics once per chunk)."""
    from idiff_cli.implicit.girsanov import path_kl

    def outer(state: FinetuneState, params0, coef):
        problem, method, _ = bind(params0, *coef)
        carry, est = method.estimate(state.params, state.carry, None)
        updates, opt_state = optimizer.update(est.grad, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        r = problem.reward(est.images)
        metrics = (jnp.mean(r), jnp.std(r), optax.tree.norm(est.grad))
        return FinetuneState(params, opt_state, carry, state.step + 1), metrics, est.states

    def kl_of(params, params0, states):
        return jnp.mean(path_kl(bind(params0)[2], params, states))

    outer_jit, kl_jit = jax.jit(outer), jax.jit(kl_of)

    coef = jnp.asarray(coef, jnp.float32)

    def chunk(state, params0):
        metrics = []
        for _ in range(n_steps):
            state, m, states = outer_jit(state, params0, coef)
            metrics.append(m)
        # Girsanov KL(p ‖ π*(θ0)) on the last completed batch under the updated θ (logging only: its
        # 2T network calls are not counted in net_evals)
        return state, tuple(jnp.stack(v) for v in zip(*metrics)), kl_jit(state.params, params0, states)

    return chunk


def make_grid_sampler(problem, grid_n: int, batch: int, key: jax.Array):
    """jit: params -> [grid_n, H, W, C] images from fixed noise keys (the same for every θ)."""
    from idiff_cli.implicit.adjoint import rollout

    p = problem.paths
    n_batches = -(-grid_n // batch)
    keys = jax.random.split(key, n_batches)

    def sample(params):
        def one(k):
            return p.denoise(params, rollout(p.step, params, p.init(k), k, p.n_steps)[-1])

        images = jax.lax.map(one, keys)
        return images.reshape(-1, *images.shape[2:])[:grid_n]

    return jax.jit(sample)


def run(cfg: FinetuneConfig, run_dir: RunDir) -> FinetuneState:
    """Finetunes (or resumes) the run in `run_dir`; returns the final state."""
    from idiff_cli.checkpoint import Checkpointer, restore_template
    from idiff_cli.diffusion.pretrain import save_grid, use_compilation_cache
    from idiff_cli.diffusion.pretrained import load_pretrained
    from idiff_cli.implicit import report

    use_compilation_cache()
    from_run = pathlib.Path(cfg.from_run) if cfg.from_run else latest_pretrain_run()
    pre = load_pretrained(from_run)
    cfg = complete(dataclasses.replace(cfg, from_run=str(from_run)), pre.cfg.dataset)
    bind, optimizer = build(cfg, pre)  # checks the reward on the model before the run directory is claimed
    _claim(run_dir, cfg)
    root = jax.random.key(cfg.seed)

    ckpt = Checkpointer(run_dir.path / "checkpoints", keep=2)
    weights = Checkpointer(run_dir.path / "weights", keep=cfg.steps // cfg.ckpt_every + 1)
    resume = ckpt.latest_step()
    # one device: the U-Net's batch is small, and a fixed placement keeps the chunk compiled once
    params0 = jax.device_put(pre.params, jax.devices()[0])
    problem, method, _ = bind(params0)

    def initial_state():
        carry = method.init(params0, jax.random.fold_in(root, 0))  # the warm queue(s): real work
        return FinetuneState(params0, optimizer.init(params0), carry, jnp.asarray(0, jnp.int32))

    # every leaf committed to the device: an uncommitted leaf (the step counter) would make the second
    # chunk call, whose inputs are the first call's committed outputs, compile the chunk again
    if resume is None:
        state = jax.device_put(initial_state(), jax.devices()[0])
        run_dir.reset_metrics()
    else:
        template = jax.device_put(restore_template(jax.eval_shape(initial_state)), jax.devices()[0])
        state, _ = ckpt.restore(template)
        rows = [r for r in run_dir.read_metrics() if r["step"] <= resume]
        run_dir.reset_metrics()
        run_dir.append_metrics(rows)
    start = int(state.step)
    console.print(f"[bold]finetune[/] {pre.cfg.dataset} from {from_run} ({method.name}, reward {cfg.reward}, "
                  f"λ={cfg.lam}, β={cfg.beta}, M={cfg.M}, T={cfg.T}, batch {cfg.batch}, lr {cfg.lr}) -> {run_dir.path}",
                  highlight=False)

    chunk = make_chunk(bind, optimizer, cfg.log_every, (cfg.lam, cfg.beta))
    grid = make_grid_sampler(problem, cfg.grid_n, cfg.batch, jax.random.fold_in(root, 1))
    per_step = method.cost

    def evaluate(step: int) -> float:
        images = np.asarray(grid(state.params))
        save_grid(images, run_dir.path / "samples" / f"step_{step:06d}.png")
        pixels = np.clip(np.round((images[:8] + 1) * 127.5), 0, 255).astype(np.uint8)
        with atomic_path(run_dir.path / "samples" / f"step_{step:06d}.npy") as tmp:
            np.save(tmp, pixels)
        return float(np.mean(np.asarray(problem.reward(jnp.asarray(images)))))

    if cfg.fid_every:  # FID of fid_n samples of θ (the finetuning sampler, fixed keys) every fid_every steps
        from idiff_cli.fid.evaluate import PeriodicFID

        fid = PeriodicFID(cfg.fid_features, pre.cfg.dataset, pre.cfg.data_dir, pre.cfg.image_size, pre.image_shape,
                          run_dir.path / "fid")
        fid_sampler = make_grid_sampler(problem, cfg.fid_n, cfg.batch, jax.random.fold_in(root, 2))

    def with_fid(row: dict, step: int) -> dict:
        if cfg.fid_every and step % cfg.fid_every == 0:
            row.update(fid=fid(fid_sampler(state.params)), fid_n=cfg.fid_n)
        return row

    rows = run_dir.read_metrics()
    elapsed = rows[-1]["wall_s"] if rows else 0.0
    if start == 0:
        run_dir.append_metrics([with_fid({"step": 0, "eval_reward": evaluate(0), "wall_s": 0.0,
                                          "net_evals": method.warmup.forward * cfg.batch,
                                          "sequential_calls": method.warmup.sequential}, 0)])
    with progress_bar("reward", "kl") as progress:
        task = progress.add_task(f"finetune {method.name}", total=cfg.steps, completed=start, rate="",
                                 reward="-", kl="-")
        step = start
        while step < cfg.steps:
            t0 = time.perf_counter()
            state, metrics, kl_value = chunk(state, params0)
            (mean, std, gnorm), kl_value = jax.device_get((metrics, kl_value))
            seconds = time.perf_counter() - t0
            new = []
            for i in range(cfg.log_every):
                s = step + i + 1
                new.append({"step": s, "reward_mean": float(mean[i]), "reward_std": float(std[i]),
                            "grad_norm": float(gnorm[i]),
                            "net_evals": (method.warmup.forward + s * (per_step.forward + per_step.backward)) * cfg.batch,
                            "sequential_calls": method.warmup.sequential + s * per_step.sequential,
                            "wall_s": elapsed + seconds * (i + 1) / cfg.log_every})
            step += cfg.log_every
            elapsed += seconds
            new[-1]["kl"] = float(kl_value)
            if not np.isfinite(new[-1]["reward_mean"]) or not np.isfinite(new[-1]["grad_norm"]):
                raise UserError(f"the reward or gradient is not finite at step {step}: lower --lr or |--lambda|")
            if step % cfg.sample_every == 0 or step == cfg.steps:
                new[-1]["eval_reward"] = evaluate(step)
            with_fid(new[-1], step)
            run_dir.append_metrics(new)
            progress.update(task, completed=step, rate=f"{cfg.log_every / seconds:.2f} steps/s",
                            reward=f"{new[-1]['reward_mean']:.4f}", kl=f"{kl_value:.3f}")
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                ckpt.save(step, state)
                weights.save(step, state.params)
                ckpt.wait()
                weights.wait()
                run_dir.write_json("finetuned.json", {"from": str(from_run), "weights": "weights", "step": step,
                                                      "final": step == cfg.steps})
    ckpt.close()
    weights.close()
    report.finish_run(run_dir)
    console.print(f"done: outputs in {run_dir.path}/ (config.json, metrics.jsonl, samples/, figures/, checkpoints/)",
                  highlight=False)
    return state


def _claim(run_dir: RunDir, cfg: FinetuneConfig) -> None:
    """Writes config.json; a run directory holding another config is refused (resume needs the same one)."""
    path = run_dir.path / "config.json"
    mine = cfglib.to_dict(cfg)
    if path.exists():
        theirs = run_dir.read_json("config.json")
        if theirs != mine:
            changed = sorted(k for k in mine if theirs.get(k) != mine[k])
            raise UserError(f"'{run_dir.path}' holds a run with another config ({', '.join(changed)} differ); "
                            "pick a new --out or repeat the same settings to resume")
    run_dir.write_json("config.json", mine)
