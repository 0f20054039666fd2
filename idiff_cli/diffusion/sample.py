"""`idiff sample`: n images of a trained model -> a PNG grid (the first 256) and an .npz of all of them.

Batch i draws from fold_in(key(seed), i), its labels cycling over the classes, so the images depend
only on the seed, n and the batch size: a re-run writes the same files.
"""

from __future__ import annotations

import io
import pathlib
import time
from typing import Any

import jax
import numpy as np

from idiff_cli import loop
from idiff_cli.diffusion.model import load, make_sample_fn
from idiff_cli.images import save_grid, to_uint8
from idiff_cli.runs import atomic_write_bytes, console, progress_bar
from idiff_cli.sharding import batch_mesh, replicate, to_host, use_compilation_cache

SHOWN = 256  # images in the PNG grid


def main(cfg: Any, out: pathlib.Path | None) -> tuple[pathlib.Path, pathlib.Path]:
    """Writes `out` (default RUN_DIR/samples)/sample-step<S>-<weights>-<sampler><steps>-seed<seed>-n<n>
    .png and .npz (`images` uint8 [n, H, W, C], `labels` [n]); returns the two paths."""
    use_compilation_cache()
    run_dir = pathlib.Path(cfg.run_dir)
    model = load(run_dir, weights=cfg.weights, step=cfg.step)
    sampler = model.sampler(cfg.sample_steps, cfg.sampler)
    name = cfg.sampler or model.cfg.sampler
    mesh = batch_mesh()
    batch = min(cfg.batch, cfg.n)
    batch -= batch % mesh.size if batch >= mesh.size else 0
    fn = make_sample_fn(model.cfg, model.model, model.sde, sampler, model.image_shape, batch, mesh)
    params = replicate(model.params, mesh)
    labels = np.arange(cfg.n + batch) % max(model.num_classes, 1)
    n_batches = -(-cfg.n // batch)
    root = jax.random.key(cfg.seed)
    with progress_bar() as progress, loop.interruptible(
            lambda done: f"stopped after {done} of {n_batches} batches; nothing written (the files are written "
                         "once every image is drawn)") as dispatch:
        task = progress.add_task(f"sample {sampler.n_steps} {name} steps", total=cfg.n, rate="")
        t0 = time.perf_counter()

        def draw(state, j: int):
            """Batch j from fold_in(key(seed), j), dispatched (the images are read after the last)."""
            key = jax.random.key_data(jax.random.fold_in(root, j))
            images = fn(params, *replicate((key, labels[j * batch: (j + 1) * batch]), mesh))
            done = min(cfg.n, (j + 1) * batch)
            progress.update(task, completed=done, rate=f"{done / (time.perf_counter() - t0):,.1f} img/s")
            return state, images

        _, batches = dispatch(draw, None, 0, n_batches)
        images = [to_host(x) for x in batches]
    pixels = to_uint8(np.concatenate(images)[: cfg.n])
    stem = (out or run_dir / "samples") / (f"sample-step{model.step}-{model.weights}-{name}{sampler.n_steps}"
                                          f"-seed{cfg.seed}-n{cfg.n}")
    png, npz = stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".npz")
    save_grid(pixels[:SHOWN], png)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=pixels, labels=labels[: cfg.n])
    atomic_write_bytes(npz, buffer.getvalue())
    console.print(f"wrote {png} and {npz}", highlight=False)
    return png, npz
