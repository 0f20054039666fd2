"""Test-suite set-up: two XLA host devices (so the sharded code paths run), float32 by default."""

import os

# Before JAX starts: expose two CPU devices, as the `idiff` CLI does on a 2-core machine.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
