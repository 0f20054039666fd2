"""benchmarks/xla_profile.py: a real trace of a convolution's forward pass and gradients, each thunk
found in the compiled HLO and put in its part."""

import pathlib
import sys

import jax
import jax.numpy as jnp

from idiff_cli.diffusion.conv import conv

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
import xla_profile  # noqa: E402


def test_a_convolution_and_its_two_gradients_land_in_their_parts(tmp_path):
    def loss(w, x):
        y = conv(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jnp.tanh(y) ** 2)

    fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
    w, x = jnp.ones((3, 3, 8, 16)) * 0.1, jax.random.normal(jax.random.key(0), (4, 14, 14, 8))
    jax.block_until_ready(fn(w, x))
    hlo = fn.lower(w, x).compile().as_text()
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        for _ in range(2):
            jax.block_until_ready(fn(w, x))
    (trace,) = tmp_path.glob("**/perfetto_trace.json.gz")
    ms_per_run = {name: ms for name, ms, _ in xla_profile.parts(trace, hlo, 2)}
    for part in ("convolutions, forward", "convolutions, ∂x", "convolutions, ∂w"):
        assert ms_per_run.get(part, 0) > 0, ms_per_run
