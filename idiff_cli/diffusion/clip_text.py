"""CLIP's text side: transformers' `CLIPTextModel` in Flax Linen (Stable Diffusion's text encoder), or with a
CLIPModel's config, its text tower and text_projection (`CLIPModel.get_text_features`), built from the fields of
a `config.json`; and the CLIP tokenizer of a pipeline's tokenizer/ directory or of a CLIP model's directory.

    ids, truncated = load_tokenizer(directory).encode(prompts)          # int32 [P, 77], list[bool]
    context = CLIPTextEncoder(**text_fields(config)).apply(variables, ids)   # last_hidden_state [P, 77, D]
    embeds = CLIPTextEncoder(**text_fields(clip_config)).apply(variables, ids, pooled=True)  # [P, projection_dim]

The network, as transformers builds it (D = hidden_size, N heads of d = D / N channels, LN = LayerNorm
with ε = layer_norm_eps):

* embeddings: h₀ = token_embedding[ids] + position_embedding[0 … L − 1].
* per layer (pre-LN, causal): h ← h + out_proj(attn(LN₁(h))), attn = softmax(q kᵀ / √d + causal mask) v
  per head, q, k, v = q_proj, k_proj, v_proj of LN₁(h); then h ← h + fc2(act(fc1(LN₂(h)))), act the
  config's hidden_act: quick_gelu(x) = x σ(1.702 x) or the exact gelu(x) = x Φ(x).
* output: last_hidden_state = final_layer_norm(h), what Stable Diffusion reads. With `pooled=True`, the
  pooler_output p = last_hidden_state at each prompt's EOS position, as transformers 5.23's CLIPTextModel picks
  it: the first position of eos_token_id, or, where the config's eos_token_id is 2 (the value of configs written
  before transformers PR #24773), argmax(ids), the first position of the largest id (CLIP's <|endoftext|> has
  the largest id); then, when projection_dim > 0 (a CLIPModel), text_embeds = text_projection(p), a
  [projection_dim, D] matrix without bias: CLIPModel.get_text_features. The attention mask that a tokenizer
  gives with padded ids is not needed: attention is causal and the padding follows the EOS, so no position up
  to the EOS attends to it.

Parameters carry transformers' module paths with "." written "__" (`text_model__encoder__layers__0/
self_attn__q_proj/kernel` holds `text_model.encoder.layers.0.self_attn.q_proj.weight`; `text_projection/kernel`
holds `text_projection.weight`); `text_params` maps a state dict onto them (diffusers_io.params_from_tensors, the
position_ids buffer skipped), with or without the "text_model." prefix, and from a CLIPModel's file ignores the
vision tower's keys and logit_scale. `dtype` is the activations' dtype; LayerNorm statistics and the attention
softmax are float32 (float64 for float64 activations); last_hidden_state is float32, the pooled outputs float32
(float64 for float64 activations).

config.json is a CLIPTextConfig (a CLIPTextModel's) or a CLIPConfig (a CLIPModel's: the text fields under
`text_config`, the projection's size the top-level `projection_dim`). An older CLIPConfig also carries a
`text_config_dict` (and a `vision_config_dict`): transformers then completes that dict with CLIPTextConfig's
defaults and lets it override every field of `text_config` (`clip_tower_fields`). So a file whose text_config
says eos_token_id 2 and whose text_config_dict names none, as copies of openai/clip-vit-large-patch14's
config.json show it, gets the default 49407, its <|endoftext|>: the largest id too, so that both rules pick the
same position on its tokenizer's ids.

The tokenizer is the `tokenizers` library's, of a directory holding its files (a pipeline's tokenizer/, or a CLIP
model's directory, where they lie beside config.json): tokenizer.json when the directory has one, else assembled from
vocab.json and merges.txt as transformers' CLIPConverter does (NFC, whitespace runs → " ", lowercase; the
CLIP split regex then byte-level; BPE with "</w>" word ends; <bos> … <eos> around each prompt). The special
tokens (bos, eos, unk, pad) come from tokenizer_config.json and special_tokens_map.json and are added as
special tokens, as transformers adds them; prompts are cut to model_max_length (77) tokens, <eos> included,
and padded with the pad token (SD 2.x: "!"), as the pipeline's `tokenizer(prompts, padding="max_length",
max_length=77, truncation=True)`.
"""

