"""The CLIP image–text similarity reward (idiff_cli/implicit/clip_score.py) and CLIP's text tower with its
projection (idiff_cli/diffusion/clip_text.py) against transformers: the tiny random CLIPModel and tokenizer of
tests/fixtures/clip_tiny (tools/make_clip_fixture.py), its token ids, get_text_features and image–text cosines; each
image scored against its own prompt under jit; the reward's gradient against central finite differences in float64;
rewards.check_reward; the one-line errors of missing files."""

import dataclasses
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64

from idiff_cli.diffusion import clip_text, clip_vision
from idiff_cli.errors import UserError
from idiff_cli.implicit import clip_score
from idiff_cli.implicit.rewards import Prompts, check_reward, takes_prompts

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "clip_tiny"
FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "vocab.json", "merges.txt",
         "tokenizer_config.json", "special_tokens_map.json")

# float32 tolerance, as in test_clip_vision.py: torch's float32 outputs differ from its float64 run by rounding
# accumulated through the layers (text_embeds: 5.3e-7 on values up to 2.4; the cosines: 1.2e-7); the port rounds
# as often in another order, so allow ten times torch's own distance from float64 (measured 0.6–1.1× for the text
# features, 1.0× for the cosines; a misplaced weight or a wrong pooled position moves them by O(0.1)).
F32_FACTOR = 10
# CLIP's preprocessing made the identity: ((x + 1)/2 − ½) / ½ = x, and no resize for 16×16 images, so that the
# reward's own path can be fed the fixture's pixel values.
IDENTITY = clip_vision.Preprocessing((16, 16), (16, 16), (0.5,) * 3, (0.5,) * 3)


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(FIXTURE / "reference.npz"))


@pytest.fixture(scope="module")
def texts(reference):
    return tuple(str(p) for p in reference["prompts"])


@pytest.fixture(scope="module")
def score():
    return clip_score.load(FIXTURE)


def tolerance(reference, name):
    return F32_FACTOR * np.max(np.abs(reference[name] - reference[f"{name}_f64"]))


def test_token_ids_of_the_model_directory_equal_transformers(reference, texts, score):
    """The tokenizer's files beside config.json (a flat directory, as the published repository has them) give
    CLIPTokenizer's ids: capitals and punctuation, the empty prompt, and a prompt cut to 77 tokens, <eos> last."""
    ids, truncated = score.tokenizer.encode(texts)
    np.testing.assert_array_equal(ids, reference["token_ids"])
    assert truncated == [False, False, False, False, True]


def test_text_features_equal_transformers(reference, score):
    """CLIPModel.get_text_features of the tokenizer's ids, which transformers computed with the attention mask
    and which the port computes without (causal attention: the padding after <eos> cannot reach it)."""
    got = jax.jit(lambda p, ids: score.text_module.apply(p, ids, pooled=True))(
        score.text_params, jnp.asarray(reference["token_ids"], jnp.int32))
    assert got.shape == (5, 16) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), reference["text_embeds_f64"], rtol=0,
                               atol=tolerance(reference, "text_embeds"))


@pytest.mark.parametrize("eos_token_id, name", [(7, "eos7"), (2, "legacy")])
def test_pooled_position_follows_transformers(reference, score, eos_token_id, name):
    """Ids whose largest id (639, twice) is not the eos_token_id 7 (twice): transformers pools at the first 7, or
    with the legacy eos_token_id 2 at argmax(ids), the first 639 (the two outputs differ by more than 0.1)."""
    model = score.text_module.clone(eos_token_id=eos_token_id)
    got = jax.jit(lambda p, ids: model.apply(p, ids, pooled=True))(score.text_params,
                                                                   jnp.asarray(reference["branch_ids"], jnp.int32))
    np.testing.assert_allclose(np.asarray(got), reference[f"text_embeds_{name}_f64"], rtol=0,
                               atol=tolerance(reference, f"text_embeds_{name}"))


