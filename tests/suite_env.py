"""XLA_FLAGS of the suite's processes: pytest's own (set by conftest.py before JAX starts) and the
`idiff` subprocesses the tests start with their own host-device count.

The suite's programs are tiny, so compiling them costs more than running them, and two XLA:CPU
options make compiling cheaper: the backend (LLVM) optimisation level 0 (a tiny U-Net's finetuning
step in about 30 % less time) and XLA:CPU's elemental IR emitters in place of its MLIR fusion emitters
(the compile-heavy test files in 23-27 % less time: test_import_cli, test_t2i_finetune, test_sd_cli and
test_implicit_adjoint took 168 s against 219 s and 192 s against 264 s, alternating, 2026-12-06). Both
compile the same HLO after the same passes, fusion and convolution kernels; only the code generated
for each fused loop differs (the elemental emitters may contract a multiply-add of one program and not
of another: two programs making the same draws agree to an ulp, where XLA's defaults give equal bits;
test_implicit_queue.py and test_sharded_parts.py compare such programs to rtol 1e-6), so the oracle
tests hold as they would at XLA's defaults. The CLI and the benchmarks keep those defaults.
"""

BACKEND_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a suite process with `devices` CPU host devices."""
    return f"--xla_force_host_platform_device_count={devices} {BACKEND_FLAGS}"
