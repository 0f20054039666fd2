"""CLIP's image tower (idiff_cli/diffusion/clip_vision.py) and the LAION aesthetic reward
(idiff_cli/implicit/aesthetic.py) against transformers and torch: the tiny random CLIPModel, CLIPImageProcessor
(PIL backend) outputs and aesthetic head of tests/fixtures/clip_tiny (tools/make_clip_fixture.py); the reward's
gradient against central finite differences in float64; the one-line errors of missing or unfit files."""

import dataclasses
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64

from idiff_cli.diffusion import clip_vision
from idiff_cli.errors import UserError
from idiff_cli.implicit import aesthetic

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "clip_tiny"
HEAD = FIXTURE / aesthetic.HEAD_FILE  # the published name: the fixture directory is a --reward-weights

# float32 tolerance, as in test_clip_text.py: torch's float32 outputs differ from its float64 run by rounding
# accumulated through the layers (image_embeds: 4.3e-7 on values up to 2.5); the port rounds as often in another
# order, so allow ten times torch's own distance from float64 (measured 1.2–1.5×; a misplaced weight moves the
# outputs by O(1)).
F32_FACTOR = 10
# bfloat16 activations (float32 weights, LayerNorm statistics and softmax): a few u = 2^-8 of the output's scale.
BF16_REL = 12 * 2.0**-8
# Preprocessing against CLIPImageProcessor (PIL) on uint8 images, per pixel on the [0, 1] scale: PIL rounds its
# horizontal pass's result and its output to uint8, so the two differ by at most ½ (1 + L) / 255, L ≤ 1.27 the
# ℓ1 norm of one output pixel's bicubic weights (clip_vision's docstring); the fixture's images stay inside
# [64, 191], so PIL's clipping never acts. 1e-6: float32 rounding of the normalisation. Measured: 0.99 / 255.
PIL_ROUNDING = 0.5 * (1 + 1.3) / 255 + 1e-6


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(FIXTURE / "reference.npz"))


@pytest.fixture(scope="module")
def tower():
    return clip_vision.load(FIXTURE)


def nhwc(pixel_values):
    return jnp.asarray(np.transpose(pixel_values, (0, 2, 3, 1)))


def test_image_embeds_equal_transformers(reference, tower):
    """last_hidden_state, pooler_output and image_embeds of the tiny CLIPModel's vision tower (get_image_features)."""
    apply = jax.jit(lambda p, x: tower.module.apply(p, x, all_outputs=True))
    out = apply(tower.params, nhwc(reference["pixel_values"]))
    assert out.image_embeds.shape == (3, 16) and out.image_embeds.dtype == jnp.float32
    assert out.last_hidden_state.shape == (3, 17, 32)
    for name in ("last_hidden_state", "pooler_output", "image_embeds"):
        want = reference[f"{name}_f64"]
        tol = F32_FACTOR * np.max(np.abs(reference[name] - want))
        np.testing.assert_allclose(np.asarray(getattr(out, name)), want, rtol=0, atol=tol, err_msg=name)


def test_bfloat16_activations_stay_near_transformers(reference):
    bf16 = clip_vision.load(FIXTURE, dtype=jnp.bfloat16)
    got = np.asarray(jax.jit(bf16.module.apply)(bf16.params, nhwc(reference["pixel_values"])))
    want = reference["image_embeds_f64"]
    err = np.max(np.abs(got - want))
    assert got.dtype == np.float32
    assert F32_FACTOR * np.max(np.abs(reference["image_embeds"] - want)) < err <= BF16_REL * np.max(np.abs(want)), err