def test_similarity_equals_transformers(reference, texts, score):
    """The reward of the fixture's pixel values (preprocessing made the identity) and each prompt: CLIPModel's
    logits_per_image / exp(logit_scale), every image against every prompt (15 rows, one call)."""
    images = jnp.asarray(np.transpose(reference["pixel_values"], (0, 2, 3, 1)))
    rows, columns = np.divmod(np.arange(15), 5)
    reward = dataclasses.replace(score, preprocessing=IDENTITY)
    got = np.asarray(jax.jit(lambda r, x, ids: r(x, Prompts(ids, texts)))(reward, images[rows],
                                                                          jnp.asarray(columns, jnp.int32)))
    np.testing.assert_allclose(got.reshape(3, 5), reference["similarity_f64"], rtol=0,
                               atol=tolerance(reference, "similarity"))


def test_each_image_is_scored_against_its_own_prompt_under_jit(texts, score):
    """Under jit (the reward a pytree argument, the prompt table static), row b's reward is that of image b and
    prompt ids[b]: equal to the matrix M[b, p] of the reward with every row given prompt p, for ids that repeat a
    prompt and for a permutation of them; reordering the table with the ids relabelled changes nothing."""
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (3, 20, 24, 3)), jnp.float32)
    reward = jax.jit(lambda r, x, ids, table: r(x, Prompts(ids, table)), static_argnums=3)
    matrix = np.stack([np.asarray(reward(score, x, jnp.full(3, p, jnp.int32), texts)) for p in range(5)], axis=1)
    assert np.min(np.abs(matrix[:, :, None] - matrix[:, None, :]) + np.eye(5)) > 1e-3  # the prompts differ
    for ids in ([4, 0, 4], [0, 4, 4], [1, 3, 2]):
        got = np.asarray(reward(score, x, jnp.asarray(ids, jnp.int32), texts))
        np.testing.assert_allclose(got, matrix[np.arange(3), ids], rtol=0, atol=1e-6, err_msg=str(ids))
    order = [3, 0, 4, 1, 2]  # table row i holds texts[order[i]]
    relabelled = jnp.asarray([order.index(p) for p in (1, 3, 2)], jnp.int32)
    got = np.asarray(reward(score, x, relabelled, tuple(texts[i] for i in order)))
    np.testing.assert_allclose(got, matrix[np.arange(3), [1, 3, 2]], rtol=0, atol=1e-6)


def test_gradient_equals_central_finite_differences(texts):
    """∇ₓ Σ_b c_b R(x_b, ids_b) through the preprocessing (20×24 images resized to 16×19 and cropped), the vision
    tower, the normalisation and the cosine with each row's own prompt, in float64, against central differences
    along random directions; the reward passed to jit as a pytree argument."""
    with enable_x64(True):
        score = clip_score.load(FIXTURE, dtype=jnp.float64, param_dtype=np.float64)
        rng = np.random.default_rng(1)
        x = jnp.asarray(rng.uniform(-1, 1, (2, 20, 24, 3)))
        c = jnp.asarray(rng.normal(size=2))
        prompts = Prompts(jnp.asarray([3, 1], jnp.int32), texts)
        objective = jax.jit(lambda x, r: jnp.sum(c * r(x, prompts)))
        value, grad = jax.jit(jax.value_and_grad(objective))(x, score)
        assert grad.dtype == jnp.float64 and np.abs(np.asarray(grad)).max() > 0
        np.testing.assert_allclose(float(objective(x, score)), float(value), rtol=1e-12)
        eps = 1e-4
        for _ in range(2):
            v = jnp.asarray(rng.normal(size=x.shape))
            fd = (float(objective(x + eps * v, score)) - float(objective(x - eps * v, score))) / (2 * eps)
            # central differences: O(eps²) truncation and roundoff ~1e-16/eps
            np.testing.assert_allclose(float(jnp.vdot(grad, v)), fd, rtol=1e-6, atol=1e-9)


def test_check_reward_accepts_it_with_a_prompt_table(texts, score):
    assert takes_prompts(score)
    for shape in ((16, 16, 3), (20, 24, 3)):
        check_reward(score, "clip-score", shape, texts=texts)
    with pytest.raises(UserError, match="this model is unconditional"):
        check_reward(score, "clip-score", (16, 16, 3))
    with pytest.raises(UserError, match="takes images with 3 channels; this model makes 1-channel images"):
        check_reward(score, "clip-score", (16, 16, 1), texts=texts)


