"""Writes the Stable Diffusion oracle fixture of `idiff import` under tests/fixtures/sd_tiny/.

Run once, in a throwaway environment with torch, diffusers and transformers (not dependencies of idiff):

    python -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch==2.14.1 diffusers==0.42.1 transformers==5.23.0 safetensors numpy
    /tmp/torchenv/bin/python tools/make_sd_fixture.py

Everything comes from fixed seeds, but the float outputs depend on the CPU kernels torch picks (AVX2 or
AVX-512: up to ~1e-6 apart), so the files, once written, stay as they are. The tool rewrites the whole
directory; it reloads each pipeline from the files it wrote and takes every oracle from that reloaded pipeline.

* `sd1/`: `StableDiffusionPipeline.save_pretrained(safe_serialization=True)` of a tiny random SD-1.x-style
  pipeline: `unet/` (UNet2DConditionModel on 8×8 latents: block_out_channels (16, 32), one layer per block, 8 norm
  groups, a CrossAttnDownBlock2D/CrossAttnUpBlock2D pair and the mid block's attention, cross-attention dim 32,
  attention_head_dim 8, which diffusers reads as 8 heads per level as in SD 1.5: here heads of 2 channels, 4 in
  the mid block), `vae/` (AutoencoderKL: block_out_channels (8, 16), 4 norm groups, 4 latent channels, latent
  factor 2: 16×16 images, scaling_factor 0.18215), `text_encoder/` (CLIPTextModel: 2 layers of width 32, 4
  heads, quick_gelu, 77 positions, the tokenizer's bos/eos/pad ids), `scheduler/` (SD 1.5's published
  PNDMScheduler scheduler_config.json, verbatim) and `tokenizer/`: a small generated CLIP vocabulary (the 256
  byte-level symbols, the same with "</w>", 128 merges learned here from a small English corpus by the byte-pair
  rule, one token each, then <|startoftext|> and <|endoftext|>: 642 tokens) as vocab.json + merges.txt, with
  tokenizer_config.json and special_tokens_map.json written as SD 1.5's (AddedToken dicts; pad token
  <|endoftext|>) and no tokenizer.json. The unet's, vae's and text encoder's weights also come as the `fp16`
  variant (`diffusion_pytorch_model.fp16.safetensors`, `model.fp16.safetensors`: the same tensors in float16, the
  configs unchanged). No safety checker or feature extractor (model_index.json: null, requires_safety_checker
  false). All norm scales and biases, and the text encoder's (zero-initialised) biases, are randomised
  (+0.2·randn) so that a mapping that swaps them cannot pass.
* `sd2/`: the SD-2.x-style variant: UNet with use_linear_projection=True, attention_head_dim=[2, 4] (which
  diffusers reads as head counts per level) and upcast_attention=True, half as wide as sd1's to keep the fixture
  under 3 MB (block_out_channels (8, 16), 4 norm groups: heads of 4 channels); text encoder with hidden_act "gelu";
  tokenizer padding with "!" (pad_token an AddedToken dict in tokenizer_config.json and special_tokens_map.json)
  that also ships the tokenizer.json transformers writes: the pad token is one of the tokenizer's special tokens,
  so a "!" in a prompt becomes the pad token's id 0 there rather than going through the byte-pair merges ("!!"
  → 0 0 with sd2, 0 256 with sd1); scheduler SD 2.1's published DDIMScheduler config (v_prediction). No fp16 files.
* `oracle_sd1.npz`, `oracle_sd2.npz` (float32 unless the name ends in `_f64`; NCHW as torch has it):
  `prompts` [P] (str) and `token_ids` int64 [P, 77] from the pipeline's tokenizer (padding="max_length",
  max_length=77, truncation=True; one prompt is longer than 77 tokens, one is empty, one has capitals, digits,
  punctuation, an accent and extra spaces), `text_embeddings` [P, 77, 32] (text_encoder(ids)[0]);
  `unet_x` [2, 4, 8, 8], `unet_t` int64 [2], `unet_context` [2, 77, 32] (two rows of text_embeddings),
  `unet_out` [2, 4, 8, 8]; `vae_z` [2, 4, 8, 8] → `vae_decoded` [2, 3, 16, 16] (vae.decode(z).sample, z not
  divided by the scaling factor); `vae_image` [2, 3, 16, 16] in [-1, 1] → `vae_mean`, `vae_logvar` [2, 4, 8, 8]
  (vae.encode(image).latent_dist); `unet_out_f64`, `text_embeddings_f64`, `vae_decoded_f64`, `vae_mean_f64`,
  `vae_logvar_f64`: deep copies of the modules in float64 on the float64-cast inputs.
  The pipeline call (`StableDiffusionPipeline.__call__`, 16×16, 4 steps, guidance 7.5, `pipe_prompt` and
  `pipe_negative` (str), initial latents `pipe_latents` [1, 4, 8, 8], the scheduler replaced by
  `DDIMScheduler.from_config(pipe.scheduler.config)`, timesteps `pipe_timesteps` int64 [4]): with eta = 0,
  `pipe_eta0_images` [1, 16, 16, 3] (output_type "np": diffusers' (x / 2 + 0.5).clamp(0, 1), NHWC) and
  `pipe_eta0_final_latents` [1, 4, 8, 8] (output_type "latent"); with eta = 1, the DDIM variance noise made
  explicit (diffusers' randn_tensor in scheduling_ddim replaced by one returning `pipe_eta1_noise` [4, 1, 4, 8, 8]
  in order, called exactly 4 times per call), `pipe_eta1_images` and `pipe_eta1_final_latents`; and the same
  three outputs of the pipeline run in float64 (`pipe_eta0_images_f64`, `pipe_eta0_final_latents_f64`,
  `pipe_eta1_images_f64`; diffusers hands the images back as float32 whatever the dtype).
  DDIM steps on their own: `ddim_timesteps` int64 [4] (= pipe_timesteps), per step a random `ddim_sample` and
  `ddim_model_output` [4, 1, 4, 8, 8], `DDIMScheduler.step`'s prev_sample with eta = 0 (`ddim_prev_eta0`) and
  with eta = 1 on the explicit variance noise `ddim_noise` (`ddim_prev_eta1`).
* `sd15_configs.json`: the published config.json fields of runwayml/stable-diffusion-v1-5's unet, vae,
  text_encoder (openai/clip-vit-large-patch14's text tower) and scheduler (written out here: the files cannot be
  downloaded on the machines that run the tests), and "param_counts": the parameters diffusers/transformers
  count for them (modules instantiated on the meta device; the text encoder's position_ids buffer excluded).

transformers 5 has a single, tokenizers-backed CLIPTokenizer (no slow/fast pair any more), so the token ids are
checked three ways instead: CLIPTokenizer built from vocab.json + merges.txt (sd1), CLIPTokenizer and the bare
`tokenizers.Tokenizer` from tokenizer.json (sd2), and `reference_ids` below, an independent re-implementation of
CLIP's byte-pair tokenizer (OpenAI's simple_tokenizer, with transformers' special-token splitting).
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
import shutil
import sys
import unicodedata
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import regex
import safetensors.torch
import tokenizers
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline,
                       UNet2DConditionModel)
from diffusers.schedulers import scheduling_ddim
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "sd_tiny"
MAX_LENGTH = 77
N_MERGES = 128  # small: the whole fixture must stay under 3 MB
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# ---------------------------------------------------------------------------------------------------------------
# Published configs of runwayml/stable-diffusion-v1-5 (unet/, vae/, text_encoder/, scheduler/ config.json) and of
# stabilityai/stable-diffusion-2-1's scheduler.

SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD15_VAE = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3,
    "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
    "scaling_factor": 0.18215, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD15_TEXT_ENCODER = {
    "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"], "attention_dropout": 0.0,
    "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768,
    "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0", "vocab_size": 49408,
}
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}
SD21_SCHEDULER = {
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
    "prediction_type": "v_prediction", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None,
}
SD15_PARAM_COUNTS = {"unet": 859520964, "vae": 83653863, "text_encoder": 123060480}

# ---------------------------------------------------------------------------------------------------------------
# Tiny models of the fixture.

TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                 norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8)
# Half as wide as sd1's (heads of 4 channels), so that the fixture, fp16 copies included, stays under 3 MB.
TINY_UNET_SD2 = dict(TINY_UNET, block_out_channels=(8, 16), norm_num_groups=4, use_linear_projection=True,
                     attention_head_dim=[2, 4], upcast_attention=True)
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=0.18215)
TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=MAX_LENGTH, projection_dim=32)

PROMPTS = [
    "a photo of a cat",
    "",
    "  A Painting of an ASTRONAUT riding a horse,   on the Moon!! (trending on artstation, 8k)  the cat's café ",
    "a highly detailed digital painting of a quiet mountain village at sunset, with small wooden houses, "
    "a stone bridge over a clear river, tall pine trees, soft golden light, long shadows, birds in the orange sky, "
    "a red boat near the shore, children playing in a green field, smoke rising from the chimneys, snow on the "
    "distant peaks, dramatic clouds, warm colors, sharp focus, intricate details, concept art by a famous painter",
]
PIPE_PROMPT = "a photo of an astronaut riding a horse"
PIPE_NEGATIVE = "blurry, low quality"

# Corpus of the merges: captions in the style of the prompts SD is used with.
CORPUS = """
a photo of a cat sitting on a wooden table next to a window. a photo of a dog running in a green field.
a painting of a horse standing in a river at sunset. a portrait of a woman with long red hair, oil painting.
an astronaut riding a horse on the moon, digital art, trending on artstation, highly detailed, sharp focus.
a small village in the mountains with snow on the roofs and smoke rising from the chimneys at night.
a cute cat wearing a hat, studio photo, soft light, high quality, detailed fur, bokeh background.
a bowl of fruit on a kitchen table, still life, oil on canvas, warm colors, by a famous painter.
a city street at night in the rain, neon lights, reflections on the wet road, cinematic lighting.
a castle on a hill above the sea, fantasy landscape, dramatic clouds, golden hour, concept art.
a red car parked in front of a house with a garden full of flowers, summer afternoon, photograph.
a forest path covered with autumn leaves, morning fog, tall trees, light rays through the branches.
a boat on a quiet lake surrounded by pine trees and mountains, reflection in the water, landscape photo.
the children are playing with a ball in the park while their parents are sitting on the bench.
a beautiful detailed illustration of a dragon flying over the ocean, waves, storm, lightning, epic.
an old man reading a book in a library, warm light from the lamp, shelves full of old books.
a bird sitting on a branch in the spring, flowers, blue sky, macro photo, shallow depth of field.
a bridge over a river in a city, the sun is setting behind the buildings, orange and purple sky.
a plate of pasta with tomato sauce and basil, food photography, restaurant, top view.
a watercolor painting of a cottage by the sea, boats, seagulls, soft pastel colors.
"""

# ---------------------------------------------------------------------------------------------------------------
# Tokenizer: CLIP's byte-level BPE.

# CLIP's pre-tokenisation: the special tokens, contractions, runs of letters, single digits, runs of other symbols.
PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map of the 256 bytes to printable characters (printable bytes first)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


BYTE_ENCODER = bytes_to_unicode()


def clean(text: str) -> str:
    """CLIP's text cleaning as transformers' normalizer does it: NFC, runs of white space to one space, lowercase."""
    return regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip().lower()


def word_symbols(word: str) -> tuple[str, ...]:
    chars = [BYTE_ENCODER[b] for b in word.encode("utf-8")]
    return tuple(chars[:-1]) + (chars[-1] + "</w>",)


def learn_merges(corpus: str, n: int) -> list[tuple[str, str]]:
    """n byte-pair merges learned on the corpus: always the most frequent adjacent pair (ties: smallest pair)."""
    words: dict[tuple[str, ...], int] = {}
    for word in PATTERN.findall(clean(corpus)):
        symbols = word_symbols(word)
        words[symbols] = words.get(symbols, 0) + 1
    merges = []
    for _ in range(n):
        pairs: dict[tuple[str, str], int] = {}
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] = pairs.get(pair, 0) + count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = {}
        for symbols, count in words.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        words = merged
    return merges


def clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary layout: byte symbols, byte symbols + "</w>", one token per merge, then BOS and EOS."""
    symbols = list(BYTE_ENCODER.values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    assert len(set(tokens)) == len(tokens), "a merge repeats a token"
    return {t: i for i, t in enumerate(tokens)}


def reference_bpe(symbols: tuple[str, ...], ranks: dict[tuple[str, str], int]) -> list[str]:
    """OpenAI simple_tokenizer's bpe(): merge the lowest-ranked adjacent pair, all its occurrences, until none."""
    word = list(symbols)
    while len(word) > 1:
        pairs = set(zip(word, word[1:]))
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        out, i = [], 0
        while i < len(word):
            if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                out.append(word[i] + word[i + 1])
                i += 2
            else:
                out.append(word[i])
                i += 1
        word = out
    return word


def reference_ids(text: str, vocab: dict[str, int], merges: list[tuple[str, str]], specials: list[str],
                  pad: str) -> list[int]:
    """Independent CLIP tokenisation: special tokens split out of the raw text first (as transformers does with
    the tokenizer's special tokens, the pad token included), then clean, split, byte-encode and merge; BOS/EOS,
    truncated to 77 and padded as the pipeline asks."""
    ranks = {m: i for i, m in enumerate(merges)}
    split = regex.compile("(" + "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")")
    ids = []
    for piece in split.split(text):
        if piece in specials:
            ids.append(vocab[piece])
            continue
        for word in PATTERN.findall(clean(piece)):
            ids.extend(vocab[t] for t in reference_bpe(word_symbols(word), ranks))
    ids = [vocab[BOS]] + ids[:MAX_LENGTH - 2] + [vocab[EOS]]
    return ids + [vocab[pad]] * (MAX_LENGTH - len(ids))


def added_token(content: str, with_type: bool) -> dict:
    token = {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    return {"__type": "AddedToken", **token} if with_type else token


def write_tokenizer_files(directory: pathlib.Path, vocab: dict[str, int], merges: list[tuple[str, str]],
                          pad: str) -> None:
    """vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json as SD 1.5 (pad <|endoftext|>)
    and SD 2.1 (pad "!") ship them."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                          encoding="utf-8")
    config = {"add_prefix_space": False, "bos_token": added_token(BOS, True), "do_lower_case": True,
              "eos_token": added_token(EOS, True), "errors": "replace", "model_max_length": MAX_LENGTH,
              "name_or_path": "openai/clip-vit-large-patch14", "pad_token": pad,
              "special_tokens_map_file": "./special_tokens_map.json", "tokenizer_class": "CLIPTokenizer",
              "unk_token": added_token(EOS, True)}
    if pad != EOS:
        config["pad_token"] = added_token(pad, True)
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": added_token(BOS, False), "eos_token": added_token(EOS, False),
               "pad_token": pad if pad == EOS else added_token(pad, False),
               "unk_token": added_token(EOS, False)}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Pipelines.

def randomise(module: torch.nn.Module, seed: int, biases: bool = False) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name or (biases and name.endswith("bias")):
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def tiny_pipeline(sd2: bool, tokenizer: CLIPTokenizer) -> StableDiffusionPipeline:
    torch.manual_seed(10 if sd2 else 0)
    unet = UNet2DConditionModel(**(TINY_UNET_SD2 if sd2 else TINY_UNET))
    randomise(unet, 11 if sd2 else 1)
    torch.manual_seed(12 if sd2 else 2)
    vae = AutoencoderKL(**TINY_VAE)
    randomise(vae, 13 if sd2 else 3)
    torch.manual_seed(14 if sd2 else 4)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_act="gelu" if sd2 else "quick_gelu", bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TINY_TEXT))
    randomise(text_encoder, 15 if sd2 else 5, biases=True)
    scheduler = (DDIMScheduler if sd2 else PNDMScheduler).from_config(SD21_SCHEDULER if sd2 else SD15_SCHEDULER)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def write_pipeline(name: str, vocab: dict[str, int], merges: list[tuple[str, str]]) -> pathlib.Path:
    sd2 = name == "sd2"
    directory = OUT / name
    staging = OUT / f"{name}_tokenizer_staging"
    pad = "!" if sd2 else EOS
    write_tokenizer_files(staging, vocab, merges, pad)
    tokenizer = CLIPTokenizer.from_pretrained(staging)
    assert (tokenizer.pad_token, tokenizer.model_max_length) == (pad, MAX_LENGTH)
    pipe = tiny_pipeline(sd2, tokenizer)
    pipe.save_pretrained(directory, safe_serialization=True)
    shutil.rmtree(staging)
    # The tokenizer as SD ships it: transformers 5 saves only tokenizer.json + its own tokenizer_config.json.
    saved = directory / "tokenizer"
    json_file = saved / "tokenizer.json"
    keep = json_file.read_bytes() if sd2 else None
    shutil.rmtree(saved)
    write_tokenizer_files(saved, vocab, merges, pad)
    if keep is not None:
        json_file.write_bytes(keep)
    # The scheduler config verbatim as published.
    published = SD21_SCHEDULER if sd2 else SD15_SCHEDULER
    (directory / "scheduler" / "scheduler_config.json").write_text(json.dumps(published, indent=2) + "\n")
    if not sd2:
        for sub, file in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                          ("text_encoder", "model")):
            tensors = safetensors.torch.load_file(directory / sub / f"{file}.safetensors")
            safetensors.torch.save_file({k: v.half().contiguous() for k, v in tensors.items()},
                                        directory / sub / f"{file}.fp16.safetensors", metadata={"format": "pt"})
    return directory


def check_reload(directory: pathlib.Path, pipe: StableDiffusionPipeline, sd2: bool) -> None:
    """The reloaded pipeline has the classes and configs meant; the fp16 variant loads and rounds the weights."""
    assert type(pipe.scheduler) is (DDIMScheduler if sd2 else PNDMScheduler)
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert pipe.unet.config.use_linear_projection == sd2 and pipe.unet.config.upcast_attention == sd2
    assert pipe.text_encoder.config.hidden_act == ("gelu" if sd2 else "quick_gelu")
    files = sorted(p.name for p in (directory / "tokenizer").iterdir())
    expected = ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    assert files == sorted(expected + (["tokenizer.json"] if sd2 else [])), files
    for sub in ("unet", "vae", "text_encoder"):
        assert bool(list((directory / sub).glob("*.fp16.*"))) == (not sd2), sub
    if not sd2:
        half = StableDiffusionPipeline.from_pretrained(directory, variant="fp16", torch_dtype=torch.float16)
        for module in ("unet", "vae", "text_encoder"):
            a, b = getattr(pipe, module).state_dict(), getattr(half, module).state_dict()
            assert a.keys() == b.keys()
            for k in a:
                assert b[k].dtype == torch.float16 or k.endswith("position_ids"), k
                assert torch.equal(a[k].half(), b[k]), k


# ---------------------------------------------------------------------------------------------------------------
# Oracles.

def f64(module: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(module).double()


class RecordedNoise:
    """Stands in for diffusers' randn_tensor in scheduling_ddim: hands out the recorded tensors in order."""

    def __init__(self, noise: torch.Tensor):
        self.noise, self.calls = noise, 0

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == tuple(self.noise.shape[1:]), shape
        out = self.noise[self.calls].to(dtype=dtype)
        self.calls += 1
        return out


def run_pipeline(pipe: StableDiffusionPipeline, latents: torch.Tensor, eta: float, output_type: str,
                 noise: torch.Tensor | None) -> np.ndarray:
    kwargs = dict(prompt=PIPE_PROMPT, negative_prompt=PIPE_NEGATIVE, height=16, width=16, num_inference_steps=4,
                  guidance_scale=7.5, eta=eta, latents=latents, output_type=output_type)
    if noise is None:
        with mock.patch.object(scheduling_ddim, "randn_tensor", side_effect=AssertionError("noise drawn")):
            out = pipe(**kwargs)
    else:
        recorded = RecordedNoise(noise)
        with mock.patch.object(scheduling_ddim, "randn_tensor", recorded):
            out = pipe(**kwargs)
        assert recorded.calls == len(noise), recorded.calls
    images = out.images
    images = images.detach().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    return images


def oracle(pipe: StableDiffusionPipeline, seed: int) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    out: dict[str, np.ndarray] = {}
    unet, vae, text_encoder = pipe.unet.eval(), pipe.vae.eval(), pipe.text_encoder.eval()
    with torch.no_grad():
        ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                             return_tensors="pt").input_ids
        out["prompts"] = np.array(PROMPTS)
        out["token_ids"] = ids.numpy().astype(np.int64)
        out["text_embeddings"] = text_encoder(ids)[0].numpy()
        out["text_embeddings_f64"] = f64(text_encoder)(ids)[0].numpy()

        x = torch.randn(2, 4, 8, 8, generator=g)
        t = torch.tensor([981, 17])
        context = torch.from_numpy(out["text_embeddings"][[0, 2]])
        out["unet_x"], out["unet_t"], out["unet_context"] = x.numpy(), t.numpy(), context.numpy()
        out["unet_out"] = unet(x, t, context).sample.numpy()
        out["unet_out_f64"] = f64(unet)(x.double(), t, context.double()).sample.numpy()

        z = torch.randn(2, 4, 8, 8, generator=g)
        image = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
        out["vae_z"], out["vae_image"] = z.numpy(), image.numpy()
        out["vae_decoded"] = vae.decode(z).sample.numpy()
        dist = vae.encode(image).latent_dist
        out["vae_mean"], out["vae_logvar"] = dist.mean.numpy(), dist.logvar.numpy()
        vae64 = f64(vae)
        out["vae_decoded_f64"] = vae64.decode(z.double()).sample.numpy()
        dist = vae64.encode(image.double()).latent_dist
        out["vae_mean_f64"], out["vae_logvar_f64"] = dist.mean.numpy(), dist.logvar.numpy()

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    noise = torch.randn(4, 1, 4, 8, 8, generator=g)
    out["pipe_prompt"], out["pipe_negative"] = np.array(PIPE_PROMPT), np.array(PIPE_NEGATIVE)
    out["pipe_latents"], out["pipe_eta1_noise"] = latents.numpy(), noise.numpy()
    out["pipe_eta0_images"] = run_pipeline(pipe, latents, 0.0, "np", None)
    out["pipe_eta0_final_latents"] = run_pipeline(pipe, latents, 0.0, "latent", None)
    out["pipe_eta1_images"] = run_pipeline(pipe, latents, 1.0, "np", noise)
    out["pipe_eta1_final_latents"] = run_pipeline(pipe, latents, 1.0, "latent", noise)
    out["pipe_timesteps"] = pipe.scheduler.timesteps.numpy().astype(np.int64)
    pipe64 = copy.deepcopy(pipe).to(torch.float64)
    out["pipe_eta0_images_f64"] = run_pipeline(pipe64, latents.double(), 0.0, "np", None)
    out["pipe_eta0_final_latents_f64"] = run_pipeline(pipe64, latents.double(), 0.0, "latent", None)
    out["pipe_eta1_images_f64"] = run_pipeline(pipe64, latents.double(), 1.0, "np", noise.double())

    ddim = DDIMScheduler.from_config(pipe.scheduler.config)
    ddim.set_timesteps(4)
    timesteps = ddim.timesteps.tolist()
    assert timesteps == out["pipe_timesteps"].tolist()
    sample, output = torch.randn(4, 1, 4, 8, 8, generator=g), torch.randn(4, 1, 4, 8, 8, generator=g)
    step_noise = torch.randn(4, 1, 4, 8, 8, generator=g)
    out["ddim_timesteps"] = np.array(timesteps, np.int64)
    out["ddim_sample"], out["ddim_model_output"], out["ddim_noise"] = sample.numpy(), output.numpy(), step_noise.numpy()
    out["ddim_prev_eta0"] = np.stack([ddim.step(output[j], t, sample[j], eta=0.0).prev_sample.numpy()
                                      for j, t in enumerate(timesteps)])
    out["ddim_prev_eta1"] = np.stack([ddim.step(output[j], t, sample[j], eta=1.0,
                                                variance_noise=step_noise[j]).prev_sample.numpy()
                                      for j, t in enumerate(timesteps)])
    for k, v in out.items():
        if v.dtype.kind == "f":
            out[k] = v.astype(np.float64 if k.endswith("_f64") else np.float32)
    return out


def check_tokens(directory: pathlib.Path, pipe: StableDiffusionPipeline, token_ids: np.ndarray, vocab, merges,
                 sd2: bool) -> None:
    pad = "!" if sd2 else EOS
    reference = np.array([reference_ids(p, vocab, merges, sorted({BOS, EOS, pad}), pad) for p in PROMPTS])
    assert np.array_equal(reference, token_ids), (reference, token_ids)
    fresh = CLIPTokenizer.from_pretrained(directory / "tokenizer")
    again = fresh(PROMPTS, padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids
    assert np.array_equal(np.array(again), token_ids)
    if sd2:
        # the same tokenizer from vocab.json + merges.txt alone
        bare = OUT / "sd2_tokenizer_without_json"
        shutil.copytree(directory / "tokenizer", bare)
        (bare / "tokenizer.json").unlink()
        again = CLIPTokenizer.from_pretrained(bare)(PROMPTS, padding="max_length", max_length=MAX_LENGTH,
                                                     truncation=True).input_ids
        shutil.rmtree(bare)
        assert np.array_equal(np.array(again), token_ids)
        raw = tokenizers.Tokenizer.from_file(str(directory / "tokenizer" / "tokenizer.json"))
        for p, row in zip(PROMPTS, token_ids):
            ids = raw.encode(p).ids
            ids = ids[:MAX_LENGTH - 1] + [vocab[EOS]] if len(ids) > MAX_LENGTH else ids
            assert ids == row[:len(ids)].tolist(), (p, ids)
    lengths = [len(pipe.tokenizer(p).input_ids) for p in PROMPTS]
    assert lengths[-1] > MAX_LENGTH and lengths[1] == 2, lengths
    words = len(PATTERN.findall(clean(PROMPTS[0])))
    assert lengths[0] - 2 < sum(len(w) for w in PATTERN.findall(clean(PROMPTS[0]))) and words >= 2
    print(f"  token lengths {lengths}; {PROMPTS[0]!r} -> {pipe.tokenizer.convert_ids_to_tokens(token_ids[0][:8])}")


# ---------------------------------------------------------------------------------------------------------------
# SD 1.5 configs.

def sd15_configs() -> dict:
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SD15_UNET)
        vae = AutoencoderKL.from_config(SD15_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER))
    counts = {name: sum(p.numel() for p in module.parameters())
              for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))}
    assert counts == SD15_PARAM_COUNTS, counts
    return {"unet": SD15_UNET, "vae": SD15_VAE, "text_encoder": SD15_TEXT_ENCODER, "scheduler": SD15_SCHEDULER,
            "param_counts": counts}


