"""Cost per outer step of the finetuning methods at MNIST size, all measured in one run.

For `implicit` (Algorithm 2) with the full adjoint (queue of M) and with the pipelined adjoint (M = T),
`nested` and `truncated-1` on the same pretrained U-Net, reward and settings, prints per outer step: sequential batched network calls (the critical path on parallel
hardware), network evaluations (images through a forward or a backward pass), steady-state wall time
(each method's jitted chunk compiled once, then timed), the wall-time ratio to `nested`, the batch-mean
reward gained over the 2·steps outer steps from θ0 (mean of the last third of them minus the first
third) and network evaluations per unit of it; then the time of `method.init` (the warm queues) and of
compiling the outer step (first chunk minus its steps at the steady-state rate).

On a CPU a batched call costs as much as its images, so the queue cannot shorten wall time here: the
expected result is implicit ≈ nested per outer step at equal work (the queue adds no overhead), while
the critical path of implicit is L + T calls against 2T, and 2 with the pipelined adjoint at M = T.

--devices 1,2 measures every variant with its image batches split over 1, then 2 local devices (as
`idiff finetune --devices N` runs it; on the CPU each core is a host device) and prints the speed-up
over the first count; on a GPU/TPU host the same line uses its accelerators.

Usage: python benchmarks/finetune.py [--from RUN_DIR] [--T 16] [--M 4] [--batch 8] [--beta 0.1] [--steps 6]
                                     [--variants ...] [--devices 1,2]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from idiff_cli.parallel import use_host_cores

use_host_cores()

import jax  # noqa: E402

from idiff_cli.diffusion.model import load  # noqa: E402
from idiff_cli.implicit import finetune as F  # noqa: E402
from idiff_cli.implicit import sharding  # noqa: E402
from idiff_cli.implicit.options import SCHEMA  # noqa: E402


def measure(cfg, pre, steps: int, devices: int) -> dict:
    mesh = sharding.mesh_of(devices)
    replicated = sharding.replicated(mesh)
    bind, optimizer, _ = F.build(cfg, sharding.BatchSharded(pre, mesh))
    params0 = sharding.put(pre.params, jax.tree.map(lambda _: replicated, pre.params))
    _, method = bind(params0)
    key = sharding.put(jax.random.key(cfg.seed), replicated)
    start = time.perf_counter()
    state = F.start_state(method, optimizer, params0, key, 0)
    shardings = sharding.state_shardings(jax.eval_shape(lambda: state), mesh, (cfg.batch, *pre.image_shape))
    state = sharding.put(state, shardings)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - start
    chunk = F.make_chunk(bind, optimizer, (cfg.lam, cfg.beta), mesh, shardings)
    start = time.perf_counter()
    state, (first, _, _) = chunk(state, params0, steps)  # compile (and `steps` outer steps)
    jax.block_until_ready(first)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    state, (reward, _, _) = chunk(state, params0, steps)
    jax.block_until_ready(reward)
    seconds = (time.perf_counter() - start) / steps
    c = method.cost
    third = max(1, steps // 3)  # batch-mean reward over the 2·steps outer steps from θ0: first third against last
    gain = float(reward[-third:].mean() - first[:third].mean())
    return {"method": method.name, "M": cfg.M, "devices": devices, "sequential": c.sequential, "net_evals": (c.forward + c.backward) * cfg.batch,
            "seconds": seconds, "gain": gain, "init_s": init_s, "compile_s": first_s - steps * seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="from_run", default="", help="pretrain run (default: latest under runs/)")
    parser.add_argument("--T", type=int, default=16)
    parser.add_argument("--M", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="timed outer steps per method (and as many before)")
    parser.add_argument("--lam", type=float, default=10.0)
    parser.add_argument("--beta", type=float, default=0.1,
                        help="KL weight; 0 drops the Girsanov running cost (an adjoint step is then a forward and a backward pass of θ, without the forward pass of θ0)")
    parser.add_argument("--variants", default="implicit:full,implicit:pipelined,nested:full,truncated-1:full",
                        help="comma-separated method:adjoint pairs to measure, nested:full among them (the "
                        "ratios are to it); pipelined runs at M = T")
    parser.add_argument("--devices", default="1", help="comma-separated local device counts to split the batch over "
                        "(each must divide --batch); the speed-up is to the first")
    args = parser.parse_args()
    counts = [int(d) for d in args.devices.split(",")]
    if any(args.batch % d or d > len(jax.local_devices()) for d in counts):
        parser.error(f"--devices {args.devices}: each count must divide --batch {args.batch} and be at most the "
                     f"{len(jax.local_devices())} local devices")
    from_run = args.from_run or str(F.latest_pretrain_run())
    pre = load(from_run)
    base = SCHEMA.resolve(dict(from_run=from_run, reward="brightness", lam=args.lam, beta=args.beta, T=args.T,
                               M=args.M, batch=args.batch, lr=1e-4, kl_n=args.batch))  # no KL is logged here
    variants = [(m, a, args.T if a == "pipelined" else args.M) for m, a in (v.split(":") for v in args.variants.split(","))]
    if ("nested", "full", args.M) not in variants:
        parser.error("--variants must include nested:full (the ratios are to it)")
    variants.sort(key=lambda v: v[:2] != ("nested", "full"))  # nested first: each row prints when measured
    print(f"pretrained {from_run}: image {pre.image_shape}, T={args.T}, M={args.M}, batch {args.batch}, β={args.beta}, "
          f"{args.steps} timed outer steps per method (pipelined: M = T), devices {args.devices} of "
          f"{len(jax.local_devices())} local ({jax.default_backend()})")
    print(f"{'method':<20}{'M':>4}{'dev':>4}{'seq. calls':>11}{'vs nested':>10}{'net evals':>11}{'s/step':>9}"
          f"{'vs nested':>10}{'speed-up':>9}{'reward gain':>13}{'evals/gain':>12}{'init s':>8}{'compile s':>10}",
          flush=True)
    nested, first = {}, {}
    for m, a, M in variants:
        for d in counts:
            r = measure(dataclasses.replace(base, method=m, adjoint=a, M=M), pre, args.steps, d)
            nested.setdefault(d, r)
            first.setdefault((m, a), r)
            n = nested[d]
            per_gain = r["net_evals"] * 2 * args.steps / r["gain"] if r["gain"] > 0 else float("inf")
            print(f"{r['method']:<20}{r['M']:>4}{d:>4}{r['sequential']:>11}{r['sequential'] / n['sequential']:>10.2f}"
                  f"{r['net_evals']:>11.0f}{r['seconds']:>9.3f}{r['seconds'] / n['seconds']:>10.2f}"
                  f"{first[(m, a)]['seconds'] / r['seconds']:>9.2f}{r['gain']:>13.4f}{per_gain:>12.0f}"
                  f"{r['init_s']:>8.0f}{r['compile_s']:>10.0f}", flush=True)


if __name__ == "__main__":
    main()
