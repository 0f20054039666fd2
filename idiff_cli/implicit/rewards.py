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


def check_reward(reward: Callable, name: str, image_shape: tuple[int, ...], batch: int = 2,
                 needs_gradient: bool = True, method: str | None = None) -> None:
    """One-line UserError unless `reward` maps [batch, *image_shape] to [batch] reals, and, when
    `needs_gradient` (a method that differentiates R, named `method`), unless it is differentiable.

    A reward declares what it needs as attributes: `min_channels` (default 1), `image_shape` (the one
    shape it takes, default any) and `differentiable` (default True; False for a host computation such
    as the JPEG size, which only a score-function method such as --method ddpo can use)."""
    channels = getattr(reward, "min_channels", 1)
    if image_shape[-1] < channels:
        raise UserError(f"reward '{name}' needs images with >= {channels} channels; this model makes "
                        f"{image_shape[-1]}-channel images (valid for it: brightness, or a plug-in)")
    required = getattr(reward, "image_shape", None)
    if required is not None and tuple(image_shape) != tuple(required):
        raise UserError(f"reward '{name}' takes {'×'.join(map(str, required))} images; this model makes "
                        f"{'×'.join(map(str, image_shape))} images")
    differentiable = getattr(reward, "differentiable", True)
    if needs_gradient and not differentiable:
        by = f"--method {method}" if method else "a method that differentiates the reward"
        raise UserError(f"reward '{name}' is not differentiable: {by} needs ∇R; use --method ddpo")
    x = jnp.zeros((batch, *image_shape))
    try:
        out = jax.eval_shape(reward, x)
        if differentiable and needs_gradient:
            jax.eval_shape(jax.grad(lambda y: jnp.sum(reward(y))), x)
    except Exception as e:  # the user's code: report its failure in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"reward '{name}' fails on a batch of shape {x.shape}: {type(e).__name__}: {first}") from None
    if out.shape != (batch,):
        raise UserError(f"reward '{name}' must map images [B, H, W, C] to [B] rewards; on a batch of shape "
                        f"{x.shape} it returned shape {out.shape}")
