"""The image rewards of `idiff finetune` (implicit/rewards.py) and their names (registry.py).

digit:N is checked against the FID classifier's own prediction on real held-out digits; the JPEG
rewards against PIL's encoded length computed here, byte for byte (sizes are whole bytes / 1000, so
float32 holds them to its rounding, 1e-6 relative).
"""

from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from idiff_cli import classifiers, registry
from idiff_cli.data.embedded import mnist_digits
from idiff_cli.errors import UserError
from idiff_cli.images import from_uint8
from idiff_cli.implicit.rewards import Prompts, check_reward, takes_prompts

CHOICES = ("valid choices: aesthetic, brightness, clip-score, compressibility, digit:N, incompressibility, "
           "jpeg-compressibility, jpeg-incompressibility, red, or package.module:function")


def reward(name):
    return registry.get("image-reward", name)


def held_out_digits(per_class: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [10·per_class, 28, 28, 1] and labels: positions 400.. of each class, which the FID
    classifier did not train on (classifiers.FID trains on positions 0..399)."""
    images, labels = mnist_digits()
    idx = np.array([c * classifiers.PER_CLASS + classifiers.FID.train[1] + k for c in range(10) for k in range(per_class)])
    return images[idx], labels[idx]


# ---- digit:N ----

def test_digit_rewards_are_the_fid_classifiers_class_log_probabilities():
    pixels, labels = held_out_digits()
    x = jnp.asarray(from_uint8(pixels))
    logp = np.stack([np.asarray(reward(f"digit:{n}")(x)) for n in range(10)], axis=1)  # [50, 10]
    # log-probabilities: each ≤ 0 and the ten classes' probabilities sum to 1 (float32 softmax: 1e-5).
    assert (logp <= 0).all()
    np.testing.assert_allclose(np.exp(logp).sum(axis=1), 1.0, atol=1e-5)
    # The classifier's own labels (labels_fn on pixels / 255, its input scale) are the argmax over N:
    # the reward reads x in [-1, 1] on the classifier's scale.
    params, _ = classifiers.load_or_train()
    predicted = np.asarray(classifiers.labels_fn(params)(pixels.astype(np.float32) / 255.0))
    np.testing.assert_array_equal(logp.argmax(axis=1), predicted)
    # Real digits of class c: digit:c has the highest mean reward over the five of them.
    mean = np.stack([logp[labels == c].mean(axis=0) for c in range(10)])  # [true class, N]
    np.testing.assert_array_equal(mean.argmax(axis=1), np.arange(10))


def test_digit_reward_has_a_finite_nonzero_gradient_and_fits_only_mnist_images():
    r = reward("digit:7")
    x = jnp.asarray(from_uint8(held_out_digits(1)[0]))
    g = jax.grad(lambda y: jnp.sum(r(y)))(x)
    assert g.shape == x.shape and bool(jnp.isfinite(g).all()) and float(jnp.abs(g).max()) > 0
    check_reward(r, "digit:7", (28, 28, 1))
    with pytest.raises(UserError, match=r"^reward 'digit:7' takes 28×28×1 images; this model makes 32×32×3 images$"):
        check_reward(r, "digit:7", (32, 32, 3))


def test_digit_rewards_share_one_load_of_the_classifier():
    assert reward("digit:3").params is reward("digit:8").params


# ---- compressibility / incompressibility ----

def pil_kb(pixels: np.ndarray) -> float:
    """The oracle: kB (bytes / 1000) of PIL's JPEG at quality 95 of one uint8 image [H, W, 1 or 3]."""
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    assert image.mode == ("L" if pixels.shape[-1] == 1 else "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return len(buffer.getvalue()) / 1000


def images(channels: int) -> np.ndarray:
    """uint8 [4, 28, 28, C]: flat grey, uniform noise, a smooth ramp, a real digit (tiled over C)."""
    noise = np.random.default_rng(0).integers(0, 256, (28, 28, channels), dtype=np.uint8)
    ramp = np.broadcast_to(np.linspace(0, 255, 28, dtype=np.uint8)[None, :, None], (28, 28, channels))
    digit = np.repeat(mnist_digits()[0][0], channels, axis=-1)
    return np.stack([np.full((28, 28, channels), 128, np.uint8), noise, ramp, digit])


@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_rewards_are_plus_minus_pils_encoded_size_in_kb(channels):
    pixels = images(channels)
    x = jnp.asarray(from_uint8(pixels))
    expected = np.array([pil_kb(p) for p in pixels])
    np.testing.assert_allclose(np.asarray(reward("incompressibility")(x)), expected, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(reward("compressibility")(x)), -expected, rtol=1e-6)
    # A flat image is more compressible than noise, under both signs.
    c, i = np.asarray(reward("compressibility")(x)), np.asarray(reward("incompressibility")(x))
    assert c[0] > c[1] and i[0] < i[1]


def test_jpeg_reward_works_under_jit_vmap_and_a_batch_split_over_two_devices():
    r = reward("incompressibility")
    x = jnp.asarray(from_uint8(images(1)))
    expected = np.asarray(r(x))
    np.testing.assert_array_equal(np.asarray(jax.jit(r)(x)), expected)
    # vmap over a leading axis (as the queue's slots are vmapped): [2, 4, H, W, C] -> [2, 4].
    stacked = jnp.stack([x, x[::-1]])
    np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(r))(stacked)), np.stack([expected, expected[::-1]]))
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 XLA devices (tests/conftest.py sets 2 host devices)")
    mesh = Mesh(np.array(jax.devices()[:2]), ("batch",))
    split = jax.device_put(x, NamedSharding(mesh, PartitionSpec("batch")))
    # Automatic partitioning: the batch is gathered for one host call.
    np.testing.assert_array_equal(np.asarray(jax.jit(r)(split)), expected)
    # Manual partitioning: each device's call sees its own half of the batch.
    per_device = jax.jit(jax.shard_map(r, mesh=mesh, in_specs=PartitionSpec("batch"), out_specs=PartitionSpec("batch")))
    np.testing.assert_array_equal(np.asarray(per_device(split)), expected)


