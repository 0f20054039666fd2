"""The cost of Stable Diffusion 1.5's networks at their real size (random weights): one U-Net call and one
VAE decode in idiff's Flax port, beside diffusers' PyTorch networks on the same CPU, each timed in
alternating fresh processes (A B A B …), medians, ratios, and every process's peak host memory.

Units (SD 1.5's published configs, tests/fixtures/sd_tiny/sd15_configs.json; 256×256 images):

* unet: one jitted `CondUNet` forward (one sampling step's network call) at batch 1: latent
  [1, 32, 32, 4], timestep 500, text context [1, 77, 768]; 859,520,964 parameters (checked on both sides);
* unet2: the same call at batch 2, the network call of a classifier-free guided step ([c̄; c]);
* vae: one `AutoencoderKL.decode` of a latent [1, 32, 32, 4] to an image [1, 256, 256, 3]
  (83,653,863 parameters for the whole autoencoder; the decoder alone runs).

Random weights. idiff: every parameter filled from its shape with a fixed seed (kernels ~ N(0, 1/fan_in),
biases 0, norm scales 1; numpy's generator, leaf by leaf), in the computing dtype — not `model.init`,
which would also run a forward pass and draw truncated normals for 860 M parameters in XLA; time and
memory do not depend on the values (no denormals: activations stay O(1)). PyTorch: diffusers'
`UNet2DConditionModel(**config)` / `AutoencoderKL(**config)` with their default initialisation, eval
mode, under `torch.no_grad()`, `torch.set_num_threads(--threads)`. idiff runs as one XLA device (on a
CPU one host device whose intra-op threads use every core: at batch 1 there is nothing to shard),
float32 or bfloat16 (`--dtype`, both by default; params cast to it, as `TextToImage.with_dtype` does).

Each process builds its network, compiles (idiff: the seconds of the first process are reported; the
script gives its processes a fresh persistent compilation cache, so the later ones load the program),
runs one untimed call, then times `--steps` calls one by one: the median over calls is the process's
figure, the median over `--rounds` processes the reported one, with the process's peak resident memory
(`getrusage(RUSAGE_SELF).ru_maxrss`, weights, compiler and activations included; the largest over the
processes). One process at a time: the SD 1.5 U-Net's float32 weights alone are 3.4 GB.

First the two sides are checked to compute the same function: PyTorch's randomly initialised networks'
state dicts copied into idiff's (diffusers_io.params_from_tensors), one batch-1 input through both
(PyTorch in float32, idiff in each `--dtype`), the max abs difference of the outputs, at full size
(`--no-check` skips it; the U-Net's state dict goes through a 3.4 GB temporary file).

On an accelerator the same command runs unchanged: JAX picks the device; the PyTorch peer runs only on a
CPU, so there it is skipped, saying so, and idiff's figures come with the device's peak memory. torch and
diffusers are not idiff dependencies: install them in a throwaway environment and point `--torch-python`
at it; without them the script says so and reports idiff's figures alone (exit 0).

    python benchmarks/sd.py --torch-python /tmp/torchenv/bin/python [--rounds 3] [--steps 3]
        [--units unet,unet2,vae] [--dtype float32,bfloat16] [--out rows.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import peer_torch  # benchmarks/peer_torch.py: its worker-process helper (stdlib imports only)

ROOT = pathlib.Path(__file__).resolve().parent.parent
COMPILATION_CACHE_ENV = "IDIFF_JAX_CACHE"  # idiff_cli.devices'
CONFIGS = ROOT / "tests" / "fixtures" / "sd_tiny" / "sd15_configs.json"
LATENT, TEXT_LEN, TIMESTEP = 32, 77, 500.0
UNITS = {"unet": ("unet", 1), "unet2": ("unet", 2), "vae": ("vae", 1)}
DESCRIBE = {"unet": "U-Net call, batch 1", "unet2": "U-Net call, batch 2 (a guided step)",
            "vae": "VAE decode 32×32 -> 256×256, batch 1"}


def configs() -> dict:
    return json.loads(CONFIGS.read_text())


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def inputs(net: str, batch: int):
    """The unit's inputs, NHWC float32 numpy (the same values on both sides)."""
    import numpy as np

    rng = np.random.default_rng(0)
    z = rng.standard_normal((batch, LATENT, LATENT, 4), np.float32)
    if net == "vae":
        return (z,)
    context = rng.standard_normal((batch, TEXT_LEN, configs()["unet"]["cross_attention_dim"]), np.float32)
    return z, np.full((batch,), TIMESTEP, np.float32), context


