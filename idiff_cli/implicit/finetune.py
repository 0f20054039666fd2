"""`idiff finetune`: reward training of a pretrained diffusion model (paper §5.2, Appendix A.2).

Minimises F(p) = −λ E_{x∼p}[R(x)] + β KL(p ‖ π*(θ0)) over the U-Net weights θ, starting from the
pretrained θ0, with one of the methods of methods.py (default: Implicit Diffusion, Algorithm 2) and
optax Adam. The run is one `loop.Unit`: the host dispatches one jitted outer step at a time (one
program per outer step compiles faster on XLA:CPU than a scan of them) and reads the metrics once
per chunk. Same-seed sample grids samples/step_XXXXXX.png use noise keys fixed for the whole run
(Figs 7, 13, 14, 16). The θ of every checkpoint is also kept on its own in weights/ with
finetuned.json, so `model.load` (hence `idiff sample`, `idiff evaluate-fid`) reads a finetuned run
like a pretrained one.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from idiff_cli import loop, registry, signals
from idiff_cli.checkpoint import Checkpointer, restore_template
from idiff_cli.diffusion.model import Model, finetuned_weights, load, write_finetuned
from idiff_cli.errors import UserError
from idiff_cli.fid.evaluate import PeriodicFID
from idiff_cli.images import save_grid, to_uint8
from idiff_cli.implicit import adjoint, girsanov, methods, report
from idiff_cli.implicit.options import SCHEMA, dataset_defaults
from idiff_cli.implicit.paths import sampler_paths
from idiff_cli.implicit.rewards import check_reward
from idiff_cli.parallel import use_compilation_cache
from idiff_cli.runs import RunDir, atomic_path, default_run_dir

EVOLUTION_IMAGES = 8  # fixed-key images per step kept in samples/step_XXXXXX.npy for the evolution strip


def latest_pretrain_run(root: pathlib.Path = pathlib.Path("runs")) -> pathlib.Path:
    """The most recently modified run under `root` holding a pretrained model (pretrained.json)."""
    found = sorted(root.glob("*/pretrained.json"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    if not found:
        raise UserError(f"no pretrained model under '{root}/' (no */pretrained.json); run `idiff pretrain mnist` "
                        "first or pass --from RUN_DIR")
    return found[-1].parent


def complete(cfg: Any, from_run: pathlib.Path, dataset: str) -> Any:
    """The config with --from and the M, T, batch left to their rule filled in: the preset's values
    for `dataset` (paper Tables 2 and 4), checked again with the filled values."""
    M, T, batch = dataset_defaults(cfg.preset, dataset)
    filled = dict(from_run=str(from_run), M=M if cfg.M is None else cfg.M, T=T if cfg.T is None else cfg.T,
                  batch=batch if cfg.batch is None else cfg.batch)
    return SCHEMA.validated(dataclasses.replace(cfg, **filled))


class FinetuneState(NamedTuple):
    params: Any
    opt_state: Any
    carry: Any  # the method's carry (the queue for `implicit`)
    step: jax.Array


def build(cfg: Any, model: Model):
    """`bind(params0, lam, beta) -> (problem, method, kl)` for a run on the pretrained `model`, and
    the optimiser. Raises UserError when the reward does not fit the model's images.

    θ0 enters the KL term; `bind` is called inside the jitted outer step with θ0, λ and β as arguments,
    so neither the weights nor λ and β are baked into the compiled program as constants."""
    reward = registry.get("image-reward", cfg.reward)
    check_reward(reward, cfg.reward, model.image_shape)
    labels = jnp.arange(cfg.batch) % model.num_classes if model.num_classes else None
    sampler = model.sampler(cfg.T, cfg.sampler)
    paths = sampler_paths(sampler, model.score, (cfg.batch, *model.image_shape), labels)
    if cfg.clip:  # the reward sees the images as they are shown: clipped to [-1, 1] (no gradient for
        # pushing a pixel beyond white or black, so brightness cannot be gained by unbounded pixel values)
        denoise = paths.denoise
        paths = paths._replace(denoise=lambda params, x: jnp.clip(denoise(params, x), -1.0, 1.0))

    def bind(params0, lam=cfg.lam, beta=cfg.beta):
        terminal = lambda params, x: -lam * reward(paths.denoise(params, x))  # noqa: E731
        kl = girsanov.kl_running_cost(model.score, model.sde, sampler.grid, params0, labels)
        transition = (girsanov.kl_transition(paths, model.score, model.sde, sampler.grid, params0, beta, labels)
                      if cfg.beta else adjoint.transition(paths.step))
        problem = methods.Problem(paths, terminal, transition, reward, bool(cfg.beta))
        return problem, methods.make_method(cfg.method, problem, cfg.T, cfg.M, cfg.adjoint), kl

    # the method's own checks (adjoint/method pairs, a plug-in builder) before any directory is claimed
    bind(model.params)
    return bind, optax.adam(cfg.lr)


def make_chunk(bind, optimizer, coef: tuple[float, float]):
    """(state, θ0, n) -> n outer steps with (λ, β) = `coef` -> (state, per-step metrics (reward mean,
    reward std, gradient norm) [n] each, KL of the last completed batch). One jitted outer step per
    dispatch (asynchronous: the host reads the metrics once per chunk)."""

    def outer(state: FinetuneState, params0, coef):
        problem, method, _ = bind(params0, *coef)
        carry, est = method.estimate(state.params, state.carry, None)
        updates, opt_state = optimizer.update(est.grad, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        r = problem.reward(est.images)
        metrics = (jnp.mean(r), jnp.std(r), optax.tree.norm(est.grad))
        return FinetuneState(params, opt_state, carry, state.step + 1), metrics, est.states

    def kl_of(params, params0, states):
        return jnp.mean(girsanov.path_kl(bind(params0)[2], params, states))

    outer_jit, kl_jit = jax.jit(outer), jax.jit(kl_of)
    coef = jnp.asarray(coef, jnp.float32)

    def chunk(state, params0, n: int):
        """Up to n outer steps: fewer when a signal asks the run to stop (metrics of the steps done)."""
        metrics = []
        for _ in range(n):
            state, m, states = outer_jit(state, params0, coef)
            metrics.append(m)
            if signals.requested():
                break
        # Girsanov KL(p ‖ π*(θ0)) on the last completed batch under the updated θ (logging only: its
        # 2T network calls are not counted in net_evals)
        return state, tuple(jnp.stack(v) for v in zip(*metrics)), kl_jit(state.params, params0, states)

    return chunk


def make_grid_sampler(problem, grid_n: int, batch: int, key: jax.Array):
    """jit: params -> [grid_n, H, W, C] images from fixed noise keys (the same for every θ)."""
    p = problem.paths
    keys = jax.random.split(key, -(-grid_n // batch))

    def sample(params):
        def one(k):
            return p.denoise(params, adjoint.rollout(p.step, params, p.init(k), k, p.n_steps)[-1])

        images = jax.lax.map(one, keys)
        return images.reshape(-1, *images.shape[2:])[:grid_n]

    return jax.jit(sample)


def finetune_unit(cfg: Any, model: Model, bind, optimizer, run_dir: RunDir, weights: Checkpointer) -> loop.Unit:
    """The run as one loop unit: state FinetuneState, one row per outer step, the fixed-key grid and
    its reward every --sample-every steps, the periodic FID, θ into weights/ at every checkpoint."""
    root = jax.random.key(cfg.seed)
    device = jax.devices()[0]  # one device: the U-Net's batch is small, and a fixed placement keeps
    # the outer step compiled once (every leaf committed: an uncommitted leaf would recompile it)
    params0 = jax.device_put(model.params, device)
    problem, method, _ = bind(params0)
    cost = method.cost

    def fresh() -> FinetuneState:
        carry = method.init(params0, jax.random.fold_in(root, 0))  # the warm queue(s): real work
        return FinetuneState(params0, optimizer.init(params0), carry, jnp.asarray(0, jnp.int32))

    def init() -> FinetuneState:
        return jax.device_put(fresh(), device)

    def template() -> FinetuneState:  # shapes only: restoring does no warm-up work
        return jax.device_put(restore_template(jax.eval_shape(fresh)), device)

    chunk = make_chunk(bind, optimizer, (cfg.lam, cfg.beta))
    grid = make_grid_sampler(problem, cfg.grid_n, cfg.batch, jax.random.fold_in(root, 1))

    def evaluate(state: FinetuneState, step: int) -> dict:
        """The fixed-key grid of θ (PNG, and the first images as uint8 for the evolution strip) and its reward."""
        images = np.asarray(grid(state.params))
        save_grid(images, run_dir.path / "samples" / f"step_{step:06d}.png")
        with atomic_path(run_dir.path / "samples" / f"step_{step:06d}.npy") as tmp:
            np.save(tmp, to_uint8(images[:EVOLUTION_IMAGES]))
        return {"eval_reward": float(np.mean(np.asarray(problem.reward(jnp.asarray(images)))))}

    def periodic_fid() -> Callable[[FinetuneState, int], dict]:
        """FID of fid_n samples of θ (the finetuning sampler, fixed keys)."""
        periodic = PeriodicFID(cfg.fid_features, model.cfg.dataset, model.cfg.data_dir, model.cfg.image_size,
                               model.image_shape, run_dir.path / "fid")
        fid_sampler = make_grid_sampler(problem, cfg.fid_n, cfg.batch, jax.random.fold_in(root, 2))
        return lambda state, step: {"fid": periodic(fid_sampler(state.params)), "fid_n": cfg.fid_n}

    fid_of = periodic_fid() if cfg.fid_every else None
    hooks = [loop.Hook(cfg.sample_every, evaluate)] + ([loop.Hook(cfg.fid_every, fid_of, at_end=False)] if fid_of else [])

    def net_evals(step: int) -> int:
        """Images through a forward or backward pass of θ's or θ0's network, warm-up included."""
        return (method.warmup.forward + method.warmup.backward + step * (cost.forward + cost.backward)) * cfg.batch

    def first_rows(state: FinetuneState) -> loop.Rows:
        row = {"step": 0, **evaluate(state, 0), "net_evals": net_evals(0),
               "sequential_calls": method.warmup.sequential, **(fid_of(state, 0) if fid_of else {})}
        return [row]

    def advance(state: FinetuneState, step: int, n: int):
        state, metrics, kl = chunk(state, params0, n)
        (mean, std, gnorm), kl = jax.device_get((metrics, kl))
        rows = [{"step": step + i + 1, "reward_mean": float(mean[i]), "reward_std": float(std[i]),
                 "grad_norm": float(gnorm[i]), "net_evals": net_evals(step + i + 1),
                 "sequential_calls": method.warmup.sequential + (step + i + 1) * cost.sequential}
                for i in range(len(mean))]
        rows[-1]["kl"] = float(kl)
        return state, rows

    def on_checkpoint(state: FinetuneState, step: int, final: bool) -> None:
        if step not in weights.all_steps():  # a finished run re-run: its θ is already stored
            weights.save(step, state.params)
            weights.wait()
        write_finetuned(run_dir, cfg.from_run, step, final)

    return loop.Unit(cfg.steps, init, advance, template=template, first_rows=first_rows, hooks=hooks,
                     chunk=cfg.log_every, finite=("reward_mean", "grad_norm"),
                     nan_hint="lower --lr or |--lambda|", progress=("reward_mean", "kl"),
                     on_checkpoint=on_checkpoint, step_of=lambda state: int(state.step))


def main(cfg: Any, out: pathlib.Path | None) -> FinetuneState:
    """`idiff finetune`: loads the pretrained model, fills M/T/batch and checks the reward and method on
    it before the run directory is claimed; runs (or resumes) the finetuning; draws its figures."""
    use_compilation_cache()
    from_run = pathlib.Path(cfg.from_run) if cfg.from_run else latest_pretrain_run()
    model = load(from_run)
    cfg = complete(cfg, from_run, model.cfg.dataset)
    bind, optimizer = build(cfg, model)
    run_dir = RunDir(out or default_run_dir("finetune"))
    with loop.Run(SCHEMA, cfg, run_dir, cfg.ckpt_every, keep=2) as run:
        run.print(f"[bold]finetune[/] {model.cfg.dataset} from {from_run} ({cfg.method}, reward {cfg.reward}, "
                  f"λ={cfg.lam}, β={cfg.beta}, M={cfg.M}, T={cfg.T}, batch {cfg.batch}, lr {cfg.lr}) -> {run_dir.path}")
        with finetuned_weights(run_dir, keep=cfg.steps // cfg.ckpt_every + 1) as weights:
            state = run.run(finetune_unit(cfg, model, bind, optimizer, run_dir, weights))
        report.finish_run(run_dir.path)
        run.done("config.json, metrics.jsonl, samples/, figures/, checkpoints/, weights/, finetuned.json")
    return state