@pytest.mark.parametrize("name", ["tall", "wide", "up"])
def test_preprocessing_matches_clip_image_processor(reference, tower, name):
    """uint8 images of 24×20 (resized to 19×16, crop rows 1..16), 20×30 (16×24, columns 4..19) and 12×14 (upsampled
    to 16×18, columns 1..16) through the fixture's preprocessor_config.json (its own mean and std), against
    CLIPImageProcessor's pixel values. A bilinear resize, one without antialiasing (when downsampling), or a crop
    one pixel off, each fails the same bound three times over."""
    images = jnp.asarray(reference[f"images_{name}"], jnp.float32) / 127.5 - 1
    want = np.transpose(reference[f"pixel_values_{name}"], (0, 2, 3, 1))
    pre = tower.preprocessing
    std = np.asarray(pre.image_std)

    def error(pixels):
        return np.max(np.abs(np.asarray(pixels) - want) * std)

    assert pre.image_mean == (0.5, 0.45, 0.4)  # read from the file: not CLIP's
    assert error(pre(images)) <= PIL_ROUNDING
    wrong = [dataclasses.replace(pre, method="linear")] + ([dataclasses.replace(pre, antialias=False)]
                                                           if name != "up" else [])
    for preprocessing in wrong:
        assert error(preprocessing(images)) > 3 * PIL_ROUNDING, preprocessing
    # The crop's offset: the resized image uncropped, then cropped at each offset within a pixel of the right one.
    h, w = pre.resized_shape(*images.shape[1:3])
    full = np.asarray(dataclasses.replace(pre, crop_size=(h, w))(images))
    top, left = (h - 16) // 2, (w - 16) // 2
    assert (h, w, top, left) == {"tall": (19, 16, 1, 0), "wide": (16, 24, 0, 4), "up": (16, 18, 0, 1)}[name]
    for dt, dl in ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)):
        t, l = top + dt, left + dl
        if 0 <= t <= h - 16 and 0 <= l <= w - 16:
            err = error(full[:, t:t + 16, l:l + 16])
            assert err <= PIL_ROUNDING if (dt, dl) == (0, 0) else err > 3 * PIL_ROUNDING, (dt, dl, err)


def test_aesthetic_head_on_fixed_embeddings_equals_torch(reference):
    head = aesthetic.read_head(HEAD)
    assert [k.shape for k, _ in head] == [(16, 12), (12, 8), (8, 6), (6, 4), (4, 1)]  # layers 0, 2, 4, 6, 7
    got = np.asarray(aesthetic.head_apply(head, jnp.asarray(reference["head_embeds"])))
    tol = F32_FACTOR * np.max(np.abs(reference["head_out"] - reference["head_out_f64"]))
    np.testing.assert_allclose(got, reference["head_out_f64"], rtol=0, atol=tol)


def test_aesthetic_score_of_pixel_values_equals_torch(reference):
    """head(e / ‖e‖) of the CLIP embeddings of fixed pixel values (preprocessing left out), as ddpo-pytorch's
    AestheticScorer computes it after its processor."""
    reward = aesthetic.load(FIXTURE, HEAD)
    assert reward.channels == (3,)
    e = jax.jit(reward.clip_module.apply)(reward.clip_params, nhwc(reference["pixel_values"]))
    got = np.asarray(aesthetic.head_apply(reward.head_params, e / jnp.linalg.norm(e, axis=-1, keepdims=True)))
    tol = F32_FACTOR * max(np.max(np.abs(reference["aesthetic"] - reference["aesthetic_f64"])),
                           np.max(np.abs(reference["image_embeds"] - reference["image_embeds_f64"])))
    np.testing.assert_allclose(got, reference["aesthetic_f64"], rtol=0, atol=tol)


def test_aesthetic_gradient_equals_central_finite_differences():
    """∇ₓ Σ_b c_b R(x_b) through the preprocessing (a 20×24 image resized to 16×19 and cropped), CLIP, the
    normalisation and the head, in float64, against central differences along random directions: the reward
    passed to jit as a pytree argument, images with an extra leading axis as vmap gives them."""
    with enable_x64(True):
        reward = aesthetic.load(FIXTURE, HEAD, dtype=jnp.float64, param_dtype=np.float64)
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.uniform(-1, 1, (2, 1, 20, 24, 3)))
        c = jnp.asarray(rng.normal(size=(2, 1)))
        objective = jax.jit(lambda r, x: jnp.sum(c * r(x)))
        value, grad = jax.jit(jax.value_and_grad(lambda x, r: jnp.sum(c * r(x))))(x, reward)
        assert grad.dtype == jnp.float64 and jax.eval_shape(reward, x).shape == (2, 1)
        assert np.all(np.isfinite(np.asarray(grad))) and np.abs(np.asarray(grad)).max() > 0
        np.testing.assert_allclose(float(objective(reward, x)), float(value), rtol=1e-12)
        eps = 1e-4
        for _ in range(3):
            v = jnp.asarray(rng.normal(size=x.shape))
            fd = (float(objective(reward, x + eps * v)) - float(objective(reward, x - eps * v))) / (2 * eps)
            # central differences: O(eps²) truncation (~1e-8 here) and roundoff ~1e-16/eps
            np.testing.assert_allclose(float(jnp.vdot(grad, v)), fd, rtol=1e-6, atol=1e-9)


