"""CLIP image–text similarity, a prompt-aware image reward: each image scored against its own prompt.

    reward = load(clip_dir)                     # a ClipScore
    scores = reward(images, prompts)            # images [B, H, W, 3] in [−1, 1], rewards.Prompts -> [B]

R(x, c) = cos(e_I(x), e_T(c)) = e_I · e_T / (‖e_I‖₂ ‖e_T‖₂), e_I = CLIP ViT-L/14's image embedding of x
(CLIPModel.get_image_features of CLIP's preprocessing of x: idiff_cli/diffusion/clip_vision.py) and e_T its text
embedding of the prompt c (CLIPModel.get_text_features of the tokenized prompt, cut to 77 tokens:
idiff_cli/diffusion/clip_text.py); weights openai/clip-vit-large-patch14 (config.json, model.safetensors and the
tokenizer's files of its repository). It is CLIP's zero-shot logit (logits_per_image) without the logit_scale
factor (exp(logit_scale) = 100 for the trained model; λ plays its part), in [−1, 1].

CLIPScore (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image Captioning") is
CLIP-S = 2.5 · max(cos, 0) of the same two embeddings (of CLIP ViT-B/32 there, and with the caption prefixed by
"A photo depicts"): 2.5 R wherever R > 0, which is where the cosines lie in practice (Hessel et al. observed
values from about 0 to 0.4, hence the factor 2.5). The plain cosine is used here because its gradient is smooth
everywhere: max(·, 0) has a kink at 0 and gives no gradient to an image whose cosine is negative.

`prompts.texts` (static) is tokenized on the host when the reward is traced, and the text embeddings of the whole
prompt table [P, projection_dim] are computed in the graph from the text tower's weights (so the compiled program
holds P × 77 token ids, not embeddings); each image's cosine is then picked from the [B, P] cosines by
`prompts.ids` with a one-hot mask (exact; no gather by the batch's ids, which the text-to-image score avoids too:
design.md, "Named conditioning"). The text side does not depend on the images: a gradient in x differentiates the
image side only, and under jit the text tower runs once per call, on the P prompts.

`ClipScore` is a pytree (the two towers' weights are its leaves; the networks, the preprocessing and the
tokenizer are static), so it can be passed to a jitted function as an argument instead of being closed over as
constants.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from idiff_cli.diffusion import clip_text, clip_vision
from idiff_cli.diffusion.diffusers_io import read_json, read_weights
from idiff_cli.errors import UserError

DOWNLOAD = (f"huggingface-cli download {clip_vision.PUBLISHED} {clip_vision.CONFIG} {clip_vision.WEIGHTS} "
            f"{' '.join(clip_text.TOKENIZER_FILES)} --local-dir DIR")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["text_params", "vision_params"],
                   meta_fields=["text_module", "vision_module", "preprocessing", "tokenizer"])
@dataclasses.dataclass(frozen=True)
class ClipScore:
    """R(x, c) = cos(e_I(x), e_T(c)) of images x [..., H, W, 3] in [−1, 1] and their prompts c (Prompts with ids
    [...]) -> [...] (module docstring): float32 (float64 when loaded with dtype float64, under jax_enable_x64),
    jit-able and differentiable in x."""

    text_module: clip_text.CLIPTextEncoder  # with projection_dim > 0: get_text_features
    text_params: Any  # the text tower's variables {"params": ...}, text_projection included
    vision_module: clip_vision.CLIPVisionEncoder
    vision_params: Any
    tokenizer: clip_text.Tokenizer
    preprocessing: clip_vision.Preprocessing = clip_vision.Preprocessing()
    takes_prompts = True  # reward(images, prompts) (rewards.takes_prompts)
    channels = (3,)  # the images a reward takes (rewards.check_reward)

    def text_embeds(self, texts: tuple[str, ...]) -> jax.Array:
        """The unit text embeddings [P, projection_dim] of P prompts (tokenized on the host)."""
        ids, _ = self.tokenizer.encode(texts)
        return clip_vision.unit(self.text_module.apply(self.text_params, jnp.asarray(ids), pooled=True))

    def image_embeds(self, images: jax.Array) -> jax.Array:
        """The unit image embeddings [..., projection_dim] of images [..., H, W, 3] in [−1, 1]."""
        return clip_vision.VisionTower(self.vision_module, self.vision_params, self.preprocessing).unit_embeds(images)

    def __call__(self, images: jax.Array, prompts: Any) -> jax.Array:  # prompts: a rewards.Prompts
        if not prompts.texts:
            raise ValueError("ClipScore needs a prompt table: Prompts.texts is empty")
        image, text = self.image_embeds(images), self.text_embeds(prompts.texts)
        cosines = jnp.einsum("...d,pd->...p", image, text, precision=jax.lax.Precision.HIGHEST)
        own = prompts.ids[..., None] == jnp.arange(len(prompts.texts))
        return jnp.sum(jnp.where(own, cosines, 0), axis=-1)


def load(directory: str | pathlib.Path, dtype: Any = jnp.float32, param_dtype: Any = np.float32) -> ClipScore:
    """The CLIP similarity reward of a CLIP model directory (openai/clip-vit-large-patch14's config.json,
    model.safetensors, read once for both towers, and its tokenizer's files: tokenizer.json, or vocab.json and
    merges.txt, with tokenizer_config.json and special_tokens_map.json), activations in `dtype`, weights in
    `param_dtype`; UserError (one line) naming a missing or unfit file and how to download the files."""
    directory = clip_vision.check_files(
        directory, (clip_vision.CONFIG, clip_vision.WEIGHTS, ("tokenizer.json", "vocab.json"),
                    ("tokenizer.json", "merges.txt")), DOWNLOAD)
    tokenizer = clip_text.load_tokenizer(directory)
    config = read_json(directory / clip_vision.CONFIG)
    if not isinstance(config.get("text_config"), dict):
        raise UserError(f"'{directory / clip_vision.CONFIG}' is not a CLIPModel's config (it has no text_config); "
                        f"the CLIP score needs both towers, as {clip_vision.PUBLISHED} has them")
    text_module = clip_text.CLIPTextEncoder(**clip_text.text_fields(config), dtype=dtype)
    if tokenizer.max_length > text_module.max_position_embeddings:
        raise UserError(f"the tokenizer in '{directory}' makes {tokenizer.max_length} tokens; the text tower has "
                        f"{text_module.max_position_embeddings} positions")
    tensors = read_weights(directory / clip_vision.WEIGHTS)
    source = str(directory / clip_vision.WEIGHTS)
    vision = clip_vision.tower(directory, config, tensors, dtype, param_dtype)
    text_params = clip_text.text_params(text_module, tensors, source, dtype=param_dtype)
    return ClipScore(text_module, text_params, vision.module, vision.params, tokenizer, vision.preprocessing)
