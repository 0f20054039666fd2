"""idiff against PyTorch on the same CPU: the pretraining step, one sampling step and one adjoint step of
the cpu-preset U-Net, each timed in alternating fresh processes (A B C A B C …), medians, ratios.

The peer is diffusers' `UNet2DModel` configured to the cpu preset's layout at 28×28×1 (`TORCH_UNET`:
channels 16·(1, 4, 4), one ResNet block per level, GroupNorm with 8 groups, one-head self-attention at
7×7 and in the middle block, stride-2 conv down-sampling, nearest up-sampling + conv); the script checks
that it has exactly the parameters of idiff's `cpu` U-Net (966,193). The units, the same on both sides:

* train (batch 32): images uint8 -> [−1, 1], t warped like the sampler grid, ε ~ N(0, I), OU noising
  X_t = e^{−t} X_0 + σ(t) ε, the EDM-preconditioned ε prediction, ε-MSE, backward, the gradient's
  global norm, Adam (lr 1e-3, β 0.9/0.999, ε 1e-8), EMA 0.995 (`idiff pretrain`'s jitted step);
* sample (batch 8): one Euler–Maruyama step of the reverse OU SDE, y + h(y + 2 s_θ(y, t)) + √(2h) z;
* adjoint (batch 8): one vjp of the finetune's transition (params, x) -> (x_next, KL increment): θ's
  score and θ0's score at x, x_next from θ's, β h ‖s_θ − s_θ0‖² per image; the vjp w.r.t. θ and x, so
  θ0's network is differentiated w.r.t. x only (the discrete adjoint's step, implicit/adjoint.py).

idiff runs as one XLA CPU device (intra-op threads on every core) and as one host device per core with
the batch sharded (the CLI's default); PyTorch with `torch.set_num_threads(cores)`. Each process builds
its step, runs it twice (compilation and warm-up), then times `--steps` calls one by one; the median over
calls is the process's figure and the median over `--rounds` processes the reported one.

The losses are checked to agree first: PyTorch's UNet2DModel and idiff's port of it (`DDPMUNet`, the
network `idiff import` builds) with PyTorch's weights copied over, on one batch of (x_t, timestep, ε):
the ε-MSE and the gradient's global norm. (idiff's own cpu U-Net has the same layout and parameter count
but its own module names, so the weight-for-weight check is on the diffusers-architecture port.)

torch and diffusers are not dependencies of idiff: install them in a throwaway environment and point
`--torch-python` at it (the default is this interpreter). Without them the script says so and exits 0.

`--profile DIR` (no torch needed) traces `--steps` calls of each idiff unit with `jax.profiler`, on one
device and on `--threads` devices, into DIR/<unit>-<devices>/ (the trace and the compiled program's HLO)
and prints the XLA:CPU thunk time per call by part of the U-Net (xla_profile.py).

    python benchmarks/peer_torch.py --torch-python /tmp/torchenv/bin/python [--rounds 3] [--steps 10]
    python benchmarks/peer_torch.py --profile /tmp/profile [--units train] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import xla_profile

ROOT = pathlib.Path(__file__).resolve().parent.parent
CPU_PRESET_PARAMS = 966_193
SIZE, CHANNELS = 28, 1
T_MIN, T_MAX, RHO = 1e-3, 5.0, 2.0  # the OU process of sde.py
LR, B1, B2, EPS, EMA = 1e-3, 0.9, 0.999, 1e-8, 0.995  # the cpu preset's MNIST defaults (options.DIGITS)
DATA_STD, BETA, SAMPLE_STEPS = 0.5, 0.1, 256
BATCH = {"train": 32, "sample": 8, "adjoint": 8}
TORCH_UNET = dict(sample_size=SIZE, in_channels=CHANNELS, out_channels=CHANNELS, layers_per_block=1,
                  block_out_channels=(16, 64, 64), down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=8,
                  attention_head_dim=None, downsample_padding=1, flip_sin_to_cos=False, freq_shift=1)


def timed(fn, steps: int) -> float:
    """The median seconds of `steps` calls of fn (each blocks until its result is ready), after two."""
    fn(), fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---- the PyTorch side ----


def torch_worker(unit: str, steps: int, threads: int) -> dict:
    import torch
    from diffusers import UNet2DModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = UNet2DModel(**TORCH_UNET)
    n_params = sum(p.numel() for p in net.parameters())
    b = BATCH[unit]
    gen = torch.Generator().manual_seed(1)

    def eps_hat(model, x, t):  # the preconditioned ε prediction (losses.score_function)
        alpha, sigma = torch.exp(-t)[:, None, None, None], torch.sqrt(-torch.expm1(-2 * t))[:, None, None, None]
        v = alpha**2 * DATA_STD**2 + sigma**2
        f = model(x * torch.rsqrt(v), 1000 * t / T_MAX).sample
        return sigma / v * x + alpha * DATA_STD * torch.rsqrt(v) * f, sigma

    if unit == "train":
        params = list(net.parameters())
        ema = [p.detach().clone() for p in params]
        opt = torch.optim.Adam(params, lr=LR, betas=(B1, B2), eps=EPS)
        images = torch.randint(0, 256, (b, CHANNELS, SIZE, SIZE), dtype=torch.uint8, generator=gen)
        net.train()

        def step():
            x0 = images.float() / 127.5 - 1
            t = T_MIN + (T_MAX - T_MIN) * torch.rand(b, generator=gen) ** RHO
            eps = torch.randn(x0.shape, generator=gen)
            alpha, sigma = torch.exp(-t)[:, None, None, None], torch.sqrt(-torch.expm1(-2 * t))[:, None, None, None]
            pred, _ = eps_hat(net, alpha * x0 + sigma * eps, t)
            loss = torch.mean((pred - eps) ** 2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
            opt.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema, params, 1 - EMA)
            return loss.item(), norm.item()
    else:
        net.eval()
        h = (T_MAX - T_MIN) / SAMPLE_STEPS
        t = torch.full((b,), 2.0)
        y = torch.randn((b, CHANNELS, SIZE, SIZE), generator=gen)
        if unit == "sample":
            def step():
                with torch.inference_mode():
                    pred, sigma = eps_hat(net, y, t)
                    z = torch.randn(y.shape, generator=gen)
                    out = y + h * (y - 2 * pred / sigma) + math.sqrt(2 * h) * z
                return out.sum().item()
        else:
            net0 = UNet2DModel(**TORCH_UNET).eval().requires_grad_(False)
            params = list(net.parameters())
            a = torch.randn(y.shape, generator=gen)

            def step():
                x = y.clone().requires_grad_(True)
                pred, sigma = eps_hat(net, x, t)
                pred0, _ = eps_hat(net0, x, t)
                z = torch.randn(y.shape, generator=gen)
                x_next = x + h * (x - 2 * pred / sigma) + math.sqrt(2 * h) * z
                cost = BETA * h * torch.sum(((pred - pred0) / sigma) ** 2, dim=(1, 2, 3))
                grads = torch.autograd.grad((x_next, cost), params + [x], (a, torch.full_like(cost, 1 / b)))
                return grads[-1].sum().item()
    return {"seconds": timed(step, steps), "params": n_params}


def torch_check(path: str) -> dict:
    """Writes PyTorch's weights, one batch and its ε-MSE and gradient norm to `path` (npz)."""
    import numpy as np
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    net = UNet2DModel(**TORCH_UNET)
    gen = torch.Generator().manual_seed(2)
    xt = torch.randn((4, CHANNELS, SIZE, SIZE), generator=gen)
    ts = torch.tensor([3.0, 100.0, 500.0, 990.0])
    eps = torch.randn(xt.shape, generator=gen)
    loss = torch.mean((net(xt, ts).sample - eps) ** 2)
    loss.backward()
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in net.parameters()]))
    tensors = {f"w:{k}": v.detach().numpy() for k, v in net.state_dict().items()}
    np.savez(path, xt=xt.numpy(), ts=ts.numpy(), eps=eps.numpy(), loss=loss.item(), norm=norm.item(), **tensors)
    return {"loss": loss.item(), "grad_norm": norm.item(), "config": dict(net.config),
            "params": sum(p.numel() for p in net.parameters())}


