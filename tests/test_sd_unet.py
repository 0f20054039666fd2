"""CondUNet (idiff_cli/diffusion/sd_unet.py) against diffusers' UNet2DConditionModel: the tiny SD-1.x and
SD-2.x U-Nets of tests/fixtures/sd_tiny (tools/make_sd_fixture.py) loaded from their config.json and
safetensors, run on the oracle's inputs in float32, float64 and bfloat16; SD 1.5's published
architecture counted; an unsupported config refused in one line."""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64
from safetensors.numpy import load_file

from idiff_cli.diffusion.diffusers_io import params_from_tensors
from idiff_cli.diffusion.sd_unet import CondUNet, cond_unet_fields, param_shapes
from idiff_cli.errors import UserError

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "sd_tiny"
SD15_UNET_PARAMS = 859_520_964  # diffusers' count of SD 1.5's UNet2DConditionModel (sd15_configs.json)


@functools.cache
def _source(name: str):
    """(config fields, parameter shapes, state dict, oracle arrays) of the fixture's `name` pipeline."""
    fields = cond_unet_fields(json.loads((FIXTURE / name / "unet" / "config.json").read_text()))
    tensors = load_file(str(FIXTURE / name / "unet" / "diffusion_pytorch_model.safetensors"))
    return fields, param_shapes(CondUNet(**fields)), tensors, dict(np.load(FIXTURE / f"oracle_{name}.npz"))


def _run(name: str, dtype) -> np.ndarray:
    """The network's output on the oracle's inputs, NCHW float64, computed in `dtype` with the params cast
    to it on the host (the float64 run needs enable_x64 around it). The networks are tiny, so compiling
    dominates: XLA's backend optimisation level 0 halves it."""
    fields, shapes, tensors, oracle = _source(name)
    model = CondUNet(**fields, dtype=dtype)
    params = params_from_tensors(shapes, tensors, name, what="UNet2DConditionModel", dtype=dtype)
    inputs = np.float64 if dtype == jnp.float64 else np.float32
    args = (params, oracle["unet_x"].transpose(0, 2, 3, 1).astype(inputs), oracle["unet_t"].astype(inputs),
            oracle["unet_context"].astype(inputs))
    apply = jax.jit(model.apply).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})
    return np.asarray(apply(*args).astype(inputs), np.float64).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_float32_matches_diffusers(name):
    """sd1: 1×1-conv projections, 8 heads everywhere; sd2: Linear projections, per-level heads [2, 4]
    (diffusers' attention_head_dim read as head counts), upcast_attention."""
    out = _run(name, jnp.float32)
    oracle = _source(name)[3]
    # diffusers' own float32 run is off the float64 values by its rounding error; ours rounds in another
    # order (XLA vs torch kernels), so allow ten times that, with a floor for a lucky oracle.
    torch_error = np.abs(oracle["unet_out"] - oracle["unet_out_f64"]).max()
    atol = 10 * torch_error + 1e-6
    np.testing.assert_allclose(out, oracle["unet_out_f64"], rtol=0, atol=atol)


def test_float64_matches_diffusers_float64():
    """In float64 the two networks agree far below float32 rounding (~1e-6 here, what a float32 step
    left in the float64 path would show): what remains (measured 6e-8) is the timestep embedding, which
    diffusers computes in float32 in every dtype (so does CondUNet) and whose float32 sin/cos may differ
    from torch's by an ulp, carried through the network."""
    with enable_x64(True):
        out = _run("sd2", jnp.float64)
    np.testing.assert_allclose(out, _source("sd2")[3]["unet_out_f64"], rtol=0, atol=2e-7)


def test_bfloat16_close_to_diffusers():
    """Computed in bfloat16 (8-bit mantissa: relative rounding up to 2⁻⁹ per operation, ~2⁻⁸ after a
    layer's sums) with float32 norm statistics and softmax: within 4% (~10 × 2⁻⁸) of the output scale
    max|y| everywhere (measured 1.3%; a wrong step would be off by O(100%))."""
    out = _run("sd1", jnp.bfloat16)
    exact = _source("sd1")[3]["unet_out_f64"]
    assert np.abs(out - exact).max() <= 0.04 * np.abs(exact).max()


def test_sd15_parameter_count():
    """SD 1.5's published UNet config builds a network with exactly diffusers' parameter count."""
    config = json.loads((FIXTURE / "sd15_configs.json").read_text())
    shapes = param_shapes(CondUNet(**cond_unet_fields(config["unet"])))
    assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes)) == SD15_UNET_PARAMS


@pytest.mark.parametrize("field, value", [("addition_embed_type", "text_time"),
                                          ("transformer_layers_per_block", 2),
                                          ("up_block_types", ["AttnUpBlock2D"] * 4)])
def test_unsupported_field_refused_in_one_line(field, value):
    config = {**json.loads((FIXTURE / "sd15_configs.json").read_text())["unet"], field: value}
    with pytest.raises(UserError, match=f"unsupported {field}") as info:
        cond_unet_fields(config)
    assert "\n" not in str(info.value) and "supported:" in str(info.value)
