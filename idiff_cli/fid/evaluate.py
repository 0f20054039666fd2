"""`idiff evaluate-fid`: the FID of given images, or of the samples of a run (resumable), written to
fid.json (the metric itself: metric.py).

    evaluate_run(run_dir, features, step=None, n=50000, batch=250, ...)   # samples, FID, fid.json

Sampling: batch i draws its `batch` images from the one key fold_in(PRNGKey(seed), i), the images split
over the largest count of local devices that divides the batch; the draws are JAX's partitionable
threefry (each element from its index), so the samples and the kept features depend neither on how
often a run was interrupted nor on the device count it ran on.
The features of every finished batch are kept in `<run>/fid/<tag>/batch-NNNNN.npy` (tag: features,
checkpoint, sampler, steps, batch, seed); a re-run with the same settings computes only what is
missing, and a larger `--n` adds batches.
"""

from __future__ import annotations

import hashlib
import io
import json
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from idiff_cli import loop
from idiff_cli.diffusion import prompt_sampling
from idiff_cli.diffusion.model import TextToImageModel, load
from idiff_cli.errors import UserError
from idiff_cli.fid import stats as statslib
from idiff_cli.fid.features import Features, embed_all, get_features
from idiff_cli.fid.metric import fid_of_features
from idiff_cli.fid.stats import Reference, reference
from idiff_cli.runs import RunDir, atomic_write_bytes, console, default_run_dir, progress_bar
from idiff_cli.sharding import replicated, seed_mesh, use_compilation_cache


def load_samples(path: str | pathlib.Path) -> np.ndarray:
    """Images [N, H, W, C] from an .npz (the array `images` or `samples`, or its only array), an .npy,
    or a directory of PNGs (sorted by name); uint8, or float in [-1, 1]. [N, H, W] is read as C = 1."""
    path = pathlib.Path(path)
    if path.is_dir():
        images = _read_pngs(path)
    elif not path.is_file():
        raise UserError(f"--samples '{path}' does not exist")
    else:
        try:
            if path.suffix == ".npy":
                images = np.load(path, allow_pickle=False)
            else:
                with np.load(path, allow_pickle=False) as data:
                    names = [k for k in ("images", "samples") if k in data.files]
                    if not names and len(data.files) != 1:
                        raise UserError(f"--samples file '{path}' holds several arrays ({', '.join(data.files)}); "
                                        "name the images 'images' or 'samples'")
                    images = data[(names or data.files)[0]]
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"cannot read --samples '{path}' (.npz, .npy or a directory of PNGs): "
                            f"{type(e).__name__}: {e}") from None
    images = images[..., None] if images.ndim == 3 else images
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or not len(images):
        raise UserError(f"--samples '{path}': images must be [N, H, W, C] with C = 1 or 3, got shape {images.shape}")
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.floating):
            raise UserError(f"--samples '{path}': images must be uint8 or float in [-1, 1], got {images.dtype}")
        low, high = float(np.min(images)), float(np.max(images))
        if not (np.isfinite(low) and np.isfinite(high)) or low < -1.001 or high > 1.001:
            raise UserError(f"--samples '{path}': float images must lie in [-1, 1], got values in "
                            f"[{low:.4g}, {high:.4g}]")
    return images


def _read_pngs(directory: pathlib.Path) -> np.ndarray:
    files = sorted(directory.glob("*.png"))
    if not files:
        raise UserError(f"--samples directory '{directory}' holds no .png files")
    images = []
    for file in files:
        with Image.open(file) as image:
            pixels = np.asarray(image.convert("L" if image.mode in ("1", "L", "I", "I;16") else "RGB"))
        if images and pixels.shape != images[0].shape:
            raise UserError(f"--samples: '{file.name}' is {pixels.shape[1]}x{pixels.shape[0]}, the first PNG "
                            f"'{files[0].name}' {images[0].shape[1]}x{images[0].shape[0]}: all must be one size")
        images.append(pixels)
    return np.stack(images)


def _sample_batch_fn(pre, sampler, batch: int, mesh):
    """(params, key) -> images [batch, H, W, C] from the batch's one key, the network's input split
    along the batch over `mesh`. Class-conditional models get labels uniform over their classes."""
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names[0]))

    def one(params, key):
        sample_key, label_key = jax.random.split(key)
        labels = (jax.random.randint(label_key, (batch,), 0, pre.num_classes) if pre.num_classes else None)
        score = lambda x, t: pre.score(params, jax.lax.with_sharding_constraint(x, split), t, labels)  # noqa: E731
        return sampler.sample(score, sample_key, (batch, *pre.image_shape))

    return jax.jit(one, out_shardings=split)