# ---- the idiff side ----


def jax_setup(devices: int):
    from idiff_cli.devices import use_host_cores

    use_host_cores(devices)
    from idiff_cli.sharding import use_compilation_cache

    use_compilation_cache()


def cpu_config():
    import numpy as np

    from idiff_cli.data import datasets
    from idiff_cli.diffusion import pretrain as P
    from idiff_cli.diffusion.options import PRETRAIN

    cfg = PRETRAIN.resolve({"dataset": "mnist", "preset": "cpu"})
    images = np.zeros((1, SIZE, SIZE, CHANNELS), np.uint8)
    return P.complete(cfg, datasets.from_arrays("mnist", "benchmark", images, np.zeros(1, np.int32), 10))


def jax_unit(unit: str, devices: int):
    """(run, program, n_params): `run()` does one `unit` on `devices` host devices and waits for it;
    `program()` is the unit's compiled XLA program (for its HLO)."""
    jax_setup(devices)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from idiff_cli.diffusion import model as M
    from idiff_cli.diffusion import pretrain as P
    from idiff_cli.diffusion.losses import score_function
    from idiff_cli.sharding import batch_mesh, global_batch, replicate, replicated

    assert len(jax.devices()) == devices, jax.devices()
    cfg = cpu_config()
    mesh = batch_mesh()
    b = BATCH[unit]
    model, sde, opt = M.make_model(cfg, 0), M.make_sde(cfg), M.make_optimizer(cfg)
    shape = (SIZE, SIZE, CHANNELS)
    state = jax.jit(lambda: M.init_state(model, opt, shape, 0), out_shardings=replicated(mesh))()
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    rng = np.random.default_rng(0)
    if unit == "train":
        step_fn = P.make_step_fn(P.make_train_step(cfg, model, sde, opt), mesh)
        data = global_batch((rng.integers(0, 256, (b, *shape), np.uint8), np.zeros(b, np.int32)), mesh)
        box = [state]

        def step():
            box[0], metrics = step_fn(box[0], data)
            jax.block_until_ready(metrics)
        return step, lambda: step_fn.lower(box[0], data).compile(), n_params

    score = score_function(M.model_apply(model), sde, cfg.precondition)
    sampler = M.make_sampler(cfg, sde, SAMPLE_STEPS, "euler-maruyama")
    y = global_batch(rng.standard_normal((b, *shape), np.float32), mesh)
    key = jax.random.wrap_key_data(replicate(jax.random.key_data(jax.random.key(0)), mesh))
    k = SAMPLE_STEPS // 2
    if unit == "sample":
        fn = jax.jit(lambda p, y, key: sampler.step(lambda x, t: score(p, x, t), y, k, key))
        args = (state.ema, y, key)
    else:
        grid = sde.time_grid(SAMPLE_STEPS)
        params0 = jax.tree.map(lambda p: p + 0.01, state.ema)
        a = global_batch(rng.standard_normal((b, *shape), np.float32), mesh)

        def transition(p, x):
            t = jnp.full(x.shape[:1], grid[k])
            s, s0 = score(p, x, t), score(params0, x, t)
            x_next = sampler.step(lambda *_: s, x, k, key)
            return x_next, BETA * (grid[k] - grid[k + 1]) * jnp.sum((s - s0) ** 2, axis=(1, 2, 3))

        def adjoint_step(p, x, a):
            (_, cost), vjp = jax.vjp(transition, p, x)
            return vjp((a, jnp.full_like(cost, 1.0 / cost.shape[0])))

        fn, args = jax.jit(adjoint_step), (state.params, y, a)
    return lambda: jax.block_until_ready(fn(*args)), lambda: fn.lower(*args).compile(), n_params