def timed(fn, steps: int) -> tuple[float, list[float]]:
    """(seconds of one untimed call, seconds of each of `steps` timed calls); fn blocks until done."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, times


# ---- the PyTorch side ----


def torch_net(net: str):
    """diffusers' network of SD 1.5's config with its default random initialisation (seed 0), eval mode."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    config = {k: v for k, v in configs()[net].items() if not k.startswith("_")}
    torch.manual_seed(0)
    return (UNet2DConditionModel if net == "unet" else AutoencoderKL)(**config).eval()


def torch_call(model, net: str, args):
    import torch

    with torch.no_grad():
        if net == "vae":
            return model.decode(args[0]).sample
        return model(args[0], args[1], encoder_hidden_states=args[2]).sample


def torch_args(net: str, batch: int):
    import torch

    arrays = inputs(net, batch)
    return (torch.from_numpy(arrays[0].transpose(0, 3, 1, 2).copy()), *(torch.from_numpy(a) for a in arrays[1:]))


def torch_worker(unit: str, steps: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    net, batch = UNITS[unit]
    start = time.perf_counter()
    model = torch_net(net)
    build = time.perf_counter() - start
    args = torch_args(net, batch)
    first, times = timed(lambda: torch_call(model, net, args), steps)
    return {"side": "PyTorch", "unit": unit, "dtype": "float32", "params": sum(p.numel() for p in model.parameters()),
            "build_s": build, "compile_s": None, "first_call_s": first, "times": times,
            "seconds": statistics.median(times), "peak_rss_gib": peak_rss_gib(), "threads": torch.get_num_threads()}


def torch_check(net: str, path: str) -> dict:
    """Writes PyTorch's state dict, the batch-1 input and its output (NHWC) to `path` (npz)."""
    import numpy as np

    model = torch_net(net)
    out = torch_call(model, net, torch_args(net, 1)).numpy().transpose(0, 2, 3, 1)
    tensors = {f"w:{k}": v.numpy() for k, v in model.state_dict().items()}
    np.savez(path, out=out, **tensors)
    return {"params": sum(p.numel() for p in model.parameters()), "max_abs_out": float(np.abs(out).max())}


# ---- the idiff side ----


def jax_setup() -> None:
    from idiff_cli.devices import use_host_cores

    use_host_cores(1)  # batch 1: one device with intra-op threads on every core
    from idiff_cli.sharding import use_compilation_cache

    use_compilation_cache()


def jax_model(net: str, dtype: str):
    """(module, variable shapes) of idiff's port of SD 1.5's `net` computing in `dtype`."""
    import jax
    import jax.numpy as jnp

    from idiff_cli.diffusion import sd_unet, vae

    dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    if net == "unet":
        model = sd_unet.CondUNet(**sd_unet.cond_unet_fields(configs()["unet"]), dtype=dt)
        return model, sd_unet.param_shapes(model)
    model = vae.AutoencoderKL(**vae.vae_fields(configs()["vae"]), dtype=dt)
    x = jnp.zeros((1, 8, 8, model.in_channels))
    return model, jax.eval_shape(lambda: model.init(jax.random.key(0), x))


def random_params(shapes, dtype: str):
    """Variables of `shapes` in `dtype` from a fixed seed: kernels ~ N(0, 1/fan_in), biases 0, GroupNorm and
    LayerNorm scales 1. Drawn by numpy one leaf at a time (XLA:CPU's threefry is ~10× slower for 860 M
    numbers) and moved to the device leaf by leaf, so the host holds one float32 leaf beside the result."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng, dt = np.random.default_rng(0), jnp.dtype(dtype)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            value = rng.standard_normal(leaf.shape, np.float32)
            value *= np.float32(1 / max(1, leaf.size // leaf.shape[-1]) ** 0.5)
        else:
            value = np.full(leaf.shape, 1.0 if name == "scale" else 0.0, np.float32)
        return jax.block_until_ready(jnp.asarray(value, dt))

    return jax.tree_util.tree_map_with_path(fill, shapes)


def jax_fn(model, net: str):
    """The unit's jitted function of (variables, *inputs)."""
    import jax

    if net == "vae":
        return jax.jit(lambda v, z: model.apply(v, z.astype(model.dtype), method="decode"))
    return jax.jit(lambda v, x, t, c: model.apply(v, x.astype(model.dtype), t, c.astype(model.dtype)))


def device_peak_gib():
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def jax_worker(unit: str, steps: int, dtype: str) -> dict:
    jax_setup()
    import jax
    import jax.numpy as jnp

    net, batch = UNITS[unit]
    model, shapes = jax_model(net, dtype)
    start = time.perf_counter()
    variables = random_params(shapes, dtype)
    build = time.perf_counter() - start
    args = [jnp.asarray(a) for a in inputs(net, batch)]
    fn = jax_fn(model, net)
    start = time.perf_counter()
    compiled = fn.lower(variables, *args).compile()
    compile_s = time.perf_counter() - start
    first, times = timed(lambda: jax.block_until_ready(compiled(variables, *args)), steps)
    return {"side": "idiff", "unit": unit, "dtype": dtype, "params": sum(x.size for x in jax.tree.leaves(variables)),
            "build_s": build, "compile_s": compile_s, "first_call_s": first, "times": times,
            "seconds": statistics.median(times), "peak_rss_gib": peak_rss_gib(), "device_peak_gib": device_peak_gib(),
            "backend": jax.default_backend()}


def jax_check(net: str, path: str, dtypes: list[str]) -> dict:
    """idiff's port with PyTorch's weights (from `path`) on the same batch-1 input, in each of `dtypes`
    (params cast to it): the max abs difference from PyTorch's float32 output."""
    jax_setup()
    import jax
    import numpy as np

    from idiff_cli.diffusion.diffusers_io import params_from_tensors

    model, shapes = jax_model(net, "float32")
    data = np.load(path)
    tensors = {k[2:]: data[k] for k in data.files if k[:2] == "w:"}
    what = "UNet2DConditionModel" if net == "unet" else "AutoencoderKL"
    variables = params_from_tensors(shapes, tensors, "PyTorch's state dict", what=what, config=f"{net}/config.json")
    del tensors
    diffs = {}
    for dtype in dtypes:
        model = jax_model(net, dtype)[0]
        cast = jax.tree.map(lambda p: p.astype(dtype), variables)
        out = np.asarray(jax_fn(model, net)(cast, *inputs(net, 1)), np.float32)
        diffs[dtype] = float(np.abs(out - data["out"]).max())
        del cast
    return {"max_abs_diff": diffs, "peak_rss_gib": peak_rss_gib()}


def jax_info() -> dict:
    """The backend, its devices and the networks' parameter counts (shapes only: nothing is allocated)."""
    jax_setup()
    import jax

    counts = {net: sum(x.size for x in jax.tree.leaves(jax_model(net, "float32")[1])) for net in ("unet", "vae")}
    return {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "params": counts}


# ---- the driver ----


def call(python: str, *args: str, env: dict | None = None) -> dict:
    return peer_torch.call(python, *args, env=env, script=__file__)


def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--torch-python", default=sys.executable, help="an interpreter with torch and diffusers")
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per side (alternating)")
    ap.add_argument("--steps", type=int, default=3, help="timed calls per process")
    ap.add_argument("--units", default="unet,unet2,vae", help=f"of {', '.join(UNITS)}")
    ap.add_argument("--dtype", default="float32,bfloat16", help="idiff's computing dtype(s): float32, bfloat16 "
                    "or both, comma-separated")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="PyTorch's threads (XLA uses every core)")
    ap.add_argument("--no-check", action="store_true", help="skip the agreement check with copied weights")
    ap.add_argument("--out", metavar="FILE.json", help="write the rows (every process's figures) here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)

    if args.worker:  # one measurement in this fresh process; JSON on the last line
        kind, *rest = args.worker.split(":")
        if kind == "torch":
            result = torch_worker(rest[0], args.steps, args.threads)
        elif kind == "jax":
            result = jax_worker(rest[0], args.steps, rest[1])
        elif kind == "torch-check":
            result = torch_check(rest[0], rest[1])
        elif kind == "jax-check":
            result = jax_check(rest[0], rest[1], args.dtype.split(","))
        else:
            result = jax_info()
        print(json.dumps(result))
        return

    units, dtypes = args.units.split(","), args.dtype.split(",")
    with tempfile.TemporaryDirectory() as cache:  # cold for the first process of each variant, then warm
        compare(args, units, dtypes, {COMPILATION_CACHE_ENV: cache})


def compare(args, units: list[str], dtypes: list[str], env: dict) -> None:
    for name in units:
        if name not in UNITS:
            raise SystemExit(f"error: unknown unit {name!r} (known: {', '.join(UNITS)})")
    for name in dtypes:
        if name not in ("float32", "bfloat16"):
            raise SystemExit(f"error: unknown dtype {name!r} (known: float32, bfloat16)")
    info = call(sys.executable, "--worker", "info", env=env)
    print(f"{datetime.date.today()}; {os.cpu_count()} cores ({cpu_model()}); JAX {info['jax']} on {info['backend']} "
          f"({info['device']}); load average {os.getloadavg()[0]:.2f}")
    print(f"SD 1.5 (random weights): U-Net {info['params']['unet']:,} parameters, VAE {info['params']['vae']:,}; "
          f"latent {LATENT}×{LATENT}×4, images {8 * LATENT}×{8 * LATENT}")

    torch_ok = False
    if info["backend"] != "cpu":
        print(f"JAX runs on {info['backend']}: the PyTorch peer runs only on the CPU, so it is skipped here and "
              "there are no ratios; idiff's figures alone")
    else:
        probe = subprocess.run([args.torch_python, "-c", "import torch, diffusers; print(torch.__version__, "
                                "diffusers.__version__)"], capture_output=True, text=True)
        if probe.returncode:
            print(f"torch and diffusers do not import in {args.torch_python}: no PyTorch peer, idiff's figures "
                  "alone. Install them in a throwaway environment and pass --torch-python PATH (they are not idiff "
                  "dependencies).")
        else:
            torch_ok = True
            print(f"PyTorch peer: torch {probe.stdout.split()[0]}, diffusers {probe.stdout.split()[1]}, "
                  f"{args.threads} thread(s)")

    checks = {}
    if torch_ok and not args.no_check:
        for net in dict.fromkeys(UNITS[u][0] for u in units):
            with tempfile.TemporaryDirectory() as tmp:
                path = str(pathlib.Path(tmp) / "check.npz")
                theirs = call(args.torch_python, "--worker", f"torch-check:{net}:{path}")
                mine = call(sys.executable, "--worker", f"jax-check:{net}:{path}", "--dtype", args.dtype,
                            env={COMPILATION_CACHE_ENV: str(pathlib.Path(tmp) / "cache")})  # not the timed one
            if theirs["params"] != info["params"][net]:
                raise SystemExit(f"error: PyTorch's {net} has {theirs['params']:,} parameters, idiff's "
                                 f"{info['params'][net]:,}")
            checks[net] = {**mine, "max_abs_out": theirs["max_abs_out"]}
            diffs = ", ".join(f"idiff {dt} {d:.2e} ({d / theirs['max_abs_out']:.1e} of max |out|)"
                              for dt, d in mine["max_abs_diff"].items())
            print(f"agreement, {net} (PyTorch's weights copied into idiff, one batch-1 input; PyTorch float32, "
                  f"max |out| {theirs['max_abs_out']:.3g}): max abs difference {diffs}")

    variants = ([("PyTorch", args.torch_python, "torch:{unit}")] if torch_ok else []) + [
        (f"idiff {dt}", sys.executable, f"jax:{{unit}}:{dt}") for dt in dtypes]
    rows = []
    for unit in units:
        results: dict[str, list[dict]] = {name: [] for name, *_ in variants}
        loads = [os.getloadavg()[0]]
        for _ in range(args.rounds):
            for name, python, worker in variants:
                result = call(python, "--worker", worker.format(unit=unit), "--steps", str(args.steps),
                              "--threads", str(args.threads), env=env)
                net = UNITS[unit][0]
                if result["params"] != info["params"][net]:
                    raise SystemExit(f"error: {name}'s {net} has {result['params']:,} parameters, not "
                                     f"{info['params'][net]:,}")
                results[name].append(result)
                rows.append({**result, "variant": name, "load": os.getloadavg()[0]})
                loads.append(os.getloadavg()[0])
        print(f"\n{unit}: {DESCRIBE[unit]}; median s/call over {args.rounds} processes × {args.steps} calls "
              f"(1-min load average {min(loads):.1f}-{max(loads):.1f}):")
        if max(loads) > 1.5 * (os.cpu_count() or 1) and info["backend"] == "cpu":
            print("  the machine was busy (load above 1.5× its cores): these times and ratios are not a quiet "
                  "machine's; rerun it quiet")
        torch_s = statistics.median(r["seconds"] for r in results["PyTorch"]) if torch_ok else None
        for name, rs in results.items():
            s = statistics.median(r["seconds"] for r in rs)
            runs = " ".join(f"{r['seconds']:.3f}" for r in rs)
            rss = max(r["peak_rss_gib"] for r in rs)
            extra = ""
            if rs[0]["compile_s"] is not None:
                extra += f"  compile {rs[0]['compile_s']:.1f} s (first process, cold cache)"
            if rs[0].get("device_peak_gib") is not None:
                extra += f"  device peak {max(r['device_peak_gib'] for r in rs):.2f} GiB"
            ratio = f"  speed vs PyTorch {torch_s / s:.2f}×" if torch_s and name != "PyTorch" else ""
            print(f"  {name:<15} {s:8.3f}  ({runs})  peak RSS {rss:5.2f} GiB{ratio}{extra}")
        if args.out:  # after each unit, so that a run cut short keeps what it measured
            pathlib.Path(args.out).write_text(json.dumps(
                {"date": str(datetime.date.today()), "cpu": cpu_model(), "cores": os.cpu_count(), "info": info,
                 "checks": checks, "rows": rows}, indent=1))
    if args.out:
        print(f"\nrows: {args.out}")


if __name__ == "__main__":
    main()