def test_jpeg_rewards_are_refused_by_methods_that_need_the_gradient():
    r = reward("compressibility")
    with pytest.raises(UserError, match=r"^reward 'compressibility' is not differentiable: --method implicit needs "
                                        r"∇R; use --method ddpo$"):
        check_reward(r, "compressibility", (28, 28, 1), method="implicit")
    check_reward(r, "compressibility", (28, 28, 1), needs_gradient=False)
    check_reward(r, "compressibility", (32, 32, 3), needs_gradient=False)
    with pytest.raises(UserError, match=r"^reward 'compressibility' takes images with 1 or 3 channels; this model "
                                        r"makes 4-channel images$"):
        check_reward(r, "compressibility", (28, 28, 4), needs_gradient=False)
    with pytest.raises(ValueError, match="JVP"):
        jax.grad(lambda y: jnp.sum(r(y)))(jnp.zeros((2, 28, 28, 1)))


# ---- prompt-aware rewards ----

def test_a_reward_is_prompt_aware_by_its_second_parameter_or_its_declaration():
    """reward(images, prompts) by a second positional parameter without a default or named `prompts`, or
    `takes_prompts`; an optional second parameter of another name keeps a reward image-only."""
    def scaled(x, scale=2.0):
        return scale * jnp.mean(x, axis=(1, 2, 3))

    class Declared:
        takes_prompts = True

        def __call__(self, *args):
            return jnp.mean(args[0], axis=(1, 2, 3)) + args[1].ids

    aware = [lambda x, p: x, lambda x, prompts=None: x, Declared()]
    image_only = [reward("brightness"), reward("compressibility"), scaled]
    assert [takes_prompts(r) for r in aware + image_only] == [True] * 3 + [False] * 3


def test_check_reward_gives_a_prompt_aware_reward_its_prompts_and_refuses_an_unconditional_model():
    texts = ("a cat", "a dog")
    seen = []

    def by_prompt(images, prompts):
        seen.append((prompts.ids.shape, prompts.texts))
        return jnp.mean(images, axis=(1, 2, 3)) * jnp.asarray([1.0, -1.0])[prompts.ids]

    check_reward(by_prompt, "by_prompt", (8, 8, 3), texts=texts)
    assert seen[0] == ((2,), texts)
    with pytest.raises(UserError, match=r"^reward 'by_prompt' takes prompts \(reward\(images, prompts\)\); this "
                                        r"model is unconditional: its images have no prompts or class labels$"):
        check_reward(by_prompt, "by_prompt", (8, 8, 3))
    ids = jnp.asarray([1, 0, 1])
    assert jax.jit(by_prompt)(jnp.ones((3, 8, 8, 3)), Prompts(ids, texts)).tolist() == [-1.0, 1.0, -1.0]


# ---- names ----

def test_registry_lists_every_reward_and_resolves_digit_names_before_plug_ins(tmp_path, monkeypatch):
    assert CHOICES == "valid choices: " + registry.choices_text("image-reward")
    assert reward("digit:7").digit == 7
    for bad in ("digit:12", "digit:x", "digit:07", "digit:"):
        with pytest.raises(UserError) as info:
            reward(bad)
        assert str(info.value) == f"unknown image-reward '{bad}' (digit:N takes N in 0..9); {CHOICES}"
    with pytest.raises(UserError, match=f"^unknown image-reward 'sparkle'; {CHOICES}$"):
        reward("sparkle")
    # A plug-in `package.module:function` whose module is not a family's prefix still resolves.
    (tmp_path / "digit_plugins.py").write_text("def bluish(x):\n    return x.mean(axis=(1, 2, 3))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert reward("digit_plugins:bluish").__name__ == "bluish"


def test_a_registered_family_resolves_its_members_and_only_them(monkeypatch):
    monkeypatch.setattr(registry, "_FAMILIES", {})  # this test's family stays out of the session's registry
    registry.register("test-family", "size:N", lambda n: 10 * n, values=range(2, 5))
    registry.register("test-family", "depth-K", lambda k: -k)  # spelled with a hyphen, every integer K
    assert registry.names("test-family") == ["depth-K", "size:N"]
    assert (registry.get("test-family", "size:3"), registry.get("test-family", "depth-12")) == (30, -12)
    with pytest.raises(UserError, match=r"^unknown test-family 'size:5' \(size:N takes N in 2..4\)"):
        registry.get("test-family", "size:5")
    for bad in ("depth-x", "depth-07", "depth-", "depth--1"):
        with pytest.raises(UserError, match=rf"^unknown test-family '{bad}' \(depth-K takes an integer K\); valid"):
            registry.get("test-family", bad)
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("test-family", "size:N", lambda n: n, values=range(3))
    with pytest.raises(ValueError, match="a family is named 'prefix:N'"):
        registry.register("test-family", "size", lambda n: n, values=range(3))


def test_the_cli_refuses_an_out_of_range_digit_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from idiff_cli.cli import app

    result = CliRunner().invoke(app, ["finetune", "--reward", "digit:12", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: unknown image-reward 'digit:12' (digit:N takes N in 0..9); {CHOICES}"
    assert not (tmp_path / "run").exists()
