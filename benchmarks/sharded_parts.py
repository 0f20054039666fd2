"""Where the weight gradient of a sharded adjoint is summed over devices: every step, or once.

The discrete adjoint's walk back (implicit/adjoint.py's `adjoint_walk`) through 16 steps of the
cpu-preset U-Net (batch 8; each step one vjp of the transition (θ, x_k) -> (x_{k+1}, KL increment))
on 1 device and on 2 host devices with the batch split two ways:

* auto: the batch constrained to be split (`with_sharding_constraint`) and XLA's partitioner left to
  place the reduction: it sums the weight gradient over devices in the loop body, so every step waits
  for the slower device;
* local: the walk under `shard_map`, each device adding up its own half-batch gradient, one `psum` at
  the end (as `idiff finetune` walks it: `sharding.walk_per_device`).

Prints the largest difference of each weight gradient to the 1-device one and the seconds per walk
(median of 5, the three variants in turn in one process) with the speed-ups over 1 device.

    python benchmarks/sharded_adjoint.py
"""

from __future__ import annotations

import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from idiff_cli.parallel import use_host_cores  # noqa: E402

use_host_cores(2)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from idiff_cli.diffusion import model as M  # noqa: E402
from idiff_cli.diffusion.losses import score_function  # noqa: E402
from idiff_cli.implicit import adjoint, sharding  # noqa: E402
from peer_torch import BETA, cpu_config  # noqa: E402

STEPS, BATCH, SHAPE = 16, 8, (28, 28, 1)


def main() -> None:
    cfg = cpu_config()
    model, sde = M.make_model(cfg, 0), M.make_sde(cfg)
    state = jax.jit(lambda: M.init_state(model, M.make_optimizer(cfg), SHAPE, 0))()
    score = score_function(M.model_apply(model), sde, cfg.precondition)
    grid = sde.time_grid(STEPS)
    params, params0 = state.params, jax.tree.map(lambda p: p + 0.01, state.ema)
    rng = np.random.default_rng(0)
    states = jnp.asarray(rng.standard_normal((STEPS + 1, BATCH, *SHAPE)), jnp.float32)
    a_final = jnp.asarray(rng.standard_normal((BATCH, *SHAPE)), jnp.float32)

    def transition(p, x, k, key):  # adjoint.Transition without noise: the walk reads only its cotangents
        t = jnp.full(x.shape[:1], grid[k])
        s, s0 = score(p, x, t), score(params0, x, t)
        h = grid[k] - grid[k + 1]
        return x + h * (x + 2 * s), BETA * h * jnp.sum((s - s0) ** 2, axis=(1, 2, 3))

    key = jax.random.key(0)
    mesh = Mesh(np.array(jax.devices()[:2]), (sharding.AXIS,))
    rows, paths = PartitionSpec(sharding.AXIS), PartitionSpec(None, sharding.AXIS)
    per_device = sharding.walk_per_device(mesh)

    def zero_adjoint(p, a):
        return adjoint.AdjointState(a, jax.tree.map(jnp.zeros_like, p), jnp.zeros((), a.dtype))

    def walk(p, states, a):  # -> (dJ/dθ, dJ/dx_0)
        out = adjoint.adjoint_walk(transition, p, states, key, zero_adjoint(p, a))
        return out.g, out.a

    def auto(p, states, a):
        states = jax.lax.with_sharding_constraint(states, NamedSharding(mesh, paths))
        return walk(p, states, jax.lax.with_sharding_constraint(a, NamedSharding(mesh, rows)))

    def local(p, states, a):
        out = per_device(transition, p, states, key, zero_adjoint(p, a))
        return out.g, out.a

    split = (jax.device_put(params, NamedSharding(mesh, PartitionSpec())),
             jax.device_put(states, NamedSharding(mesh, paths)), jax.device_put(a_final, NamedSharding(mesh, rows)))
    variants = {"1 device": (jax.jit(walk), (params, states, a_final)),
                "2 devices, auto": (jax.jit(auto), split), "2 devices, local": (jax.jit(local), split)}
    reference = variants["1 device"][0](*variants["1 device"][1])[0]
    for name, (fn, args) in variants.items():
        g = fn(*args)[0]
        diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(reference)))
        scale = max(float(jnp.max(jnp.abs(y))) for y in jax.tree.leaves(reference))
        print(f"{name:<17} max |g − g(1 device)| {diff:.1e} (largest |g| {scale:.1e})")
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(5):
        for name, (fn, args) in variants.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            seconds[name].append(time.perf_counter() - start)
    one = statistics.median(seconds["1 device"])
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"{name:<17} {median:.3f} s per {STEPS}-step walk   {one / median:.2f}× one device")


if __name__ == "__main__":
    main()