def test_config_of_older_files_resolves_as_transformers():
    """A CLIPConfig's text_config_dict, completed with CLIPTextConfig's defaults, overrides every field of
    text_config (transformers 5.23's CLIPConfig.__post_init__; so openai/clip-vit-large-patch14's text_config
    eos_token_id 2 becomes 49407); the top-level projection_dim sizes text_projection; the same for the vision
    tower."""
    config = json.loads((FIXTURE / "config.json").read_text())
    assert config["text_config"]["projection_dim"] == 512 and clip_text.text_fields(config)["projection_dim"] == 16
    older = {**config, "text_config": {**config["text_config"], "eos_token_id": 2},
             "text_config_dict": {"hidden_size": 64}, "vision_config_dict": {"num_hidden_layers": 24}}
    text, vision = clip_text.text_fields(older), clip_vision.vision_fields(older)
    assert (text["hidden_size"], text["eos_token_id"], text["vocab_size"]) == (64, 49407, 49408)
    assert (vision["num_hidden_layers"], vision["hidden_size"], vision["patch_size"]) == (24, 768, 32)
    with pytest.raises(UserError, match=r"eos_token_id = \[2, 3\]; idiff takes one integer"):
        clip_text.text_fields({**config, "text_config": {**config["text_config"], "eos_token_id": [2, 3]}})


def test_vit_l14_text_tower_has_transformers_parameter_count():
    """openai/clip-vit-large-patch14's text fields and projection_dim build a network with the parameter count of
    transformers' CLIPTextModelWithProjection (text_projection included)."""
    published = json.loads((FIXTURE / "clip_vit_l14.json").read_text())
    fields = clip_text.text_fields({"projection_dim": published["projection_dim"],
                                    "text_config": published["text_config"]})
    model = clip_text.CLIPTextEncoder(**fields)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 77), jnp.int32), pooled=True))
    count = sum(leaf.size for leaf in jax.tree_util.tree_leaves(shapes))
    assert count == published["text_param_count"] == 123_650_304


def copy_of_fixture(tmp_path, leave_out=()):
    directory = tmp_path / "clip"
    directory.mkdir()
    for name in FILES:
        if name not in leave_out:
            shutil.copy(FIXTURE / name, directory / name)
    return directory


def test_both_towers_come_from_one_read_of_the_weights(monkeypatch):
    read, original = [], clip_score.read_weights
    monkeypatch.setattr(clip_score, "read_weights", lambda path: read.append(path) or original(path))
    clip_score.load(FIXTURE)
    assert read == [FIXTURE / "model.safetensors"]


@pytest.mark.parametrize("leave_out", ["directory", "config.json", "model.safetensors", "vocab.json", "merges.txt"])
def test_missing_files_are_one_line_naming_the_path_and_the_download(tmp_path, leave_out):
    directory = tmp_path / "absent" if leave_out == "directory" else copy_of_fixture(tmp_path, (leave_out,))
    with pytest.raises(UserError) as error:
        clip_score.load(directory)
    message = str(error.value)
    assert "\n" not in message and f"'{directory}'" in message, message
    assert message.endswith("huggingface-cli download openai/clip-vit-large-patch14 config.json model.safetensors "
                            "tokenizer.json vocab.json merges.txt tokenizer_config.json special_tokens_map.json "
                            "--local-dir DIR"), message
    if leave_out != "directory":
        names = {"vocab.json": "tokenizer.json nor vocab.json", "merges.txt": "tokenizer.json nor merges.txt"}
        assert f"has no {names.get(leave_out, leave_out)};" in message, message


def test_unfit_files_are_refused_in_one_line(tmp_path):
    """A CLIPVisionConfig (no text tower), and a tokenizer making more tokens than the text tower has positions."""
    directory = copy_of_fixture(tmp_path)
    config = json.loads((FIXTURE / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config["vision_config"], "projection_dim": 16}))
    with pytest.raises(UserError, match=r"config.json' is not a CLIPModel's config \(it has no text_config\)"):
        clip_score.load(directory)
    shutil.copy(FIXTURE / "config.json", directory / "config.json")
    tokenizer_config = json.loads((FIXTURE / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "model_max_length": 78}))
    with pytest.raises(UserError, match=r"^the tokenizer in '.*' makes 78 tokens; the text tower has 77 positions$"):
        clip_score.load(directory)