from __future__ import annotations

import pathlib
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from idiff_cli.diffusion.diffusers_io import CONFIG, params_from_tensors, read_json
from idiff_cli.errors import UserError

PREFIX, PROJECTION = "text_model.", "text_projection.weight"
OTHER_TOWER = ("vision_model.", "visual_projection.", "logit_scale")  # a CLIPModel's keys outside the text tower
LEGACY_EOS = 2  # the eos_token_id of configs written before transformers PR #24773: pool at argmax(ids)
ACTIVATIONS = {"quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
               "gelu": lambda x: jax.nn.gelu(x, approximate=False)}
# CLIPTextConfig fields (with transformers' defaults) that the Flax network takes.
TEXT_FIELDS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                   num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                   eos_token_id=49407)

SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")
# CLIPTokenizer's special tokens where the tokenizer's files name none.
SPECIAL_DEFAULTS = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                        pad_token="<|endoftext|>")
# The files a tokenizer directory may hold that `load_tokenizer` reads (tokenizer.json, or vocab.json + merges.txt).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
MAX_LENGTH = 77  # CLIP's context length, where tokenizer_config.json gives no model_max_length
ADDED_TOKEN_FIELDS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")


def attention(q, k, v, causal: bool = False):
    """softmax(q kᵀ / √d + mask) v of [B, L, N, d] queries, keys and values (the mask −∞ above the diagonal
    when `causal`), the logits and softmax in float32, float64 for float64 inputs (jax.nn.dot_product_attention
    would compute float64 in float32)."""
    wide = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("blnd,bmnd->bnlm", q, k, preferred_element_type=wide) / np.sqrt(q.shape[-1])
    if causal:
        length = q.shape[1]
        logits = jnp.where(jnp.tril(jnp.ones((length, length), bool)), logits, -jnp.inf)
    return jnp.einsum("bnlm,bmnd->blnd", jax.nn.softmax(logits, axis=-1).astype(v.dtype), v)


class EncoderLayer(nn.Module):
    """CLIPEncoderLayer, of both towers: pre-LN self-attention (causal in the text tower) and MLP, each
    residual."""

    heads: int
    intermediate_size: int
    hidden_act: str
    eps: float
    dtype: Any = jnp.float32
    causal: bool = False

    @nn.compact
    def __call__(self, h):
        b, length, dim = h.shape
        x = nn.LayerNorm(self.eps, dtype=self.dtype, name="layer_norm1")(h)
        q, k, v = (nn.Dense(dim, dtype=self.dtype, name=f"self_attn__{p}_proj")(x).reshape(b, length, self.heads, -1)
                   for p in "qkv")
        a = attention(q, k, v, self.causal).reshape(b, length, dim)
        h = h + nn.Dense(dim, dtype=self.dtype, name="self_attn__out_proj")(a)
        x = nn.LayerNorm(self.eps, dtype=self.dtype, name="layer_norm2")(h)
        x = ACTIVATIONS[self.hidden_act](nn.Dense(self.intermediate_size, dtype=self.dtype, name="mlp__fc1")(x))
        return h + nn.Dense(dim, dtype=self.dtype, name="mlp__fc2")(x)


def eos_positions(ids, eos_token_id: int):
    """The pooled position of each row of token ids [..., L] (module docstring): argmax(ids) for the legacy
    eos_token_id 2, else the first position of eos_token_id (0 where a row has none, as torch's argmax gives)."""
    return jnp.argmax(ids if eos_token_id == LEGACY_EOS else ids == eos_token_id, axis=-1)


