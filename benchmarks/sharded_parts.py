"""The two loops of a finetuning outer step on 2 host devices: left to XLA's partitioner, or per device.

On the cpu-preset U-Net (batch 8), on 1 device and on 2 host devices with the batch split two ways:

* the queue's advance (implicit/queue.py's `queue_advance`): M = 4 slots, vmapped, each advanced
  L = 4 steps, so the network sees 32 images per call;
* the discrete adjoint's walk back (implicit/adjoint.py's `walk_paths`) through 16 steps, each one
  vjp of the transition (θ, x_k) -> (x_{k+1}, KL increment).

Each split two ways:

* auto: the network's input constrained to be split along the batch (`with_sharding_constraint`, as
  `per_device.BatchSharded.score` does) and XLA's partitioner left to place the rest. In the advance the
  vmapped slots merge into the network's batch with the split axis minor, and the partitioner
  all-gathers every convolution's input; in the walk it sums the weight gradient over the devices in
  the loop body, so every step waits for the slower device;
* local: under `shard_map`, each device on its own rows, the walk's weight gradient summed once at the
  end (as `idiff finetune` runs them: `per_device.advance_per_device`, `per_device.walk_per_device`).

Prints the largest difference of each result to the 1-device one, the collectives in each variant's
optimised HLO, and the seconds per call (median of 5, the variants in turn in one process) with the
speed-ups over 1 device.

    python benchmarks/sharded_parts.py
"""

from __future__ import annotations

import collections
import pathlib
import re
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from idiff_cli.devices import use_host_cores  # noqa: E402

use_host_cores(2)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from idiff_cli import sharding  # noqa: E402
from idiff_cli.diffusion import model as M  # noqa: E402
from idiff_cli.diffusion.losses import score_function  # noqa: E402
from idiff_cli.implicit import adjoint, per_device  # noqa: E402
from idiff_cli.implicit import queue as queue_lib  # noqa: E402
from peer_torch import BETA, cpu_config  # noqa: E402

STEPS, SLOTS, BATCH, SHAPE = 16, 4, 8, (28, 28, 1)


def collectives(fn, args) -> str:
    """The collectives of fn's optimised HLO by kind, with how many sit in a loop body (run every
    iteration: their op_name passes through a while body), e.g. "all-gather ×12 (12 in a loop)"."""
    found: dict[str, list[bool]] = collections.defaultdict(list)
    for line in fn.lower(*args).compile().as_text().splitlines():
        match = re.search(r" (all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)(?:-start)?\(", line)
        if match:
            found[match.group(1)].append("/while/body/" in line)
    return ", ".join(f"{kind} ×{len(where)} ({sum(where)} in a loop)" for kind, where in sorted(found.items())) or "none"


def timed(variants: dict, what: str) -> None:
    """Checks each variant's first output against the 1-device one and lists its collectives, then
    times the variants in turn."""
    reference = variants["1 device"][0](*variants["1 device"][1])[0]
    scale = max(float(jnp.max(jnp.abs(y))) for y in jax.tree.leaves(reference))
    for name, (fn, args) in variants.items():
        out = fn(*args)[0]
        diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(reference)))
        print(f"{what:<8}{name:<17} max difference to 1 device {diff:.1e} (largest entry {scale:.1e}); "
              f"collectives: {collectives(fn, args)}")
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(5):
        for name, (fn, args) in variants.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            seconds[name].append(time.perf_counter() - start)
    one = statistics.median(seconds["1 device"])
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"{what:<8}{name:<17} {median:.3f} s   {one / median:.2f}× one device")


def main() -> None:
    cfg = cpu_config()
    model, sde = M.make_model(cfg, 0), M.make_sde(cfg)
    state = jax.jit(lambda: M.init_state(model, M.make_optimizer(cfg), SHAPE, 0))()
    apply = score_function(M.model_apply(model), sde, cfg.precondition)
    grid = sde.time_grid(STEPS)
    params, params0 = state.params, jax.tree.map(lambda p: p + 0.01, state.ema)
    mesh = Mesh(np.array(jax.devices()[:2]), (sharding.AXIS,))
    split_rows = NamedSharding(mesh, PartitionSpec(sharding.AXIS))

    def transition_with(constrain: bool):
        """adjoint.Transition without noise (timing only); with `constrain`, the network's input split."""

        def score(p, x, t):
            return apply(p, jax.lax.with_sharding_constraint(x, split_rows) if constrain else x, t)

        def transition(p, x, k, key):
            t = jnp.full(x.shape[:1], grid[k])
            s, s0 = score(p, x, t), score(params0, x, t)
            h = grid[k] - grid[k + 1]
            return x + h * (x + 2 * s), BETA * h * jnp.sum((s - s0) ** 2, axis=(1, 2, 3))

        return transition

    def step_with(constrain: bool):
        transition = transition_with(constrain)
        return lambda p, x, k, key: transition(p, x, k, key)[0]

    def variants(part, per_device, args, specs):
        """1 device; 2 devices with the network's input constrained; 2 devices per device. part(constrain)
        and per_device are functions of `args`, placed on the mesh by `specs` for the 2-device ones."""
        split = tuple(jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(args, specs))
        return {"1 device": (jax.jit(part(False)), args), "2 devices, auto": (jax.jit(part(True)), split),
                "2 devices, local": (jax.jit(per_device), split)}

    rng = np.random.default_rng(0)
    key = jax.random.key(0)

    # the queue's advance: SLOTS slots of STEPS + 1 states, each advanced STEPS // SLOTS steps
    slots = jnp.asarray(rng.standard_normal((SLOTS, STEPS + 1, BATCH, *SHAPE)), jnp.float32)
    queue = queue_lib.Queue(slots, jax.random.split(key, SLOTS), jnp.asarray(SLOTS, jnp.int32))

    def advance_with(advance, constrain=False):
        return lambda p, states: (advance(step_with(constrain), p, queue._replace(states=states), SLOTS, STEPS)[0].states,)

    timed(variants(lambda constrain: advance_with(queue_lib.queue_advance, constrain),
                   advance_with(per_device.advance_per_device(mesh)), (params, slots),
                   (PartitionSpec(), PartitionSpec(None, None, sharding.AXIS))), "advance")

    # the adjoint's walk back through STEPS steps of one path (a leading axis of 1: walk_paths' form)
    states = jnp.asarray(rng.standard_normal((STEPS + 1, BATCH, *SHAPE)), jnp.float32)
    a_final = jnp.asarray(rng.standard_normal((BATCH, *SHAPE)), jnp.float32)
    one = lambda x: x[None]  # noqa: E731

    def walk_with(walk, constrain=False):
        def run(p, states, a):  # -> (dJ/dθ, dJ/dx_0)
            start = adjoint.AdjointState(one(a), jax.tree.map(lambda x: one(jnp.zeros_like(x)), p), jnp.zeros(1, a.dtype))
            out = walk(transition_with(constrain), p, one(states), one(key), start, jnp.zeros(1, jnp.int32))
            return jax.tree.map(lambda x: x[0], out.g), out.a[0]

        return run

    timed(variants(lambda constrain: walk_with(adjoint.walk_paths, constrain), walk_with(per_device.walk_per_device(mesh)),
                   (params, states, a_final), (PartitionSpec(), PartitionSpec(None, sharding.AXIS),
                                               PartitionSpec(sharding.AXIS))), "walk")


if __name__ == "__main__":
    main()