def test_vit_l14_has_transformers_parameter_count():
    """openai/clip-vit-large-patch14's vision fields (as its config.json gives them) build a network with the
    parameter count of transformers' CLIPVisionModelWithProjection."""
    published = json.loads((FIXTURE / "clip_vit_l14.json").read_text())
    fields = clip_vision.vision_fields({"model_type": "clip", "projection_dim": published["projection_dim"],
                                        "vision_config": published["vision_config"]})
    model = clip_vision.CLIPVisionEncoder(**fields)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
    count = sum(leaf.size for leaf in jax.tree_util.tree_leaves(shapes))
    assert count == published["vision_param_count"] == 303_966_208


def test_config_forms():
    """CLIPConfig: the top-level projection_dim sizes the projection (the vision config's 512 is CLIPModel's unused
    default), a vision_config_dict overrides vision_config; a CLIPVisionConfig gives its own projection_dim."""
    config = json.loads((FIXTURE / "config.json").read_text())
    assert config["vision_config"]["projection_dim"] == 512
    assert clip_vision.vision_fields(config)["projection_dim"] == 16
    older = {**config, "vision_config_dict": {"num_hidden_layers": 24}}
    assert clip_vision.vision_fields(older)["num_hidden_layers"] == 24
    vision = {**config["vision_config"], "projection_dim": 8}
    assert clip_vision.vision_fields(vision)["projection_dim"] == 8
    with pytest.raises(UserError, match=r"^config.json: neither a CLIPConfig .* \(model_type 'bert'\)"):
        clip_vision.vision_fields({"model_type": "bert"})


def test_preprocessor_config_forms(tmp_path):
    """The published file's older form (integer size and crop_size), and CLIP's statistics without a file."""
    assert clip_vision.read_preprocessing(tmp_path, 16) == clip_vision.Preprocessing(16, (16, 16))
    assert clip_vision.Preprocessing().image_mean == (0.48145466, 0.4578275, 0.40821073)
    assert clip_vision.Preprocessing().image_std == (0.26862954, 0.26130258, 0.27577711)
    published = {"crop_size": 16, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                 "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.1, 0.2, 0.3],
                 "image_std": [0.4, 0.5, 0.6], "resample": 3, "size": 20}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(published))
    assert clip_vision.read_preprocessing(tmp_path, 16) == clip_vision.Preprocessing(
        20, (16, 16), (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**published, "resample": 0}))
    with pytest.raises(UserError, match=r"preprocessor_config.json: resample = 0 is not supported \(3: bicubic"):
        clip_vision.read_preprocessing(tmp_path, 16)


def copy_of_fixture(tmp_path, leave_out=()):
    directory = tmp_path / "clip"
    directory.mkdir()
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        if name not in leave_out:
            shutil.copy(FIXTURE / name, directory / name)
    return directory


@pytest.mark.parametrize("leave_out", ["directory", "config.json", "model.safetensors"])
def test_missing_clip_files_are_one_line_naming_the_path(tmp_path, leave_out):
    directory = tmp_path / "absent" if leave_out == "directory" else copy_of_fixture(tmp_path, (leave_out,))
    with pytest.raises(UserError) as error:
        aesthetic.load(directory, HEAD)
    message = str(error.value)
    assert "\n" not in message and f"'{directory}'" in message, message
    assert message.endswith("huggingface-cli download openai/clip-vit-large-patch14 config.json model.safetensors "
                            "--local-dir DIR"), message
    if leave_out != "directory":
        assert f"has no {leave_out}" in message


def test_missing_head_is_one_line_naming_the_path(tmp_path):
    with pytest.raises(UserError) as error:
        aesthetic.load(FIXTURE, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    message = str(error.value)
    assert "\n" not in message and f"'{tmp_path / 'sac+logos+ava1-l14-linearMSE.pth'}' does not exist" in message
    assert message.endswith("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                            "sac+logos+ava1-l14-linearMSE.pth"), message


def test_unfit_heads_are_refused_in_one_line(tmp_path, monkeypatch):
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match=r"^cannot read '.*junk.pth' as a PyTorch state dict \("):
        aesthetic.read_head(tmp_path / "junk.pth")
    state = aesthetic.read_state_dict(HEAD)
    wider = {**state, "layers.0.weight": np.zeros((12, 8), np.float32)}
    monkeypatch.setattr(aesthetic, "read_state_dict", lambda path: wider)
    with pytest.raises(UserError, match=r"takes 8-d embeddings; the CLIP model in '.*' makes 16-d ones"):
        aesthetic.load(FIXTURE, HEAD)
    monkeypatch.setattr(aesthetic, "read_state_dict", lambda path: {**state, "layers.3.weight": np.zeros((2, 2))})
    with pytest.raises(UserError, match=r"layers.3 has weight only"):
        aesthetic.read_head(HEAD)
