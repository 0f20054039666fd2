"""Writes the CLIP oracle fixture (both towers, the tokenizer, the aesthetic head) under tests/fixtures/clip_tiny/.

Run once, in a throwaway environment with torch and transformers (not dependencies of idiff), no internet needed:

    python -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch==2.14.1 transformers==5.23.0 safetensors numpy pillow
    /tmp/torchenv/bin/python tools/make_clip_fixture.py

Made with torch 2.14.1+cu130 (run on the CPU), transformers 5.23.0, Pillow 13.0.0, numpy 2.4.6, Python 3.11.7 (the
script prints the versions it ran with). Everything comes from fixed seeds, but the float outputs depend on the
CPU kernels torch picks (AVX2 or AVX-512: up to ~1e-6 apart), so the files, once written, stay as they are. The
tool rewrites the whole directory and takes every oracle from the model reloaded from the files it wrote. It
copies the tokenizer of tests/fixtures/sd_tiny/sd1 (tools/make_sd_fixture.py), which must exist.

* `config.json`, `model.safetensors`: `CLIPModel.save_pretrained` of a tiny random CLIP — the published
  openai/clip-vit-large-patch14 layout (a CLIPConfig with text_config and vision_config; the vision tower's keys
  `vision_model.*` and `visual_projection.weight` beside the text tower's `text_model.*`, `text_projection.weight`
  and `logit_scale`). Vision tower: hidden 32, 2 layers, 4 heads, intermediate 37, patch 4, image_size 16 (16
  patches + the class token), quick_gelu, layer_norm_eps 1e-5; CLIPConfig.projection_dim 16, while
  vision_config.projection_dim and text_config.projection_dim keep their default 512: CLIPModel sizes
  visual_projection and text_projection by the top-level field (as the published config does: 768 there), so a
  loader that read a tower's own would fail. Text tower: the tokenizer's vocabulary (642 ids), hidden 16, 2 layers,
  2 heads, intermediate 20, 77 positions, quick_gelu, bos/eos/pad ids of the tokenizer (eos 641, <|endoftext|>,
  also the largest id, as 49407 is in the published vocabulary). Every weight is redrawn as randn/√fan_in, the
  class embedding as randn, position embeddings 0.5·randn, LayerNorm scales 1 + 0.2·randn and every bias
  0.2·randn (each tower from its own seed), so that a swapped, transposed or missing parameter changes the
  outputs by O(1).
* `vocab.json`, `merges.txt`, `tokenizer_config.json`, `special_tokens_map.json`: tests/fixtures/sd_tiny/sd1's
  tokenizer files (a small generated CLIP BPE vocabulary; model_max_length 77), copied beside config.json, where
  openai/clip-vit-large-patch14 has its tokenizer's files.
* `preprocessor_config.json`: `CLIPImageProcessorPil` (transformers' PIL backend of CLIPImageProcessor, the
  slow processor of transformers 4 that DDPO's CLIPProcessor ran; the torchvision backend is not installed
  here) with size {"shortest_edge": 16}, crop 16×16, bicubic, and image_mean (0.5, 0.45, 0.4) / image_std
  (0.22, 0.25, 0.28) — not CLIP's, so that a loader that ignored the file would fail.
* `sac+logos+ava1-l14-linearMSE.pth` (the published head's name, so that the directory serves as --reward-weights): `torch.save(state_dict)` of the LAION aesthetic predictor v2's MLP at tiny sizes:
  `layers` = Linear(16, 12), Dropout(0.2), Linear(12, 8), Dropout(0.2), Linear(8, 6), Dropout(0.1), Linear(6, 4),
  Linear(4, 1) (keys layers.{0,2,4,6,7}.{weight,bias}, as sac+logos+ava1-l14-linearMSE.pth's 768-1024-128-64-16-1).
* `clip_vit_l14.json`: openai/clip-vit-large-patch14's vision and text fields (written out here: nothing is
  downloaded) and the parameters transformers counts for its CLIPVisionModelWithProjection and
  CLIPTextModelWithProjection (built on the meta device).
* `reference.npz` (float32 unless the name ends in `_f64`: the same computation on float64 copies of the models
  and inputs; NCHW as torch has it):
  `pixel_values` [3, 3, 16, 16] (randn) -> `last_hidden_state` [3, 17, 32], `pooler_output` [3, 32],
  `image_embeds` [3, 16] (CLIPModel.get_image_features; CLIPVisionModelWithProjection loaded from the same
  directory gives the same numbers, checked here) and their `_f64`;
  uint8 images in [64, 191] (random per pixel, so that no bicubic overshoot reaches 0 or 255 and PIL's clipping
  never acts) `images_tall` [2, 24, 20, 3], `images_wide` [2, 20, 30, 3] (downsampled) and `images_up`
  [2, 12, 14, 3] (upsampled), each with the processor's `pixel_values_tall`, `_wide`, `_up` [2, 3, 16, 16];
  `head_embeds` [5, 16] (unit vectors) -> `head_out` [5] (the MLP in eval mode) and `head_out_f64`;
  `aesthetic` [3] (and `aesthetic_f64`): head(e / ‖e‖) of e = image_embeds of `pixel_values`, as ddpo-pytorch's
  AestheticScorer computes it after its processor;
  `prompts` [5] (str: capitals and punctuation, the empty prompt, one cut to 77 tokens) -> `token_ids` [5, 77]
  (CLIPTokenizer loaded from the directory, padding="max_length", truncation=True, as CLIPProcessor pads them),
  `text_embeds` [5, 16] (CLIPModel.get_text_features with the tokenizer's attention mask) and `_f64`;
  `similarity` [3, 5] (and `_f64`): CLIPModel's logits_per_image / exp(logit_scale), the cosine of each of the 3
  images' and 5 prompts' features;
  `branch_ids` [2, 77] (random ids below 600, with id 7 and the id 639 each twice per row, at other positions)
  -> `text_embeds_eos7` (text_model.eos_token_id set to 7: pooled at the first 7) and `text_embeds_legacy`
  (eos_token_id 2: pooled at argmax(ids), the first 639), and their `_f64`.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import PIL
import torch
from transformers import (CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTextConfig, CLIPTextModelWithProjection,
                          CLIPTokenizer, CLIPVisionConfig, CLIPVisionModelWithProjection)
from transformers.utils import logging

logging.set_verbosity_error()  # CLIPVisionModelWithProjection's report of the text tower's keys it leaves out

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures"
OUT = FIXTURES / "clip_tiny"
TOKENIZER = FIXTURES / "sd_tiny" / "sd1" / "tokenizer"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"  # the published aesthetic head's name (idiff_cli.implicit.aesthetic.HEAD_FILE)
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, patch_size=4,
              image_size=16, hidden_act="quick_gelu", layer_norm_eps=1e-5)
TEXT = dict(hidden_size=16, intermediate_size=20, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)
PROMPTS = ("a photo of a cat", "A RED car, parked!", "", "an astronaut riding a horse",
           "the quick brown fox jumps over the lazy dog " * 6)
PROJECTION_DIM = 16
HEAD = (16, 12, 8, 6, 4, 1)
DROPOUTS = (0.2, 0.2, 0.1)  # after the first three linear layers, as in the published MLP
MEAN, STD = (0.5, 0.45, 0.4), (0.22, 0.25, 0.28)
MAX_BYTES = 300_000
# openai/clip-vit-large-patch14's config.json: CLIPConfig.projection_dim and the vision_config fields idiff reads.
VIT_L14 = {"projection_dim": 768, "vision_config": {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "num_channels": 3, "image_size": 224, "patch_size": 14, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05},
    "text_config": {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05}}


class AestheticHead(torch.nn.Module):
    """The aesthetic predictor's MLP (no activations between the linear layers; dropout only in training)."""

    def __init__(self, sizes=HEAD):
        super().__init__()
        layers = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(torch.nn.Linear(n_in, n_out))
            if i < len(DROPOUTS):
                layers.append(torch.nn.Dropout(DROPOUTS[i]))
        self.layers = torch.nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


