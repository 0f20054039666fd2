"""The Stable Diffusion text side (idiff_cli/diffusion/clip_text.py) against transformers: the tiny pipelines
of tests/fixtures/sd_tiny (tools/make_sd_fixture.py) — sd1's tokenizer from vocab.json + merges.txt padding
with <|endoftext|> and a quick_gelu text encoder, sd2's from tokenizer.json padding with "!" and a gelu one —
their stored token ids and text embeddings, and SD 1.5's published text encoder config (its parameter count
as transformers counts it)."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from idiff_cli.diffusion import clip_text
from idiff_cli.errors import UserError

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "sd_tiny"
VARIANTS = ("sd1", "sd2")

# float32 tolerance: torch's float32 embeddings differ from its float64 run by float32 rounding accumulated
# through the layers (|f32 − f64| ≈ 1e-6 on values up to ~3.5 here). The Flax encoder rounds as often but
# sums in another order, so its distance from the float64 run is of the same order without being equal:
# allow ten times torch's own (measured 0.8×), far below what a misplaced weight does (~0.1).
F32_FACTOR = 10
# bfloat16 activations (float32 weights, LayerNorm statistics and softmax): each rounding is off by up to
# u = 2^-8 relative; through the two layers the output is off by a few u of its scale (measured 2.8 u):
# allow 12 u of the float64 output's largest magnitude.
BF16_REL = 12 * 2.0**-8


def oracle(variant):
    return np.load(FIXTURE / f"oracle_{variant}.npz")


def prompts(data):
    return [str(p) for p in data["prompts"]]


def encoder(variant, dtype=jnp.float32):
    """(CLIPTextEncoder, variables) of a fixture pipeline's text_encoder/."""
    directory = FIXTURE / variant / "text_encoder"
    model = clip_text.CLIPTextEncoder(**clip_text.text_fields(json.loads((directory / "config.json").read_text())),
                                      dtype=dtype)
    tensors = load_file(str(directory / "model.safetensors"))
    return model, clip_text.text_params(model, tensors, str(directory))


@pytest.mark.parametrize("variant", VARIANTS)
def test_token_ids_equal_the_pipelines(variant):
    """Every prompt (capitals, digits, punctuation, an accent, runs of spaces, the empty prompt, one of more
    than 77 tokens) gives the pipeline tokenizer's ids; only the long prompt is reported cut."""
    data, directory = oracle(variant), FIXTURE / variant / "tokenizer"
    assert (directory / "tokenizer.json").exists() == (variant == "sd2")
    tokenizer = clip_text.load_tokenizer(directory)
    ids, truncated = tokenizer.encode(prompts(data))
    assert ids.dtype == np.int32 and ids.shape == (len(prompts(data)), 77)
    np.testing.assert_array_equal(ids, data["token_ids"])
    longest = max(range(len(ids)), key=lambda i: len(prompts(data)[i]))
    assert truncated == [i == longest for i in range(len(ids))]
    pad = {"sd1": "<|endoftext|>", "sd2": "!"}[variant]
    assert ids[1, -1] == tokenizer.backend.token_to_id(pad)  # the empty prompt: <bos> <eos> then padding


@pytest.mark.parametrize("variant", VARIANTS)
def test_text_embeddings_equal_transformers(variant):
    data = oracle(variant)
    model, variables = encoder(variant)
    got = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(data["token_ids"], jnp.int32)))
    assert got.shape == (len(prompts(data)), 77, 32) and got.dtype == np.float32
    tol = F32_FACTOR * np.max(np.abs(data["text_embeddings"] - data["text_embeddings_f64"]))
    np.testing.assert_allclose(got, data["text_embeddings_f64"], rtol=0, atol=tol)


def test_bfloat16_activations_stay_near_transformers():
    data = oracle("sd1")
    model, variables = encoder("sd1", jnp.bfloat16)
    got = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(data["token_ids"], jnp.int32)))
    want = data["text_embeddings_f64"]
    err = np.max(np.abs(got - want))
    f32_tol = F32_FACTOR * np.max(np.abs(data["text_embeddings"] - want))
    assert f32_tol < err <= BF16_REL * np.max(np.abs(want)), err


def test_published_key_names_are_read_too():
    """transformers 5 saves a CLIPTextModel's weights without the "text_model." prefix (the fixture), the
    published SD checkpoints carry it; both give the same variables."""
    directory = FIXTURE / "sd1" / "text_encoder"
    model, variables = encoder("sd1")
    tensors = load_file(str(directory / "model.safetensors"))
    assert not any(k.startswith("text_model.") for k in tensors)
    published = {"text_model." + k: v for k, v in tensors.items()}
    published["text_model.embeddings.position_ids"] = np.arange(77)[None]
    again = clip_text.text_params(model, published, str(directory))
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool((a == b).all()), variables, again))


def test_sd15_text_encoder_has_transformers_parameter_count():
    configs = json.loads((FIXTURE / "sd15_configs.json").read_text())
    model = clip_text.CLIPTextEncoder(**clip_text.text_fields(configs["text_encoder"]))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 77), jnp.int32)))
    count = sum(leaf.size for leaf in jax.tree_util.tree_leaves(shapes))
    assert count == configs["param_counts"]["text_encoder"] == 123_060_480


def test_an_unsupported_activation_is_refused_in_one_line():
    config = json.loads((FIXTURE / "sd1" / "text_encoder" / "config.json").read_text())
    with pytest.raises(UserError, match=r"^config.json of a CLIPTextModel: unsupported hidden_act = 'relu' "
                                        r"\(supported: quick_gelu, gelu\)$"):
        clip_text.text_fields({**config, "hidden_act": "relu"})


@pytest.mark.parametrize("damage, message", [
    ("merges.txt", r"has neither tokenizer.json nor merges.txt$"),
    ("tokenizer_config.json", r"^'.*tokenizer_config.json' is damaged \(not JSON: "),
    ("vocab.json", r"^cannot read the tokenizer in '.*': "),
], ids=["missing-merges", "bad-config-json", "bad-vocab-json"])
def test_an_unreadable_tokenizer_is_refused_in_one_line(tmp_path, damage, message):
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((FIXTURE / "sd1" / "tokenizer" / name).read_bytes())
    if damage == "merges.txt":
        (tmp_path / damage).unlink()
    else:
        (tmp_path / damage).write_text('{"truncated": ')
    with pytest.raises(UserError, match=message) as info:
        clip_text.load_tokenizer(tmp_path)
    assert "\n" not in str(info.value)
