"""CLIP's image side: transformers' `CLIPVisionModelWithProjection` in Flax Linen, built from the fields of a CLIP
model's `config.json`, and CLIP's image preprocessing written as a differentiable JAX function.

    tower = load(directory)                                  # config.json, model.safetensors (+ preprocessor_config)
    pixels = tower.preprocessing(images)                     # [B, H, W, 3] in [−1, 1] -> [B, S, S, 3] normalised
    image_embeds = tower.module.apply(tower.params, pixels)  # [B, projection_dim] float32; tower.embed(images)

The network, as transformers builds it (D = hidden_size, N heads of d = D / N channels, P = patch_size, S =
image_size, LN = LayerNorm with ε = layer_norm_eps):

* embeddings: the image cut into (S/P)² patches of P×P pixels, each mapped to D channels by patch_embedding (a
  P×P convolution of stride P, no bias); h₀ = [class_embedding; patch embeddings] + position_embedding[0 … (S/P)²],
  the class token first and the patches in row-major order.
* h ← pre_layrnorm(h₀) (transformers' spelling of the name).
* per layer (pre-LN, not causal): h ← h + out_proj(attn(LN₁(h))), attn = softmax(q kᵀ / √d) v per head, q, k, v =
  q_proj, k_proj, v_proj of LN₁(h); then h ← h + fc2(act(fc1(LN₂(h)))), act the config's hidden_act
  (clip_text.ACTIVATIONS: quick_gelu(x) = x σ(1.702 x), or the exact gelu).
* pooler_output = post_layernorm(h[:, 0]) (the class token's output); image_embeds = visual_projection(
  pooler_output), a [projection_dim, D] matrix without bias: CLIPModel.get_image_features, which is what the LAION
  aesthetic predictor and DDPO's aesthetic reward read.

Parameters carry transformers' module paths with "." written "__" (`vision_model__encoder__layers__0/
self_attn__q_proj/kernel` holds `vision_model.encoder.layers.0.self_attn.q_proj.weight`); `vision_params` maps a
state dict onto them with diffusers_io.params_from_tensors. The class token, a bare torch parameter
`vision_model.embeddings.class_embedding` [D], is the `embedding` of a module of that name. A CLIPModel's file
(openai/clip-vit-large-patch14 publishes one, model.safetensors) also holds the text tower (`text_model.*`,
`text_projection.weight`, `logit_scale`): those keys are ignored, as are position_ids buffers. `dtype` is the
activations' dtype; LayerNorm statistics and the attention softmax are computed in float32 (float64 when the
activations are), and the outputs are float32 (float64 under float64 activations).

config.json is a CLIPConfig (a CLIPModel's: the vision fields under `vision_config`, or where older files carry a
`vision_config_dict`, that dict completed with CLIPVisionConfig's defaults, as transformers resolves it
(clip_text.clip_tower_fields); the projection's size is the top-level `projection_dim`, which sizes CLIPModel's
visual_projection — the vision config's own projection_dim, absent or 512 in published files, is not read) or a
CLIPVisionConfig (CLIPVisionModelWithProjection's; its projection_dim).

Preprocessing. CLIPImageProcessor (and OpenAI's `clip.load` transform) takes a uint8 image, resizes it with PIL's
bicubic filter so that its shorter side is `shortest_edge` (224) and its longer side int(224 · long / short),
crops the centre crop_size (224 × 224) at offsets ⌊(resized − crop) / 2⌋, scales by 1/255 and normalises each
channel, (x − mean) / std with OpenAI's mean (0.48145466, 0.4578275, 0.40821073) and std (0.26862954, 0.26130258,
0.27577711), or those of preprocessor_config.json. `Preprocessing.__call__` does the same on float images in
[−1, 1], differentiably: (x + 1)/2, then jax.image.resize with the "cubic" method (Keys' cubic with a = −0.5, PIL's
bicubic) and antialias=True — the kernel widened by the downsampling factor, as PIL's resize always does and as
transformers' torchvision backend asks for (antialias=True); weights renormalised over the taps inside the image,
as PIL does. It differs from the processor on uint8 images only by what PIL rounds: PIL stores the result of its
horizontal pass and of its vertical pass as uint8, rounding each to the nearest integer and clipping it to
[0, 255]. Here nothing is rounded or clipped (a clip would cut the gradient at saturated pixels). So where no
bicubic overshoot leaves [0, 255], the two differ by at most ½ (1 + L) / 255 per pixel before normalisation, L the
largest ℓ1 norm of one output pixel's bicubic weights (above 1 by the kernel's negative lobes; at most 1.27 for
all sizes up to 259 pixels): below 1.15 / 255; where PIL clips an overshoot, by more. DDPO also rounds its [0, 1]
images to uint8 before its processor; the reward here sees the float images. The resize runs in float32 (float64
for float64 images) at Precision.HIGHEST.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from idiff_cli.diffusion.clip_text import EncoderLayer, check_encoder_fields, clip_tower_fields
from idiff_cli.diffusion.diffusers_io import params_from_tensors, read_json, read_weights
from idiff_cli.errors import UserError

CONFIG, WEIGHTS, PREPROCESSOR = "config.json", "model.safetensors", "preprocessor_config.json"
PUBLISHED = "openai/clip-vit-large-patch14"
DOWNLOAD = f"huggingface-cli download {PUBLISHED} {CONFIG} {WEIGHTS} --local-dir DIR"
# CLIPVisionConfig fields (with transformers' defaults) that the Flax network takes.
VISION_FIELDS = dict(hidden_size=768, intermediate_size=3072, projection_dim=512, num_hidden_layers=12,
                     num_attention_heads=12, num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu",
                     layer_norm_eps=1e-5)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESAMPLE = {3: "cubic", 2: "linear"}  # PIL's resample codes (BICUBIC, BILINEAR) -> jax.image.resize methods
VISION_PREFIX, PROJECTION = "vision_model.", "visual_projection.weight"
CLASS_EMBEDDING = "vision_model.embeddings.class_embedding"


def _float_dtype(dtype: Any) -> Any:
    """The dtype of LayerNorm statistics, the softmax and the outputs: float32, or float64 for float64."""
    return jnp.promote_types(dtype, jnp.float32)


class _Vector(nn.Module):
    """A bare parameter [size] (torch's class_embedding), held as this module's `embedding`."""

    size: int

    @nn.compact
    def __call__(self):
        return self.param("embedding", nn.initializers.normal(1.0), (self.size,))


class VisionOutputs(NamedTuple):
    last_hidden_state: jax.Array  # [B, 1 + (S/P)², D]
    pooler_output: jax.Array  # [B, D]
    image_embeds: jax.Array  # [B, projection_dim]


class CLIPVisionEncoder(nn.Module):
    """CLIPVisionModelWithProjection's image_embeds [B, projection_dim] (float32) of normalised pixel values
    [B, S, S, num_channels] (NHWC; module docstring); with `all_outputs`, VisionOutputs."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values, all_outputs: bool = False):
        dim, dt, p, s = self.hidden_size, self.dtype, self.patch_size, self.image_size
        if pixel_values.shape[1:] != (s, s, self.num_channels):
            raise ValueError(f"CLIPVisionEncoder takes pixel values [B, {s}, {s}, {self.num_channels}] (preprocessed); "
                             f"got {pixel_values.shape}")
        b, grid = pixel_values.shape[0], s // p
        patches = nn.Conv(dim, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=dt,
                          name="vision_model__embeddings__patch_embedding")(pixel_values)
        cls = _Vector(dim, name="vision_model__embeddings__class_embedding")().astype(patches.dtype)
        h = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, dim)), patches.reshape(b, grid * grid, dim)], axis=1)
        h = h + nn.Embed(grid * grid + 1, dim, dtype=dt,
                         name="vision_model__embeddings__position_embedding")(jnp.arange(grid * grid + 1))
        h = nn.LayerNorm(self.layer_norm_eps, dtype=dt, name="vision_model__pre_layrnorm")(h)
        for i in range(self.num_hidden_layers):
            h = EncoderLayer(self.num_attention_heads, self.intermediate_size, self.hidden_act, self.layer_norm_eps, dt,
                             name=f"vision_model__encoder__layers__{i}")(h)
        pooled = nn.LayerNorm(self.layer_norm_eps, dtype=dt, name="vision_model__post_layernorm")(h[:, 0])
        embeds = nn.Dense(self.projection_dim, use_bias=False, dtype=dt, name="visual_projection")(pooled)
        out = _float_dtype(dt)
        if all_outputs:
            return VisionOutputs(h.astype(out), pooled.astype(out), embeds.astype(out))
        return embeds.astype(out)


