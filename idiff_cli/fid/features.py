"""Feature extractors of the FID, by name (registry kind "features", `get_features(name)`):

* `inception`: the 2048-d pool features of pytorch-fid's Inception-v3 (inception.py), with the weights
  converted from the pinned 2015-12-05 file (`--inception-weights PATH` or $IDIFF_INCEPTION_WEIGHTS).
  Numbers are "FID" in the usual sense, comparable with published ones.
* `mnist-classifier`: the 128-d penultimate features of the project's MNIST classifier
  (idiff_cli/classifiers.py), offline; numbers are "FID (MNIST classifier features)", not comparable
  with Inception FID.

Images enter as the standard tools see them: samples in [-1, 1] are clipped and quantised to 8 bits
(as saving a PNG does), then scaled to [0, 1]; uint8 images are taken as they are. Grey images are
repeated to 3 channels for Inception (as PIL's convert("RGB")); colour images are averaged over their
channels for the MNIST classifier. A user extractor is a `package.module:function(weights=None)` that
returns a `Features`.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from idiff_cli import classifiers, registry
from idiff_cli.errors import UserError
from idiff_cli.fid import convert, inception
from idiff_cli.images import to_uint8
from idiff_cli.sharding import seed_mesh, shard_leading

WEIGHTS_ENV = "IDIFF_INCEPTION_WEIGHTS"


@dataclasses.dataclass(frozen=True)
class Features:
    """A feature extractor: `embed(images [B, H, W, C] float in [0, 1]) -> [B, dim]` (jittable),
    reported as `label`; `source` says where its weights come from."""

    name: str
    label: str
    dim: int
    embed: Callable[[jax.Array], jax.Array]
    source: str
    image_size: tuple[int, int] | None = None  # required (H, W), or None for any size

    def check_shape(self, shape) -> None:
        """UserError (one line) for images this extractor cannot take."""
        if len(shape) != 4 or shape[-1] not in (1, 3):
            raise UserError(f"{self.name} features take images [N, H, W, C] with C = 1 or 3, got shape {tuple(shape)}")
        if self.image_size is not None and tuple(shape[1:3]) != self.image_size:
            raise UserError(f"{self.name} features take {self.image_size[0]}x{self.image_size[1]} images, "
                            f"got {shape[1]}x{shape[2]}; use --features inception for other image sizes")


def get_features(features: str | Features, inception_weights: str | None = None) -> Features:
    """The extractor named `features` (registry kind "features"; `inception_weights` for "inception"),
    or `features` itself when it is one."""
    return features if isinstance(features, Features) else registry.get("features", features)(inception_weights)


def to_unit_range(images) -> np.ndarray:
    """uint8 images -> /255; float images in [-1, 1] -> quantised to 8 bits (`images.to_uint8`), /255. float32."""
    return to_uint8(images).astype(np.float32) / 255.0


def embed_all(features: Features, images, batch: int = 250, devices: int | None = None) -> np.ndarray:
    """Features [N, dim] (float32) of images [N, H, W, C] (uint8 or float in [-1, 1]), `batch` at a
    time, each batch split over the local devices (or the first `devices`; padded to a multiple)."""
    features.check_shape(np.shape(images))
    n_dev = devices or len(jax.local_devices())
    size = -(-min(batch, len(images)) // n_dev) * n_dev
    mesh = seed_mesh(size)
    out = []
    for start in range(0, len(images), size):
        chunk = to_unit_range(images[start:start + size])
        padded = np.concatenate([chunk, np.zeros((size - len(chunk), *chunk.shape[1:]), np.float32)])
        out.append(np.asarray(_embed_jit(features)(shard_leading(padded, mesh)))[: len(chunk)])
    return np.concatenate(out)


_COMPILED: dict[Callable, Callable] = {}


def _embed_jit(features: Features) -> Callable:
    """One jitted `embed` per embed function (compiled once per batch shape); the dict holds the
    function itself as key, so a later extractor can never be mistaken for a freed one."""
    if features.embed not in _COMPILED:
        _COMPILED[features.embed] = jax.jit(features.embed)
    return _COMPILED[features.embed]


@registry.register("features", "inception")
def inception_features(weights: str | None = None) -> Features:
    """pytorch-fid's Inception-v3 pool features; `weights`: the converted .npz (default: $IDIFF_INCEPTION_WEIGHTS)."""
    weights = weights or os.environ.get(WEIGHTS_ENV)
    if not weights:
        raise UserError(inception.missing_weights_message(f"no Inception weights given (--inception-weights or ${WEIGHTS_ENV})"))
    variables = inception.load_weights(weights)
    network = inception.InceptionV3FID()

    def embed(images):
        rgb = jnp.broadcast_to(images, (*images.shape[:3], 3))
        return network.apply(variables, rgb)

    return Features("inception", "FID (Inception-v3, pytorch-fid 2015-12-05 weights)", inception.FEATURE_DIM, embed,
                    source=f"{weights} (converted from sha256 {inception_source_sha()})")


def inception_source_sha() -> str:
    return convert.PINNED_SHA256


@registry.register("features", "mnist-classifier")
def mnist_classifier_features(weights: str | None = None) -> Features:
    """The project's MNIST classifier's 128-d features; `weights`: its cache directory (default:
    $IDIFF_CACHE_DIR/mnist-classifier, trained there on first use)."""
    directory = pathlib.Path(weights) if weights else classifiers.cache_dir()
    params, meta = classifiers.load_or_train(directory)
    model = classifiers.MnistClassifier()

    def embed(images):
        grey = images.mean(axis=-1, keepdims=True)
        return model.apply({"params": params}, grey)[0]

    return Features("mnist-classifier", "FID (MNIST classifier features)", classifiers.FEATURE_DIM, embed,
                    source=f"{directory} (held-out accuracy {meta['held_out_accuracy']:.4f})", image_size=(28, 28))