def jax_worker(unit: str, steps: int, devices: int) -> dict:
    run, _, n_params = jax_unit(unit, devices)
    return {"seconds": timed(run, steps), "params": n_params}


def jax_profile(unit: str, steps: int, devices: int, out: str) -> dict:
    """A `jax.profiler` trace of `steps` runs of the unit (after two) into `out`, beside its compiled
    program (program.hlo.txt), and the time of its XLA:CPU thunks per run, grouped by xla_profile.part."""
    run, program, n_params = jax_unit(unit, devices)  # first: it sets the device count before JAX starts
    import jax

    run(), run()
    hlo = program().as_text()
    with jax.profiler.trace(out, create_perfetto_trace=True):
        for _ in range(steps):
            run()
    (pathlib.Path(out) / "program.hlo.txt").write_text(hlo)
    (trace,) = pathlib.Path(out).glob("**/perfetto_trace.json.gz")
    return {"parts": xla_profile.parts(trace, hlo, steps), "params": n_params}


def jax_check(path: str, config: dict) -> dict:
    """idiff's DDPMUNet with PyTorch's weights on PyTorch's batch: ε-MSE and gradient norm."""
    jax_setup(1)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from idiff_cli.diffusion.diffusers_io import build, param_shapes, params_from_tensors

    data = np.load(path)
    model, _, shape = build(config, {})
    params = params_from_tensors(param_shapes(model, shape), {k[2:]: data[k] for k in data.files if k[:2] == "w:"},
                                 "peer_torch")
    xt, eps = (jnp.asarray(data[k].transpose(0, 2, 3, 1)) for k in ("xt", "eps"))

    def loss(p):
        return jnp.mean((model.apply(p, xt, jnp.asarray(data["ts"])) - eps) ** 2)

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return {"loss": float(value), "grad_norm": float(optax.tree.norm(grads))}


