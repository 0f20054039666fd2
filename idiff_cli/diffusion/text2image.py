"""Latent text-to-image diffusion (Stable Diffusion 1.x/2.x; Rombach et al. 2022) as diffusers'
`StableDiffusionPipeline` computes it, on the discrete chain of ddpm.py.

    model = TextToImage(unet, vae, text_encoder, tokenizer, sde, scaling_factor, latent_shape, image_shape)
    ids, _ = model.tokenizer.encode(["a photo of a cat"])          # [P, 77] int32
    context = model.embed(params, ids)                             # [P, 77, D] CLIP text embeddings
    images = model.sample(params, context, negative, key, sampler, guidance=7.5)   # [B, H, W, 3] in [−1, 1]

* The U-Net's prediction is ε, or v converted to ε = √ᾱ_t v + √(1 − ᾱ_t) z (`eps`).
* Classifier-free guidance (Ho & Salimans 2022) with the negative prompt's embedding c̄ ("" by default):
  ε̃(z, t) = ε(z, t, c̄) + g (ε(z, t, c) − ε(z, t, c̄)), one U-Net call on the batch [c̄; c] as diffusers
  makes it (`guided_eps`); g ≤ 1 is the conditional model alone (one call), as in diffusers.
* Sampling: z_T ~ N(0, I) [B, h, w, C_latent] (diffusers' init_noise_sigma is 1 for DDIM and DDPM), then
  the sampler's steps with the score s(z, t) = −ε̃(z, t)/σ(t); the images are the VAE decoder's
  D(z_0 / scaling_factor) clipped to [−1, 1] (diffusers' output_type "np" is (x + 1)/2 of that).

Weights and activations run in the networks' `dtype` (bfloat16 on accelerators: `with_dtype`); the
latents and the sampler's arithmetic stay float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from idiff_cli.diffusion.ddpm import DiscreteDDPM
from idiff_cli.diffusion.samplers import Sampler
from idiff_cli.diffusion.sde import _expand

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True, eq=False)
class TextToImage:
    """The networks of an SD pipeline (Flax modules: sd_unet.CondUNet, vae.AutoencoderKL,
    clip_text.CLIPTextEncoder), its tokenizer and noise process; latent_shape (h, w, C_latent) and
    image_shape (H, W, 3). Variables: {"unet": …, "vae": …, "text_encoder": …}."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    sde: DiscreteDDPM
    scaling_factor: float
    latent_shape: tuple[int, int, int]
    image_shape: tuple[int, int, int]

    def with_dtype(self, params: dict[str, Any], dtype: str) -> tuple["TextToImage", dict[str, Any]]:
        """The model whose networks compute in `dtype` ("float32" or "bfloat16") and its params cast to it."""
        dt = DTYPES[dtype]
        model = dataclasses.replace(self, unet=self.unet.clone(dtype=dt), vae=self.vae.clone(dtype=dt),
                                    text_encoder=self.text_encoder.clone(dtype=dt))
        return model, jax.tree_util.tree_map(lambda p: p.astype(dt), params)

    def with_remat(self) -> "TextToImage":
        """The model whose U-Net and VAE decoder rematerialise their blocks in a backward pass (jax.checkpoint
        of each ResNet, transformer and mid block: only block inputs are kept between the forward and the
        backward pass, the rest recomputed) — the same outputs and gradients."""
        return dataclasses.replace(self, unet=self.unet.clone(remat=True), vae=self.vae.clone(remat=True))

    def embed(self, params: dict[str, Any], ids: jax.Array) -> jax.Array:
        """CLIP's last hidden state [P, 77, D] (float32) of token ids [P, 77]."""
        return self.text_encoder.apply(params["text_encoder"], ids).astype(jnp.float32)

    def eps(self, params: dict[str, Any], z: jax.Array, t: jax.Array, context: jax.Array) -> jax.Array:
        """ε_θ(z [B, h, w, C], t [B] timesteps, context [B, 77, D]) [B, h, w, C] float32."""
        dt = self.unet.dtype
        out = self.unet.apply(params["unet"], z.astype(dt), t, context.astype(dt)).astype(jnp.float32)
        if self.sde.prediction_type == "v_prediction":
            abar = _expand(self.sde.abar(t), z)
            out = jnp.sqrt(abar) * out + jnp.sqrt(1.0 - abar) * z
        return out

    def guided_eps(self, params: dict[str, Any], z: jax.Array, t: jax.Array, context: jax.Array,
                   negative: jax.Array, guidance: float) -> jax.Array:
        """ε̃ of classifier-free guidance (module docstring); context and negative [B, 77, D]."""
        if guidance <= 1.0:
            return self.eps(params, z, t, context)
        both = self.eps(params, jnp.concatenate([z, z]), jnp.concatenate([t, t]),
                        jnp.concatenate([negative, context]))
        uncond, cond = jnp.split(both, 2)
        return uncond + guidance * (cond - uncond)

    def decode(self, params: dict[str, Any], z: jax.Array) -> jax.Array:
        """Images [B, H, W, 3] in [−1, 1] of latents z_0 [B, h, w, C]."""
        x = self.vae.apply(params["vae"], (z / self.scaling_factor).astype(self.vae.dtype), method="decode")
        return jnp.clip(x.astype(jnp.float32), -1.0, 1.0)

    def sample(self, params: dict[str, Any], context: jax.Array, negative: jax.Array, key: jax.Array,
               sampler: Sampler, guidance: float, latents: jax.Array | None = None) -> jax.Array:
        """Images [B, H, W, 3] in [−1, 1] for the embeddings context [B, 77, D] (negative: the negative
        prompt's, broadcast to it), from `latents` z_T or z_T ~ N(0, I) of `key`."""
        negative = jnp.broadcast_to(negative, context.shape)

        def score(z, t):
            return -self.guided_eps(params, z, t, context, negative, guidance) / _expand(self.sde.sigma(t), z)

        z0 = sampler.sample(score, key, (context.shape[0], *self.latent_shape), init=latents)
        return self.decode(params, z0)
