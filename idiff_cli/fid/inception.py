"""The Inception-v3 "FID network" of pytorch-fid (`pytorch_fid.inception.InceptionV3`, block 3) in Flax.

Same layers, same names and the same preprocessing as the standard tool, so that with the converted
2015-12-05 weights (convert.py) it returns the same 2048-d pool features:

    images [B, H, W, 3] in [0, 1] --bilinear resize (half-pixel centres, no antialiasing, as
    torch.nn.functional.interpolate(mode="bilinear", align_corners=False))--> [B, 299, 299, 3]
    --> 2x - 1 --> stem --> Mixed_5b..5d (A) --> 6a (B) --> 6b..6e (C) --> 7a (D) --> 7b, 7c (E)
    --> global average pool --> [B, 2048]

The FID-specific patches of the TensorFlow graph are kept: the average-pool branches of the A, C
and E blocks do not count padding (count_include_pad=False) and the last E block max-pools its
pool branch. Every convolution has no bias and is followed by batch norm (eps 1e-3, inference
statistics) and ReLU. Parameters mirror the PyTorch state-dict names: `Mixed_5b/branch1x1/conv/kernel`
is `Mixed_5b.branch1x1.conv.weight` (transposed OIHW -> HWIO).
"""

from __future__ import annotations

import pathlib
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from idiff_cli.errors import UserError
from idiff_cli.fid import convert

FEATURE_DIM = 2048
INPUT_SIZE = 299


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3, running statistics) -> ReLU; torch padding is symmetric."""

    features: int
    kernel: int | Sequence[int]
    stride: int = 1
    padding: int | Sequence[int] = 0

    @nn.compact
    def __call__(self, x):
        ph, pw = _pair(self.padding)
        x = nn.Conv(self.features, _pair(self.kernel), strides=_pair(self.stride),
                    padding=((ph, ph), (pw, pw)), use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x):
    """TensorFlow's average pool: zero padding is not counted in the average."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x, stride: int = 1, padding: int = 1):
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((padding, padding),) * 2)


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(64, 1, name="branch1x1")(x)
        b5 = BasicConv2d(48, 1, name="branch5x5_1")(x)
        b5 = BasicConv2d(64, 5, padding=2, name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, 3, stride=2, name="branch3x3")(x)
        bd = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, 3, stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3(x, stride=2, padding=0)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = BasicConv2d(192, 1, name="branch1x1")(x)
        b7 = BasicConv2d(c7, 1, name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, 1, name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, 1, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(192, 1, name="branch3x3_1")(x)
        b3 = BasicConv2d(320, 3, stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, 1, name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, 3, stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3(x, stride=2, padding=0)], axis=-1)


class InceptionE(nn.Module):
    """`pool="avg"`: pytorch-fid's FIDInceptionE_1 (Mixed_7b); `pool="max"`: FIDInceptionE_2 (Mixed_7c)."""

    pool: str = "avg"

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(320, 1, name="branch1x1")(x)
        b3 = BasicConv2d(384, 1, name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv2d(448, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        pooled = _avg_pool_3x3(x) if self.pool == "avg" else _max_pool_3x3(x)
        bp = BasicConv2d(192, 1, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def resize_bilinear(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """[B, H, W, C] -> [B, size, size, C]; equals F.interpolate(bilinear, align_corners=False)."""
    b, _, _, c = images.shape
    return jax.image.resize(images, (b, size, size, c), method="bilinear", antialias=False)


class InceptionV3FID(nn.Module):
    """images [B, H, W, 3] in [0, 1] -> pool features [B, 2048] (pytorch-fid, resize and normalize on)."""

    @nn.compact
    def __call__(self, images):
        x = 2.0 * resize_bilinear(images.astype(jnp.float32)) - 1.0
        x = BasicConv2d(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, 3, name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3(x, stride=2, padding=0)
        x = BasicConv2d(80, 1, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, 3, name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3(x, stride=2, padding=0)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(c7, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE("avg", name="Mixed_7b")(x)
        x = InceptionE("max", name="Mixed_7c")(x)
        return x.mean(axis=(1, 2))


def variable_shapes() -> dict:
    """ShapeDtypeStructs of the variables {"params", "batch_stats"} (traced, nothing computed)."""
    return jax.eval_shape(InceptionV3FID().init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))


def random_variables(seed: int) -> dict:
    """Random variables of the network (for tests and the oracle script; the FID needs the real ones):
    He-normal kernels, batch-norm scale and running variance ~ U[0.5, 1.5], bias and running mean
    ~ N(0, 0.1²). Drawn with NumPy from the shapes, so no network is run (a traced `init` of this
    network takes a minute to compile on a CPU)."""
    rng = np.random.default_rng(seed)

    def draw(path, spec):
        if path[-1] == "kernel":
            return rng.normal(0.0, np.sqrt(2.0 / np.prod(spec.shape[:-1])), spec.shape)
        if path[-1] in ("scale", "var"):
            return rng.uniform(0.5, 1.5, spec.shape)
        return rng.normal(0.0, 0.1, spec.shape)

    flat = flatten_dict(variable_shapes())
    return unflatten_dict({path: jnp.asarray(draw(path, spec), jnp.float32) for path, spec in flat.items()})


def load_weights(path, require_pinned: bool = True) -> dict:
    """Variables {"params", "batch_stats"} from a .npz written by `python -m idiff_cli.fid.convert`.

    Every array must be present with the network's shape. With `require_pinned`, the file must have
    been converted from the pinned pytorch-fid weights (its recorded source checksum), so that a
    number reported as Inception FID is one. Raises UserError (one line) otherwise.
    """
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise UserError(missing_weights_message(f"Inception weights '{path}' do not exist"))
    try:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as e:  # a truncated or foreign file: one line, not a traceback
        raise UserError(f"cannot read Inception weights '{path}' ({type(e).__name__}: {e}); "
                        "re-create them with `python -m idiff_cli.fid.convert`") from None
    source = str(arrays.pop("meta/source_sha256", "unknown"))
    if require_pinned and source != convert.PINNED_SHA256:
        raise UserError(f"Inception weights '{path}' were not converted from the pinned pytorch-fid file "
                        f"(source sha256 {source}, expected {convert.PINNED_SHA256})")
    template = variable_shapes()
    expected = {"/".join(k): v.shape for k, v in flatten_dict(template).items()}
    got = {k: v.shape for k, v in arrays.items()}
    if got != expected:
        bad = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
        raise UserError(f"Inception weights '{path}' do not fit the FID network: {len(bad)} array(s) missing, "
                        f"extra or misshapen (e.g. {bad[0]}: {got.get(bad[0])} vs {expected.get(bad[0])})")
    return unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in arrays.items()})


def missing_weights_message(what: str) -> str:
    return (f"{what}; the Inception FID needs pytorch-fid's weights, converted once: download "
            f"{convert.WEIGHTS_URL} (sha256 {convert.PINNED_SHA256[:16]}...), run `python -m idiff_cli.fid.convert "
            "pt_inception-2015-12-05-6726825d.pth inception.npz`, then pass --inception-weights inception.npz "
            "or set IDIFF_INCEPTION_WEIGHTS")
