"""sharding.keep_ahead: a host loop of multi-device programs with collectives, dispatched without
reading their results, runs to the end on 2 host devices sharing a 2-thread XLA pool.

Unbounded, the same loop stops inside an all-reduce once ≥ 32 programs are queued (XLA:CPU's in-flight
limit per device) and XLA aborts the process after its collective timeout (jaxlib 0.10.2: the script
below with `ahead` = 10**6 aborts; a loop of the same kind completes with 31 programs queued and
aborts with 32). The test runs in a subprocess, as the device count and the pool size are fixed when
JAX starts.
"""

import os
import subprocess
import sys
import textwrap

from suite_env import xla_flags

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from idiff_cli.sharding import keep_ahead

    mesh = Mesh(np.array(jax.devices()[:2]), ("batch",))
    split, whole = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())

    def step(w, x):  # a gradient of a batch mean: XLA all-reduces it over the split batch
        g = jax.grad(lambda w: jnp.mean(jnp.tanh(x @ w) ** 2))(w)
        return w - 0.01 * g, jnp.sum(g * g)

    f = jax.jit(step, out_shardings=(whole, whole))
    x = jax.random.normal(jax.random.key(0), (512, 256))
    w = w0 = jnp.eye(256) * 0.1
    w_split, x_split = jax.device_put(w0, whole), jax.device_put(x, split)
    dispatched = []
    for _ in range(200):
        w_split, m = f(w_split, x_split)
        dispatched.append(m)
        keep_ahead(dispatched)
    one_device = jax.jit(step)  # uncommitted arrays: device 0 alone
    for _ in range(200):
        w, _ = one_device(w, x)
    print("max abs difference to one device", float(jnp.max(jnp.abs(w_split - w))))
""")


def test_a_long_queue_of_sharded_steps_completes_on_two_host_devices():
    env = dict(os.environ, NPROC="2",  # XLA:CPU's thread pool of a 2-core machine, whatever this one has
               XLA_FLAGS=xla_flags(2) + " --xla_cpu_collective_call_terminate_timeout_seconds=20")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # the two programs reduce the batch in different orders: float32 rounding over 200 steps
    assert float(out.stdout.split()[-1]) < 1e-5, out.stdout
