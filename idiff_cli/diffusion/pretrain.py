"""`idiff pretrain`: denoising diffusion pretraining of θ0 (paper Appendix A.2, Tables 1 and 3).

One jitted training step (denoising score matching, optax Adam, EMA of the parameters), dispatched
asynchronously `log_every` times between host reads of the metrics; the global batch is split over
every device of every process (`jax.sharding`, parameters replicated), so one code path serves one
CPU, a GPU box and a TPU pod slice. The run loop (loop.py) owns the run directory: resume from the
latest checkpoint, hooks for sample grids and the periodic FID, checkpoints. Step k trains on the
examples from position k × batch of the data stream and draws its noise from fold_in(key, k), so a
resumed run repeats the uninterrupted one.

Run directory:
    config.json           the resolved config (architecture included)
    metrics.jsonl         per `log_every` steps: loss, learning rate, grad norm, images/s, data position
    checkpoints/<step>/   orbax: TrainState (params, EMA, optimiser state, step, key)
    pretrained.json       which checkpoint is θ0 for `idiff finetune` (EMA weights), `final` when done
    samples/step_*.png    sample grids during training (EMA weights, fixed key)
    figures/loss.png, figures/samples.png
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from idiff_cli.data import datasets
from idiff_cli.data.stream import DataStream
from idiff_cli.diffusion import figures
from idiff_cli.diffusion.losses import denoising_loss, score_function
from idiff_cli.diffusion.model import (
    TrainState,
    init_state,
    learning_rate,
    make_model,
    make_optimizer,
    make_sample_fn,
    make_sampler,
    make_sde,
    state_template,
    write_pretrained,
)
from idiff_cli.diffusion.options import PRETRAIN
from idiff_cli.diffusion.unet import UNet
from idiff_cli.errors import UserError, first_line
from idiff_cli.fid.features import get_features
from idiff_cli.fid.metric import PeriodicFID
from idiff_cli.images import from_uint8, save_grid
from idiff_cli.loop import Hook, Image, Run, Unit
from idiff_cli.runs import RunDir, default_run_dir
from idiff_cli.sharding import (
    device_count,
    global_batch,
    initialize_distributed_from_env,
    mesh_of,
    replicate,
    replicated,
    to_host,
    use_compilation_cache,
)


def complete(cfg: Any, ds: datasets.ImageDataset) -> Any:
    """The config completed for the dataset (`options.TABLE`: the image size of the data and the
    preset's U-Net for it); checks that the U-Net can take the images and that the labels exist."""
    cfg = PRETRAIN.complete(cfg, {"image_size": ds.image_shape[0]})
    problem = UNet.cannot_take(cfg.image_size, cfg.ch_mult)
    if problem:
        raise UserError(f"{problem}; pick --image-size or --ch-mult to match")
    if cfg.class_conditional and not ds.num_classes:
        raise UserError(f"--class-conditional: dataset '{cfg.dataset}' has no labels")
    return cfg


def make_train_step(cfg: Any, model: UNet, sde, optimizer):
    """step(state, (images uint8 [B, H, W, C], labels [B])) -> (state, (loss, grad norm, learning rate))."""
    schedule = learning_rate(cfg)

    def loss_fn(params, x, labels, key):
        loss_key, dropout_key = jax.random.split(key)
        apply = lambda p, xt, level, y: model.apply(p, xt, level, y, train=True, rngs={"dropout": dropout_key})  # noqa: E731
        score = score_function(apply, sde, cfg.precondition)
        return jnp.mean(denoising_loss(lambda xt, t: score(params, xt, t, labels), sde, x, loss_key))

    def step(state: TrainState, batch):
        images, labels = batch
        flip_key, loss_key = jax.random.split(jax.random.fold_in(state.key, state.step))
        x = from_uint8(images)
        if cfg.flip:
            flip = jax.random.bernoulli(flip_key, 0.5, (x.shape[0], 1, 1, 1))
            x = jnp.where(flip, x[:, :, ::-1], x)
        loss, grads = jax.value_and_grad(loss_fn)(state.params, x, labels, loss_key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        d = cfg.ema_decay
        ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, state.ema, params)
        metrics = (loss, optax.tree.norm(grads), schedule(state.step))
        return TrainState(state.step + 1, params, ema, opt_state, state.key), metrics

    return step


def make_step_fn(step, mesh):
    """jit(step): batch sharded over `mesh`, state replicated, state buffers donated.

    The run loop dispatches one call per step (`loop.dispatch`: asynchronous, the metrics read once per
    `log_every` steps), which keeps logging, checkpoints and preemption between steps at no cost."""
    return jax.jit(step, out_shardings=replicated(mesh), donate_argnums=0)


def fixed_draw(cfg: Any, model: UNet, sde, image_shape, num_classes: int, n: int, stream: int, mesh):
    """params -> n samples of the config's sampler from the fixed key fold_in(key(seed), stream), labels
    cycling over the classes (the grids: stream 2; the periodic FID: stream 3)."""
    fn = make_sample_fn(cfg, model, sde, make_sampler(cfg, sde), image_shape, n, mesh)
    inputs = replicate((jax.random.key_data(jax.random.fold_in(jax.random.key(cfg.seed), stream)),
                        np.arange(n) % max(num_classes, 1)), mesh)
    return lambda params: to_host(fn(params, *inputs))


def main(cfg: Any, out: pathlib.Path | None) -> TrainState:
    """Trains (or resumes) the run in `out` (default runs/pretrain-<dataset>-<timestamp>); returns the
    final state. Everything that needs the data is checked before the run directory is claimed."""
    initialize_distributed_from_env()
    use_compilation_cache()
    ds = datasets.load(cfg.dataset, cfg.data_dir, cfg.image_size or 0)
    cfg = complete(cfg, ds)
    n, note = device_count(cfg.batch, cfg.devices, len(jax.local_devices()), jax.process_count())
    mesh = mesh_of(n)
    stream = DataStream(ds, cfg.batch, cfg.seed, jax.process_index(), jax.process_count())
    image_shape = ds.image_shape
    features = None
    if cfg.fid_every:
        features = get_features(cfg.fid_features)
        features.check_shape((1, *image_shape))
    is_main = jax.process_index() == 0
    run_dir = RunDir(out or default_run_dir(f"pretrain-{cfg.dataset.replace(':', '-').replace('/', '-')}"))
    run = Run(PRETRAIN, cfg, run_dir, cfg.ckpt_every, cfg.keep_checkpoints, is_main)

    model, sde, optimizer = make_model(cfg, ds.num_classes), make_sde(cfg), make_optimizer(cfg)
    try:  # the U-Net's shapes on the data's images: an architecture that does not fit is one line
        shapes = jax.eval_shape(lambda: init_state(model, optimizer, image_shape, 0)).params
    except (TypeError, ValueError) as e:
        raise UserError(f"the U-Net of --ch {cfg.ch} --ch-mult {','.join(map(str, cfg.ch_mult))} --groups {cfg.groups} "
                        f"--attn-resolutions {','.join(map(str, cfg.attn_resolutions))} does not fit "
                        f"{'×'.join(map(str, image_shape))} images: {first_line(e)}") from None
    n_params = sum(x.size for x in jax.tree.leaves(shapes))
    step_fn = make_step_fn(make_train_step(cfg, model, sde, optimizer), mesh)

    def train_step(state: TrainState, i: int):
        """Training step i + 1 on the examples from position i × batch of the stream."""
        images, labels = stream.read(i * cfg.batch, 1)
        return step_fn(state, global_batch((images[0], labels[0]), mesh))

    def rows(start: int, metrics: list, seconds: float) -> list[dict]:
        """One row at the last step done: the means over the chunk's steps."""
        k = len(metrics)
        values = np.array([[float(v) for v in m] for m in metrics])  # [k, 3]: loss, grad norm, lr
        return [{"step": start + k, "loss": float(values[:, 0].mean()), "grad_norm": float(values[:, 1].mean()),
                 "lr": float(values[-1, 2]), "images_per_s": k * cfg.batch / seconds,
                 "data_position": (start + k) * cfg.batch}]

    grid = fixed_draw(cfg, model, sde, image_shape, ds.num_classes, cfg.grid_n, 2, mesh)

    def sample_grid(state: TrainState, step: int) -> dict:
        images = grid(state.ema)
        path = run_dir.path / ("figures/samples.png" if step == cfg.steps else f"samples/step_{step:07d}.png")
        if not is_main:
            return {}
        save_grid(images, path)
        return {"samples": Image(path)}

    def fid_hook() -> Hook:
        """FID of fid_n samples of the EMA weights from fixed keys (the dataset's statistics are computed
        on first use, which takes a while: built once the run has claimed its directory)."""
        fid = PeriodicFID(features, cfg.dataset, cfg.data_dir, cfg.image_size, image_shape)
        fid_draw = fixed_draw(cfg, model, sde, image_shape, ds.num_classes, cfg.fid_n, 3, mesh)
        return Hook(cfg.fid_every, lambda state, step: {"fid": fid(fid_draw(state.ema)), "fid_n": cfg.fid_n},
                    at_end=False)

    def on_checkpoint(state: TrainState, step: int, final: bool) -> None:
        if is_main:
            write_pretrained(run_dir, step, final, image_shape, ds.num_classes, ds.name, ds.source)
            figures.save_loss(run_dir)

    with run:
        run.print(f"[bold]pretrain[/] {cfg.dataset} ({cfg.preset} preset): {n_params / 1e6:.2f} M-parameter "
                  f"U-Net, {cfg.sde} noise, batch {cfg.batch} on {mesh.size} device(s) / {jax.process_count()} "
                  f"process(es), {cfg.steps} steps -> {run_dir.path}")
        run.print(f"data: {ds.source}")
        if note:
            run.print(note)
        unit = Unit(
            steps=cfg.steps,
            init=jax.jit(lambda: init_state(model, optimizer, image_shape, cfg.seed), out_shardings=replicated(mesh)),
            template=lambda: state_template(model, optimizer, image_shape, replicated(mesh)),
            step=train_step,
            rows=rows,
            hooks=[Hook(cfg.sample_every, sample_grid)] + ([fid_hook()] if cfg.fid_every else []),
            chunk=cfg.log_every,
            finite=("loss", "grad_norm"),
            nan_hint="lower --lr or set --grad-clip",
            progress=("loss",),
            on_checkpoint=on_checkpoint,
            rate=lambda seconds, n: f"{n * cfg.batch / seconds:,.0f} img/s",
        )
        state = run.run(unit)
        last = run_dir.read_metrics()[-1:]
        loss = f"final loss {last[0]['loss']:.4f}, " if last and "loss" in last[0] else ""
        run.done("config.json, metrics.jsonl, checkpoints/, pretrained.json, samples/, figures/",
                 f"{loss}θ0 = EMA weights of checkpoint {cfg.steps}")
    return state
