"""The U-Net ε_θ(x, t[, label]) of DDPM (Ho et al. 2020; Ronneberger et al. 2015), in Flax Linen.

Sinusoidal time embedding -> MLP; per resolution `num_res_blocks` residual blocks (GroupNorm, SiLU,
3×3 convs, time embedding added), self-attention at the resolutions in `attn_resolutions`, strided-conv
down- and nearest-neighbour up-sampling, skip connections, and a zero-initialised output conv (the
untrained network predicts ε = 0). With `num_classes` > 0 a label embedding is added to the time
embedding (the paper's CIFAR-10 model was label-conditioned).

`UNet.cannot_take(image_size)` says why an image size does not fit the architecture, or returns None.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from idiff_cli.diffusion.conv import conv

# every convolution's gradients are canonical convolutions, fast on XLA:CPU inside loops too (conv.py)
Conv = functools.partial(nn.Conv, conv_general_dilated=conv)


def timestep_embedding(level: jax.Array, dim: int) -> jax.Array:
    """Sinusoidal embedding [B, dim] of noise levels in [0, 1] (scaled by 1000, as DDPM's step index)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10_000.0) * jnp.arange(half) / max(half - 1, 1))
    args = 1000.0 * level[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)


def upsample_nearest(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, 2H, 2W, C], each pixel repeated 2×2: `jax.image.resize(..., "nearest")` by a
    broadcast and a reshape, whose gradient is a sum over the 2×2 blocks, where resize's gather has a
    scatter-add (slow on XLA:CPU)."""
    b, hgt, wid, c = x.shape
    return jnp.broadcast_to(x[:, :, None, :, None, :], (b, hgt, 2, wid, 2, c)).reshape(b, 2 * hgt, 2 * wid, c)


class GroupNorm(nn.Module):
    """Group normalisation (Wu & He 2018) of x [B, H, W, C]: flax's `nn.GroupNorm` (the same `scale` and
    `bias` parameters, ε = 1e-6, variance E[x²] − E[x]² per image and group), with the statistics
    reduced per channel over H, W first and then over each group's channels, and the normalisation
    applied as one multiply-add x·a + b with a, b [B, C]. XLA:CPU runs the [B, C] reductions and the
    multiply-add (with the SiLU after it) as a few fused passes over x, where `nn.GroupNorm`'s
    [B, H, W, G, C/G] statistics and (x − mean)·a + bias take longer (measured: docs/results.md)."""

    num_groups: int
    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, _, _, c = x.shape
        g = self.num_groups
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = jnp.mean(x, axis=(1, 2)).reshape(b, g, c // g).mean(-1)
        mean2 = jnp.mean(x * x, axis=(1, 2)).reshape(b, g, c // g).mean(-1)
        inv = jax.lax.rsqrt(jnp.maximum(mean2 - mean**2, 0.0) + self.epsilon)
        a = jnp.repeat(inv, c // g, axis=-1) * scale
        shift = bias - jnp.repeat(mean, c // g, axis=-1) * a
        return x * a[:, None, None, :] + shift[:, None, None, :]


class ResBlock(nn.Module):
    out_ch: int
    groups: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, temb, train: bool):
        h = Conv(self.out_ch, (3, 3))(nn.silu(GroupNorm(min(self.groups, x.shape[-1]))(x)))
        h = h + nn.Dense(self.out_ch)(nn.silu(temb))[:, None, None, :]
        h = nn.silu(GroupNorm(min(self.groups, self.out_ch))(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = Conv(self.out_ch, (3, 3), kernel_init=nn.initializers.zeros)(h)
        if x.shape[-1] != self.out_ch:
            x = Conv(self.out_ch, (1, 1))(x)
        return x + h


class AttnBlock(nn.Module):
    groups: int

    @nn.compact
    def __call__(self, x):
        b, hgt, wid, c = x.shape
        h = GroupNorm(min(self.groups, c))(x).reshape(b, hgt * wid, c)
        q, k, v = (nn.Dense(c)(h) for _ in range(3))
        weights = jax.nn.softmax(jnp.einsum("bic,bjc->bij", q, k) / math.sqrt(c), axis=-1)
        h = nn.Dense(c, kernel_init=nn.initializers.zeros)(jnp.einsum("bij,bjc->bic", weights, v))
        return x + h.reshape(b, hgt, wid, c)


class UNet(nn.Module):
    """ε_θ(x [B, H, W, C], level [B] in [0, 1], labels [B] int or None) -> [B, H, W, C]."""

    ch: int = 32
    ch_mult: Sequence[int] = (1, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (7,)
    dropout: float = 0.0
    num_classes: int = 0
    groups: int = 8

    @staticmethod
    def cannot_take(image_size: int, ch_mult: Sequence[int]) -> str | None:
        factor = 2 ** (len(ch_mult) - 1)
        if image_size % factor:
            return (f"image size {image_size} cannot be halved {len(ch_mult) - 1} times by the U-Net "
                    f"(ch_mult {tuple(ch_mult)}): it must be a multiple of {factor}")
        return None

    @nn.compact
    def __call__(self, x, level, labels=None, train: bool = False):
        temb = timestep_embedding(level, self.ch)
        temb = nn.Dense(4 * self.ch)(nn.silu(nn.Dense(4 * self.ch)(temb)))
        if self.num_classes:
            temb = temb + nn.Embed(self.num_classes, 4 * self.ch)(labels)
        block = lambda ch: ResBlock(ch, self.groups, self.dropout)  # noqa: E731

        h = Conv(self.ch, (3, 3))(x)
        skips = [h]
        for i, mult in enumerate(self.ch_mult):
            for _ in range(self.num_res_blocks):
                h = block(self.ch * mult)(h, temb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = AttnBlock(self.groups)(h)
                skips.append(h)
            if i < len(self.ch_mult) - 1:
                h = Conv(h.shape[-1], (3, 3), strides=(2, 2))(h)
                skips.append(h)

        h = block(h.shape[-1])(h, temb, train)
        h = AttnBlock(self.groups)(h)
        h = block(h.shape[-1])(h, temb, train)

        for i, mult in reversed(list(enumerate(self.ch_mult))):
            for _ in range(self.num_res_blocks + 1):
                h = block(self.ch * mult)(jnp.concatenate([h, skips.pop()], axis=-1), temb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = AttnBlock(self.groups)(h)
            if i > 0:
                h = Conv(h.shape[-1], (3, 3))(upsample_nearest(h))

        h = nn.silu(GroupNorm(min(self.groups, h.shape[-1]))(h))
        return Conv(x.shape[-1], (3, 3), kernel_init=nn.initializers.zeros)(h)