def randomise(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "logit_scale":
                continue
            if name.endswith("class_embedding"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("position_embedding.weight"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:  # LayerNorm scales
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)


def write_model() -> None:
    for name in TOKENIZER_FILES:
        shutil.copy(TOKENIZER / name, OUT / name)
    tokenizer = CLIPTokenizer.from_pretrained(OUT)
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    assert ids["eos_token_id"] == ids["vocab_size"] - 1 and tokenizer.model_max_length == 77, ids
    torch.manual_seed(0)
    config = CLIPConfig(text_config={**TEXT, **ids}, vision_config=VISION, projection_dim=PROJECTION_DIM)
    model = CLIPModel(config)
    randomise(torch.nn.ModuleList([model.vision_model, model.visual_projection]), 1)
    randomise(torch.nn.ModuleList([model.text_model, model.text_projection]), 6)
    model.save_pretrained(OUT, safe_serialization=True)
    saved = json.loads((OUT / "config.json").read_text())
    assert saved["projection_dim"] == PROJECTION_DIM, saved
    assert saved["vision_config"]["projection_dim"] == saved["text_config"]["projection_dim"] == 512, saved
    processor = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                      image_mean=list(MEAN), image_std=list(STD))
    processor.save_pretrained(OUT)
    torch.manual_seed(2)
    head = AestheticHead()
    randomise(head, 3)
    torch.save(head.state_dict(), OUT / HEAD_FILE)


def vit_l14() -> dict:
    with torch.device("meta"):
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(projection_dim=VIT_L14["projection_dim"],
                                                                **VIT_L14["vision_config"]))
        text = CLIPTextModelWithProjection(CLIPTextConfig(projection_dim=VIT_L14["projection_dim"],
                                                          **VIT_L14["text_config"]))
    return {**VIT_L14, "vision_param_count": sum(p.numel() for p in vision.parameters()),
            "text_param_count": sum(p.numel() for p in text.parameters())}


