"""The U-Net of diffusers' `UNet2DModel` (Ho et al. 2020's DDPM networks) in Flax Linen, built from the
fields of its `config.json`, so that the public DDPM checkpoints (`google/ddpm-cifar10-32`,
`google/ddpm-bedroom-256`, …) run in JAX.

    ε = DDPMUNet(**fields)(x [B, H, W, C], t [B] (training timesteps 0 … N − 1, floats)) -> [B, H, W, C]

The network, as diffusers builds it:

* time: e(t) = [sin(t ω), cos(t ω)] (or [cos, sin] with `flip_sin_to_cos`), ω_j = exp(−log(10⁴) j /
  (d/2 − freq_shift)), d = block_out_channels[0]; then Linear(4d) · SiLU · Linear(4d).
* `conv_in` 3×3; per level i a down block of `layers_per_block` ResNet blocks (GroupNorm(groups, eps) ·
  SiLU · 3×3 conv, + Linear(SiLU(temb)), GroupNorm · SiLU · 3×3 conv, 1×1 shortcut when the channels
  change), each followed by self-attention in an AttnDownBlock2D, then a stride-2 3×3 conv (padding
  `downsample_padding`; 0 pads one zero row/column at the bottom/right first) except at the last level;
  every block output is kept as a skip.
* mid: ResNet · attention · ResNet (outputs divided by `mid_block_scale_factor`).
* up blocks in reverse: `layers_per_block` + 1 ResNet blocks, each on [h, skip] concatenated along the
  channels (h first), attention in an AttnUpBlock2D, then nearest 2× upsampling and a 3×3 conv.
* GroupNorm · SiLU · `conv_out` 3×3.

Attention: GroupNorm, q, k, v Linear over the channels, `heads` = C / attention_head_dim heads (one
head of C channels when attention_head_dim is null), softmax(q kᵀ/√d_head) v, Linear out, plus the
input.

Submodules carry diffusers' module paths with "." written "__" (`down_blocks__0__resnets__1/conv1/kernel`
holds `down_blocks.0.resnets.1.conv1.weight`; no diffusers name contains "__"), so diffusers_io.py maps a
state dict onto the parameters name by name. Every convolution goes through the canonical-gradient conv (conv.py).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from idiff_cli.diffusion.conv import conv

DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")

_Conv = functools.partial(nn.Conv, conv_general_dilated=conv)


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> jax.Array:
    """diffusers' sinusoidal embedding [B, dim] (float32) of timesteps t [B] (`Timesteps`, max period 10⁴).
    The frequencies are float32 constants made on the host as torch makes them: the exponents
    float32(−log 10⁴) · j / (dim/2 − freq_shift) rounded at each float32 operation (an XLA division by a
    constant may become an inexact multiplication by its reciprocal, which times t ≈ 10³ moves the
    sines by ~5·10⁻⁵), then exp rounded once from float64 (torch's float32 exp is within an ulp)."""
    half = dim // 2
    exponents = np.float32(-math.log(10_000.0)) * np.arange(half, dtype=np.float32) / np.float32(half - freq_shift)
    freqs = np.exp(exponents.astype(np.float64)).astype(np.float32)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class ResnetBlock(nn.Module):
    """diffusers' ResnetBlock2D ("default" time embedding: added after the first conv), computed in
    `dtype` (GroupNorm statistics in float32 at least)."""

    out_ch: int
    groups: int
    eps: float
    scale: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, temb):
        dt = self.dtype
        h = nn.silu(nn.GroupNorm(self.groups, epsilon=self.eps, dtype=dt, name="norm1")(x))
        h = _Conv(self.out_ch, (3, 3), padding=1, dtype=dt, name="conv1")(h)
        h = h + nn.Dense(self.out_ch, dtype=dt, name="time_emb_proj")(nn.silu(temb))[:, None, None, :]
        h = nn.silu(nn.GroupNorm(self.groups, epsilon=self.eps, dtype=dt, name="norm2")(h))
        h = _Conv(self.out_ch, (3, 3), padding=1, dtype=dt, name="conv2")(h)
        if x.shape[-1] != self.out_ch:
            x = _Conv(self.out_ch, (1, 1), padding=0, dtype=dt, name="conv_shortcut")(x)
        return (x + h) / self.scale


