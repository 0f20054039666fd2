"""XLA_FLAGS of the suite's processes: pytest's own (set by conftest.py before JAX starts) and the
`idiff` subprocesses the tests start with their own host-device count.

XLA's backend (LLVM) optimisation level is 0 in the suite: its programs are tiny, so compiling them
costs more than running them, and level 0 compiles a tiny U-Net's finetuning step in about 30 % less
time. Programs compiled at level 0 compute the same operations (the HLO passes, fusion and the
convolution kernels are unchanged; the generated loops are less optimised), so the oracle tests hold
as they would at XLA's default; the CLI and the benchmarks keep that default.
"""

BACKEND_FLAGS = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a suite process with `devices` CPU host devices."""
    return f"--xla_force_host_platform_device_count={devices} {BACKEND_FLAGS}"
