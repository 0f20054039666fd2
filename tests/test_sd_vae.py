"""The Stable Diffusion VAE (idiff_cli/diffusion/vae.py) against diffusers' AutoencoderKL: the tiny random VAE
of tests/fixtures/sd_tiny/sd1 (tools/make_sd_fixture.py: block_out_channels (8, 16), 4 norm groups, norm
parameters randomised) decoding the stored latents and encoding the stored images, and SD 1.5's published
config (its parameter count as diffusers counts it)."""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from idiff_cli.diffusion import vae
from idiff_cli.errors import UserError

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "sd_tiny"
VAE = FIXTURE / "sd1" / "vae"

# float32 tolerance: torch's float32 outputs differ from its float64 run by float32 rounding accumulated
# through the network (|f32 − f64| ≈ 2e-6 on outputs of size ~1.7 here). The Flax network rounds as often
# but sums in another order, so its distance from the float64 run is of the same order without being equal:
# allow ten times torch's own (measured: 0.9× for the decoder, 1.1× for the mean), still five orders of
# magnitude below what a misplaced weight does (a swapped GroupNorm scale/bias moves outputs by ~0.1).
F32_FACTOR = 10
# bfloat16 activations (float32 weights, GroupNorm statistics and softmax): each rounding is off by up to
# u = 2^-8 relative; through ~20 layers the output is off by a few u of its scale (measured 3.2 u for the
# mean, 5.3 u for the decoder): allow 12 u of the float64 output's largest magnitude.
BF16_REL = 12 * 2.0**-8


def nhwc(a):
    return jnp.asarray(np.asarray(a, np.float32).transpose(0, 2, 3, 1))


def nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def oracle():
    return np.load(FIXTURE / "oracle_sd1.npz")


@pytest.fixture(scope="module")
def loaded():
    """(fields, variables) of the fixture's VAE."""
    fields = vae.vae_fields(json.loads((VAE / "config.json").read_text()))
    model = vae.AutoencoderKL(**fields)
    return fields, vae.vae_params(model, load_file(str(VAE / "diffusion_pytorch_model.safetensors")), str(VAE))


def run(fields, variables, method, x, dtype=jnp.float32):
    model = vae.AutoencoderKL(**fields, dtype=dtype)
    return jax.jit(functools.partial(model.apply, method=method))(variables, nhwc(x))


def f32_tolerance(oracle, name):
    return F32_FACTOR * np.max(np.abs(oracle[name] - oracle[f"{name}_f64"]))


def test_decode_equals_diffusers(oracle, loaded):
    got = nchw(run(*loaded, "decode", oracle["vae_z"]))
    assert got.shape == (2, 3, 16, 16) and got.dtype == np.float32
    np.testing.assert_allclose(got, oracle["vae_decoded_f64"], rtol=0, atol=f32_tolerance(oracle, "vae_decoded"))


def test_encode_equals_diffusers(oracle, loaded):
    """mean against the float64 run; logvar (the other half of the same output convolution, clamped) against
    torch's float32 run with the mean's tolerance doubled (both sides round)."""
    mean, logvar = (nchw(a) for a in run(*loaded, "encode", oracle["vae_image"]))
    assert mean.shape == logvar.shape == (2, 4, 8, 8)
    tol = f32_tolerance(oracle, "vae_mean")
    np.testing.assert_allclose(mean, oracle["vae_mean_f64"], rtol=0, atol=tol)
    np.testing.assert_allclose(logvar, oracle["vae_logvar"], rtol=0, atol=2 * tol)


def test_bfloat16_activations_stay_near_diffusers(oracle, loaded):
    fields, variables = loaded
    decoded = nchw(run(fields, variables, "decode", oracle["vae_z"], jnp.bfloat16))
    mean, _ = run(fields, variables, "encode", oracle["vae_image"], jnp.bfloat16)
    for got, name in ((decoded, "vae_decoded"), (nchw(mean), "vae_mean")):
        want = oracle[f"{name}_f64"]
        err = np.max(np.abs(got - want))
        assert f32_tolerance(oracle, name) < err <= BF16_REL * np.max(np.abs(want)), (name, err)


def test_older_attention_names_are_read_as_diffusers_reads_them(loaded):
    """query/key/value/proj_attn (VAE files saved before diffusers 0.14) map to to_q/to_k/to_v/to_out.0."""
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, value in load_file(str(VAE / "diffusion_pytorch_model.safetensors")).items():
        for now, before in old.items():
            key = key.replace(f".attentions.0.{now}.", f".attentions.0.{before}.")
        renamed[key] = value
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in renamed
    fields, variables = loaded
    again = vae.vae_params(vae.AutoencoderKL(**fields), renamed, "old")
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool((a == b).all()), variables, again))


def test_sd15_vae_has_diffusers_parameter_count():
    configs = json.loads((FIXTURE / "sd15_configs.json").read_text())
    fields = vae.vae_fields(configs["vae"])
    assert vae.latent_factor(fields) == 8
    shapes = jax.eval_shape(lambda: vae.AutoencoderKL(**fields).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
    count = sum(leaf.size for leaf in jax.tree_util.tree_leaves(shapes))
    assert count == configs["param_counts"]["vae"] == 83_653_863


def test_optional_convolutions_and_mid_attention_follow_the_config():
    config = json.loads((VAE / "config.json").read_text())
    config.update(use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False)
    fields = vae.vae_fields(config)
    assert vae.latent_factor(fields) == 2
    params = jax.eval_shape(lambda: vae.AutoencoderKL(**fields).init(jax.random.key(0), jnp.zeros((1, 2, 2, 3))))
    names = set(params["params"]) | set(params["params"]["encoder"]["mid_block"])
    assert not names & {"quant_conv", "post_quant_conv", "attentions__0"}


def test_an_unsupported_field_is_refused_in_one_line():
    config = json.loads((VAE / "config.json").read_text())
    with pytest.raises(UserError, match=r"^config.json of an AutoencoderKL: unsupported up_block_types entry "
                                        r"'AttnUpDecoderBlock2D' \(supported: UpDecoderBlock2D\)$"):
        vae.vae_fields({**config, "up_block_types": ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]})