class Attention(nn.Module):
    """Self-attention over the H·W positions with `head_dim` channels per head, residual, / `scale`."""

    head_dim: int | None
    groups: int
    eps: float
    scale: float = 1.0

    @nn.compact
    def __call__(self, x):
        b, hgt, wid, c = x.shape
        d = self.head_dim or c
        heads = c // d
        h = nn.GroupNorm(self.groups, epsilon=self.eps, name="group_norm")(x).reshape(b, hgt * wid, heads, d)
        q, k, v = (nn.Dense(c, name=name)(h.reshape(b, hgt * wid, c)).reshape(b, hgt * wid, heads, d)
                   for name in ("to_q", "to_k", "to_v"))
        weights = jax.nn.softmax(jnp.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(d), axis=-1)
        out = jnp.einsum("bhij,bjhd->bihd", weights, v).reshape(b, hgt * wid, c)
        out = nn.Dense(c, name="to_out__0")(out).reshape(b, hgt, wid, c)
        return (out + x) / self.scale


class DDPMUNet(nn.Module):
    """ε_θ(x [B, H, W, C], t [B] timesteps, labels ignored (unconditional)) -> [B, H, W, C], the network
    output converted to ε when the checkpoint predicts v (`v_prediction` with the training ᾱ table
    `alphas_cumprod`: ε = √ᾱ_t v + √(1 − ᾱ_t) x)."""

    block_out_channels: Sequence[int]
    down_block_types: Sequence[str]
    up_block_types: Sequence[str]
    layers_per_block: int = 2
    in_channels: int = 3
    out_channels: int = 3
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    attention_head_dim: int | None = 8
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    add_attention: bool = True
    center_input_sample: bool = False
    time_embedding_dim: int | None = None
    v_prediction_alphas_cumprod: tuple[float, ...] = ()
    num_classes: int = 0

    @nn.compact
    def __call__(self, x, t, labels=None, train: bool = False):
        del labels, train  # unconditional, no dropout at inference
        boc = tuple(self.block_out_channels)
        groups, eps = self.norm_num_groups, self.norm_eps
        t = jnp.broadcast_to(jnp.asarray(t), x.shape[:1])
        temb = timestep_embedding(t, boc[0], self.flip_sin_to_cos, self.freq_shift)
        dim = self.time_embedding_dim or 4 * boc[0]
        temb = nn.Dense(dim, name="time_embedding__linear_2")(
            nn.silu(nn.Dense(dim, name="time_embedding__linear_1")(temb)))

        h = 2 * x - 1.0 if self.center_input_sample else x
        h = _Conv(boc[0], (3, 3), padding=1, name="conv_in")(h)
        skips = [h]
        for i, kind in enumerate(self.down_block_types):
            block = f"down_blocks__{i}"
            for j in range(self.layers_per_block):
                h = ResnetBlock(boc[i], groups, eps, name=f"{block}__resnets__{j}")(h, temb)
                if kind == "AttnDownBlock2D":
                    h = Attention(self.attention_head_dim or None, groups, eps, name=f"{block}__attentions__{j}")(h)
                skips.append(h)
            if i < len(boc) - 1:
                pad = self.downsample_padding
                if pad == 0:  # diffusers pads one zero row and column at the bottom/right, then convolves
                    h = jnp.pad(h, ((0, 0), (0, 1), (0, 1), (0, 0)))
                h = _Conv(boc[i], (3, 3), strides=(2, 2), padding=pad, name=f"{block}__downsamplers__0__conv")(h)
                skips.append(h)

        scale = self.mid_block_scale_factor
        h = ResnetBlock(boc[-1], groups, eps, scale, name="mid_block__resnets__0")(h, temb)
        if self.add_attention:
            h = Attention(self.attention_head_dim or None, groups, eps, scale, name="mid_block__attentions__0")(h)
        h = ResnetBlock(boc[-1], groups, eps, scale, name="mid_block__resnets__1")(h, temb)

        for i, kind in enumerate(self.up_block_types):
            block, out_ch = f"up_blocks__{i}", boc[len(boc) - 1 - i]
            for j in range(self.layers_per_block + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = ResnetBlock(out_ch, groups, eps, name=f"{block}__resnets__{j}")(h, temb)
                if kind == "AttnUpBlock2D":
                    h = Attention(self.attention_head_dim or None, groups, eps, name=f"{block}__attentions__{j}")(h)
            if i < len(boc) - 1:
                b, hgt, wid, c = h.shape
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest-neighbour 2×
                h = _Conv(c, (3, 3), padding=1, name=f"{block}__upsamplers__0__conv")(h)

        h = nn.silu(nn.GroupNorm(groups, epsilon=eps, name="conv_norm_out")(h))
        out = _Conv(self.out_channels, (3, 3), padding=1, name="conv_out")(h)
        if self.v_prediction_alphas_cumprod:
            abar = jnp.asarray(self.v_prediction_alphas_cumprod, jnp.float32)[t.astype(jnp.int32)][:, None, None, None]
            out = jnp.sqrt(abar) * out + jnp.sqrt(1.0 - abar) * x
        return out