class CLIPTextEncoder(nn.Module):
    """CLIPTextModel's last_hidden_state [B, L, D] (float32) of token ids [B, L]; with `pooled`, the pooled
    output [B, D], or with projection_dim > 0 CLIPModel.get_text_features [B, projection_dim] (module
    docstring)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    projection_dim: int = 0  # text_projection's outputs (a CLIPModel's text tower); 0: none (a CLIPTextModel)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids, pooled: bool = False):
        dim, dt = self.hidden_size, self.dtype
        h = (nn.Embed(self.vocab_size, dim, dtype=dt, name="text_model__embeddings__token_embedding")(ids)
             + nn.Embed(self.max_position_embeddings, dim, dtype=dt,
                        name="text_model__embeddings__position_embedding")(jnp.arange(ids.shape[1])))
        for i in range(self.num_hidden_layers):
            h = EncoderLayer(self.num_attention_heads, self.intermediate_size, self.hidden_act, self.layer_norm_eps, dt,
                             causal=True, name=f"text_model__encoder__layers__{i}")(h)
        h = nn.LayerNorm(self.layer_norm_eps, dtype=dt, name="text_model__final_layer_norm")(h)
        if not pooled:
            return h.astype(jnp.float32)
        p = jnp.take_along_axis(h, eos_positions(ids, self.eos_token_id)[:, None, None], axis=1)[:, 0]
        if self.projection_dim:
            p = nn.Dense(self.projection_dim, use_bias=False, dtype=dt, name="text_projection")(p)
        return p.astype(jnp.promote_types(dt, jnp.float32))


def clip_tower_fields(config: Mapping[str, Any], tower: str, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The values of `defaults`' fields in a CLIPConfig's `tower` ("text_config" or "vision_config") as
    transformers 5.23's CLIPConfig resolves them: from `<tower>_dict` where the file has one (completed with
    the defaults, it overrides every field of `<tower>`), else from `<tower>`; each default where absent."""
    fields = config.get(f"{tower}_dict")
    if fields is None:
        fields = config[tower]
    return {name: fields.get(name, default) for name, default in defaults.items()}


def check_encoder_fields(fields: Mapping[str, Any], what: str) -> None:
    """UserError (one line, naming `what`) unless a tower's fields give EncoderLayer an activation it has and
    heads that divide the width."""
    if fields["hidden_act"] not in ACTIVATIONS:
        raise UserError(f"{what}: unsupported hidden_act = {fields['hidden_act']!r} (supported: "
                        f"{', '.join(ACTIVATIONS)})")
    if fields["hidden_size"] % fields["num_attention_heads"]:
        raise UserError(f"{what}: hidden_size {fields['hidden_size']} is not a multiple of num_attention_heads "
                        f"{fields['num_attention_heads']}")


def text_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """The CLIPTextEncoder fields of a text encoder's config.json (a CLIPTextConfig) or of a CLIP model's (a
    CLIPConfig: its text tower and text_projection; module docstring); UserError naming the first unsupported
    field."""
    if isinstance(config.get("text_config"), Mapping):
        what = f"{CONFIG} of a CLIPModel"
        fields = {**clip_tower_fields(config, "text_config", TEXT_FIELDS),
                  "projection_dim": config.get("projection_dim", 512)}  # CLIPConfig's default
    else:
        what = f"{CONFIG} of a CLIPTextModel"
        architectures = config.get("architectures") or ["CLIPTextModel"]
        if list(architectures) != ["CLIPTextModel"]:
            raise UserError(f"{CONFIG}: unsupported architectures {architectures!r}; idiff imports the CLIPTextModel "
                            "text encoder of Stable Diffusion 1.x/2.x")
        fields = {name: config.get(name, default) for name, default in TEXT_FIELDS.items()}
    if not isinstance(fields["eos_token_id"], int):
        raise UserError(f"{what}: eos_token_id = {fields['eos_token_id']!r}; idiff takes one integer")
    check_encoder_fields(fields, what)
    return fields


def text_params(model: CLIPTextEncoder, tensors: Mapping[str, np.ndarray], source: str,
                dtype: Any = np.float32) -> Any:
    """The variables of `model` from a CLIPTextModel state dict, whose keys may or may not start with
    "text_model." (transformers 5 saves them without, the published checkpoints carry it; transformers reads
    both), or from a CLIPModel's (its text keys and text_projection.weight; the vision tower's keys and
    logit_scale ignored); UserError naming the first key that does not fit."""
    tensors = {k if k.startswith((PREFIX, PROJECTION)) else PREFIX + k: v for k, v in tensors.items()
               if not k.startswith(OTHER_TOWER)}
    ids = jnp.zeros((1, model.max_position_embeddings), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, pooled=True))
    return params_from_tensors(shapes, tensors, source, what="CLIPTextModel", ignored=("position_ids",),
                               dtype=dtype)