def vision_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """The CLIPVisionEncoder fields of a CLIP model's config.json (a CLIPConfig or a CLIPVisionConfig: module
    docstring); UserError naming the first unsupported field."""
    if isinstance(config.get("vision_config"), Mapping):  # a CLIPConfig
        what = f"{CONFIG} of a CLIPModel"
        fields = {**clip_tower_fields(config, "vision_config", VISION_FIELDS),
                  "projection_dim": config.get("projection_dim", 512)}  # CLIPConfig's default
    elif config.get("model_type") == "clip_vision_model" or "CLIPVisionModelWithProjection" in (
            config.get("architectures") or ()):
        what = f"{CONFIG} of a CLIPVisionModelWithProjection"
        fields = {name: config.get(name, default) for name, default in VISION_FIELDS.items()}
    else:
        raise UserError(f"{CONFIG}: neither a CLIPConfig (with vision_config) nor a CLIPVisionConfig (model_type "
                        f"{config.get('model_type')!r}); idiff reads CLIP models such as {PUBLISHED}")
    check_encoder_fields(fields, what)
    for name in ("image_size", "patch_size"):
        if not isinstance(fields[name], int):
            raise UserError(f"{what}: {name} = {fields[name]!r}; idiff takes square images (one integer)")
    if fields["image_size"] % fields["patch_size"]:
        raise UserError(f"{what}: image_size {fields['image_size']} is not a multiple of patch_size "
                        f"{fields['patch_size']}")
    return fields


