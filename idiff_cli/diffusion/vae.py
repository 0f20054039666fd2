"""diffusers' `AutoencoderKL` (the Stable Diffusion VAE) in Flax Linen, built from the fields of its
`config.json`.

    mean, logvar = model.apply(variables, x [B, H, W, in_channels], method="encode")   # [B, h, w, latent]
    x̂ = model.apply(variables, z [B, h, w, latent], method="decode")                   # [B, H, W, out_channels]

with h = H / f, w = W / f, f = `latent_factor(fields)` = 2^(levels − 1). Latents are raw: the pipeline's
z = scaling_factor · (mean + exp(logvar / 2) ε) scaling is the caller's. `model.apply(variables, x)` is
diffusers' forward without sampling: decode(mean).

The network, as diffusers builds it (every GroupNorm has ε = 10⁻⁶ and `norm_num_groups` groups):

* ResNet block (ResnetBlock2D without a time embedding): h = conv1(SiLU(GN(x))), h = conv2(SiLU(GN(h))),
  out = x + h, x through a 1×1 `conv_shortcut` when the channel count changes.
* attention (one head of all C channels): a = softmax(q kᵀ / √C) v over the h·w positions, with q, k, v
  linear maps of GN(x); out = x + to_out(a).
* mid block: ResNet · attention (absent when `mid_block_add_attention` is false) · ResNet.
* encoder: 3×3 `conv_in`; per level i `layers_per_block` ResNet blocks to `block_out_channels[i]`, then,
  except at the last level, one zero row/column padded at the bottom/right and a stride-2 3×3 conv
  (padding 0); mid block; GN · SiLU · 3×3 `conv_out` to 2·latent channels; 1×1 `quant_conv` (when
  `use_quant_conv`); split into mean and logvar, logvar clamped to [−30, 20].
* decoder: 1×1 `post_quant_conv` (when `use_post_quant_conv`); 3×3 `conv_in`; mid block; per level, in
  reverse channel order, `layers_per_block` + 1 ResNet blocks, then, except at the last, nearest 2×
  upsampling and a 3×3 conv; GN · SiLU · 3×3 `conv_out`.

Submodules carry diffusers' module paths with "." written "__" (`encoder/down_blocks__0__resnets__0/conv1`
holds `encoder.down_blocks.0.resnets.0.conv1.weight`); `vae_params` maps a state dict onto them
(diffusers_io.params_from_tensors). `dtype` is the activations' dtype; GroupNorm statistics, the attention
softmax and the outputs are float32.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from idiff_cli.diffusion.ddpm_unet import _Conv
from idiff_cli.diffusion.diffusers_io import CONFIG, _fields, params_from_tensors
from idiff_cli.errors import UserError

EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)

# AutoencoderKL fields (with diffusers' defaults) that the Flax network takes.
VAE_FIELDS = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                  up_block_types=("UpDecoderBlock2D",), block_out_channels=(64,), layers_per_block=1,
                  latent_channels=4, norm_num_groups=32, use_quant_conv=True, use_post_quant_conv=True,
                  mid_block_add_attention=True)
# AutoencoderKL fields supported only at these values.
VAE_FIXED = dict(act_fn="silu")


class _Resnet(nn.Module):
    """ResnetBlock2D without a time embedding."""

    out_ch: int
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.silu(nn.GroupNorm(self.groups, epsilon=EPS, dtype=self.dtype, name="norm1")(x))
        h = _Conv(self.out_ch, (3, 3), padding=1, dtype=self.dtype, name="conv1")(h)
        h = nn.silu(nn.GroupNorm(self.groups, epsilon=EPS, dtype=self.dtype, name="norm2")(h))
        h = _Conv(self.out_ch, (3, 3), padding=1, dtype=self.dtype, name="conv2")(h)
        if x.shape[-1] != self.out_ch:
            x = _Conv(self.out_ch, (1, 1), padding=0, dtype=self.dtype, name="conv_shortcut")(x)
        return x + h


class _Attention(nn.Module):
    """One-head self-attention over the h·w positions, residual."""

    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, hgt, wid, c = x.shape
        h = nn.GroupNorm(self.groups, epsilon=EPS, dtype=self.dtype, name="group_norm")(x).reshape(b, hgt * wid, c)
        q, k, v = (nn.Dense(c, dtype=self.dtype, name=name)(h)[:, :, None, :] for name in ("to_q", "to_k", "to_v"))
        a = jax.nn.dot_product_attention(q, k, v).reshape(b, hgt * wid, c)
        return x + nn.Dense(c, dtype=self.dtype, name="to_out__0")(a).reshape(b, hgt, wid, c)


class _MidBlock(nn.Module):
    """UNetMidBlock2D: ResNet · attention · ResNet."""

    groups: int
    add_attention: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = _Resnet(c, self.groups, self.dtype, name="resnets__0")(x)
        if self.add_attention:
            x = _Attention(self.groups, self.dtype, name="attentions__0")(x)
        return _Resnet(c, self.groups, self.dtype, name="resnets__1")(x)


class Encoder(nn.Module):
    """Image [B, H, W, in] -> 2·latent channels [B, h, w, 2·latent] (before quant_conv)."""

    block_out_channels: Sequence[int]
    layers_per_block: int
    latent_channels: int
    groups: int
    add_attention: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        boc, dt = tuple(self.block_out_channels), self.dtype
        h = _Conv(boc[0], (3, 3), padding=1, dtype=dt, name="conv_in")(x)
        for i, ch in enumerate(boc):
            for j in range(self.layers_per_block):
                h = _Resnet(ch, self.groups, dt, name=f"down_blocks__{i}__resnets__{j}")(h)
            if i < len(boc) - 1:
                h = jnp.pad(h, ((0, 0), (0, 1), (0, 1), (0, 0)))
                h = _Conv(ch, (3, 3), strides=(2, 2), padding=0, dtype=dt,
                          name=f"down_blocks__{i}__downsamplers__0__conv")(h)
        h = _MidBlock(self.groups, self.add_attention, dt, name="mid_block")(h)
        h = nn.silu(nn.GroupNorm(self.groups, epsilon=EPS, dtype=dt, name="conv_norm_out")(h))
        return _Conv(2 * self.latent_channels, (3, 3), padding=1, dtype=dt, name="conv_out")(h)


class Decoder(nn.Module):
    """Latents [B, h, w, latent] (after post_quant_conv) -> image [B, H, W, out]; with `remat`, the mid block
    and each ResNet block rematerialised (jax.checkpoint: their inputs kept, their insides recomputed in the
    backward pass)."""

    block_out_channels: Sequence[int]
    layers_per_block: int
    out_channels: int
    groups: int
    add_attention: bool
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, z):
        boc, dt = tuple(self.block_out_channels), self.dtype
        resnet, mid = (nn.remat(_Resnet), nn.remat(_MidBlock)) if self.remat else (_Resnet, _MidBlock)
        h = _Conv(boc[-1], (3, 3), padding=1, dtype=dt, name="conv_in")(z)
        h = mid(self.groups, self.add_attention, dt, name="mid_block")(h)
        for i, ch in enumerate(reversed(boc)):
            for j in range(self.layers_per_block + 1):
                h = resnet(ch, self.groups, dt, name=f"up_blocks__{i}__resnets__{j}")(h)
            if i < len(boc) - 1:
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
                h = _Conv(ch, (3, 3), padding=1, dtype=dt, name=f"up_blocks__{i}__upsamplers__0__conv")(h)
        h = nn.silu(nn.GroupNorm(self.groups, epsilon=EPS, dtype=dt, name="conv_norm_out")(h))
        return _Conv(self.out_channels, (3, 3), padding=1, dtype=dt, name="conv_out")(h)


class AutoencoderKL(nn.Module):
    """diffusers' AutoencoderKL (module docstring)."""

    block_out_channels: Sequence[int]
    down_block_types: Sequence[str] = ("DownEncoderBlock2D",)
    up_block_types: Sequence[str] = ("UpDecoderBlock2D",)
    in_channels: int = 3
    out_channels: int = 3
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: Any = jnp.float32
    remat: bool = False  # the decoder's blocks rematerialised (Decoder)

    def setup(self):
        common = dict(block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
                      groups=self.norm_num_groups, add_attention=self.mid_block_add_attention, dtype=self.dtype)
        self.encoder = Encoder(latent_channels=self.latent_channels, **common)
        self.decoder = Decoder(out_channels=self.out_channels, remat=self.remat, **common)
        if self.use_quant_conv:
            self.quant_conv = _Conv(2 * self.latent_channels, (1, 1), padding=0, dtype=self.dtype)
        if self.use_post_quant_conv:
            self.post_quant_conv = _Conv(self.latent_channels, (1, 1), padding=0, dtype=self.dtype)

    def encode(self, x):
        """(mean, logvar) [B, h, w, latent] float32 of images x [B, H, W, in_channels] (in [−1, 1])."""
        moments = self.encoder(x.astype(self.dtype))
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z):
        """Images [B, H, W, out_channels] float32 of raw latents z [B, h, w, latent]."""
        z = z.astype(self.dtype)
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x):
        return self.decode(self.encode(x)[0])


