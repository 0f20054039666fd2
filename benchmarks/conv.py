"""flax's nn.Conv against the canonical-gradient convolution (idiff_cli/diffusion/conv.py), in one run.

On the cpu-preset U-Net at 28×28×1: (a) 4 vjps of the network at batch 8 inside a `lax.scan` and
unrolled (the adjoint's loop), (b) one training-step gradient at batch 32 (pretrain's step, no loop).
XLA:CPU canonicalises only top-level convolutions, so (a) in a scan is where nn.Conv is slow.

Usage: python benchmarks/conv.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from idiff_cli.diffusion import unet
from idiff_cli.diffusion.architectures import cpu_architecture


def seconds(f, *args, repeats: int) -> float:
    jax.block_until_ready(f(*args))  # compile
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(f(*args))
    return (time.perf_counter() - start) / repeats


def measure(conv_module, repeats: int) -> dict:
    unet.Conv = conv_module  # the U-Net looks its convolution up when traced
    net = unet.UNet(**cpu_architecture(28))
    key = jax.random.key(0)
    params = jax.jit(net.init)(key, jnp.zeros((1, 28, 28, 1)), jnp.zeros(1))
    x8, x32 = jax.random.normal(key, (8, 28, 28, 1)), jax.random.normal(key, (32, 28, 28, 1))

    def walk(a, unroll):  # as adjoint.adjoint_walk: the weight gradients summed in the carry
        def body(carry, level):
            a, g = carry
            _, vjp = jax.vjp(lambda p, y: net.apply(p, y, jnp.full((8,), level)), params, a)
            g_step, a = vjp(a)
            return (a, jax.tree.map(jnp.add, g, g_step)), None

        return jax.lax.scan(body, (a, jax.tree.map(jnp.zeros_like, params)), jnp.linspace(0.2, 0.8, 4),
                            unroll=unroll)[0]

    grad = jax.jit(jax.grad(lambda p: jnp.mean((net.apply(p, x32, jnp.linspace(0.1, 0.9, 32)) - x32) ** 2)))
    return {"scan": seconds(jax.jit(functools.partial(walk, unroll=1)), x8, repeats=repeats),
            "unrolled": seconds(jax.jit(functools.partial(walk, unroll=4)), x8, repeats=repeats),
            "train step": seconds(grad, params, repeats=repeats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = {"nn.Conv": measure(nn.Conv, args.repeats),
            "conv.py": measure(functools.partial(nn.Conv, conv_general_dilated=unet.conv), args.repeats)}
    print(f"{jax.device_count()} × {jax.devices()[0].platform}; seconds per call")
    print(f"{'':<10}{'4 vjps, scan':>14}{'4 vjps, unrolled':>18}{'train step (B=32)':>19}")
    for name, r in rows.items():
        print(f"{name:<10}{r['scan']:>14.3f}{r['unrolled']:>18.3f}{r['train step']:>19.3f}")
    a, b = rows["nn.Conv"], rows["conv.py"]
    print(f"{'ratio':<10}{a['scan'] / b['scan']:>14.2f}{a['unrolled'] / b['unrolled']:>18.2f}"
          f"{a['train step'] / b['train step']:>19.2f}   (nn.Conv / conv.py)")


if __name__ == "__main__":
    main()
