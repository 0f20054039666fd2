"""What the CPU cannot measure, in one prepared run for a lent accelerator (~5 minutes with compilation).

    python benchmarks/accelerator.py --out DIR [--from CPU_PRESET_PRETRAIN_RUN]
    SMOKE=1 python benchmarks/accelerator.py --out DIR        # tiny sizes on the CPU (the suite runs it)

Parts, in order of value, each under its own wall-time cap (a part stops starting rows once its cap
is spent; a row already started finishes):

  a. finetune, seconds per outer step at the paper's MNIST setting (M = 4, T = 64, batch 32, the
     paper-preset U-Net with random weights: time does not depend on them) for nested, implicit,
     implicit-pipelined (M = T), truncated-1, truncated-4, full-backprop and ddpo; with the compile
     seconds, the warm-up seconds and the peak device memory (where the backend reports it);
  b. reward per wall-second from a real cpu-preset θ0 (--from; random weights would measure nothing):
     implicit-pipelined (M = T), implicit and nested each finetune for the same wall time after
     compiling, and the fixed-key evaluation reward (64 samples, the same noise at the start and the
     end) gives each one's gain; skipped, saying so, without --from;
  c. pretraining throughput and model FLOPs utilisation of the paper presets (MNIST 28×28, CIFAR-10
     32×32; benchmarks/pretrain.py's measurement);
  d. `--part sd` (Stable Diffusion's UNet step and LoRA finetuning in bf16) is not built: it needs the
     text-to-image import and finetuning; asking for it is a one-line error.

Each row is printed as soon as it is measured, one line naming its units, appended to DIR/rows.jsonl,
and DIR/results.md (the machine, versions and date, and one table per part) is rewritten after each
row, so a run cut off by the end of a lease still reports what it measured. Compiled programs go to
the persistent compilation cache ($IDIFF_JAX_CACHE), so a second run on the same machine compiles
little. SMOKE=1: a 4-channel one-level U-Net (attention at 8×8) on 8×8 images, T = 2, two outer steps,
nested alone in parts a and b (every method goes through the same code, and nested has no queue to
warm up, whose programs are the slowest to compile; part b compiles no new outer step: the
persistent cache holds part a's), a one-second budget, no caps — a check that the script runs, not a
measurement.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import time
from typing import Callable, Iterator

from idiff_cli.devices import use_host_cores

use_host_cores()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from idiff_cli import loop, sharding  # noqa: E402
from idiff_cli.diffusion import model as M  # noqa: E402
from idiff_cli.diffusion.model import Model, load  # noqa: E402
from idiff_cli.implicit import finetune as F  # noqa: E402
from idiff_cli.implicit import per_device  # noqa: E402
from idiff_cli.implicit.options import SCHEMA  # noqa: E402
from idiff_cli.runs import atomic_write_bytes  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import finetune as finetune_bench  # noqa: E402  (benchmarks/finetune.py)
import pretrain as pretrain_bench  # noqa: E402  (benchmarks/pretrain.py)

SMOKE = os.environ.get("SMOKE") == "1"
PARTS = ("finetune", "wall", "pretrain")
# (method, adjoint): pipelined runs at M = T
VARIANTS = ([("nested", "full")] if SMOKE else
            [("nested", "full"), ("implicit", "full"), ("implicit", "pipelined"), ("truncated-1", "full"),
             ("truncated-4", "full"), ("full-backprop", "full"), ("ddpo", "full")])
SETTING = dict(T=2, M=2, batch=4, steps=2) if SMOKE else dict(T=64, M=4, batch=32, steps=3)
WALL = [("nested", "full")] if SMOKE else [("implicit", "pipelined"), ("implicit", "full"), ("nested", "full")]
TINY_UNET = dict(ch=4, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(8,), groups=2, image_size=8)


class Report:
    """Rows as they come: printed, appended to rows.jsonl, and DIR/results.md rewritten."""

    def __init__(self, out: pathlib.Path, header: dict):
        self.out, self.header, self.rows = out, header, []
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "machine.json", json.dumps(header, indent=1).encode())
        self.write()

    def add(self, part: str, row: dict, line: str) -> None:
        print(f"[{part}] {line}", flush=True)
        self.rows.append({"part": part, **row})
        with open(self.out / "rows.jsonl", "a") as f:
            f.write(json.dumps({"part": part, **row}) + "\n")
        self.write()

    def write(self) -> None:
        lines = ["# Accelerator benchmark", "", *(f"- {k}: {v}" for k, v in self.header.items()), ""]
        for part in PARTS:
            rows = [r for r in self.rows if r["part"] == part]
            if rows:
                keys = list(dict.fromkeys(k for r in rows for k in r if k != "part"))
                lines += [f"## {part}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
                lines += ["| " + " | ".join(_cell(r.get(k)) for k in keys) + " |" for r in rows] + [""]
        atomic_write_bytes(self.out / "results.md", "\n".join(lines).encode())


def _cell(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else "" if v is None else str(v)


def within_cap(report: Report, part: str, items: list, cap: float, name: Callable) -> Iterator:
    """The items of a part, while its cap (seconds since the first) lasts; a skipped row for each after."""
    start = time.perf_counter()
    for item in items:
        if time.perf_counter() - start <= cap:
            yield item
        else:
            report.add(part, {"row": name(item), "skipped": f"part cap {cap:.0f} s spent"},
                       f"{name(item)}: skipped (part cap {cap:.0f} s spent)")


def peak_memory_gib() -> float | None:
    """The device's peak bytes in use so far (GiB), where the backend reports it (GPU, TPU); None on CPU."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None


