"""A Stable Diffusion pipeline read without torch and sampled as diffusers samples it: the scheduler
configs, DDIM's steps (η = 0 and 1, `set_alpha_to_one` false), and a whole 4-step guided pipeline call
against diffusers' own output (tests/fixtures/sd_tiny, tools/make_sd_fixture.py).

Tolerances: the fixture holds the pipeline's output in float32 and, from the same modules and inputs in
float64, its float64 output. The float32 round-off of a 4-step guided call (g = 7.5 magnifies the
difference of two U-Net outputs) is the |f32 − f64| of diffusers' own run; ours may differ from diffusers'
by about as much again in the other direction, so each comparison allows 4× that round-off plus a floor
of 1e-6 (values of order 1).
"""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idiff_cli.diffusion import diffusers_io, pipeline_io
from idiff_cli.diffusion.ddpm import DDIMMoments, DiscreteDDPM
from idiff_cli.errors import UserError

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "sd_tiny"


def oracle(name: str):
    return np.load(FIXTURE / f"oracle_{name}.npz")


def nhwc(x: np.ndarray) -> jnp.ndarray:
    return jnp.asarray(np.moveaxis(x, -3, -1))


def tolerance(f32: np.ndarray, f64: np.ndarray) -> float:
    return 4 * float(np.max(np.abs(f32 - f64))) + 1e-6


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def pipeline(request):
    return request.param, pipeline_io.read_pipeline(FIXTURE / request.param)


# ---- the scheduler configs ----


@pytest.mark.parametrize("kind, extra, expected", [
    ("DDPMScheduler", {"variance_type": "fixed_large"}, {"variance_type": "fixed_large", "set_alpha_to_one": True}),
    ("DDIMScheduler", {"set_alpha_to_one": False}, {"set_alpha_to_one": False, "clip_sample": True}),
    ("PNDMScheduler", {"set_alpha_to_one": False, "skip_prk_steps": True}, {"set_alpha_to_one": False}),
    ("EulerDiscreteScheduler", {"timestep_spacing": "linspace", "use_karras_sigmas": False},
     {"timestep_spacing": "linspace", "variance_type": "fixed_small"}),
    ("DPMSolverMultistepScheduler", {"variance_type": None, "algorithm_type": "dpmsolver++"},
     {"variance_type": "fixed_small"}),
])
def test_scheduler_classes_give_their_noise_process(kind, extra, expected):
    """Every scheduler class reads the same noise process (betas, prediction, spacing, offset); the
    fields absent from a file take DDIMScheduler.from_config's defaults."""
    config = {"_class_name": kind, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
              "prediction_type": "v_prediction", "steps_offset": 1, **extra}
    fields = diffusers_io.scheduler_fields(config)
    assert fields["beta_schedule"] == "scaled_linear" and fields["prediction_type"] == "v_prediction"
    assert fields["steps_offset"] == 1
    assert {k: fields[k] for k in expected} == expected


def test_scheduler_refusals_are_one_line():
    with pytest.raises(UserError, match="unsupported _class_name 'LCMScheduler'"):
        diffusers_io.scheduler_fields({"_class_name": "LCMScheduler"})
    with pytest.raises(UserError, match="rescale_betas_zero_snr"):
        diffusers_io.scheduler_fields({"_class_name": "DDIMScheduler", "rescale_betas_zero_snr": True})
    with pytest.raises(UserError, match="prediction_type = 'sample'"):
        diffusers_io.scheduler_fields({"_class_name": "DDIMScheduler", "prediction_type": "sample"})


