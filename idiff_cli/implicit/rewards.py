"""Image rewards R(x): a batch of images [B, H, W, C] in [−1, 1] -> [B] (paper §5.2, Appendix A.2).

Pixel values are read on the [0, 1] scale, (x + 1)/2. The adjoint differentiates R, so a reward must
be a differentiable JAX function; a plug-in `package.module:function` is checked on a batch of the
run's shape before training (`check_reward`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from idiff_cli.errors import UserError
from idiff_cli.registry import register


@register("image-reward", "brightness")
def brightness(x: jax.Array) -> jax.Array:
    """Mean pixel value in [0, 1] (MNIST, Figs 13-15: λ > 0 brighter, λ < 0 darker)."""
    return jnp.mean((x + 1) / 2, axis=tuple(range(1, x.ndim)))


@register("image-reward", "red")
def red(x: jax.Array) -> jax.Array:
    """Mean of the red channel minus the mean of the other channels, in [−1, 1] (CIFAR-10/LSUN, Figs 7, 16)."""
    v = (x + 1) / 2
    return jnp.mean(v[..., 0], axis=(1, 2)) - jnp.mean(v[..., 1:], axis=(1, 2, 3))


red.min_channels = 3  # type: ignore[attr-defined]


def check_reward(reward: Callable, name: str, image_shape: tuple[int, ...], batch: int = 2) -> None:
    """One-line UserError unless `reward` maps [batch, *image_shape] to [batch] reals, differentiably."""
    channels = getattr(reward, "min_channels", 1)
    if image_shape[-1] < channels:
        raise UserError(f"reward '{name}' needs images with >= {channels} channels; this model makes "
                        f"{image_shape[-1]}-channel images (valid for it: brightness, or a plug-in)")
    x = jnp.zeros((batch, *image_shape))
    try:
        out = jax.eval_shape(jax.grad(lambda y: jnp.sum(reward(y))), x), jax.eval_shape(reward, x)
    except Exception as e:  # the user's code: report its failure in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"reward '{name}' fails on a batch of shape {x.shape}: {type(e).__name__}: {first}") from None
    shape = out[1].shape
    if shape != (batch,):
        raise UserError(f"reward '{name}' must map images [B, H, W, C] to [B] rewards; on a batch of shape "
                        f"{x.shape} it returned shape {shape}")
