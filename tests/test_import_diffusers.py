"""`idiff import diffusers` against diffusers itself: the fixture of tools/make_diffusers_fixture.py
(diffusers 0.42.1, torch 2.14.1) holds a tiny random UNet2DModel, its ε on fixed (x, t), DDPMScheduler /
DDIMScheduler steps on fixed inputs with explicit noise, and the google/ddpm-cifar10-32 config."""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import invoke
from safetensors.numpy import load_file, save_file

from idiff_cli.diffusion import ddpm, diffusers_io, model, samplers

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "diffusers_tiny"
MODEL = FIXTURE / "model"


@pytest.fixture(scope="module")
def source():
    return diffusers_io.read_source(MODEL)


def nhwc(a):
    return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def epsilon(src, unet=None, params=None):
    oracle = np.load(FIXTURE / "unet_oracle.npz")
    out = (unet or src.model).apply(params or src.params, nhwc(oracle["x"]), jnp.asarray(oracle["t"], jnp.float32))
    return np.asarray(out), oracle["eps"].transpose(0, 2, 3, 1)


# ε is O(1) (max 1.3 here); float32 rounding (1.2e-7 relative) through ~40 layers of sums of up to 600
# terms (64-channel 3×3 convs) in a different order than torch's grows to at most ~√600 · 40 · 1.2e-7 ≈ 1e-4
# on unit-scale values; measured 2.3e-6.
EPS_ATOL = 1e-4


def test_epsilon_equals_diffusers(source):
    got, want = epsilon(source)
    np.testing.assert_allclose(got, want, rtol=0, atol=EPS_ATOL)


def test_a_wrong_time_embedding_misses_the_oracle(source):
    """Negative control: diffusers' other sinusoid order (flip_sin_to_cos) is far outside the tolerance."""
    got, want = epsilon(source, unet=source.model.clone(flip_sin_to_cos=True))
    assert np.max(np.abs(got - want)) > 100 * EPS_ATOL


def test_older_attention_names_are_read_as_diffusers_reads_them(source, tmp_path):
    """query/key/value/proj_attn (checkpoints saved before diffusers 0.14) map to to_q/to_k/to_v/to_out.0."""
    directory = tmp_path / "old"
    shutil.copytree(MODEL, directory)
    new = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    tensors = load_file(str(MODEL / diffusers_io.WEIGHTS))
    renamed = {}
    for key, value in tensors.items():
        for now, old in new.items():
            key = key.replace(f".{now}.", f".{old}.")
        renamed[key] = value
    assert any(".query." in k for k in renamed)
    save_file(renamed, str(directory / diffusers_io.WEIGHTS))
    got, want = epsilon(diffusers_io.read_source(directory))
    np.testing.assert_allclose(got, want, rtol=0, atol=EPS_ATOL)


# Scheduler steps: values up to ~10 (x̂0 = (x − √(1−ᾱ) ε)/√ᾱ before clipping); a handful of float32
# operations on the ᾱ table (cumulative products of 1000 float32 factors, as diffusers computes them).
STEP_ATOL = 1e-5


@pytest.mark.parametrize("case", json.loads((FIXTURE / "scheduler_oracle.json").read_text()),
                         ids=lambda c: f"{c['config']['beta_schedule']}-{c['config']['timestep_spacing']}-T{c['n']}")