@pytest.mark.parametrize("name", ["sd1", "sd2"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_steps_equal_diffusers(name, eta):
    """DDIMScheduler.step (from the pipeline's config: set_alpha_to_one false, so the last step lands on
    ᾱ_0; sd2 predicts v) at the 4 steps of set_timesteps(4), the noise of η = 1 made explicit: float32
    arithmetic on values of order 1, so 1e-5."""
    data = oracle(name)
    config = diffusers_io.read_json(FIXTURE / name / "scheduler" / diffusers_io.SCHEDULER)
    sde = DiscreteDDPM(**diffusers_io.scheduler_fields(config))
    assert not sde.set_alpha_to_one
    np.testing.assert_array_equal(np.asarray(sde.time_grid(4))[:-1], data["ddim_timesteps"])
    moments = DDIMMoments(sde.num_train_timesteps // 4, eta)
    for k, t in enumerate(data["ddim_timesteps"]):
        x, out = jnp.asarray(data["ddim_sample"][k]), jnp.asarray(data["ddim_model_output"][k])
        if sde.prediction_type == "v_prediction":
            out = jnp.sqrt(sde.abar(t)) * out + jnp.sqrt(1 - sde.abar(t)) * x
        mean, std = moments(sde, -out / sde.sigma(t), x, float(t), None)
        prev = mean + std * data["ddim_noise"][k]
        expected = data["ddim_prev_eta1" if eta else "ddim_prev_eta0"][k]
        np.testing.assert_allclose(prev, expected, atol=1e-5, rtol=1e-5)


# ---- the whole pipeline ----


@pytest.mark.slow  # the whole guided pipeline, per fixture
def test_guided_pipeline_call_equals_diffusers(pipeline):
    """StableDiffusionPipeline(prompt, negative_prompt, guidance_scale=7.5, 4 DDIM steps, latents) with
    η = 0 end to end, and with η = 1 step by step on diffusers' recorded noise: final latents and images
    (output_type "np" = (x + 1)/2) within the module's tolerance."""
    name, source = pipeline
    data, model, params = oracle(name), source.model, source.params
    ids, _ = model.tokenizer.encode([str(data["pipe_prompt"]), str(data["pipe_negative"])])
    context = model.embed(params, jnp.asarray(ids))
    sampler = model.sde.sampler(4, "ddim")
    latents = nhwc(data["pipe_latents"])
    images = model.sample(params, context[:1], context[1:], jax.random.key(0), sampler, 7.5, latents)
    np.testing.assert_allclose((images + 1) / 2, data["pipe_eta0_images"],
                               atol=tolerance(data["pipe_eta0_images"], data["pipe_eta0_images_f64"]))

    moments = DDIMMoments(model.sde.num_train_timesteps // 4, 1.0)

    def step(z, t_noise):
        t, noise = t_noise
        eps = model.guided_eps(params, z, jnp.full((1,), t), context[:1], context[1:], 7.5)
        mean, std = moments(model.sde, -eps / model.sde.sigma(t), z, t, None)
        return mean + std * noise, None

    noise = jnp.moveaxis(jnp.asarray(data["pipe_eta1_noise"]), -3, -1)
    z, _ = jax.lax.scan(step, latents, (sampler.grid[:-1], noise))
    np.testing.assert_allclose(z, nhwc(data["pipe_eta1_final_latents"]), atol=1e-4)
    np.testing.assert_allclose((model.decode(params, z) + 1) / 2, data["pipe_eta1_images"],
                               atol=tolerance(data["pipe_eta1_images"], data["pipe_eta1_images_f64"]))


def test_fp16_variant_reads_the_half_weights():
    """--variant fp16 reads diffusers' *.fp16.safetensors as float16: the same network within fp16's
    rounding of the weights (relative 2⁻¹¹ per weight)."""
    full, half = pipeline_io.read_pipeline(FIXTURE / "sd1"), pipeline_io.read_pipeline(FIXTURE / "sd1", "fp16")
    for a, b in zip(jax.tree_util.tree_leaves(full.params), jax.tree_util.tree_leaves(half.params)):
        assert b.dtype == jnp.float16
        np.testing.assert_allclose(np.asarray(b, np.float32), a, rtol=2**-10, atol=1e-7)
    with pytest.raises(UserError, match=r"--variant fp16: '.*sd2/unet/diffusion_pytorch_model.fp16.safetensors' "
                                        r"does not exist"):
        pipeline_io.read_pipeline(FIXTURE / "sd2", "fp16")


def copy_pipeline(tmp_path: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(FIXTURE / "sd1", tmp_path / "sd1"))


@pytest.mark.parametrize("kind", ["StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline",
                                  "StableDiffusionControlNetPipeline", "StableDiffusionInpaintPipeline"])
def test_other_pipelines_are_refused_by_name(tmp_path, kind):
    directory = copy_pipeline(tmp_path)
    index = json.loads((directory / "model_index.json").read_text())
    (directory / "model_index.json").write_text(json.dumps({**index, "_class_name": kind}))
    with pytest.raises(UserError, match=f"unsupported pipeline '{kind}'"):
        pipeline_io.read_pipeline(directory)


def test_broken_pipelines_name_the_first_problem(tmp_path):
    directory = copy_pipeline(tmp_path)
    shutil.rmtree(directory / "vae")
    with pytest.raises(UserError, match="has no vae/"):
        pipeline_io.read_pipeline(directory)
    directory = copy_pipeline(tmp_path / "b")
    config = json.loads((directory / "unet" / "config.json").read_text())
    (directory / "unet" / "config.json").write_text(json.dumps({**config, "cross_attention_dim": 16}))
    with pytest.raises(UserError, match="cross_attention_dim 16 differs from the text encoder's hidden_size 32"):
        pipeline_io.read_pipeline(directory)
    directory = copy_pipeline(tmp_path / "c")
    config = json.loads((directory / "unet" / "config.json").read_text())
    (directory / "unet" / "config.json").write_text(json.dumps({**config, "layers_per_block": 2}))
    with pytest.raises(UserError, match=r"no weight 'down_blocks\.0\.attentions\.1\..*which unet/config.json implies"):
        pipeline_io.read_pipeline(directory)
