"""Reference statistics (μ, Σ) of features: `.npz` files with `mu` and `sigma` (the format pytorch-fid
and the TTUR code write, so their published files load as they are), and statistics of a dataset.

    save_stats(path, mu, sigma, features="inception", n=50000, dataset="cifar10")
    mu, sigma = load_stats(path, dim=2048)
    ref = reference(features, dataset="mnist")   # a Reference, from a file or a dataset (computed once)

The statistics of a dataset are computed once per machine and kept in `cache_dir()`
($IDIFF_CACHE_DIR/fid-reference), under a name that holds a digest of where the images and the
features come from (the dataset's source line: tfds or the embedded digits, and its image shape; the
extractor's name and weights): preparing the tfds dataset, or other feature weights, gives new
statistics; delete the directory to recompute them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import pathlib

import numpy as np

from idiff_cli.data import datasets
from idiff_cli.errors import UserError
from idiff_cli.fid.features import Features, embed_all
from idiff_cli.fid.frechet import feature_statistics
from idiff_cli.runs import atomic_write_bytes, cache_root, taking_turns


def save_stats(path, mu, sigma, **meta) -> pathlib.Path:
    """Writes mu [D], sigma [D, D] (float64) and string metadata to `path` atomically."""
    path = pathlib.Path(path)
    buffer = io.BytesIO()
    np.savez(buffer, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
             **{f"meta_{k}": np.array(str(v)) for k, v in meta.items()})
    atomic_write_bytes(path, buffer.getvalue())
    return path


def load_stats(path, dim: int | None = None, what: str = "--ref-stats") -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) from an .npz; UserError (one line) if absent, unreadable, malformed, or
    of another dimension than `dim`."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise UserError(f"{what} file '{path}' does not exist")
    try:
        with np.load(path) as data:
            if "mu" not in data.files or "sigma" not in data.files:
                raise UserError(f"{what} file '{path}' has no 'mu' and 'sigma' arrays (it has: {', '.join(data.files)})")
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot read {what} file '{path}': {type(e).__name__}: {e}") from None
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise UserError(f"{what} file '{path}' has mu {mu.shape} and sigma {sigma.shape}; expected [D] and [D, D]")
    if dim is not None and mu.size != dim:
        raise UserError(f"{what} file '{path}' holds {mu.size}-d statistics, but the features are {dim}-d; "
                        "use statistics made with the same --features")
    return mu, sigma


def dataset_images(name: str, data_dir: str | None = None, image_size: int = 0,
                   limit: int | None = None) -> np.ndarray:
    """All images (uint8 [N, H, W, C]) of a dataset of `idiff_cli.data.datasets` (tfds or embedded;
    `image_size` > 0 centre-crops and resizes as `idiff pretrain` does), or its first `limit`."""
    return _images(datasets.load(name, data_dir=data_dir or None, image_size=image_size), limit)


def _images(ds: datasets.ImageDataset, limit: int | None = None) -> np.ndarray:
    n = ds.num_examples if limit is None else min(limit, ds.num_examples)
    return ds.batch(np.arange(n))[0]


def image_statistics(features: Features, images, batch: int = 250) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the features of images [N, H, W, C] (uint8, or float in [-1, 1])."""
    return feature_statistics(embed_all(features, images, batch))


@dataclasses.dataclass(frozen=True)
class Reference:
    """Reference statistics, mu [D] and sigma [D, D], and where they come from (a file or a dataset)."""

    mu: np.ndarray
    sigma: np.ndarray
    description: str


def cache_dir() -> pathlib.Path:
    """Where datasets' statistics are kept between runs: $IDIFF_CACHE_DIR/fid-reference."""
    return cache_root() / "fid-reference"


def reference(features: Features, ref_stats: str | pathlib.Path | None = None, dataset: str | None = None,
              data_dir: str | None = None, image_size: int = 0, batch: int = 250) -> Reference:
    """Statistics from `ref_stats` (.npz with mu, sigma), else of all images of `dataset`, computed
    once per machine (module docstring; processes that need them at once take turns)."""
    if ref_stats is not None:
        mu, sigma = load_stats(ref_stats, dim=features.dim)
        return Reference(mu, sigma, f"file {ref_stats}")
    if dataset is None:
        raise UserError("give the reference: --ref-stats FILE.npz or --dataset NAME")
    ds = datasets.load(dataset, data_dir=data_dir or None, image_size=image_size)
    origin = f"{ds.source}|{ds.image_shape}|{features.name}|{features.source}"
    path = cache_dir() / f"ref-{dataset}-{features.name}-{hashlib.sha256(origin.encode()).hexdigest()[:16]}.npz"
    with taking_turns(path.with_suffix(".lock")):
        if path.exists():
            mu, sigma = load_stats(path, dim=features.dim, what="cached reference")
        else:
            images = _images(ds)
            mu, sigma = image_statistics(features, images, batch)
            save_stats(path, mu, sigma, features=features.name, features_source=features.source, dataset=dataset,
                       dataset_source=ds.source, n=len(images))
    return Reference(mu, sigma, f"dataset {dataset}")