def _prompted_batch_fn(pre, sampler, settings: prompt_sampling.Settings, batch: int):
    """(params, key) -> images [batch, H, W, 3] of a text-to-image model: row r of the whole run of
    samples has prompt r mod P, so batch i's rows are i·batch … (i + 1)·batch − 1; and its params."""
    fn, params = prompt_sampling.batch_sampler(pre, settings, sampler)
    n_prompts = len(settings.prompts)

    @jax.jit
    def one(params, key, i):
        rows = (i * batch + jnp.arange(batch)) % n_prompts
        return fn(params, jax.random.key_data(key), rows)

    return one, params


def sample_features(pre, sampler, features: Features, n: int, batch: int, seed: int, store: pathlib.Path,
                    progress=None, settings: prompt_sampling.Settings | None = None) -> np.ndarray:
    """Features [n, dim] of n samples of `pre` with `sampler` (a text-to-image model: with the prompts
    and guidance of `settings`), reusing the batches already in `store`."""
    n_batches = -(-n // batch)
    mesh = seed_mesh(batch)
    if settings is None:
        one = _sample_batch_fn(pre, sampler, batch, mesh)
        params = jax.device_put(pre.params, replicated(mesh))
        draw = lambda params, key, i: one(params, jax.device_put(key, replicated(mesh)))  # noqa: E731
    else:
        draw, params = _prompted_batch_fn(pre, sampler, settings, batch)
    root = jax.random.key(seed)
    task = progress.add_task("fid samples", total=n, rate="") if progress else None
    start, fresh = time.monotonic(), 0

    def batch_features(state, i: int):
        """Batch i's features into `store` (a batch already there is kept as it is)."""
        nonlocal fresh
        path = store / f"batch-{i:05d}.npy"
        if not path.exists():
            _save_npy(path, embed_all(features, np.asarray(draw(params, jax.random.fold_in(root, i), i)), batch))
            fresh += batch
        if progress:
            rate = fresh / max(time.monotonic() - start, 1e-9)
            progress.update(task, completed=min((i + 1) * batch, n), rate=f"{rate:.1f} img/s")
        return state, None

    def stopped(done: int) -> str:
        kept = sum((store / f"batch-{i:05d}.npy").exists() for i in range(n_batches))  # a file or an object
        return (f"stopped after batch {done} of {n_batches}; the features of {kept} batches are kept in {store}: "
                "re-run the same command to continue")

    with loop.interruptible(stopped) as dispatch:  # SIGTERM/SIGINT: stop after the current batch
        dispatch(batch_features, None, 0, n_batches)
    return np.concatenate([np.load(io.BytesIO((store / f"batch-{i:05d}.npy").read_bytes()))
                           for i in range(n_batches)])[:n]


def _save_npy(path: pathlib.Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(path, buffer.getvalue())


def evaluate_run(run_dir: str | pathlib.Path, features: Features, *, step: int | None, n: int, batch: int,
                 sampler_name: str | None, sample_steps: int | None, seed: int, ref_stats=None,
                 dataset: str | None = None, data_dir: str | None = None, cfg: Any = None) -> dict[str, Any]:
    """Samples n images of the run's model (θ0 of a pretrain run, θ of a finetune run; or checkpoint `step`;
    a text-to-image run with the prompts of `cfg`), computes the FID and writes fid.json."""
    run = RunDir(run_dir)
    pre = load(run.path, step=step)
    settings = prompt_sampling.settings_of(cfg, isinstance(pre, TextToImageModel)) if cfg is not None else None
    features.check_shape((1, *pre.image_shape))
    sampler = pre.sampler(sample_steps, sampler_name, (cfg.ddim_eta or 0.0) if cfg is not None else 0.0)
    sampler_name = sampler_name or pre.cfg.sampler
    dataset = dataset or pre.cfg.dataset
    ref = reference(features, ref_stats, dataset, data_dir or pre.cfg.data_dir, pre.cfg.image_size, batch=batch)
    tag = f"{features.name}-ckpt{pre.step}-{sampler_name}-{sampler.n_steps}steps-b{batch}-seed{seed}"
    prompted = {}
    if settings is not None:
        prompted = {"prompts": len(settings.prompts), "negative_prompt": settings.negative_prompt,
                    "guidance": settings.guidance, "ddim_eta": cfg.ddim_eta or 0.0, "dtype": settings.dtype}
        digest = hashlib.sha256(json.dumps([settings.prompts, prompted]).encode()).hexdigest()[:12]
        tag += f"-prompts{digest}"
    with progress_bar() as progress:
        feats = sample_features(pre, sampler, features, n, batch, seed, run.path / "fid" / tag, progress, settings)
    result = {"metric": features.label, "value": fid_of_features(feats, ref), "n": n, "features": features.name,
              "features_source": features.source, "reference": ref.description, "run": str(run.path),
              "checkpoint": pre.step, "weights": pre.weights, "sampler": sampler_name, "sample_steps": sampler.n_steps,
              "batch": batch, "seed": seed, **prompted}
    run.write_json("fid.json", result)
    return result


def evaluate_images(images, features: Features, ref: Reference, out: pathlib.Path, source: str,
                    batch: int) -> dict[str, Any]:
    """The FID of given images, written to `out`/fid.json."""
    result = {"metric": features.label, "value": fid_of_features(embed_all(features, images, batch), ref),
              "n": int(len(images)), "features": features.name, "features_source": features.source,
              "reference": ref.description, "samples": source}
    RunDir(out).write_json("fid.json", result)
    return result


def summary(result: dict[str, Any]) -> str:
    return f"{result['metric']} = {result['value']:.4f} (n = {result['n']}, reference: {result['reference']})"




def main(cfg: Any, out: pathlib.Path | None) -> dict[str, Any] | None:
    """`idiff evaluate-fid` in its three modes (RUN_DIR, --samples, --dataset --save-stats); returns the
    fid.json content (None when writing statistics)."""
    modes = [m for m, given in (("RUN_DIR", cfg.run_dir), ("--samples", cfg.samples)) if given]
    if len(modes) > 1:
        raise UserError("give RUN_DIR or --samples, not both")
    if not modes and not (cfg.save_stats and cfg.dataset):
        raise UserError("give RUN_DIR, --samples FILE.npz, or --dataset NAME --save-stats FILE.npz")
    if cfg.save_stats and cfg.run_dir:
        raise UserError("--save-stats writes the statistics of --dataset or --samples, not of a run")
    if not cfg.run_dir:
        prompt_sampling.settings_of(cfg, False)  # the text-to-image options sample a run: refused here
    if cfg.save_stats:
        if pathlib.Path(cfg.save_stats).is_dir():
            raise UserError(f"--save-stats '{cfg.save_stats}' is a directory; give the .npz file to write")
        RunDir(pathlib.Path(cfg.save_stats).parent).check_writable("--save-stats")
    elif cfg.samples:
        out = out or default_run_dir("evaluate-fid")
        RunDir(out).check_writable()
    else:
        RunDir(cfg.run_dir).check_writable("RUN_DIR")
    use_compilation_cache()
    extractor = get_features(cfg.features, cfg.inception_weights)
    if cfg.save_stats:
        images = load_samples(cfg.samples) if cfg.samples else statslib.dataset_images(cfg.dataset, cfg.data_dir)
        mu, sigma = statslib.image_statistics(extractor, images, cfg.batch)
        statslib.save_stats(cfg.save_stats, mu, sigma, features=extractor.name, n=len(images),
                            source=str(cfg.samples) if cfg.samples else f"dataset {cfg.dataset}")
        console.print(f"wrote {cfg.save_stats}: {extractor.name} statistics of {len(images)} images", highlight=False)
        return None
    if cfg.samples:
        images = load_samples(cfg.samples)
        extractor.check_shape(images.shape)
        dataset = cfg.dataset or ("mnist" if extractor.name == "mnist-classifier" else None)
        ref = reference(extractor, cfg.ref_stats, dataset, cfg.data_dir, batch=cfg.batch)
        result = evaluate_images(images, extractor, ref, out, str(cfg.samples),
                                 cfg.batch)
    else:
        result = evaluate_run(cfg.run_dir, extractor, step=cfg.step, n=cfg.n, batch=cfg.batch,
                              sampler_name=cfg.sampler, sample_steps=cfg.sample_steps, seed=cfg.seed,
                              ref_stats=cfg.ref_stats, dataset=cfg.dataset, data_dir=cfg.data_dir, cfg=cfg)
    console.print(summary(result), highlight=False)
    return result
