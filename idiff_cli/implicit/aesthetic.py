"""The LAION aesthetic predictor v2 as a differentiable image reward (DDPO's "aesthetic quality" reward).

    reward = load(clip_dir, head_path)          # an AestheticScore
    scores = reward(images)                     # images [B, H, W, 3] in [−1, 1] -> [B]

R(x) = head(e / ‖e‖₂), e = CLIP ViT-L/14's image embedding of x (CLIPModel.get_image_features of CLIP's
preprocessing of x: idiff_cli/diffusion/clip_vision.py, weights openai/clip-vit-large-patch14). The head is the
MLP of christophschuhmann/improved-aesthetic-predictor, published as sac+logos+ava1-l14-linearMSE.pth (trained
on ratings of the SAC, LAION-Logos and AVA images, on a 1–10 scale):

    layers.0 Linear(768, 1024), Dropout(0.2), layers.2 Linear(1024, 128), Dropout(0.2),
    layers.4 Linear(128, 64), Dropout(0.1), layers.6 Linear(64, 16), layers.7 Linear(16, 1)

with no activation between the linear layers (the ReLUs are commented out in the published simple_inference.py;
ddpo-pytorch's aesthetic_scorer.py has the same MLP) and dropout inactive at inference: the head is an affine
map of the normalised embedding, computed here layer by layer as torch computes it. The layer sizes are read from
the file (so a head of other sizes with the same key layout, e.g. the tests' tiny one, works too). The .pth is
read with the project's restricted unpickler (idiff_cli.fid.convert.read_state_dict; no torch).

DDPO (Black et al. 2023; ddpo-pytorch rewards.aesthetic_score) computes the same R on images quantised to uint8,
(x · 255).round() of its [0, 1] images, through transformers' CLIPProcessor (PIL's bicubic resize); here the
images stay float and the preprocessing is clip_vision.Preprocessing (what differs and by how much: its
docstring), so that R is differentiable in x end to end and every gradient method can use it.

`AestheticScore` is a pytree (its weights are its leaves; the network and the preprocessing are static), so it
can be passed to a jitted function as an argument instead of being closed over as constants.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from idiff_cli.diffusion import clip_vision
from idiff_cli.errors import UserError, first_line
from idiff_cli.fid.convert import read_state_dict

HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
HEAD_URL = f"https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/{HEAD_FILE}"
_KEY = re.compile(r"layers\.(\d+)\.(weight|bias)")


def head_apply(head: tuple[tuple[jax.Array, jax.Array], ...], embeds: jax.Array) -> jax.Array:
    """The MLP of (kernel [in, out], bias [out]) layers on embeddings [..., in] -> [...] (no activations)."""
    x = embeds
    for kernel, bias in head:
        x = x @ kernel.astype(x.dtype) + bias.astype(x.dtype)
    return x[..., 0]


def read_head(path: str | pathlib.Path) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """The linear layers (kernel [in, out], bias [out]) of an aesthetic predictor's .pth state dict
    (`layers.N.weight` [out, in] and `layers.N.bias` for each linear layer N, in the order of N); UserError (one
    line) when the file is missing or is not such a head."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise UserError(f"aesthetic predictor head '{path}' does not exist; download the LAION aesthetic predictor "
                        f"v2 head from {HEAD_URL}")
    try:
        state = read_state_dict(path)
    except Exception as e:  # a truncated or foreign file, a refused pickle: one line
        raise UserError(f"cannot read '{path}' as a PyTorch state dict ({type(e).__name__}: {first_line(e)}); "
                        f"download the head again from {HEAD_URL}") from None
    layers: dict[int, dict[str, np.ndarray]] = {}
    for key, value in state.items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise UserError(f"'{path}': unexpected key '{key}'; an aesthetic predictor head has only layers.N.weight "
                            "and layers.N.bias")
        layers.setdefault(int(match[1]), {})[match[2]] = np.asarray(value, np.float32)
    if not layers:
        raise UserError(f"'{path}' holds no layers.N.weight: not an aesthetic predictor head")
    head, width = [], None
    for index in sorted(layers):
        layer = layers[index]
        if set(layer) != {"weight", "bias"}:
            raise UserError(f"'{path}': layers.{index} has {' and '.join(sorted(layer))} only (a linear layer has a "
                            "weight and a bias)")
        w, b = layer["weight"], layer["bias"]
        if w.ndim != 2 or b.shape != (w.shape[0],) or (width is not None and w.shape[1] != width):
            raise UserError(f"'{path}': layers.{index} has weight {w.shape} and bias {b.shape}, which do not chain "
                            f"as linear layers (input width {width})")
        head.append((w.T.copy(), b))
        width = w.shape[0]
    if width != 1:
        raise UserError(f"'{path}': the last layer has {width} outputs; an aesthetic predictor head has 1")
    return tuple(head)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["clip_params", "head_params"],
                   meta_fields=["clip_module", "preprocessing"])
@dataclasses.dataclass(frozen=True)
class AestheticScore:
    """R(x) = head(e / ‖e‖₂), e the CLIP image embedding of images x [..., H, W, 3] in [−1, 1] -> [...] (module
    docstring): float32 (float64 for float64 images, under jax_enable_x64), jit-able and differentiable in x."""

    clip_module: clip_vision.CLIPVisionEncoder
    clip_params: Any  # the CLIP tower's variables {"params": ...}
    head_params: tuple[tuple[jax.Array, jax.Array], ...]  # (kernel [in, out], bias [out]) per linear layer
    preprocessing: clip_vision.Preprocessing = clip_vision.Preprocessing()
    channels = (3,)  # the images a reward takes (rewards.check_reward)

    def embed(self, images: jax.Array) -> jax.Array:
        """The L2-normalised CLIP image embeddings [..., projection_dim] of images [..., H, W, 3] in [−1, 1]."""
        return clip_vision.VisionTower(self.clip_module, self.clip_params, self.preprocessing).unit_embeds(images)

    def __call__(self, images: jax.Array) -> jax.Array:
        return head_apply(self.head_params, self.embed(images))


def load(clip_dir: str | pathlib.Path, head_path: str | pathlib.Path, dtype: Any = jnp.float32,
         param_dtype: Any = np.float32) -> AestheticScore:
    """The aesthetic reward of a CLIP model directory (clip_vision.load: openai/clip-vit-large-patch14's
    config.json and model.safetensors) and the predictor's head (.pth), CLIP's activations in `dtype` and all
    weights in `param_dtype`; UserError (one line) naming a missing or unfit file and where to get it."""
    head = read_head(head_path)  # first: the small file, checked before the large one is read
    tower = clip_vision.load(clip_dir, dtype=dtype, param_dtype=param_dtype)
    width = head[0][0].shape[0]
    if width != tower.module.projection_dim:
        raise UserError(f"aesthetic predictor head '{head_path}' takes {width}-d embeddings; the CLIP model in "
                        f"'{clip_dir}' makes {tower.module.projection_dim}-d ones (the LAION predictor v2 needs "
                        f"{clip_vision.PUBLISHED})")
    head_params = tuple((jnp.asarray(k, param_dtype), jnp.asarray(b, param_dtype)) for k, b in head)
    return AestheticScore(tower.module, tower.params, head_params, tower.preprocessing)