def main() -> None:
    torch.set_num_threads(2)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    merges = learn_merges(CORPUS, N_MERGES)
    assert len(merges) == N_MERGES, len(merges)
    vocab = clip_vocab(merges)
    print(f"vocabulary: {len(vocab)} tokens ({len(merges)} merges)")
    for name in ("sd1", "sd2"):
        sd2 = name == "sd2"
        directory = write_pipeline(name, vocab, merges)
        pipe = StableDiffusionPipeline.from_pretrained(directory)
        check_reload(directory, pipe, sd2)
        out = oracle(pipe, seed=20 if sd2 else 21)
        check_tokens(directory, pipe, out["token_ids"], vocab, merges, sd2)
        np.savez_compressed(OUT / f"oracle_{name}.npz", **out)
        for key in sorted(out):
            if key.endswith("_f64"):
                print(f"  {name} max |f32 - f64| {key[:-4]}: {np.abs(out[key[:-4]] - out[key]).max():.3g}")
        print(f"wrote {directory} and oracle_{name}.npz")
    configs = sd15_configs()
    (OUT / "sd15_configs.json").write_text(json.dumps(configs, indent=1) + "\n")
    print(f"sd15 parameter counts {configs['param_counts']}")
    print(f"(torch {torch.__version__}, diffusers {sys.modules['diffusers'].__version__}, "
          f"transformers {sys.modules['transformers'].__version__}, python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