def random_model(preset: str, dataset: str, size: int, channels: int) -> Model:
    """A U-Net of `preset` (SMOKE: a tiny one) for `dataset` images with random weights (its init)."""
    cfg = pretrain_bench.completed_config(dataset, size, channels, {"preset": preset, **(TINY_UNET if SMOKE else {})})
    net, opt = M.make_model(cfg, 0), M.make_optimizer(cfg)
    params = jax.jit(lambda: M.init_state(net, opt, (size, size, channels), 0).ema)()
    return Model(net, params, M.make_sde(cfg), cfg, (size, size, channels), net.num_classes, 0, True, "ema")


def config(model: Model, method: str, adjoint: str):
    T, Mq, batch = SETTING["T"], SETTING["M"], SETTING["batch"]
    return SCHEMA.resolve(dict(from_run="benchmark", reward="brightness", lam=10.0, beta=0.1, T=T,
                               M=T if adjoint == "pipelined" else Mq, batch=batch, lr=1e-4, kl_n=batch,
                               method=method, adjoint=adjoint, sampler=model.cfg.sampler))


def part_finetune(report: Report, cap: float) -> None:
    model = random_model("paper", "mnist", 8 if SMOKE else 28, 1)
    for method, adjoint in within_cap(report, "finetune", VARIANTS, cap, "-".join):
        r = finetune_bench.measure(config(model, method, adjoint), model, SETTING["steps"], len(jax.local_devices()))
        row = {"method": r["method"], "M": r["M"], "T": SETTING["T"], "batch": SETTING["batch"],
               "s_per_step": r["seconds"], "compile_s": r["compile_s"], "warmup_s": r["init_s"],
               "sequential_calls": r["sequential"], "net_evals": r["net_evals"], "peak_GiB": peak_memory_gib()}
        report.add("finetune", row, f"{r['method']} (M={r['M']}): {r['seconds']:.4f} s/step, compile "
                                    f"{r['compile_s']:.1f} s, warm-up {r['init_s']:.1f} s, "
                                    f"{r['sequential']:.0f} sequential calls/step, peak {_cell(row['peak_GiB'])} GiB")