def vision_params(model: CLIPVisionEncoder, tensors: Mapping[str, np.ndarray], source: str,
                  dtype: Any = np.float32) -> Any:
    """The variables of `model` from a CLIPModel's or CLIPVisionModelWithProjection's state dict (the vision keys;
    the text tower's, logit_scale and position_ids ignored); UserError naming the first key that does not fit."""
    vision = {(k + ".weight" if k == CLASS_EMBEDDING else k): v for k, v in tensors.items()
              if (k.startswith(VISION_PREFIX) or k == PROJECTION) and not k.endswith("position_ids")}
    pixels = jnp.zeros((1, model.image_size, model.image_size, model.num_channels), jnp.float32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), pixels))
    return params_from_tensors(shapes, vision, source, what="CLIPVisionModelWithProjection", dtype=dtype)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """CLIP's preprocessing of float images [..., H, W, 3] in [−1, 1] -> normalised pixel values
    [..., crop_h, crop_w, 3] (module docstring). `size` is the shorter side after the resize (an int), or (h, w)
    to resize to whatever the aspect ratio; `crop_size` (h, w)."""

    size: int | tuple[int, int] = 224
    crop_size: tuple[int, int] = (224, 224)
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    method: str = "cubic"
    antialias: bool = True

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """The (h, w) of an H × W image after the resize: transformers' get_resize_output_image_size
        (default_to_square=False)."""
        if not isinstance(self.size, int):
            return tuple(self.size)
        short, long = min(height, width), max(height, width)
        new_long = int(self.size * long / short)
        return (new_long, self.size) if width <= height else (self.size, new_long)

    def __call__(self, images: jax.Array) -> jax.Array:
        *lead, height, width, channels = images.shape
        if channels != len(self.image_mean):
            raise ValueError(f"CLIP's preprocessing takes {len(self.image_mean)}-channel images; got {images.shape}")
        dtype = _float_dtype(images.dtype)
        x = (images.astype(dtype).reshape(-1, height, width, channels) + 1) / 2
        h, w = self.resized_shape(height, width)
        ch, cw = self.crop_size
        if h < ch or w < cw:
            raise ValueError(f"images of {height}×{width} resize to {h}×{w}, smaller than the crop {ch}×{cw}")
        if (h, w) != (height, width):
            x = jax.image.resize(x, (x.shape[0], h, w, channels), method=self.method, antialias=self.antialias,
                                 precision=jax.lax.Precision.HIGHEST)
        top, left = (h - ch) // 2, (w - cw) // 2
        x = x[:, top:top + ch, left:left + cw]
        x = (x - jnp.asarray(self.image_mean, dtype)) / jnp.asarray(self.image_std, dtype)
        return x.reshape(*lead, ch, cw, channels)


def _square(value: Any, name: str, source: str) -> tuple[int, int]:
    """A preprocessor_config.json size entry as (h, w): an int, or {"height", "width"}."""
    if isinstance(value, int):
        return value, value
    if isinstance(value, Mapping) and isinstance(value.get("height"), int) and isinstance(value.get("width"), int):
        return value["height"], value["width"]
    raise UserError(f"{source}: unsupported {name} = {value!r} (an integer or {{\"height\", \"width\"}})")


