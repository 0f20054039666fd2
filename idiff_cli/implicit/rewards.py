"""Image rewards R(x): a batch of images [B, H, W, C] in [−1, 1] -> [B] (paper §5.2, Appendix A.2).

Pixel values are read on the [0, 1] scale, (x + 1)/2. The adjoint differentiates R, so a reward for
the gradient methods must be a differentiable JAX function; a reward declaring `differentiable = False`
(the JPEG sizes, a host computation) serves only the score-function method, --method ddpo. A reward
may declare the images it takes (`min_channels`, `channels`, `image_shape`); a plug-in
`package.module:function` is checked on a batch of the run's shape before training (`check_reward`).

A *prompt-aware* reward takes the batch's conditioning too, reward(images, prompts) -> [B], prompts a
`Prompts`: ids [B] (traced) into texts (static), the run's prompt table. It is one whose second
positional parameter has no default or is named `prompts`, or that declares `takes_prompts = True`.
Every method gives it the prompts each path was sampled with (the slot key names both).

    brightness, red                      the paper's rewards
    digit:N                              log p(N | x) under the MNIST classifier of the FID (N = 0..9)
    jpeg-compressibility,                ∓ the JPEG size in kB at quality 95 (DDPO, Black et al. 2023;
      jpeg-incompressibility               also named compressibility, incompressibility)
    aesthetic                            the LAION aesthetic predictor v2 on CLIP ViT-L/14 (aesthetic.py)
    clip-score                           cos(CLIP image embedding, its prompt's text embedding) (clip_score.py)

A reward read from weight files (`FromWeights`: aesthetic, clip-score) is built by `resolve` from the directory
--reward-weights names; it is a pytree of its weights, which the finetune passes to its jitted programs
as an argument.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import pathlib
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from idiff_cli import classifiers
from idiff_cli import registry
from idiff_cli.errors import UserError, first_line
from idiff_cli.images import to_uint8
from idiff_cli.implicit import aesthetic, clip_score
from idiff_cli.registry import register
from idiff_cli.runs import cache_root


@functools.partial(jax.tree_util.register_dataclass, data_fields=["ids"], meta_fields=["texts"])
@dataclasses.dataclass(frozen=True)
class Prompts:
    """A batch's conditioning as a prompt-aware reward receives it: ids [B] int32, each the row of its
    image's prompt in `texts`, the run's prompt table (a text-to-image run's training prompts, then its
    evaluation prompts; a class-conditional model's class indices written "0", "1", …). Under jit `ids`
    is traced and `texts` a static tuple, so a reward can turn the table into constants when traced (e.g.
    text embeddings [P, D]) and pick their rows by `ids`."""

    ids: jax.Array
    texts: tuple[str, ...]


def takes_prompts(reward: Callable) -> bool:
    """Whether `reward` is prompt-aware, reward(images, prompts): its `takes_prompts` attribute where it
    declares one, else its signature (a second positional parameter without a default, or named `prompts`)."""
    declared = getattr(reward, "takes_prompts", None)
    if declared is not None:
        return bool(declared)
    try:
        parameters = list(inspect.signature(reward).parameters.values())
    except (TypeError, ValueError):  # a callable without a signature: an image-only reward
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    second = positional[1] if len(positional) >= 2 else None
    return second is not None and (second.default is inspect.Parameter.empty or second.name == "prompts")


def prompted(reward: Callable) -> Callable[[jax.Array, Optional[Prompts]], jax.Array]:
    """`reward` as a function of (images, prompts): a prompt-aware reward itself, else one that ignores
    the prompts."""
    return reward if takes_prompts(reward) else (lambda images, prompts: reward(images))


@register("image-reward", "brightness")
def brightness(x: jax.Array) -> jax.Array:
    """Mean pixel value in [0, 1] (MNIST, Figs 13-15: λ > 0 brighter, λ < 0 darker)."""
    return jnp.mean((x + 1) / 2, axis=tuple(range(1, x.ndim)))


@register("image-reward", "red")
def red(x: jax.Array) -> jax.Array:
    """Mean of the red channel minus the mean of the other channels, in [−1, 1] (CIFAR-10/LSUN, Figs 7, 16)."""
    v = (x + 1) / 2
    return jnp.mean(v[..., 0], axis=(1, 2)) - jnp.mean(v[..., 1:], axis=(1, 2, 3))


red.min_channels = 3  # type: ignore[attr-defined]


@dataclasses.dataclass(frozen=True, eq=False)
class DigitLogProb:
    """digit:N — log p(N | x) = log_softmax(logits(x))_N, the log-probability of class N under the MNIST
    classifier of the FID (classifiers.FID) on images [B, 28, 28, 1] in [−1, 1], read on its [0, 1]
    scale as (x + 1)/2 without quantisation (so ∇R exists); returns [B], each ≤ 0. "Generate more sevens"
    is digit:7 with λ > 0.

    Not classifiers.LABELS: that independent network labels samples for `label_kept`, and no reward reads
    it, so that a finetuned model cannot game the evaluation by fooling its judge (adversarial pixels that
    raise digit:N under one network need not move the other's label). The FID's network is
    the one the reward pushes on, so a digit:N run's "FID (MNIST classifier features)" is measured in
    the feature space the reward shapes; compare it across such runs with that in mind."""

    digit: int
    params: Any  # the classifier's weights, loaded once when the reward is built
    image_shape = (28, 28, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        _, logits = classifiers.MnistClassifier().apply({"params": self.params}, (x + 1) / 2)
        return jax.nn.log_softmax(logits, axis=-1)[:, self.digit]


@functools.lru_cache(maxsize=None)
def _fid_classifier(directory: pathlib.Path) -> Any:
    return classifiers.load_or_train(directory, classifiers.FID)[0]


def digit(n: int) -> DigitLogProb:
    """The reward digit:n, with the FID classifier's weights from its cache (trained there on first use)."""
    return DigitLogProb(n, _fid_classifier(classifiers.cache_dir(classifiers.FID)))


register("image-reward", "digit:N", digit, values=range(10))


def jpeg_kb(pixels: np.ndarray, quality: int = 95) -> np.ndarray:
    """uint8 images [..., H, W, C] (C = 1: PIL mode "L"; C = 3: "RGB") -> their JPEG sizes [...] in kB
    (bytes / 1000), each encoded by PIL at `quality` with its other settings at their defaults (4:2:0
    chroma subsampling for RGB), as ddpo-pytorch's `jpeg_incompressibility` does for RGB images
    (ddpo_pytorch/rewards.py). Sizes are those of the libjpeg that PIL bundles."""
    flat = pixels.reshape(-1, *pixels.shape[-3:])
    sizes = np.empty(len(flat))
    for i, image in enumerate(flat):
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="JPEG",
                                                                               quality=quality)
        sizes[i] = buffer.tell() / 1000
    return sizes.reshape(pixels.shape[:-3])


@dataclasses.dataclass(frozen=True)
class JpegSize:
    """sign · (JPEG size in kB at `quality`) of images [B, H, W, C] in [−1, 1], C ∈ {1, 3} -> [B]:
    compressibility (sign −1) and incompressibility (sign +1) of DDPO (Black et al. 2023, App. D; ddpo-pytorch
    `jpeg_compressibility` / `jpeg_incompressibility`: PIL, quality 95, size = bytes / 1000). Images are
    quantised to uint8 as the project shows them (images.to_uint8), then encoded on the host through
    jax.pure_callback: one call per batch, under jit and vmap (extra vmapped axes lead the batch, and the
    host function takes any leading axes), and under automatic sharding XLA gathers the batch to one
    device for the call. No gradient (a JVP raises): only --method ddpo uses it."""

    sign: float
    quality: int = 95
    differentiable = False
    channels = (1, 3)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32

        def host(images):
            return (self.sign * jpeg_kb(to_uint8(images), self.quality)).astype(dtype)

        return jax.pure_callback(host, jax.ShapeDtypeStruct(x.shape[:-3], dtype), x, vmap_method="expand_dims")


for sign, name in ((-1.0, "compressibility"), (+1.0, "incompressibility")):
    register("image-reward", f"jpeg-{name}", JpegSize(sign))  # ddpo-pytorch's names
    register("image-reward", name, JpegSize(sign))


# ---- rewards read from weight files ----

CLIP_WEIGHTS = "clip-vit-large-patch14"  # the default --reward-weights, under $IDIFF_CACHE_DIR


@dataclasses.dataclass(frozen=True)
class FromWeights:
    """A reward built from the files of a directory (--reward-weights): load(directory) -> the reward, a
    pytree whose leaves are its weights; `files`: what the directory must hold, in words."""

    load: Callable[[pathlib.Path], Any]
    files: str


def default_weights() -> pathlib.Path:
    """Where a reward's weights are read from without --reward-weights: $IDIFF_CACHE_DIR/clip-vit-large-patch14."""
    return cache_root() / CLIP_WEIGHTS


@functools.lru_cache(maxsize=2)
def _aesthetic(directory: pathlib.Path) -> aesthetic.AestheticScore:
    return aesthetic.load(directory, directory / aesthetic.HEAD_FILE)


register("image-reward", "aesthetic", FromWeights(
    _aesthetic, f"{aesthetic.clip_vision.PUBLISHED}'s config.json and model.safetensors and the LAION aesthetic "
                f"head {aesthetic.HEAD_FILE}"))
register("image-reward", "clip-score", FromWeights(
    functools.lru_cache(maxsize=2)(clip_score.load),
    f"{aesthetic.clip_vision.PUBLISHED}'s config.json, model.safetensors and tokenizer files"))


def resolve(name: str, weights: str | pathlib.Path | None = None) -> Callable:
    """The reward `name` (registry kind "image-reward"), a FromWeights one loaded from `weights` (default:
    default_weights()). UserError (one line) for weights given to a reward that reads none, or for missing
    or unfit files (naming them, where to get them and --reward-weights)."""
    reward = registry.get("image-reward", name)
    if not isinstance(reward, FromWeights):
        if weights is not None:
            raise UserError(f"--reward-weights: reward '{name}' reads no weight files")
        return reward
    directory = pathlib.Path(weights if weights is not None else default_weights()).expanduser()
    try:
        return reward.load(directory)
    except UserError as e:
        raise UserError(f"reward '{name}': {e}; --reward-weights DIR names a directory holding {reward.files} "
                        f"(default {default_weights()})") from None


def carried(reward: Callable) -> bool:
    """Whether `reward` is a pytree of arrays (its weights), to be passed to jitted programs as an argument
    rather than closed over: XLA would embed closed-over weights in every program as constants."""
    leaves = jax.tree.leaves(reward)
    return bool(leaves) and all(isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves)


def _image_mismatch(reward: Callable, image_shape: tuple[int, ...]) -> str:
    """Why `reward` does not take images of `image_shape` (H, W, C), by its declarations, or ""."""
    c, shown = image_shape[-1], "×".join(map(str, image_shape))
    least, accepted, required = (getattr(reward, "min_channels", 1), getattr(reward, "channels", None),
                                 getattr(reward, "image_shape", None))
    if c < least:
        return f"needs images with >= {least} channels; this model makes {c}-channel images"
    if accepted is not None and c not in accepted:
        return f"takes images with {' or '.join(map(str, accepted))} channels; this model makes {c}-channel images"
    if required is not None and image_shape != tuple(required):
        return f"takes {'×'.join(map(str, required))} images; this model makes {shown} images"
    return ""


def check_reward(reward: Callable, name: str, image_shape: tuple[int, ...], batch: int = 2,
                 needs_gradient: bool = True, method: str | None = None, texts: tuple[str, ...] = ()) -> None:
    """One-line UserError unless `reward` maps [batch, *image_shape] (and, prompt-aware, the batch's
    Prompts over `texts`, the model's prompt table: empty for an unconditional model) to [batch] reals,
    and, when `needs_gradient` (a method that differentiates R, named `method`), unless it is differentiable.

    A reward declares what it needs as attributes: `min_channels` (default 1), `channels` (the channel
    counts it takes, default any), `image_shape` (the one shape it takes, default any) and
    `differentiable` (default True; False for a host computation such as the JPEG size, which only a
    score-function method such as --method ddpo can use)."""
    mismatch = _image_mismatch(reward, tuple(image_shape))
    if mismatch:
        raise UserError(f"reward '{name}' {mismatch}")
    differentiable = getattr(reward, "differentiable", True)
    if needs_gradient and not differentiable:
        by = f"--method {method}" if method else "a method that differentiates the reward"
        raise UserError(f"reward '{name}' is not differentiable: {by} needs ∇R; use --method ddpo")
    aware = takes_prompts(reward)
    if aware and not texts:
        raise UserError(f"reward '{name}' takes prompts (reward(images, prompts)); this model is unconditional: "
                        "its images have no prompts or class labels")
    x = jnp.zeros((batch, *image_shape))
    prompts = Prompts(jnp.zeros((batch,), jnp.int32), tuple(texts)) if aware else None
    scored = prompted(reward)
    try:
        out = jax.eval_shape(scored, x, prompts)
        if differentiable and needs_gradient:
            jax.eval_shape(jax.grad(lambda y: jnp.sum(scored(y, prompts))), x)
    except Exception as e:  # the user's code: report its failure in one line
        raise UserError(f"reward '{name}' fails on a batch of shape {x.shape}: {type(e).__name__}: "
                        f"{first_line(e)}") from None
    if out.shape != (batch,):
        raise UserError(f"reward '{name}' must map images [B, H, W, C] to [B] rewards; on a batch of shape "
                        f"{x.shape} it returned shape {out.shape}")
