"""diffusion/conv.py: the same values and gradients as `lax.conv_general_dilated`, and a U-Net vjp inside
`lax.scan` that compiles to canonical convolutions only (the XLA:CPU fast path)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64, lax

from idiff_cli.diffusion.conv import NHWC, conv
from idiff_cli.diffusion.unet import UNet

# (image size, kernel, stride, padding): odd and even sizes, strides 1 and 2, 1×1 kernels, uneven pads
CASES = [(8, 3, 1, "SAME"), (8, 3, 2, "SAME"), (7, 3, 2, "SAME"), (8, 1, 1, "SAME"), (9, 3, 2, "VALID"),
         (6, 3, 1, ((2, 0), (1, 1)))]


@pytest.mark.parametrize("size,k,stride,padding", CASES)
def test_value_and_gradients_equal_lax(size, k, stride, padding):
    """Float64; tolerance 1e-12 of the largest entry: each output is a sum of at most k²·C·B products of
    O(1) numbers, so the two summation orders differ by round-off ~1e-15 relative."""
    with enable_x64(True):
        keys = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(keys[0], (2, size, size, 3), jnp.float64)
        w = jax.random.normal(keys[1], (k, k, 3, 5), jnp.float64)
        ref = lambda x, w: lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=NHWC)  # noqa: E731
        mine = lambda x, w: conv(x, w, (stride, stride), padding, dimension_numbers=NHWC)  # noqa: E731
        y, vjp_ref = jax.vjp(ref, x, w)
        y_mine, vjp_mine = jax.vjp(mine, x, w)
        g = jax.random.normal(keys[2], y.shape, jnp.float64)
        for a, b in zip((y, *vjp_ref(g)), (y_mine, *vjp_mine(g))):
            assert a.shape == b.shape
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-12 * float(jnp.max(jnp.abs(a))))


def test_dilated_or_grouped_convolutions_are_refused():
    x, w = jnp.zeros((1, 8, 8, 4)), jnp.zeros((3, 3, 2, 4))
    with pytest.raises(ValueError, match="groups 2"):
        conv(x, w, (1, 1), "SAME", dimension_numbers=NHWC, feature_group_count=2)
    with pytest.raises(ValueError, match="dilations"):
        conv(x, jnp.zeros((3, 3, 4, 4)), (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=NHWC)


@pytest.mark.slow  # compiles a U-Net's VJP in a scan
def test_unet_vjp_inside_a_scan_compiles_to_canonical_convolutions():
    """The adjoint's reverse scan of U-Net vjps (with a strided down-sampling conv): every convolution
    XLA:CPU compiles is NHWC × HWIO -> NHWC. With flax's default nn.Conv the gradients inside the
    loop body keep JAX's dimension numbers (b01f_01oi, f01b_i01o), which run ~9× slower."""
    net = UNet(ch=4, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), groups=2)
    x = jnp.zeros((2, 8, 8, 1))
    shapes = jax.eval_shape(net.init, jax.random.key(0), x, jnp.zeros(2))
    params = jax.tree.map(lambda s: jnp.full(s.shape, 0.1, s.dtype), shapes)

    def walk(params, x):
        def body(a, level):
            _, vjp = jax.vjp(lambda p, y: net.apply(p, y, jnp.full((2,), level)), params, x)
            g, a = vjp(a)
            return a, g

        return jax.lax.scan(body, x, jnp.linspace(0.1, 0.9, 3))

    hlo = jax.jit(walk).lower(params, x).compile().as_text()
    labels = set(re.findall(r" convolution\(.*?dim_labels=([^,\s]+)", hlo))
    assert labels == {"b01f_01io->b01f"}, labels
