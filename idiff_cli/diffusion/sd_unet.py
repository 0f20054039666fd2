"""The text-conditioned U-Net of Stable Diffusion 1.x/2.x (diffusers' `UNet2DConditionModel`) in Flax
Linen, built from the fields of its `config.json`.

    y = CondUNet(**cond_unet_fields(config))(x [B, h, w, C_in] latents, t [B] timesteps (floats),
                                             context [B, L, D] text embeddings) -> [B, h, w, C_out]

y is the raw network output (ε or v, whichever the checkpoint predicts), in `dtype`.

The network, as diffusers builds it (c_i = block_out_channels[i], n levels, d = c_0):

* time: e(t) = [sin(t ω), cos(t ω)] (or [cos, sin] with `flip_sin_to_cos`), ω_j = exp(−log(10⁴) j /
  (d/2 − freq_shift)), computed in float32; temb = Linear(SiLU(Linear(e))), width `time_embedding_dim`
  (4d when null).
* `conv_in` 3×3 (on 2x − 1 with `center_input_sample`); per level i a down block of
  layers_per_block[i] ResNet blocks (GroupNorm(groups, norm_eps) · SiLU · 3×3 conv, + Linear(SiLU(temb)),
  GroupNorm · SiLU · 3×3 conv, 1×1 shortcut when the channels change), each followed in a
  CrossAttnDownBlock2D by a spatial transformer, then (except at the last level) a stride-2 3×3 conv
  (padding `downsample_padding`; 0 pads one zero row/column at the bottom/right first). The conv_in
  output and every block output are kept as skips.
* mid (UNetMidBlock2DCrossAttn): ResNet · transformer · ResNet, each ResNet output divided by
  `mid_block_scale_factor`.
* up blocks in reverse: layers_per_block[i] + 1 ResNet blocks, each on [h, skip] concatenated along the
  channels (h first), each followed by a transformer in a CrossAttnUpBlock2D; then (except at the last)
  nearest upsampling to the size of the next skip (2× when the sizes divide) and a 3×3 conv.
* GroupNorm · SiLU · `conv_out` 3×3.

Spatial transformer (Transformer2DModel, one BasicTransformerBlock), on h [B, H, W, C] with N heads of
width C // N (`num_attention_heads`, I = N · (C // N)):

    u = proj_in(GroupNorm(groups, eps 1e-6)(h))  [B, H·W, I]  (1×1 conv, or Linear with
                                                               `use_linear_projection`)
    u = u + Attn(LN₁(u), LN₁(u));  u = u + Attn(LN₂(u), context);  u = u + FF(LN₃(u))
    out = h + proj_out(u)

Attn(a, b) = to_out(softmax(q kᵀ / √(C // N)) v) per head, q = to_q(a), k = to_k(b), v = to_v(b) (no
biases but to_out's); FF(u) = Linear(g ⊙ GELU(gate)), [g, gate] = Linear(u) of width 2 · 4I (GEGLU, exact
GELU); LayerNorm eps 1e-5.

Heads: diffusers' config calls the number of heads per level `attention_head_dim` (a naming quirk it
keeps for compatibility); `cond_unet_fields` hands it over as `num_attention_heads`. The mid block uses
the last level's heads, up block i those of level n − 1 − i. to_k/to_v read context vectors of width
`cross_attention_dim`.

Precision: every Dense/Conv computes in `dtype` (params are cast by the caller); GroupNorm/LayerNorm
statistics and the attention logits and softmax are float32 (jax.nn.dot_product_attention's XLA path
accumulates q·k in float32 for bfloat16 inputs); `upcast_attention` runs the whole attention product in
float32 at least. Variances are two-pass, as torch's, but in the ResNet blocks (ddpm_unet's, shared
with DDPMUNet: Flax's one-pass E[x²] − E[x]²).

Submodules carry diffusers' module paths with "." written "__"
(`down_blocks__0__attentions__0/transformer_blocks__0/attn2/to_k/kernel` holds
`down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight`), so that
diffusers_io.params_from_tensors fills the parameters from a safetensors state dict name by name.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from idiff_cli.diffusion.ddpm_unet import ResnetBlock, _Conv, timestep_embedding
from idiff_cli.errors import UserError

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
CROSS_ATTENTION_BLOCKS = ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D")
WHAT = "config.json of a UNet2DConditionModel"

# UNet2DConditionModel fields (with diffusers' defaults) that CondUNet takes, by their config names.
FIELDS = dict(in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
              block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1,
              mid_block_scale_factor=1.0, norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=1280,
              attention_head_dim=8, use_linear_projection=False, upcast_attention=False, time_embedding_dim=None)
# Fields supported only at their default (diffusers itself refuses a num_attention_heads). The fields
# named neither here nor above (dropout, sample_size, resnet_out_scale_factor, resnet_skip_time_act,
# cross_attention_norm, mid_block_only_cross_attention, …) change nothing in these block types.
FIXED = dict(mid_block_type="UNetMidBlock2DCrossAttn", num_attention_heads=None, dual_cross_attention=False,
             class_embed_type=None, num_class_embeds=None, class_embeddings_concat=False, addition_embed_type=None,
             encoder_hid_dim=None, encoder_hid_dim_type=None, time_embedding_type="positional",
             time_embedding_act_fn=None, timestep_post_act=None, time_cond_proj_dim=None, conv_in_kernel=3,
             conv_out_kernel=3, resnet_time_scale_shift="default", attention_type="default",
             reverse_transformer_layers_per_block=None)
# Fields that may be given per level: supported only at this value at every level.
FIXED_PER_LEVEL = dict(only_cross_attention=False, transformer_layers_per_block=1)
ACTIVATIONS = ("silu", "swish")  # the same function in diffusers


def _per_level(name: str, value: Any, levels: int) -> tuple:
    """A field given as one value for all levels or as a list of one per level, as a tuple per level."""
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise UserError(f"{WHAT}: {name} has {len(value)} entries for {levels} levels (down_block_types)")
        return tuple(value)
    return (value,) * levels


def cond_unet_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """The CondUNet fields of a UNet2DConditionModel config.json (diffusers' defaults where absent);
    UserError naming the first unsupported field."""
    if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise UserError(f"config.json: unsupported _class_name {config['_class_name']!r}; idiff's Stable "
                        "Diffusion U-Net is a UNet2DConditionModel")
    for name, value in FIXED.items():
        if config.get(name, value) != value:
            raise UserError(f"{WHAT}: unsupported {name} = {config[name]!r} (supported: {value!r})")
    if config.get("act_fn", "silu") not in ACTIVATIONS:
        raise UserError(f"{WHAT}: unsupported act_fn = {config['act_fn']!r} (supported: {', '.join(ACTIVATIONS)})")
    fields = {name: config.get(name, default) for name, default in FIELDS.items()}
    levels = len(fields["down_block_types"])
    for name, value in FIXED_PER_LEVEL.items():
        if any(v != value for v in _per_level(name, config.get(name, value), levels)):
            raise UserError(f"{WHAT}: unsupported {name} = {config[name]!r} (supported: {value!r} at every level)")
    for name, supported in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
        fields[name] = tuple(fields[name])
        for kind in fields[name]:
            if kind not in supported:
                raise UserError(f"{WHAT}: unsupported {name} entry {kind!r} (supported: {', '.join(supported)})")
    fields["block_out_channels"] = tuple(fields["block_out_channels"])
    if not len(fields["up_block_types"]) == len(fields["block_out_channels"]) == levels:
        raise UserError(f"{WHAT}: down_block_types, up_block_types and block_out_channels differ in length")
    if fields["norm_num_groups"] is None:
        raise UserError(f"{WHAT}: unsupported norm_num_groups = None (supported: an integer)")
    for name in ("layers_per_block", "cross_attention_dim", "attention_head_dim"):
        fields[name] = _per_level(name, fields[name], levels)
        if None in fields[name]:
            raise UserError(f"{WHAT}: unsupported {name} = {config[name]!r} (supported: integers)")
    if len(set(fields["cross_attention_dim"])) > 1:  # one text context feeds every level
        raise UserError(f"{WHAT}: unsupported cross_attention_dim = {config['cross_attention_dim']!r} "
                        "(supported: one width for every level)")
    fields["cross_attention_dim"] = fields["cross_attention_dim"][0]
    fields["num_attention_heads"] = fields.pop("attention_head_dim")
    return fields


def _upsample_nearest(h: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Nearest-neighbour resize of h [B, H, W, C] to `size` as torch's F.interpolate(mode="nearest"):
    output row i reads input row ⌊i H / H_out⌋ (the 2× case: row ⌊i/2⌋). torch rounds i · (H / H_out)
    in float32, which gives the same rows for the sizes a U-Net makes (H_out = 2H ± 1: no i H / H_out
    but i = 0 is an integer, and each is ≥ 1/H_out away from one)."""
    for axis, out in zip((1, 2), size):
        h = jnp.take(h, np.arange(out) * h.shape[axis] // out, axis=axis)
    return h


class Attention(nn.Module):
    """diffusers' Attention (AttnProcessor2_0): multi-head attention of x [B, T, C] over kv [B, S, D]."""

    heads: int
    head_dim: int
    upcast: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, kv):
        b, width = x.shape[0], self.heads * self.head_dim

        def project(name, a):
            return nn.Dense(width, use_bias=False, dtype=self.dtype, name=name)(a).reshape(
                b, -1, self.heads, self.head_dim)

        q, k, v = project("to_q", x), project("to_k", kv), project("to_v", kv)
        if self.upcast:
            wide = jnp.promote_types(self.dtype, jnp.float32)
            q, k, v = q.astype(wide), k.astype(wide), v.astype(wide)
        out = jax.nn.dot_product_attention(q, k, v).astype(self.dtype).reshape(b, -1, width)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="to_out__0")(out)


