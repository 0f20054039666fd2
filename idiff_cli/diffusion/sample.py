"""`idiff sample`: n images of a trained model -> a PNG grid (the first 256) and an .npz of all of them.

Batch i draws from fold_in(key(seed), i), its labels cycling over the classes (a text-to-image run: its
rows cycling over the prompts, n images of each, prompt by prompt), so the images depend only on the seed,
n and the batch size: a re-run writes the same files.
"""

from __future__ import annotations

import io
import pathlib
import time
from typing import Any

import jax
import numpy as np

from idiff_cli import loop, storage
from idiff_cli.diffusion import prompt_sampling
from idiff_cli.diffusion.model import TextToImageModel, load, make_sample_fn
from idiff_cli.images import save_grid, to_uint8
from idiff_cli.runs import RunDir, atomic_write_bytes, console, progress_bar
from idiff_cli.sharding import batch_mesh, replicate, to_host, use_compilation_cache

SHOWN = 256  # images in the PNG grid


def main(cfg: Any, out: pathlib.Path | None) -> tuple[pathlib.Path, pathlib.Path]:
    """Writes `out` (default RUN_DIR/samples)/sample-step<S>-<weights>-<sampler><steps>-seed<seed>-n<n>
    .png and .npz (`images` uint8 [N, H, W, C], `labels` [N]; a text-to-image run: N = n × prompts, and
    `prompts` [N], `negative_prompt`, `guidance` besides); returns the two paths."""
    run_dir = storage.path(cfg.run_dir)
    out = out or run_dir / "samples"
    RunDir(out).check_writable()
    use_compilation_cache()
    model = load(run_dir, weights=cfg.weights, step=cfg.step)
    settings = prompt_sampling.settings_of(cfg, isinstance(model, TextToImageModel))
    sampler = model.sampler(cfg.sample_steps, cfg.sampler, cfg.ddim_eta or 0.0)
    name = cfg.sampler or model.cfg.sampler
    mesh = batch_mesh()
    if settings is None:
        total = cfg.n
        labels = np.arange(cfg.n + cfg.batch) % max(model.num_classes, 1)
        batch = min(cfg.batch, cfg.n)
        batch -= batch % mesh.size if batch >= mesh.size else 0
        fn = make_sample_fn(model.cfg, model.model, model.sde, sampler, model.image_shape, batch, mesh)
        params = replicate(model.params, mesh)
        draw = lambda key, rows: fn(params, *replicate((key, rows), mesh))  # noqa: E731
    else:
        total = cfg.n * len(settings.prompts)
        labels = np.repeat(np.arange(len(settings.prompts)), cfg.n)
        labels = np.concatenate([labels, labels[: cfg.batch]]).astype(np.int32)
        batch = min(cfg.batch, total)
        fn, params = prompt_sampling.batch_sampler(model, settings, sampler, mesh)
        draw = lambda key, rows: fn(params, *replicate((key, rows), mesh))  # noqa: E731
    n_batches = -(-total // batch)
    root = jax.random.key(cfg.seed)
    with progress_bar() as progress, loop.interruptible(
            lambda done: f"stopped after {done} of {n_batches} batches; nothing written (the files are written "
                         "once every image is drawn)") as dispatch:
        task = progress.add_task(f"sample {sampler.n_steps} {name} steps", total=total, rate="")
        t0 = time.perf_counter()

        def one(state, j: int):
            """Batch j from fold_in(key(seed), j), dispatched (the images are read after the last)."""
            images = draw(jax.random.key_data(jax.random.fold_in(root, j)), labels[j * batch: (j + 1) * batch])
            done = min(total, (j + 1) * batch)
            progress.update(task, completed=done, rate=f"{done / (time.perf_counter() - t0):,.1f} img/s")
            return state, images

        _, batches = dispatch(one, None, 0, n_batches)
        images = [to_host(x) for x in batches]
    pixels = to_uint8(np.concatenate(images)[:total])
    stem = out / (f"sample-step{model.step}-{model.weights}-{name}{sampler.n_steps}"
                                          f"-seed{cfg.seed}-n{cfg.n}")
    png, npz = stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".npz")
    save_grid(pixels[:SHOWN], png)
    extra = {} if settings is None else {
        "prompts": np.asarray(settings.prompts)[labels[:total]], "negative_prompt": np.asarray(settings.negative_prompt),
        "guidance": np.float32(settings.guidance), "ddim_eta": np.float32(cfg.ddim_eta or 0.0), "dtype": settings.dtype}
    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=pixels, labels=labels[:total], **extra)
    atomic_write_bytes(npz, buffer.getvalue())
    console.print(f"wrote {png} and {npz}", highlight=False)
    return png, npz