def test_scheduler_steps_equal_diffusers(case):
    sde = ddpm.DiscreteDDPM(**diffusers_io.scheduler_fields(case["config"]))
    grid = np.asarray(sde.time_grid(case["n"]))
    assert grid[:-1].astype(int).tolist() == case["timesteps"] and grid[-1] == -1
    for step in case["steps"]:
        t, t_next = grid[step["index"]], grid[step["index"] + 1]
        y, out = jnp.asarray(step["sample"]), jnp.asarray(step["model_output"])
        abar = sde.alpha(t) ** 2
        # what the imported network returns: ε, converted from v for a v-predicting model
        eps = out if sde.prediction_type == "epsilon" else jnp.sqrt(abar) * out + jnp.sqrt(1 - abar) * y
        mean, std = ddpm.ddpm_mean_std(sde, eps, y, t, t_next)
        np.testing.assert_allclose(mean + std * jnp.asarray(step["noise"]), step["ddpm"], rtol=0, atol=STEP_ATOL)
        if "ddim" in step:
            np.testing.assert_allclose(ddpm.ddim_from_eps(sde, eps, y, t, t_next), step["ddim"], rtol=0,
                                       atol=STEP_ATOL)


def test_the_imported_sampler_step_is_diffusers_ddpm_step(source, monkeypatch):
    """The imported model's ancestral sampler (its scheduler_config.json, 10 steps: the oracle's first
    case) stepping from the stored sample on the score s = −ε/σ(t) of the stored model output ε, with the
    stored noise as its draw, gives DDPMScheduler.step's prev_sample at each stored index."""
    case = json.loads((FIXTURE / "scheduler_oracle.json").read_text())[0]
    assert ddpm.DiscreteDDPM(**diffusers_io.scheduler_fields(case["config"])) == source.sde and case["n"] == 10
    sampler = source.sde.sampler(case["n"], "ddpm")
    for step in case["steps"]:
        eps, noise = jnp.asarray(step["model_output"]), jnp.asarray(step["noise"])
        monkeypatch.setattr(samplers.GaussianStep, "noise", lambda self, key, y, noise=noise: noise)
        score = lambda x, t, eps=eps: -eps / source.sde.sigma(t)[:, None, None, None]  # noqa: E731
        got = sampler.step(score, jnp.asarray(step["sample"]), step["index"], jax.random.key(0))
        np.testing.assert_allclose(got, step["ddpm"], rtol=0, atol=STEP_ATOL)


def test_ddpm_cifar10_32_has_diffusers_parameter_count():
    fixture = json.loads((FIXTURE / "ddpm_cifar10_32.json").read_text())
    unet, sde, shape = diffusers_io.build(fixture["config"], fixture["scheduler"])
    shapes = diffusers_io.param_shapes(unet, shape)
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(shapes))
    assert count == fixture["parameters"] == 35_746_307
    assert shape == (32, 32, 3) and sde.variance_type == "fixed_large" and sde.clip_sample


def broken_copy(tmp_path, config=None, scheduler=None, tensors=None):
    directory = tmp_path / "model"
    shutil.copytree(MODEL, directory)
    for name, change in ((diffusers_io.CONFIG, config), (diffusers_io.SCHEDULER, scheduler)):
        if change:
            data = json.loads((directory / name).read_text())
            data.update(change)
            (directory / name).write_text(json.dumps(data))
    if tensors:
        save_file(tensors(load_file(str(MODEL / diffusers_io.WEIGHTS))), str(directory / diffusers_io.WEIGHTS))
    return directory


def drop(key):
    return lambda t: {k: v for k, v in t.items() if k != key}


def renamed(old, new):
    return lambda t: {(new if k == old else k): v for k, v in t.items()}