def f64(module: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(module).double()


def aesthetic(model: CLIPModel, head: AestheticHead, pixel_values: torch.Tensor) -> torch.Tensor:
    e = model.get_image_features(pixel_values=pixel_values).pooler_output
    return head(e / torch.linalg.vector_norm(e, dim=-1, keepdim=True)).squeeze(1)


def text_embeds(model: CLIPModel, ids: torch.Tensor, eos_token_id: int | None = None, **kwargs) -> np.ndarray:
    """get_text_features, pooled at `eos_token_id`'s rule where given (CLIPTextModel reads its attribute)."""
    saved = model.text_model.eos_token_id
    model.text_model.eos_token_id = saved if eos_token_id is None else eos_token_id
    try:
        return model.get_text_features(input_ids=ids, **kwargs).pooler_output.numpy()
    finally:
        model.text_model.eos_token_id = saved


def branch_ids() -> np.ndarray:
    """Two rows of random ids in [8, 600) with 7 at two positions and 639 (the row's largest) at two others."""
    ids = np.random.default_rng(6).integers(8, 600, size=(2, 77))
    for row, sevens, largest in ((0, (5, 40), (20, 30)), (1, (60, 70), (3, 50))):
        ids[row, list(sevens)], ids[row, list(largest)] = 7, 639
    return ids


def oracle() -> dict[str, np.ndarray]:
    model = CLIPModel.from_pretrained(OUT).eval()
    assert model.visual_projection.weight.shape == (PROJECTION_DIM, VISION["hidden_size"])
    assert model.text_projection.weight.shape == (PROJECTION_DIM, TEXT["hidden_size"])
    tokenizer = CLIPTokenizer.from_pretrained(OUT)
    head = AestheticHead().eval()
    head.load_state_dict(torch.load(OUT / HEAD_FILE, weights_only=True))
    processor = CLIPImageProcessorPil.from_pretrained(OUT)
    g = torch.Generator().manual_seed(4)
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        x = torch.randn(3, 3, 16, 16, generator=g)
        out["pixel_values"] = x.numpy()
        for suffix, m, xx in (("", model, x), ("_f64", f64(model), x.double())):
            vision = m.vision_model(pixel_values=xx)
            out["last_hidden_state" + suffix] = vision.last_hidden_state.numpy()
            out["pooler_output" + suffix] = vision.pooler_output.numpy()
            out["image_embeds" + suffix] = m.get_image_features(pixel_values=xx).pooler_output.numpy()
        # CLIPVisionModelWithProjection reads the vision tower out of the same files (its projection sized by the
        # config's projection_dim, given here as CLIPModel's).
        tower = CLIPVisionModelWithProjection.from_pretrained(OUT, projection_dim=PROJECTION_DIM).eval()
        np.testing.assert_allclose(tower(pixel_values=x).image_embeds.numpy(), out["image_embeds"], rtol=0, atol=1e-6)

        rng = np.random.default_rng(5)
        for name, shape in (("tall", (2, 24, 20, 3)), ("wide", (2, 20, 30, 3)), ("up", (2, 12, 14, 3))):
            images = rng.integers(64, 192, size=shape, dtype=np.uint8)
            out["images_" + name] = images
            pv = processor(images=list(images), return_tensors="np")["pixel_values"]
            assert pv.shape == (2, 3, 16, 16), pv.shape
            out["pixel_values_" + name] = pv.astype(np.float32)

        e = torch.randn(5, PROJECTION_DIM, generator=g)
        e = e / torch.linalg.vector_norm(e, dim=-1, keepdim=True)
        out["head_embeds"] = e.numpy()
        out["head_out"] = head(e).squeeze(1).numpy()
        out["head_out_f64"] = f64(head)(e.double()).squeeze(1).numpy()
        out["aesthetic"] = aesthetic(model, head, x).numpy()
        out["aesthetic_f64"] = aesthetic(f64(model), f64(head), x.double()).numpy()

        tokens = tokenizer(list(PROMPTS), padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        out["prompts"], out["token_ids"] = np.array(PROMPTS), tokens.input_ids.numpy()
        assert (tokens.input_ids[-1, -1] == tokenizer.eos_token_id and tokens.attention_mask[-1].all()
                and not tokens.attention_mask[2, 2:].any()), tokens  # the long prompt cut; the empty one padded
        out["branch_ids"] = branch_ids()
        for suffix, m, xx in (("", model, x), ("_f64", f64(model), x.double())):
            out["text_embeds" + suffix] = text_embeds(m, tokens.input_ids, attention_mask=tokens.attention_mask)
            both = m(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=xx)
            out["similarity" + suffix] = (both.logits_per_image / m.logit_scale.exp()).numpy()
            ids = torch.from_numpy(out["branch_ids"])
            out["text_embeds_eos7" + suffix] = text_embeds(m, ids, eos_token_id=7)
            out["text_embeds_legacy" + suffix] = text_embeds(m, ids, eos_token_id=2)
        # the similarity is the cosine of get_image_features and get_text_features
        image, text = out["image_embeds_f64"], out["text_embeds_f64"]
        cosine = (image @ text.T) / np.outer(np.linalg.norm(image, axis=1), np.linalg.norm(text, axis=1))
        np.testing.assert_allclose(out["similarity_f64"], cosine, rtol=0, atol=1e-12)
        # the two pooling rules pick different rows of branch_ids
        assert np.abs(out["text_embeds_eos7"] - out["text_embeds_legacy"]).max(axis=1).min() > 0.1
    return out


def main() -> None:
    torch.set_num_threads(2)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    write_model()
    out = oracle()
    np.savez_compressed(OUT / "reference.npz", **out)
    (OUT / "clip_vit_l14.json").write_text(json.dumps(vit_l14(), indent=1) + "\n")
    for key in sorted(out):
        if key.endswith("_f64"):
            print(f"  max |f32 - f64| {key[:-4]}: {np.abs(out[key[:-4]] - out[key]).max():.3g}")
    sizes = {p.name: p.stat().st_size for p in sorted(OUT.iterdir())}
    print("wrote", ", ".join(f"{name} ({size:,} B)" for name, size in sizes.items()))
    assert sum(sizes.values()) < MAX_BYTES, sum(sizes.values())
    print(f"(torch {torch.__version__}, transformers {sys.modules['transformers'].__version__}, "
          f"Pillow {PIL.__version__}, numpy {np.__version__}, python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