def cpu_preset_params() -> int:
    jax_setup(1)
    import jax

    from idiff_cli.diffusion import model as M

    cfg = cpu_config()
    model = M.make_model(cfg, 0)
    shapes = jax.eval_shape(lambda: M.init_state(model, M.make_optimizer(cfg), (SIZE, SIZE, CHANNELS), 0))
    return sum(x.size for x in jax.tree.leaves(shapes.params))


# ---- the driver ----


def call(python: str, *args: str, env: dict | None = None, script: str = __file__) -> dict:
    """The JSON of the last stdout line of `python script args` run from the repository root (a worker
    process of a benchmark); SystemExit with its stderr's tail when it fails."""
    out = subprocess.run([python, script, *args], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, **(env or {})})
    if out.returncode:
        raise SystemExit(f"error: {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--torch-python", default=sys.executable, help="an interpreter with torch and diffusers")
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per variant (alternating)")
    ap.add_argument("--steps", type=int, default=10, help="timed calls per process")
    ap.add_argument("--units", default="train,sample,adjoint")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="cores used by both sides")
    ap.add_argument("--profile", metavar="DIR", help="instead of comparing: trace idiff's units (1 device and "
                    "--threads devices) into DIR and print where their time goes")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:  # one measurement in this fresh process; JSON on the last line
        kind, *rest = args.worker.split(":")
        if kind == "torch":
            result = torch_worker(rest[0], args.steps, args.threads)
        elif kind == "jax":
            result = jax_worker(rest[0], args.steps, int(rest[1]))
        elif kind == "jax-profile":
            result = jax_profile(rest[0], args.steps, int(rest[1]), rest[2])
        elif kind == "torch-check":
            result = torch_check(rest[0])
        elif kind == "jax-check":
            result = jax_check(rest[0], json.loads(os.environ["PEER_CONFIG"]))
        else:
            result = {"params": cpu_preset_params()}
        print(json.dumps(result))
        return

    if args.profile:
        for unit in args.units.split(","):
            for devices in sorted({1, args.threads}):
                out = pathlib.Path(args.profile) / f"{unit}-{devices}"
                result = call(sys.executable, "--worker", f"jax-profile:{unit}:{devices}:{out}", "--steps", str(args.steps))
                print(f"\n{unit} (batch {BATCH[unit]}), idiff on {devices} device(s): XLA:CPU thunk time per call, "
                      f"summed over devices ({args.steps} traced calls; trace in {out}); load average "
                      f"{os.getloadavg()[0]:.2f}")
                for name, ms, share in result["parts"]:
                    print(f"  {name:<24} {ms:8.1f} ms  {share:6.1%}")
        return

    probe = subprocess.run([args.torch_python, "-c", "import torch, diffusers; print(torch.__version__, "
                            "diffusers.__version__)"], capture_output=True, text=True)
    if probe.returncode:
        print(f"torch and diffusers do not import in {args.torch_python}: nothing to compare. Install them in a "
              "throwaway environment and pass --torch-python PATH (they are not idiff dependencies).")
        return
    torch_version, diffusers_version = probe.stdout.split()
    print(f"torch {torch_version}, diffusers {diffusers_version}; {args.threads} thread(s) / core(s); "
          f"load average {os.getloadavg()[0]:.2f}")

    ours = call(sys.executable, "--worker", "params")["params"]
    with tempfile.TemporaryDirectory() as tmp:
        batch = str(pathlib.Path(tmp) / "check.npz")
        theirs = call(args.torch_python, "--worker", f"torch-check:{batch}")
        mine = call(sys.executable, "--worker", f"jax-check:{batch}", env={"PEER_CONFIG": json.dumps(theirs["config"])})
    print(f"parameters: idiff cpu preset {ours:,}, PyTorch UNet2DModel {theirs['params']:,}")
    loss_err = abs(mine["loss"] - theirs["loss"]) / theirs["loss"]
    norm_err = abs(mine["grad_norm"] - theirs["grad_norm"]) / theirs["grad_norm"]
    print(f"one batch, shared weights (diffusers architecture): ε-MSE {theirs['loss']:.6f} (PyTorch) "
          f"{mine['loss']:.6f} (idiff), gradient norm {theirs['grad_norm']:.5f} / {mine['grad_norm']:.5f}: "
          f"relative differences {loss_err:.1e}, {norm_err:.1e}")
    if not ours == theirs["params"] == CPU_PRESET_PARAMS or loss_err > 1e-4 or norm_err > 1e-3:
        raise SystemExit("error: the networks or the losses differ; the timings would not compare like with like")

    variants = [("PyTorch", args.torch_python, "torch:{unit}"), ("idiff 1 device", sys.executable, "jax:{unit}:1"),
                (f"idiff {args.threads} devices", sys.executable, f"jax:{{unit}}:{args.threads}")]
    for unit in args.units.split(","):
        seconds: dict[str, list[float]] = {name: [] for name, *_ in variants}
        loads = [os.getloadavg()[0]]
        for _ in range(args.rounds):
            for name, python, worker in variants:
                result = call(python, "--worker", worker.format(unit=unit), "--steps", str(args.steps),
                              "--threads", str(args.threads))
                if result["params"] != CPU_PRESET_PARAMS:
                    raise SystemExit(f"error: {name} has {result['params']:,} parameters, not {CPU_PRESET_PARAMS:,}")
                seconds[name].append(result["seconds"])
                loads.append(os.getloadavg()[0])
        medians = {name: statistics.median(v) for name, v in seconds.items()}
        torch_s = medians["PyTorch"]
        print(f"\n{unit} (batch {BATCH[unit]}), median s/step over {args.rounds} processes × {args.steps} calls "
              f"(1-min load average {min(loads):.1f}-{max(loads):.1f}):")
        if max(loads) > 1.5 * args.threads:
            print(f"  the machine was busy (load above {args.threads} cores): PyTorch's OpenMP threads spin-wait and "
                  "suffer more than XLA's from shared cores, so these ratios overstate idiff; rerun it quiet")
        for name, s in medians.items():
            runs = " ".join(f"{v:.4f}" for v in seconds[name])
            ratio = "" if name == "PyTorch" else f"   speed vs PyTorch {torch_s / s:.2f}×"
            print(f"  {name:<16} {s:.4f}  ({runs}){ratio}")


if __name__ == "__main__":
    main()
