"""Throughput of Implicit Diffusion on the Langevin reward experiment (paper §5.1, Appendix A.1).

Measures, in one run on this machine, particle-steps per second (one particle advanced by one ULA
step, with its share of the Γ update) of:
  * idiff's `implicit`: 10 seeds × 1000 particles, jitted lax.scan, seeds vmapped and sharded over
    the host devices (the CLI's default: one device per core);
  * the same on a single device (seeds vmapped, no sharding);
  * a straightforward implementation written here: one seed at a time, a Python loop of per-step
    jitted updates, per-point potential vmapped over a [B, 2] batch.
and prints the ratios. Usage: python benchmarks/langevin.py [--steps 5000] [--baseline-steps 300]
"""

from __future__ import annotations

import argparse
import time

from idiff_cli.devices import use_host_cores

use_host_cores()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from idiff_cli import registry  # noqa: E402
from idiff_cli.langevin.experiment import components  # noqa: E402
from idiff_cli.langevin.options import SCHEMA  # noqa: E402
from idiff_cli.langevin.simulate import advance  # noqa: E402
from idiff_cli.sharding import shard_leading  # noqa: E402


def idiff_rate(cfg, devices: int) -> tuple[float, float]:
    """Steady-state particle-steps/s of `implicit`, seeds sharded over `devices` devices (compiled
    once, then timed on a second run with the same update function)."""
    potential, reward = registry.get("potential", cfg.potential), registry.get("reward", cfg.reward)
    method = registry.get("method", "implicit")(components(cfg, potential, reward), 1)
    mean_reward = lambda x: jnp.mean(reward(x))  # noqa: E731
    x0 = jax.random.normal(jax.random.key(0), (cfg.seeds, 2, cfg.batch))
    theta0 = jnp.tile(jnp.asarray(cfg.theta0), (cfg.seeds, 1))
    state = jax.vmap(method.init)(x0, theta0)
    keys = jax.random.split(jax.random.key(1), cfg.seeds)
    state, keys = shard_leading((state, keys), Mesh(np.array(jax.devices()[:devices]), ("seeds",)))
    advance(method.update, mean_reward, state, keys, 0, cfg.steps, cfg.log_every)  # compile
    start = time.perf_counter()
    _, _, _, _, rewards = advance(method.update, mean_reward, state, keys, 0, cfg.steps, cfg.log_every)
    seconds = time.perf_counter() - start
    return cfg.seeds * cfg.batch * cfg.steps / seconds, float(rewards[-10:].mean())


def straightforward_rate(cfg, steps: int) -> float:
    """A lean per-step loop: per-point V, vmapped over a [B, 2] batch; one jitted update per step."""
    potential, reward = registry.get("potential", cfg.potential), registry.get("reward", cfg.reward)
    V = lambda x, th: potential(x, th)  # noqa: E731 - one point x of shape [2]
    grad_x = jax.vmap(jax.grad(V), in_axes=(0, None))
    grad_theta = jax.vmap(jax.grad(V, argnums=1), in_axes=(0, None))

    @jax.jit
    def update(x, theta, key):
        x = x - cfg.gamma * grad_x(x, theta) + jnp.sqrt(2 * cfg.gamma) * jax.random.normal(key, x.shape)
        r = jax.vmap(reward)(x)
        g = jnp.mean((r - r.mean())[:, None] * grad_theta(x, theta), axis=0)
        return x, theta - cfg.lr * g

    x = jax.random.normal(jax.random.key(0), (cfg.batch, 2))
    theta = jnp.asarray(cfg.theta0)
    key = jax.random.key(1)
    x, theta = update(x, theta, key)  # compile
    start = time.perf_counter()
    for k in range(steps):  # one seed at a time, as a straightforward script would
        x, theta = update(x, theta, jax.random.fold_in(key, k))
    theta.block_until_ready()
    return cfg.batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--baseline-steps", type=int, default=300)
    args = parser.parse_args()
    cfg = SCHEMA.resolve({"steps": args.steps, "log_every": 10})
    n_dev = len(jax.devices())
    print(f"devices: {n_dev} x {jax.devices()[0].platform}; {cfg.seeds} seeds x {cfg.batch} particles x {cfg.steps} steps")
    sharded, reward = idiff_rate(cfg, n_dev)
    single, _ = idiff_rate(cfg, 1)
    lean = straightforward_rate(cfg, args.baseline_steps)
    print(f"idiff implicit, seeds sharded over {n_dev} devices : {sharded / 1e6:7.2f} M particle-steps/s "
          f"(final reward {reward:.3f})")
    print(f"idiff implicit, 1 device                       : {single / 1e6:7.2f} M particle-steps/s")
    print(f"straightforward per-step loop, 1 seed at a time: {lean / 1e6:7.2f} M particle-steps/s")
    print(f"ratio sharded / straightforward: {sharded / lean:5.1f}x;  sharded / 1 device: {sharded / single:4.2f}x")


if __name__ == "__main__":
    main()
