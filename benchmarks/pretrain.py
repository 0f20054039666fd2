"""Throughput of `idiff pretrain`: training images/s and sampling steps/s, per preset, on this machine.

For each preset (`cpu`: ≈1.1 M-parameter U-Net; `paper`: the DDPM-size U-Net) and image size, measures
in one run:
  * training: images/s of the jitted training step (loss, gradient, Adam, EMA) at the given batch,
    dispatched as `idiff pretrain` does (batch sharded over all local devices, parameters replicated);
  * sampling: reverse-SDE steps/s (one Euler–Maruyama step of the whole batch) and images/s for a
    256-step sample;
  * model FLOPs per training step from XLA's cost analysis and, with --peak-tflops (or on a known
    GPU), the model FLOPs utilisation.
Compilation is excluded (one warm-up call). Usage:
    python benchmarks/pretrain.py                         # cpu preset 28×28 (batch 32), paper 28×28 and 32×32 (batch 8)
    python benchmarks/pretrain.py --presets paper:32:128 --steps 20 --peak-tflops 494   # e.g. an H100 (TF32 dense)
    python benchmarks/pretrain.py --presets cpu:28:32,cpu:28:32:plain      # with and without preconditioning
"""

from __future__ import annotations

import argparse
import time

from idiff_cli.devices import use_host_cores

use_host_cores()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from idiff_cli.data import datasets  # noqa: E402
from idiff_cli.diffusion import model as M  # noqa: E402
from idiff_cli.diffusion import pretrain as P  # noqa: E402
from idiff_cli.diffusion.losses import score_function  # noqa: E402
from idiff_cli.diffusion.options import PRETRAIN  # noqa: E402
from idiff_cli.sharding import batch_mesh, global_batch, replicate, replicated  # noqa: E402

# Peak dense TF32 tensor-core throughput (TFLOP/s; JAX runs float32 matmuls/convs as TF32 on these
# GPUs by default), for MFU.
PEAK_TFLOPS = {"H100": 494.0, "H200": 494.0, "A100": 156.0}


def completed_config(dataset: str, size: int, channels: int, given: dict):
    """The pretrain config of options `given` completed for `dataset` images of `size`×`size`×`channels`
    (no data is read: a zero image stands in, only its shape counts)."""
    images = np.zeros((1, size, size, channels), np.uint8)
    cfg = PRETRAIN.resolve({"dataset": dataset, **given})
    return P.complete(cfg, datasets.from_arrays(dataset, "benchmark", images, np.zeros(1, np.int32), 10))


def measure(preset: str, size: int, batch: int, steps: int, sample_steps: int, peak: float | None,
            precondition: bool = True, overrides: dict | None = None) -> dict:
    """One row of the table (main's columns) for `preset` at `size`×`size` (MNIST at 28, else 3-channel
    CIFAR-10 sizes), with pretrain options `overrides` (e.g. a smaller U-Net)."""
    channels = 1 if size == 28 else 3
    dataset = "mnist" if channels == 1 else "cifar10"
    cfg = completed_config(dataset, size, channels, {"preset": preset, "batch": batch, "precondition": precondition,
                                                     **(overrides or {})})
    mesh = batch_mesh()
    model, sde, opt = M.make_model(cfg, 0), M.make_sde(cfg), M.make_optimizer(cfg)
    state = jax.jit(lambda: M.init_state(model, opt, (size, size, channels), 0), out_shardings=replicated(mesh))()
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    step_fn = P.make_step_fn(P.make_train_step(cfg, model, sde, opt), mesh)
    rng = np.random.default_rng(0)
    data = global_batch((rng.integers(0, 256, (batch, size, size, channels), np.uint8), np.zeros(batch, np.int32)), mesh)
    flops = step_fn.lower(state, data).compile().cost_analysis()
    flops = (flops[0] if isinstance(flops, list) else flops or {}).get("flops", float("nan"))
    state, m = step_fn(state, data)  # warm-up (compiles)
    jax.block_until_ready(m)
    start = time.perf_counter()
    for _ in range(steps):
        state, m = step_fn(state, data)
    jax.block_until_ready(m)
    train_s = (time.perf_counter() - start) / steps

    score = score_function(M.model_apply(model), sde, cfg.precondition)
    sampler = M.make_sampler(cfg, sde, sample_steps, "euler-maruyama")
    em_step = jax.jit(lambda p, y, k, key: sampler.step(lambda x, t: score(p, x, t), y, k, key))
    y = global_batch(np.zeros((batch, size, size, channels), np.float32), mesh)
    key = replicate(jax.random.key_data(jax.random.key(0)), mesh)
    y = em_step(state.ema, y, 0, jax.random.wrap_key_data(key)).block_until_ready()
    start = time.perf_counter()
    for k in range(sample_steps):
        y = em_step(state.ema, y, k, jax.random.wrap_key_data(key))
    y.block_until_ready()
    sample_s = (time.perf_counter() - start) / sample_steps
    row = {"preset": preset, "size": size, "params_M": n_params / 1e6, "batch": batch, "devices": mesh.size,
           "train_s_per_step": train_s, "train_img_per_s": batch / train_s,
           "sample_steps_per_s": 1 / sample_s, "sample_img_per_s_256": batch / (256 * sample_s),
           "train_tflops_per_s": flops / train_s / 1e12}
    if peak:
        row["mfu"] = row["train_tflops_per_s"] / peak
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="cpu:28:32,paper:28:8,paper:32:8",
                        help="comma-separated preset:image_size:batch, with :plain for --no-precondition")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--sample-steps", type=int, default=10, help="timed sampling steps")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s of one device, for MFU")
    args = parser.parse_args()
    device = jax.devices()[0]
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in device.device_kind), None)
    peak = peak * len(jax.devices()) if peak else None
    print(f"devices: {len(jax.devices())} × {device.device_kind} ({jax.default_backend()}); jax {jax.__version__}")
    print(f"{'preset':<13}{'size':>5}{'params':>9}{'batch':>6}{'train s/step':>14}{'train img/s':>13}"
          f"{'sample steps/s':>16}{'img/s (256 st)':>16}{'TFLOP/s':>9}{'MFU':>7}")
    for spec in args.presets.split(","):
        preset, size, batch, *plain = spec.split(":")
        r = measure(preset, int(size), int(batch), args.steps, args.sample_steps, peak, precondition=plain != ["plain"])
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
        print(f"{r['preset'] + (' plain' if plain else ''):<13}{r['size']:>5}{r['params_M']:>8.2f}M{r['batch']:>6}{r['train_s_per_step']:>14.3f}"
              f"{r['train_img_per_s']:>13.1f}{r['sample_steps_per_s']:>16.2f}{r['sample_img_per_s_256']:>16.2f}"
              f"{r['train_tflops_per_s']:>9.3f}{mfu:>7}", flush=True)


if __name__ == "__main__":
    main()
