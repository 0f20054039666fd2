"""What a CPU can do with the full `google/ddpm-cifar10-32` network (35.7 M parameters, random weights:
no download): the seconds of one sampling step and of one finetune outer step, measured in one run.

The network and noise process are built from the config fields in the test fixture
(tests/fixtures/diffusers_tiny/ddpm_cifar10_32.json) with random weights, as `idiff import` builds them
from the downloaded files. Prints, after compiling each once:

* one DDPM ancestral sampling step at `--batch` (one network forward), mean of `--repeats` steps;
* one finetune outer step (`implicit`, Algorithm 2: one sampling step of the queue and the adjoint of
  the completed batch, T/M steps) at T = `--T`, M = `--M`, `--batch`, reward `red`, β = `--beta`.

Usage: python benchmarks/imported.py [--T 16] [--M 4] [--batch 4] [--beta 1.0] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

from idiff_cli.devices import use_host_cores

use_host_cores()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from idiff_cli.diffusion import diffusers_io  # noqa: E402
from idiff_cli.diffusion.model import ImportedConfig, ImportedModel  # noqa: E402
from idiff_cli.implicit import finetune as F  # noqa: E402
from idiff_cli.implicit.options import SCHEMA  # noqa: E402

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "diffusers_tiny" / "ddpm_cifar10_32.json"


def cifar10_model(T: int) -> ImportedModel:
    fields = json.loads(FIXTURE.read_text())
    unet, sde, shape = diffusers_io.build(fields["config"], fields["scheduler"])
    params = jax.jit(lambda: unet.init(jax.random.key(0), jnp.zeros((1, *shape)), jnp.zeros((1,))))()
    cfg = ImportedConfig("cifar10", None, "ddpm", T, shape[0], "random weights")
    return ImportedModel(unet, params, sde, cfg, shape, 0, 0, True, "imported")


def timed(fn, repeats: int) -> tuple[float, float]:
    """(seconds of the first call (compile + run), mean seconds of the next `repeats`)."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn())
    return first, (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--T", type=int, default=16)
    parser.add_argument("--M", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = cifar10_model(args.T)
    n = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(model.params))
    print(f"ddpm-cifar10-32 architecture: {n:,} parameters, {jax.device_count()} XLA device(s)")

    sampler = model.sampler(args.T, "ddpm")
    step = jax.jit(lambda params, y, key: sampler.step(lambda x, t: model.score(params, x, t), y, 0, key))
    y = jax.random.normal(jax.random.key(1), (args.batch, *model.image_shape))
    first, seconds = timed(lambda: step(model.params, y, jax.random.key(2)), args.repeats)
    print(f"sampling step, batch {args.batch}: {seconds:.3f} s (first call with compilation {first:.1f} s)")

    cfg = F.complete(SCHEMA.resolve(dict(reward="red", lam=1000.0, beta=args.beta, T=args.T, M=args.M,
                                         batch=args.batch)), pathlib.Path("random"), model)
    parts = F.build(cfg, model)
    bind, optimizer = parts.bind, parts.optimizer
    frozen = jax.device_put(parts.frozen, jax.devices()[0])
    params0 = frozen["subject"]
    _, method = bind(frozen)
    start = time.perf_counter()
    state = F.start_state(method, optimizer, params0, jax.random.key(3), 0)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - start
    outer_step = F.make_outer_step(bind, optimizer, frozen, (cfg.lam, cfg.beta))
    holder = [state]

    def outer():
        holder[0], metrics = outer_step(holder[0], 0)
        return metrics

    first, seconds = timed(outer, args.repeats)
    print(f"finetune outer step (implicit, T={args.T}, M={args.M}, batch {args.batch}, β={args.beta}): "
          f"{seconds:.2f} s (first with compilation {first:.1f} s; warm queue {init_s:.1f} s)")


if __name__ == "__main__":
    main()