class TransformerBlock(nn.Module):
    """diffusers' BasicTransformerBlock: self-attention, cross-attention on the context, GEGLU
    feed-forward, each on a LayerNorm of the residual stream u [B, T, I]."""

    heads: int
    head_dim: int
    upcast: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, u, context):
        dt, width = self.dtype, u.shape[-1]

        def norm(name):
            return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=dt, name=name)

        def attention(name):
            return Attention(self.heads, self.head_dim, self.upcast, dt, name=name)

        a = norm("norm1")(u)
        u = u + attention("attn1")(a, a)
        u = u + attention("attn2")(norm("norm2")(u), context)
        g, gate = jnp.split(nn.Dense(8 * width, dtype=dt, name="ff__net__0__proj")(norm("norm3")(u)), 2, axis=-1)
        return u + nn.Dense(width, dtype=dt, name="ff__net__2")(g * nn.gelu(gate, approximate=False))


class Transformer2D(nn.Module):
    """diffusers' Transformer2DModel on continuous inputs h [B, H, W, C] (one transformer block)."""

    heads: int
    groups: int
    linear_projection: bool = False
    upcast: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, context):
        b, hgt, wid, c = h.shape
        head_dim, dt = c // self.heads, self.dtype
        inner = self.heads * head_dim
        u = nn.GroupNorm(self.groups, epsilon=1e-6, use_fast_variance=False, dtype=dt, name="norm")(h)
        if self.linear_projection:
            u = nn.Dense(inner, dtype=dt, name="proj_in")(u.reshape(b, hgt * wid, c))
        else:
            u = _Conv(inner, (1, 1), padding=0, dtype=dt, name="proj_in")(u).reshape(b, hgt * wid, inner)
        u = TransformerBlock(self.heads, head_dim, self.upcast, dt, name="transformer_blocks__0")(u, context)
        if self.linear_projection:
            u = nn.Dense(c, dtype=dt, name="proj_out")(u).reshape(b, hgt, wid, c)
        else:
            u = _Conv(c, (1, 1), padding=0, dtype=dt, name="proj_out")(u.reshape(b, hgt, wid, inner))
        return h + u