def part_wall(report: Report, cap: float, from_run: str | None, seconds: float) -> None:
    if from_run is None and not SMOKE:
        report.add("wall", {"skipped": "no --from"}, "skipped: needs --from a cpu-preset pretrained run "
                   "(`idiff pretrain mnist`); random weights would measure nothing here")
        return
    model = load(from_run) if from_run else random_model("paper", "mnist", 8, 1)  # SMOKE: part a's model
    mesh = sharding.mesh_of(len(jax.local_devices()))
    replicated = sharding.replicated(mesh)
    for method, adjoint in within_cap(report, "wall", WALL, cap, "-".join):
        cfg = config(model, method, adjoint)
        parts = F.build(cfg, per_device.BatchSharded(model, mesh))
        bind, optimizer = parts.bind, parts.optimizer
        frozen = sharding.put(parts.frozen, jax.tree.map(lambda _: replicated, parts.frozen))
        _, m = bind(frozen)
        state = F.start_state(m, optimizer, frozen["subject"], sharding.put(jax.random.key(0), replicated), 0)
        shardings = per_device.state_shardings(jax.eval_shape(lambda: state), mesh, (cfg.batch, *model.image_shape))
        state = sharding.put(state, shardings)
        step = F.make_outer_step(bind, optimizer, frozen, (cfg.lam, cfg.beta), mesh, shardings)
        grid = F.make_grid_sampler(lambda frozen: bind(frozen)[0], 64, cfg.batch, jax.random.key(1), mesh,
                                   rewarded=True)
        evaluate: Callable = lambda params: float(np.mean(np.asarray(grid(params, frozen)[1])))  # noqa: E731
        before = evaluate(state.params)
        state, _ = loop.dispatch(step, state, 0, 1)  # compiles
        jax.block_until_ready(state)
        done, begun = 1, time.perf_counter()
        while time.perf_counter() - begun < seconds:
            state, _ = loop.dispatch(step, state, done, 1)
            jax.block_until_ready(state)
            done += 1
        elapsed = time.perf_counter() - begun
        gain = evaluate(state.params) - before
        row = {"method": m.name, "M": cfg.M, "outer_steps": done, "seconds": elapsed, "s_per_step": elapsed / (done - 1)
               if done > 1 else None, "reward_gain": gain, "gain_per_s": gain / elapsed}
        report.add("wall", row, f"{m.name} (M={cfg.M}): {done} outer steps in {elapsed:.1f} s after compiling, "
                                f"fixed-key reward gain {gain:+.4f} ({gain / elapsed:+.5f}/s)")


def part_pretrain(report: Report, cap: float) -> None:
    presets = [("cpu", 8, 4)] if SMOKE else [("paper", 28, 128), ("paper", 32, 128)]
    device = jax.devices()[0]
    peak = next((v for k, v in pretrain_bench.PEAK_TFLOPS.items() if k in device.device_kind), None)
    for preset, size, batch in within_cap(report, "pretrain", presets, cap, lambda p: f"{p[0]} {p[1]}×{p[1]}"):
        r = pretrain_bench.measure(preset, size, batch, 2 if SMOKE else 10, 2 if SMOKE else 10,
                                   peak * len(jax.devices()) if peak else None, overrides=TINY_UNET if SMOKE else None)
        report.add("pretrain", r, f"{preset} {size}×{size} ({r['params_M']:.2f} M parameters), batch {batch}: "
                                  f"{r['train_img_per_s']:.1f} img/s training, {r['sample_steps_per_s']:.2f} "
                                  f"sampling steps/s, {r['train_tflops_per_s']:.3f} TFLOP/s"
                                  + (f", MFU {r['mfu']:.1%}" if "mfu" in r else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=pathlib.Path, help="where rows.jsonl and results.md go")
    parser.add_argument("--from", dest="from_run", default=None, help="cpu-preset pretrain run for part b")
    parser.add_argument("--part", default="all", help="all, or one of finetune, wall, pretrain (sd: not built)")
    parser.add_argument("--wall-seconds", type=float, default=1.0 if SMOKE else 45.0,
                        help="part b: wall time of each method's finetuning after compiling")
    args = parser.parse_args()
    if args.part == "sd":
        parser.exit(2, "error: --part sd is not built: Stable Diffusion's UNet and LoRA finetuning come with the "
                       "text-to-image import and finetuning\n")
    if args.part not in ("all", *PARTS):
        parser.exit(2, f"error: unknown --part '{args.part}'; valid choices: all, {', '.join(PARTS)}, sd\n")
    sharding.use_compilation_cache()
    device = jax.devices()[0]
    header = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "devices": f"{len(jax.devices())} × {device.device_kind} ({jax.default_backend()})",
              "jax": jax.__version__, "python": platform.python_version(), "smoke": SMOKE,
              "setting": json.dumps(SETTING)}
    report = Report(args.out, header)
    print(" · ".join(f"{k} {v}" for k, v in header.items()), flush=True)
    caps = {"finetune": 150.0, "wall": 180.0, "pretrain": 60.0} if not SMOKE else dict.fromkeys(PARTS, float("inf"))
    for part in PARTS:
        if args.part in ("all", part):
            {"finetune": lambda: part_finetune(report, caps["finetune"]),
             "wall": lambda: part_wall(report, caps["wall"], args.from_run, args.wall_seconds),
             "pretrain": lambda: part_pretrain(report, caps["pretrain"])}[part]()
    print(f"wrote {args.out / 'results.md'}", flush=True)


if __name__ == "__main__":
    main()