def read_preprocessing(directory: str | pathlib.Path, image_size: int) -> Preprocessing:
    """The Preprocessing of a CLIP model directory: its preprocessor_config.json (a CLIPImageProcessor's), or
    CLIP's (shorter side and crop `image_size`, OpenAI's mean and std) where it has none; UserError (one line)
    naming what idiff does not support."""
    path = pathlib.Path(directory) / PREPROCESSOR
    if not path.is_file():
        return Preprocessing(image_size, (image_size, image_size))
    config, source = read_json(path), str(path)
    for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
        if config.get(flag, True) is not True:
            raise UserError(f"{source}: {flag} = {config[flag]!r} is not supported (CLIP's preprocessing does "
                            "each step)")
    if abs(float(config.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-12:
        raise UserError(f"{source}: rescale_factor = {config['rescale_factor']!r} is not supported (1/255)")
    resample = config.get("resample", 3)
    if resample not in RESAMPLE:
        raise UserError(f"{source}: resample = {resample!r} is not supported (3: bicubic, 2: bilinear)")
    size = config.get("size", image_size)
    if isinstance(size, Mapping) and set(size) >= {"shortest_edge"}:
        size = size["shortest_edge"]
    size = size if isinstance(size, int) else _square(size, "size", source)
    crop = _square(config.get("crop_size", image_size), "crop_size", source)
    if crop != (image_size, image_size):
        raise UserError(f"{source}: crop_size {crop[0]}×{crop[1]} differs from the model's image_size {image_size}")
    if isinstance(size, int) and size < image_size:
        raise UserError(f"{source}: the shorter side after the resize ({size}) is below the crop ({image_size})")
    stats = {}
    for name, default in (("image_mean", OPENAI_CLIP_MEAN), ("image_std", OPENAI_CLIP_STD)):
        value = config.get(name, default)
        value = (value,) * 3 if isinstance(value, (int, float)) else tuple(value)
        if len(value) != 3 or not all(isinstance(v, (int, float)) for v in value):
            raise UserError(f"{source}: {name} = {config[name]!r} is not three numbers")
        stats[name] = tuple(float(v) for v in value)
    if min(stats["image_std"]) <= 0:
        raise UserError(f"{source}: image_std = {list(stats['image_std'])} has a value <= 0")
    return Preprocessing(size, crop, stats["image_mean"], stats["image_std"], RESAMPLE[resample])


class VisionTower(NamedTuple):
    """A loaded CLIP image tower: the network, its variables {"params": ...}, and its preprocessing."""

    module: CLIPVisionEncoder
    params: Any
    preprocessing: Preprocessing

    def embed(self, images: jax.Array) -> jax.Array:
        """image_embeds [B, projection_dim] of images [B, H, W, 3] in [−1, 1] (preprocessing included)."""
        return self.module.apply(self.params, self.preprocessing(images))

    def unit_embeds(self, images: jax.Array) -> jax.Array:
        """The L2-normalised image_embeds [..., projection_dim] of images [..., H, W, 3] in [−1, 1] (`unit`)."""
        *lead, h, w, c = images.shape
        return unit(self.embed(images.reshape(-1, h, w, c))).reshape(*lead, -1)


def unit(e: jax.Array) -> jax.Array:
    """e / ‖e‖₂ along the last axis, in float32 (float64 for float64 e): CLIP's embeddings as its cosines
    and the aesthetic head read them."""
    e = e.astype(_float_dtype(e.dtype))
    return e / jnp.linalg.norm(e, axis=-1, keepdims=True)


def check_files(directory: str | pathlib.Path, files: tuple[str | tuple[str, ...], ...],
                download: str = DOWNLOAD) -> pathlib.Path:
    """`directory`, checked to hold each of `files` (a name, or a tuple of names of which one will do); UserError
    (one line) naming the directory and the first file missing, ending with the `download` command."""
    directory = pathlib.Path(directory)
    what = f"CLIP model directory '{directory}'"
    if not directory.is_dir():
        raise UserError(f"{what} does not exist; download {PUBLISHED}'s files: {download}")
    for names in files:
        names = (names,) if isinstance(names, str) else names
        if not any((directory / name).is_file() for name in names):
            raise UserError(f"{what} has no {' nor '.join(names)}; download {PUBLISHED}'s files: {download}")
    return directory


def tower(directory: pathlib.Path, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray],
          dtype: Any = jnp.float32, param_dtype: Any = np.float32) -> VisionTower:
    """The CLIP image tower of a model directory's parsed config.json and state dict (and its
    preprocessor_config.json, if any)."""
    fields = vision_fields(config)
    model = CLIPVisionEncoder(**fields, dtype=dtype)
    params = vision_params(model, tensors, str(directory / WEIGHTS), dtype=param_dtype)
    return VisionTower(model, params, read_preprocessing(directory, fields["image_size"]))


def load(directory: str | pathlib.Path, dtype: Any = jnp.float32, param_dtype: Any = np.float32) -> VisionTower:
    """The CLIP image tower of a model directory holding config.json and model.safetensors (module docstring),
    with activations in `dtype` and weights in `param_dtype`; UserError (one line) naming what is missing."""
    directory = check_files(directory, (CONFIG, WEIGHTS))
    return tower(directory, read_json(directory / CONFIG), read_weights(directory / WEIGHTS), dtype, param_dtype)