def vae_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """The AutoencoderKL fields of a VAE config.json; UserError naming the first unsupported field. The
    pipeline-level fields (scaling_factor, shift_factor, latents_mean/std, sample_size, force_upcast) are
    not network fields and are left to the caller."""
    what = f"{CONFIG} of an AutoencoderKL"
    fields = _fields(config, CONFIG, "AutoencoderKL", "idiff imports the AutoencoderKL of Stable Diffusion",
                     VAE_FIXED, VAE_FIELDS)
    for name in ("down_block_types", "up_block_types", "block_out_channels"):
        fields[name] = tuple(fields[name])
    for name, supported in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        for kind in fields[name]:
            if kind != supported:
                raise UserError(f"{what}: unsupported {name} entry {kind!r} (supported: {supported})")
    if not len(fields["down_block_types"]) == len(fields["up_block_types"]) == len(fields["block_out_channels"]):
        raise UserError(f"{what}: down_block_types, up_block_types and block_out_channels differ in length")
    bad = [c for c in fields["block_out_channels"] if c % fields["norm_num_groups"]]
    if bad:
        raise UserError(f"{what}: block_out_channels entry {bad[0]} is not a multiple of norm_num_groups "
                        f"{fields['norm_num_groups']}")
    return fields


def latent_factor(fields: Mapping[str, Any]) -> int:
    """The ratio of image to latent height (and width): 2^(levels − 1)."""
    return 2 ** (len(fields["block_out_channels"]) - 1)


def vae_params(model: AutoencoderKL, tensors: Mapping[str, np.ndarray], source: str, dtype: Any = np.float32) -> Any:
    """The variables of `model` from an AutoencoderKL state dict; UserError naming the first key that does
    not fit."""
    side = latent_factor({"block_out_channels": model.block_out_channels})
    x = jnp.zeros((1, side, side, model.in_channels))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    return params_from_tensors(shapes, tensors, source, what="AutoencoderKL", dtype=dtype)