class CondUNet(nn.Module):
    """diffusers' UNet2DConditionModel: (x [B, h, w, C_in], t [B], context [B, L, D]) -> [B, h, w, C_out]
    (module docstring). layers_per_block and num_attention_heads have one entry per level."""

    block_out_channels: Sequence[int]
    down_block_types: Sequence[str]
    up_block_types: Sequence[str]
    layers_per_block: Sequence[int]
    num_attention_heads: Sequence[int]
    cross_attention_dim: int = 1280
    in_channels: int = 4
    out_channels: int = 4
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = False
    upcast_attention: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    center_input_sample: bool = False
    time_embedding_dim: int | None = None
    dtype: Any = jnp.float32
    remat: bool = False  # rematerialise each ResNet and transformer block (jax.checkpoint): keep block inputs only

    def _transformer(self, level: int, name: str) -> Transformer2D:
        block = nn.remat(Transformer2D) if self.remat else Transformer2D
        return block(self.num_attention_heads[level], self.norm_num_groups, self.use_linear_projection,
                     self.upcast_attention, self.dtype, name=name)

    @nn.compact
    def __call__(self, x, t, context):
        boc, levels, dt = tuple(self.block_out_channels), len(self.block_out_channels), self.dtype
        groups, eps = self.norm_num_groups, self.norm_eps

        def resnet(out_ch, name, scale=1.0):
            block = nn.remat(ResnetBlock) if self.remat else ResnetBlock
            return block(out_ch, groups, eps, scale, dt, name=name)

        t = jnp.broadcast_to(jnp.asarray(t), x.shape[:1])
        temb = timestep_embedding(t, boc[0], self.flip_sin_to_cos, self.freq_shift).astype(dt)
        dim = self.time_embedding_dim or 4 * boc[0]
        temb = nn.Dense(dim, dtype=dt, name="time_embedding__linear_2")(
            nn.silu(nn.Dense(dim, dtype=dt, name="time_embedding__linear_1")(temb)))
        if context.shape[-1] != self.cross_attention_dim:
            raise ValueError(f"context width {context.shape[-1]}, the network's cross_attention_dim is "
                             f"{self.cross_attention_dim}")
        context = context.astype(dt)

        h = 2 * x - 1.0 if self.center_input_sample else x
        h = _Conv(boc[0], (3, 3), padding=1, dtype=dt, name="conv_in")(h)
        skips = [h]
        for i, kind in enumerate(self.down_block_types):
            block = f"down_blocks__{i}"
            for j in range(self.layers_per_block[i]):
                h = resnet(boc[i], f"{block}__resnets__{j}")(h, temb)
                if kind in CROSS_ATTENTION_BLOCKS:
                    h = self._transformer(i, f"{block}__attentions__{j}")(h, context)
                skips.append(h)
            if i < levels - 1:
                pad = self.downsample_padding
                if pad == 0:  # diffusers pads one zero row and column at the bottom/right, then convolves
                    h = jnp.pad(h, ((0, 0), (0, 1), (0, 1), (0, 0)))
                h = _Conv(boc[i], (3, 3), strides=(2, 2), padding=pad, dtype=dt,
                          name=f"{block}__downsamplers__0__conv")(h)
                skips.append(h)

        scale = self.mid_block_scale_factor
        h = resnet(boc[-1], "mid_block__resnets__0", scale)(h, temb)
        h = self._transformer(levels - 1, "mid_block__attentions__0")(h, context)
        h = resnet(boc[-1], "mid_block__resnets__1", scale)(h, temb)

        for i, kind in enumerate(self.up_block_types):
            block, level = f"up_blocks__{i}", levels - 1 - i
            for j in range(self.layers_per_block[level] + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = resnet(boc[level], f"{block}__resnets__{j}")(h, temb)
                if kind in CROSS_ATTENTION_BLOCKS:
                    h = self._transformer(level, f"{block}__attentions__{j}")(h, context)
            if i < levels - 1:
                h = _upsample_nearest(h, skips[-1].shape[1:3])
                h = _Conv(boc[level], (3, 3), padding=1, dtype=dt, name=f"{block}__upsamplers__0__conv")(h)

        h = nn.silu(nn.GroupNorm(groups, epsilon=eps, use_fast_variance=False, dtype=dt, name="conv_norm_out")(h))
        return _Conv(self.out_channels, (3, 3), padding=1, dtype=dt, name="conv_out")(h)


def param_shapes(model: CondUNet) -> Any:
    """The variables {"params": ...} of `model` as ShapeDtypeStructs (no initialisation)."""
    side = 2 ** (len(model.block_out_channels) - 1)
    x = jnp.zeros((1, side, side, model.in_channels))
    context = jnp.zeros((1, 1, model.cross_attention_dim))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x, jnp.zeros((1,)), context))