@pytest.mark.parametrize("change, message", [
    (dict(config={"block_out_channels": [16, 24]}),
     "weight 'down_blocks.1.attentions.0.group_norm.bias' has shape (32,), config.json implies (24,)"),
    (dict(tensors=renamed("conv_in.weight", "conv_inn.weight")),
     "no weight 'conv_in.weight', which config.json implies (shape (16, 3, 3, 3))"),
    (dict(tensors=drop("mid_block.attentions.0.to_q.bias")), "no weight 'mid_block.attentions.0.to_q.bias'"),
    (dict(config={"layers_per_block": 0}), "weight 'down_blocks.0.resnets.0.conv1.bias' (16,) is not a parameter"),
    (dict(config={"class_embed_type": "timestep"}), "unsupported class_embed_type = 'timestep'"),
    (dict(config={"up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]}),
     "unsupported up_block_types entry 'CrossAttnUpBlock2D'"),
    (dict(config={"_class_name": "UNet2DConditionModel"}), "unsupported _class_name 'UNet2DConditionModel'"),
    (dict(scheduler={"variance_type": "learned_range"}), "unsupported variance_type = 'learned_range'"),
    (dict(scheduler={"thresholding": True}), "unsupported thresholding = True"),
])
def test_mismatches_and_unsupported_fields_are_one_line(tmp_path, change, message):
    out = tmp_path / "run"
    result = invoke("import", "diffusers", broken_copy(tmp_path, **change), "--out", out)
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("\n") == 1 and result.output.startswith("error: ")
    assert not out.exists()


@pytest.mark.parametrize("setup, message", [
    (lambda d: (d / diffusers_io.CONFIG).unlink(), "has no config.json (nor unet/config.json): download the whole"),
    (lambda d: (d / diffusers_io.SCHEDULER).unlink(), "has no scheduler_config.json: download it with the model"),
    (lambda d: (d / diffusers_io.WEIGHTS).unlink(), "has no diffusion_pytorch_model.safetensors: download it"),
    (lambda d: (d / diffusers_io.WEIGHTS).rename(d / "diffusion_pytorch_model.bin"),
     "diffusion_pytorch_model.bin' is a torch pickle, which idiff does not read: download the "
     "diffusion_pytorch_model.safetensors of the model, or convert it where torch is installed"),
    (lambda d: (d / diffusers_io.WEIGHTS).write_bytes(b"\x00" * 16), "as safetensors"),
])
def test_missing_files_say_what_to_do(tmp_path, setup, message):
    directory = broken_copy(tmp_path)
    setup(directory)
    result = invoke("import", "diffusers", directory, "--out", tmp_path / "run")
    assert result.exit_code == 2 and message in result.output and result.output.count("\n") == 1, result.output
    assert not (tmp_path / "run").exists()


def test_unknown_format_and_a_used_out_are_refused(tmp_path):
    result = invoke("import", "ckpt", MODEL)
    assert result.exit_code == 2 and "unknown FORMAT 'ckpt'; valid choices: diffusers" in result.output
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x").write_text("")
    result = invoke("import", "diffusers", MODEL, "--out", tmp_path / "run")
    assert result.exit_code == 2 and "is not an empty directory" in result.output


def test_a_pipeline_directory_imports_and_loads_with_the_same_weights(tmp_path, source):
    pipeline = tmp_path / "pipeline"
    shutil.copytree(MODEL, pipeline / "unet")
    (pipeline / "scheduler").mkdir()
    (pipeline / "unet" / diffusers_io.SCHEDULER).rename(pipeline / "scheduler" / diffusers_io.SCHEDULER)
    invoke("import", "diffusers", pipeline, "--out", tmp_path / "run", "--sample-steps", "25", check=True)
    loaded = model.load(tmp_path / "run")
    assert isinstance(loaded, model.ImportedModel) and loaded.image_shape == (16, 16, 3)
    jax.tree.map(np.testing.assert_array_equal, loaded.params, source.params)
    sampler = loaded.sampler()
    assert sampler.n_steps == 25 and sampler.step_fn is ddpm.ddpm_step and not sampler.denoise_final
    with pytest.raises(Exception, match="holds one set of weights"):
        model.load(tmp_path / "run", weights="params")
    result = invoke("sample", tmp_path / "run", "--weights", "params")
    assert result.exit_code == 2 and "holds one set of weights, so weights 'params' does not apply" in result.output
    result = invoke("sample", tmp_path / "run", "--sample-steps", "2000")
    assert result.exit_code == 2 and "2000 sampling steps exceed the model's 1000 training timesteps" in result.output