class Tokenizer:
    """A CLIP tokenizer: prompts -> token ids padded and truncated to `max_length` (module docstring)."""

    def __init__(self, backend: tokenizers.Tokenizer, max_length: int, pad_token: str, source: str):
        pad_id = backend.token_to_id(pad_token)
        if pad_id is None:
            raise UserError(f"{source}: the pad token {pad_token!r} is not in the vocabulary")
        backend.enable_truncation(max_length)
        backend.enable_padding(pad_id=pad_id, pad_token=pad_token, length=max_length)
        self.backend, self.max_length = backend, max_length

    def encode(self, prompts: Sequence[str]) -> tuple[np.ndarray, list[bool]]:
        """(ids int32 [P, max_length], whether each prompt was cut to fit)."""
        encodings = self.backend.encode_batch(list(prompts))
        ids = np.array([e.ids for e in encodings], np.int32).reshape(len(encodings), self.max_length)
        return ids, [bool(e.overflowing) for e in encodings]


def _one_line(e: Exception) -> str:
    """An exception's message on one line (the tokenizers library's messages may span several)."""
    return " ".join(str(e).split())


def _added_token(value: str | Mapping[str, Any], special: bool = True) -> AddedToken:
    """A tokenizer file's token (a string or a serialised AddedToken) as an AddedToken."""
    if isinstance(value, str):
        return AddedToken(value, special=special)
    props = {k: v for k, v in value.items() if k in ADDED_TOKEN_FIELDS}
    return AddedToken(**{"special": special, **props})


def _special_tokens(directory: pathlib.Path) -> tuple[dict[str, Any], list[AddedToken]]:
    """(tokenizer_config.json's content, the added tokens as transformers loads them): the entries of
    its added_tokens_decoder in id order, else special_tokens_map.json's values over tokenizer_config.json's,
    then each named special token not among them."""
    config = read_json(directory / "tokenizer_config.json") if (directory / "tokenizer_config.json").exists() else {}
    named = {key: config.get(key) or SPECIAL_DEFAULTS[key] for key in SPECIAL}
    added = [_added_token(config["added_tokens_decoder"][i], special=False)
             for i in sorted(config.get("added_tokens_decoder") or {}, key=int)]
    if not added and (directory / "special_tokens_map.json").exists():
        named.update({key: value for key, value in read_json(directory / "special_tokens_map.json").items()
                      if key in SPECIAL and value})
    contents = {t.content for t in added}
    for value in named.values():
        token = _added_token(value)
        if token.content not in contents:
            added.append(token)
            contents.add(token.content)
    config.update({key: value if isinstance(value, str) else value["content"] for key, value in named.items()})
    return config, added


def _from_vocab(directory: pathlib.Path, unk: str) -> tokenizers.Tokenizer:
    """The byte-level BPE tokenizer of vocab.json + merges.txt, configured as CLIPConverter configures it."""
    for name in ("vocab.json", "merges.txt"):
        if not (directory / name).is_file():
            raise UserError(f"tokenizer directory '{directory}' has neither tokenizer.json nor {name}")
    try:
        model = BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt"), dropout=None,
                              continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False, unk_token=unk)
    except Exception as e:
        raise UserError(f"cannot read the tokenizer in '{directory}': {_one_line(e)}") from None
    backend = tokenizers.Tokenizer(model)
    backend.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return backend


def load_tokenizer(directory: str | pathlib.Path) -> Tokenizer:
    """The CLIP tokenizer of a pipeline's tokenizer/ directory; UserError (one line) when it cannot be read."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise UserError(f"tokenizer directory '{directory}' does not exist")
    config, added = _special_tokens(directory)
    if (directory / "tokenizer.json").is_file():
        try:
            backend = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as e:
            raise UserError(f"cannot read '{directory / 'tokenizer.json'}': {_one_line(e)}") from None
    else:
        backend = _from_vocab(directory, config["unk_token"])
    backend.add_tokens(added)
    bos, eos = config["bos_token"], config["eos_token"]
    backend.post_processor = processors.RobertaProcessing((eos, backend.token_to_id(eos)),
                                                          (bos, backend.token_to_id(bos)),
                                                          trim_offsets=False, add_prefix_space=False)
    max_length = config.get("model_max_length", MAX_LENGTH)
    return Tokenizer(backend, int(max_length), config["pad_token"], str(directory))
