"""A 2-D convolution whose gradients XLA:CPU runs on its fast path inside loops too.

XLA:CPU runs a convolution through Eigen only when it is *canonical* (input NHWC, kernel HWIO, output
NHWC). JAX's gradients of a convolution are convolutions with other dimension numbers (∂x: kernel
HWOI; ∂w: batch and feature swapped), and XLA's CPU pass that rewrites them into canonical ones with
transposes (ConvCanonicalization) visits only the top-level computation, not the body of a while loop.
So the adjoint's reverse `lax.scan` of U-Net vjps fell to the generic loop emitter, several times
slower than the same vjps unrolled (benchmarks/conv.py; docs/results.md, "Canonical-gradient convolutions").

`conv` computes the same convolution with a `custom_vjp` whose two gradients are written as
canonical convolutions with explicit transposes, so every convolution of the U-Net, its vjp and its
vjp inside any loop, is canonical. For stride s, kernel k and padding (lo, hi) per spatial axis:

    ∂x = conv(g dilated by s, flip(w) with I ↔ O, padding (k − 1 − lo, n_in − 1 + lo − (n_out − 1)s)),
    ∂w = conv(x with B ↔ C, g as a kernel dilated by s, padding (lo, k + (n_out − 1)s − n_in − lo)),

each padding the one that gives the output its size (n_in, and k). Pass it to Flax as
`nn.Conv(..., conv_general_dilated=conv)`.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

NHWC = ("NHWC", "HWIO", "NHWC")


def conv(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding, lhs_dilation=None,
         rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1, precision=None,
         preferred_element_type=None) -> jax.Array:
    """`lax.conv_general_dilated` for x [B, H, W, C_in] and w [k_h, k_w, C_in, C_out] (NHWC / HWIO),
    strides and padding ('SAME', 'VALID' or pairs) of any kind; no dilation, no feature groups."""
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    canonical = lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
    dilated = any(d != 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
    if lhs.ndim != 4 or dn != canonical or dilated or feature_group_count != 1 or preferred_element_type is not None:
        raise ValueError(f"conv takes 2-D NHWC/HWIO convolutions without dilation or groups, got dimension numbers "
                         f"{dimension_numbers}, dilations {lhs_dilation}/{rhs_dilation}, groups {feature_group_count}")
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _conv(lhs, rhs, strides, pads, precision)


def _plain(x, w, strides, pads, precision, lhs_dilation=None, rhs_dilation=None):
    return lax.conv_general_dilated(x, w, strides, pads, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                                   dimension_numbers=NHWC, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, strides, pads, precision):
    return _plain(x, w, strides, pads, precision)


def _fwd(x, w, strides, pads, precision):
    return _plain(x, w, strides, pads, precision), (x, w)


def _bwd(strides, pads, precision, residuals, g):
    x, w = residuals
    n_in, k, n_out = x.shape[1:3], w.shape[:2], g.shape[1:3]
    # ∂x: g dilated by the strides, correlated with the flipped kernel, I and O swapped (HWIO again)
    pads_x = [(kk - 1 - lo, ni - 1 + lo - (no - 1) * s) for ni, kk, no, s, (lo, _) in zip(n_in, k, n_out, strides, pads)]
    dx = _plain(g, jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2), (1, 1), pads_x, precision, lhs_dilation=strides)
    # ∂w[i, j, c, o] = Σ_b,y,z x_pad[b, s·y + i, s·z + j, c] g[b, y, z, o]: a convolution of x with B ↔ C
    # (batch C_in, features B) by g as a [H_out, W_out, B, C_out] kernel dilated by the strides
    pads_w = [(lo, kk + (no - 1) * s - ni - lo) for ni, kk, no, s, (lo, _) in zip(n_in, k, n_out, strides, pads)]
    dw = _plain(x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), (1, 1), pads_w, precision, rhs_dilation=strides)
    return dx, dw.transpose(1, 2, 0, 3)


_conv.defvjp(_fwd, _bwd)
