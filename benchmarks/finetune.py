"""The finetuning methods measured against each other at MNIST size: cost per outer step, or the whole
comparison at one budget of image evaluations.

Cost per outer step (the default mode). For `implicit` (Algorithm 2) with the full adjoint (queue of
M) and with the pipelined adjoint (M = T), `nested` and `truncated-1` on the same pretrained U-Net,
reward and settings, prints per outer step: sequential batched network calls (the critical path on
parallel hardware), network evaluations (images through a forward or a backward pass), steady-state
wall time (each method's jitted chunk compiled once, then timed), the wall-time ratio to `nested`, the
batch-mean reward gained over the 2·steps outer steps from θ0 (mean of the last third of them minus
the first third) and network evaluations per unit of it; then the time of `method.init` (the warm
queues) and of compiling the outer step (first chunk minus its steps at the steady-state rate).
On a CPU a batched call costs as much as its images, so the queue cannot shorten wall time here: the
expected result is implicit ≈ nested per outer step at equal work (the queue adds no overhead), while
the critical path of implicit is L + T calls against 2T, and 2 with the pipelined adjoint at M = T.
--devices 1,2 measures every variant with its image batches split over 1, then 2 local devices (as
`idiff finetune --devices N` runs it; on the CPU each core is a host device) and prints the speed-up
over the first count; on a GPU/TPU host the same line uses its accelerators.

Comparison (`compare`). Every method of --methods finetunes the same pretrained model with the same
reward, λ, β, lr, T, M and batch, for each seed of --seeds, through the real CLI (`idiff finetune` in
a subprocess), one run directory each: OUT/<method>/seed<k>. Every method gets the same number of
image evaluations (`net_evals`: images through a forward or backward pass of θ's or θ0's network,
warm-up included; the passes of the logged KL, grids and labels are apart): its --steps is the whole
number whose net_evals is nearest the budget, from the method's `Cost` totalled by methods.spent (the
method built in this process for the run's config by finetune.build, as the run logs it). --budget is
in image evaluations (e.g. 20000) or in outer steps of `nested` at the run's size (e.g. 120x). Every
cadence of a run is its --steps: it is one chunk, with the KL of --kl-n fresh paths of θ to θ0
(± its standard error), label_kept (--label-n fixed-key samples keeping their digit) and eval_reward
(the mean reward of --grid-n fixed-key samples) at step 0 and at the end. A finished run
(finetuned.json final at the planned step) is skipped; an interrupted one starts again (Ctrl-C stops
the comparison with exit code 130), so the same command continues a stopped comparison. The runs
share the compilation cache OUT/jax-cache. Then per method, mean (min..max) over the seeds:

  reward gain   eval_reward at the end minus at step 0: the same --grid-n noise keys under θ_final
                and θ0, a paired difference, less noisy than the training batches' reward_mean
                (8 images per step, from a moving θ)
  KL            the Girsanov path KL of θ_final to θ0 on --kl-n fresh paths, ± the standard error of
                the seed mean (√(Σ kl_se²)/n)
  label kept    label_kept at the end (1 at step 0 by definition)
  wall s        the run's own clock (wall_s of its last row): compiling the outer step (the first seed
                of a method; the others read the cache), the outer steps and the last KL evaluation;
                not the warm-up, the grids or the labels
  seq. calls    sequential batched network calls, cumulative, warm-up included
  image evals   net_evals at the end
as a markdown table, printed and written to OUT/comparison.md, the plan and per-run numbers to
OUT/comparison.json, the figure OUT/comparison.png (left: the training batches' reward against image
evaluations, seed mean of a trailing moving average over a tenth of each run's steps, band min..max
over seeds, dots the fixed-key eval_reward; right: reward gain against the final KL, one point per
run), and `idiff report` of all runs against net_evals into OUT/report/.

The default budget, 120x = 79,680 image evaluations at the cpu preset with β > 0, gives implicit 120
outer steps (664 images each, 192 for the warm-up), nested 120 (664), truncated-1 433 (184),
truncated-4 285 (280), full-backprop 101 (792), ddpo 123 (648: a round and its 2 updates). Expected time of
the 6 methods × 2 seeds on the reference machine (2 CPU cores): ≈ 45 min when it is quiet, from
2-step timings of each method (outer steps 31.5 min: 0.31–1.82 s per outer step, ≈ 950 s per seed)
and ≈ 70 s per run for everything else (process start, warm-up, compiling, grids, KL, 3 × 256
label samples; 13–15 min in all); ≈ 60 min at a load of 4 (benchmarks/README.md).

Usage: python benchmarks/finetune.py [--from RUN_DIR] [--T 16] [--M 4] [--batch 8] [--beta 0.1] [--steps 6]
                                     [--variants ...] [--devices 1,2]
       python benchmarks/finetune.py compare --from RUN_DIR --out DIR [--methods implicit,nested,...]
                                     [--seeds 0,1] [--budget 120x] [--T 16] [--M 4] [--batch 8] [--dry-run]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import time
from typing import Callable, NamedTuple

from idiff_cli.devices import use_host_cores

use_host_cores()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from idiff_cli import loop, sharding  # noqa: E402
from idiff_cli.diffusion.model import load  # noqa: E402
from idiff_cli.errors import UserError  # noqa: E402
from idiff_cli.implicit import finetune as F  # noqa: E402
from idiff_cli.implicit import methods  # noqa: E402
from idiff_cli.implicit import per_device  # noqa: E402
from idiff_cli.implicit.options import SCHEMA  # noqa: E402
from idiff_cli.implicit.report import last  # noqa: E402
from idiff_cli.runs import atomic_path, read_metrics, save_figure  # noqa: E402

METHODS = "implicit,nested,truncated-1,truncated-4,full-backprop,ddpo"
DEFAULT_BUDGET = "120x"


def measure(cfg, pre, steps: int, devices: int) -> dict:
    mesh = sharding.mesh_of(devices)
    replicated = sharding.replicated(mesh)
    parts = F.build(cfg, per_device.BatchSharded(pre, mesh))
    bind, optimizer = parts.bind, parts.optimizer
    frozen = sharding.put(parts.frozen, jax.tree.map(lambda _: replicated, parts.frozen))
    params0 = frozen["subject"]
    _, method = bind(frozen)
    key = sharding.put(jax.random.key(cfg.seed), replicated)
    start = time.perf_counter()
    state = F.start_state(method, optimizer, params0, key, 0)
    shardings = per_device.state_shardings(jax.eval_shape(lambda: state), mesh, (cfg.batch, *pre.image_shape))
    state = sharding.put(state, shardings)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - start
    outer_step = F.make_outer_step(bind, optimizer, frozen, (cfg.lam, cfg.beta), mesh, shardings)

    def rewards(state, n: int):
        """n outer steps as the run loop dispatches them; their batch-mean rewards [n], read back."""
        state, metrics = loop.dispatch(outer_step, state, 0, n)
        return state, np.array([float(m["reward_mean"]) for m in metrics])

    start = time.perf_counter()
    state, first = rewards(state, steps)  # compile (and `steps` outer steps)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    state, reward = rewards(state, steps)
    seconds = (time.perf_counter() - start) / steps
    c = [a - b for a, b in zip(methods.spent(method, 1), methods.spent(method, 0))]  # per outer step
    third = max(1, steps // 3)  # batch-mean reward over the 2·steps outer steps from θ0: first third against last
    gain = float(reward[-third:].mean() - first[:third].mean())
    return {"method": method.name, "M": cfg.M, "devices": devices, "sequential": c[2], "net_evals": (c[0] + c[1]) * cfg.batch,
            "seconds": seconds, "gain": gain, "init_s": init_s, "compile_s": first_s - steps * seconds}


def per_step(argv: list[str]) -> None:
    """The default mode: cost per outer step of --variants, each on --devices counts."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="from_run", default="", help="pretrain run (default: latest under runs/)")
    parser.add_argument("--T", type=int, default=16)
    parser.add_argument("--M", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="timed outer steps per method (and as many before)")
    parser.add_argument("--lam", type=float, default=10.0)
    parser.add_argument("--beta", type=float, default=0.1,
                        help="KL weight; 0 drops the Girsanov running cost (an adjoint step is then a forward and a backward pass of θ, without the forward pass of θ0)")
    parser.add_argument("--variants", default="implicit:full,implicit:pipelined,nested:full,truncated-1:full",
                        help="comma-separated method:adjoint pairs to measure, nested:full among them (the "
                        "ratios are to it); pipelined runs at M = T")
    parser.add_argument("--devices", default="1", help="comma-separated local device counts to split the batch over "
                        "(each must divide --batch); the speed-up is to the first")
    args = parser.parse_args(argv)
    counts = [int(d) for d in args.devices.split(",")]
    if any(args.batch % d or d > len(jax.local_devices()) for d in counts):
        parser.error(f"--devices {args.devices}: each count must divide --batch {args.batch} and be at most the "
                     f"{len(jax.local_devices())} local devices")
    from_run = args.from_run or str(F.latest_pretrain_run())
    pre = load(from_run)
    base = SCHEMA.resolve(dict(from_run=from_run, reward="brightness", lam=args.lam, beta=args.beta, T=args.T,
                               M=args.M, batch=args.batch, lr=1e-4, kl_n=args.batch))  # no KL is logged here
    variants = [(m, a, args.T if a == "pipelined" else args.M) for m, a in (v.split(":") for v in args.variants.split(","))]
    if ("nested", "full", args.M) not in variants:
        parser.error("--variants must include nested:full (the ratios are to it)")
    variants.sort(key=lambda v: v[:2] != ("nested", "full"))  # nested first: each row prints when measured
    print(f"pretrained {from_run}: image {pre.image_shape}, T={args.T}, M={args.M}, batch {args.batch}, β={args.beta}, "
          f"{args.steps} timed outer steps per method (pipelined: M = T), devices {args.devices} of "
          f"{len(jax.local_devices())} local ({jax.default_backend()})")
    print(f"{'method':<20}{'M':>4}{'dev':>4}{'seq. calls':>11}{'vs nested':>10}{'net evals':>11}{'s/step':>9}"
          f"{'vs nested':>10}{'speed-up':>9}{'reward gain':>13}{'evals/gain':>12}{'init s':>8}{'compile s':>10}",
          flush=True)
    nested, first = {}, {}
    for m, a, M in variants:
        for d in counts:
            r = measure(dataclasses.replace(base, method=m, adjoint=a, M=M), pre, args.steps, d)
            nested.setdefault(d, r)
            first.setdefault((m, a), r)
            n = nested[d]
            per_gain = r["net_evals"] * 2 * args.steps / r["gain"] if r["gain"] > 0 else float("inf")
            print(f"{r['method']:<20}{r['M']:>4}{d:>4}{r['sequential']:>11.0f}{r['sequential'] / n['sequential']:>10.2f}"
                  f"{r['net_evals']:>11.0f}{r['seconds']:>9.3f}{r['seconds'] / n['seconds']:>10.2f}"
                  f"{first[(m, a)]['seconds'] / r['seconds']:>9.2f}{r['gain']:>13.4f}{per_gain:>12.0f}"
                  f"{r['init_s']:>8.0f}{r['compile_s']:>10.0f}", flush=True)


# ---------------------------------------------------------------------------------------------------
# compare: every method at one budget of image evaluations, through the CLI


class Plan(NamedTuple):
    """One method's share of the budget: the outer steps chosen, and the image evaluations (net_evals)
    and sequential batched calls of the warm-up and of those steps together (methods.spent)."""

    method: str
    steps: int
    warmup: int
    net_evals: int
    sequential: int


def run_options(args: argparse.Namespace, method: str, seed: int, steps: int) -> dict:
    """The `idiff finetune` option values (schema names) of one run: every cadence at `steps`, so the
    KL, label_kept and the fixed-key grid are evaluated at step 0 and at the end only."""
    return dict(from_run=args.from_run, reward=args.reward, lam=args.lam, beta=args.beta, lr=args.lr, T=args.T,
                M=args.M, batch=args.batch, method=method, seed=seed, steps=steps, log_every=steps,
                sample_every=steps, ckpt_every=steps, kl_n=args.kl_n, grid_n=args.grid_n,
                **(dict(label_every=steps, label_n=args.label_n) if args.label_n else {}))


def command_line(idiff: str, options: dict, out: pathlib.Path) -> list[str]:
    """`idiff finetune` with `options` as flags (their spellings from the schema) and --out."""
    flags = [item for name, value in options.items() for item in (SCHEMA.option(name).flag, str(value))]
    return [idiff, "finetune", *flags, "--out", str(out)]


def spending(options: dict, pre) -> Callable[[int], tuple[int, int]]:
    """steps -> (net_evals, sequential calls) of the warm-up and `steps` outer steps of the method of
    `options`, as `idiff finetune` builds it for this config and logs them (methods.spent × batch; raises
    UserError as the command would)."""
    cfg = F.complete(SCHEMA.resolve(options), pathlib.Path(options["from_run"]), pre)
    F.check_against_model(cfg, pre)
    parts = F.build(cfg, pre)
    F.check_method(cfg, parts)
    _, method = parts.bind(parts.frozen)

    def spent(steps: int) -> tuple[int, int]:
        cost = methods.spent(method, steps)
        return (cost.forward + cost.backward) * cfg.batch, cost.sequential

    return spent


def parse_budget(text: str, nested_per_step: int) -> int:
    """Image evaluations of `text`: an integer, or `Kx` = K outer steps of nested."""
    try:
        value = float(text[:-1]) * nested_per_step if text.endswith("x") else int(text)
    except ValueError:
        raise UserError(f"--budget takes image evaluations (e.g. 20000) or outer steps of nested (e.g. 120x), "
                        f"got {text!r}") from None
    if value <= 0:
        raise UserError(f"--budget must be positive, got {text!r}")
    return round(value)


def nearest_steps(evals: Callable[[int], int], budget: int) -> int:
    """The outer steps s ≥ 1 whose evals(s) (non-decreasing) is nearest `budget`."""
    s = 1
    while evals(s) < budget:
        s += 1
    return s - 1 if s > 1 and budget - evals(s - 1) < evals(s) - budget else s


def plan(args: argparse.Namespace, pre, names: list[str]) -> tuple[int, list[Plan]]:
    """(budget in image evaluations, one Plan per method of `names`)."""
    spent = {m: spending(run_options(args, m, 0, 1), pre) for m in dict.fromkeys(["nested", *names])}
    budget = parse_budget(args.budget, spent["nested"](1)[0] - spent["nested"](0)[0])
    plans = []
    for m in names:
        steps = nearest_steps(lambda s: spent[m](s)[0], budget)
        plans.append(Plan(m, steps, spent[m](0)[0], *spent[m](steps)))
    return budget, plans


def finished_step(run_dir: pathlib.Path) -> int | None:
    """The step of a run that completed (finetuned.json with final: true), None otherwise."""
    path = run_dir / "finetuned.json"
    if not path.exists():
        return None
    state = json.loads(path.read_text())
    return int(state["step"]) if state.get("final") else None


def summarise_run(run_dir: pathlib.Path) -> dict:
    """The numbers of one finished run, from its metrics.jsonl (see the module docstring)."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    evals = [r["eval_reward"] for r in rows if "eval_reward" in r]
    return {"steps": rows[-1]["step"], "net_evals_0": rows[0]["net_evals"], "net_evals": last(rows, "net_evals"),
            "sequential_calls": last(rows, "sequential_calls"), "wall_s": last(rows, "wall_s"),
            "eval_reward_0": evals[0], "eval_reward": evals[-1], "reward_gain": evals[-1] - evals[0],
            "kl": last(rows, "kl"), "kl_se": last(rows, "kl_se"), "label_kept": last(rows, "label_kept"),
            "kl_net_evals": last(rows, "kl_net_evals")}


def seed_stats(runs: list[dict], key: str) -> dict | None:
    """mean, min, max of `key` over the runs (None when a run lacks it); for kl also the standard error
    of the seed mean, √(Σ kl_se²)/n."""
    values = [r[key] for r in runs]
    if any(v is None for v in values):
        return None
    stats = {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values))}
    if key == "kl":
        stats["se"] = float(math.sqrt(sum(r["kl_se"] ** 2 for r in runs)) / len(runs))
    return stats


SUMMARY = (("steps", "steps", "{:.0f}"), ("net_evals", "image evals", "{:.0f}"),
           ("sequential_calls", "seq. calls", "{:.0f}"), ("reward_gain", "reward gain", "{:+.4f}"),
           ("kl", "KL (± SE)", "{:.3g}"), ("label_kept", "label kept", "{:.3f}"), ("wall_s", "wall s", "{:.0f}"))


def cell(stats: dict | None, form: str) -> str:
    """`mean (min..max)`, one number when they agree; the KL with ± the SE of its seed mean."""
    if stats is None:
        return "–"
    text = form.format(stats["mean"])
    if "se" in stats:
        text += " ± " + form.format(stats["se"])
    if form.format(stats["min"]) != form.format(stats["max"]):
        text += f" ({form.format(stats['min'])}..{form.format(stats['max'])})"
    return text


def markdown(aggregates: dict[str, dict], settings: str) -> str:
    header = ["method", "seeds", *(title for _, title, _ in SUMMARY)]
    lines = [settings, "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for method, agg in aggregates.items():
        lines.append("| " + " | ".join([method, str(agg["seeds"]),
                                        *(cell(agg[key], form) for key, _, form in SUMMARY)]) + " |")
    return "\n".join(lines) + "\n"


def trailing_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of values[i − window + 1 .. i] for i ≥ window − 1."""
    return np.convolve(values, np.ones(window) / window, mode="valid")


def comparison_figure(runs: dict[str, list[pathlib.Path]], summaries: dict[str, list[dict]]):
    """Left: training-batch reward against image evaluations per method (seed mean of a trailing moving
    average over a tenth of the steps, band min..max over seeds; dots: fixed-key eval_reward at step 0
    and at the end, seed mean). Right: reward gain against the final KL (± 2 SE), one point per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_t) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (method, dirs) in enumerate(runs.items()):
        color = f"C{i}"
        curves = []
        for run_dir in dirs:
            train = [r for r in read_metrics(run_dir / "metrics.jsonl") if "reward_mean" in r]
            window = max(1, len(train) // 10)
            xs = np.array([r["net_evals"] for r in train])[window - 1:]
            curves.append((xs, trailing_mean(np.array([r["reward_mean"] for r in train]), window)))
        xs = curves[0][0]
        ys = np.stack([c[1] for c in curves])
        ax_r.plot(xs, ys.mean(0), color=color, lw=1.2, label=f"{method} ({len(dirs)} seeds)")
        ax_r.fill_between(xs, ys.min(0), ys.max(0), color=color, alpha=0.15)
        s = summaries[method]
        ax_r.plot([s[0]["net_evals_0"], s[0]["net_evals"]],
                  [np.mean([r["eval_reward_0"] for r in s]), np.mean([r["eval_reward"] for r in s])], "o",
                  color=color, ms=5)
        kl = [(r["kl"], r["kl_se"], r["reward_gain"]) for r in s if r["kl"] is not None]
        if kl:
            k, se, gain = np.array(kl).T
            ax_t.errorbar(k, gain, xerr=2 * se, fmt="o", color=color, capsize=2, label=method)
    ax_r.set(xlabel="image evaluations (net_evals, warm-up included)", ylabel="reward",
             title="training-batch reward (moving average, band: min..max over seeds);\n"
                   "dots: fixed-key eval_reward at step 0 and at the end")
    ax_t.set(xlabel=r"KL(P_θ ‖ P_θ0) of the paths at the end (fresh paths, ± 2 SE)",
             ylabel="reward gain (fixed keys, end − step 0)", title="reward gained against the KL, one point per run")
    ax_r.legend(fontsize=8)
    ax_t.legend(fontsize=8)
    fig.tight_layout()
    return fig


def run_child(argv: list[str], env: dict) -> int:
    """Runs `argv` to its end and returns its exit code. Ctrl-C reaches the child too (same process
    group): the parent keeps waiting while the child saves its checkpoint and exits."""
    with subprocess.Popen(argv, env=env) as child:
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:
                continue


def compare(argv: list[str]) -> None:
    """The `compare` mode (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="benchmarks/finetune.py compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="from_run", required=True, help="the pretrain run (θ0) of every run")
    parser.add_argument("--out", required=True, type=pathlib.Path, help="directory of the runs and the summary")
    parser.add_argument("--methods", default=METHODS, help="comma-separated `idiff finetune --method` values")
    parser.add_argument("--seeds", default="0,1", help="comma-separated --seed values, one run per method each")
    parser.add_argument("--budget", default=DEFAULT_BUDGET,
                        help="image evaluations per run (e.g. 20000) or outer steps of nested (e.g. 120x)")
    parser.add_argument("--T", type=int, default=16)
    parser.add_argument("--M", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reward", default="brightness")
    parser.add_argument("--lam", type=float, default=10.0)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--kl-n", type=int, default=64, help="fresh paths of the final KL")
    parser.add_argument("--label-n", type=int, default=256,
                        help="fixed-key samples of label_kept (at least 256; 0: not logged, e.g. for a non-MNIST model)")
    parser.add_argument("--grid-n", type=int, default=64, help="fixed-key samples of eval_reward (the reward gain)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the commands, run nothing")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds takes integers separated by commas, got {args.seeds!r}")
    idiff = shutil.which("idiff", path=str(pathlib.Path(sys.executable).parent)) or shutil.which("idiff")
    if not idiff:
        parser.error("no `idiff` command beside this Python or on PATH: pip install -e . first")
    try:
        pre = load(args.from_run)
        budget, plans = plan(args, pre, methods)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None

    print(f"compare from {args.from_run}: reward {args.reward}, λ={args.lam}, β={args.beta}, lr {args.lr}, "
          f"T={args.T}, M={args.M}, batch {args.batch}, seeds {','.join(map(str, seeds))}; budget {budget} image "
          f"evaluations ({args.budget}) -> {args.out}")
    print(f"{'method':<16}{'steps':>7}{'warm-up':>9}{'evals/step':>11}{'image evals':>13}{'vs budget':>11}"
          f"{'seq. calls':>12}")
    for p in plans:
        print(f"{p.method:<16}{p.steps:>7}{p.warmup:>9}{(p.net_evals - p.warmup) / p.steps:>11.0f}{p.net_evals:>13}"
              f"{p.net_evals / budget - 1:>+11.1%}{p.sequential:>12}", flush=True)

    # one compilation cache for the comparison: the first seed of each method compiles its programs, the
    # others read them, whatever was compiled on this machine before
    env = {"IDIFF_JAX_CACHE": str((args.out / "jax-cache").resolve()), **os.environ}
    failed = []
    for seed in seeds:
        for p in plans:
            run_dir = args.out / p.method / f"seed{seed}"
            argv_run = command_line(idiff, run_options(args, p.method, seed, p.steps), run_dir)
            done = finished_step(run_dir)
            if done == p.steps:
                print(f"skip {run_dir}: finished ({p.steps} steps)", flush=True)
                continue
            if done is not None and done > p.steps:
                failed.append(f"{run_dir} finished {done} steps, more than the {p.steps} of this budget: "
                              "use another --out")
                continue
            print("$ " + shlex.join(argv_run), flush=True)
            if args.dry_run:
                continue
            rc = run_child(argv_run, env)
            if rc in (130, -2):  # Ctrl-C: the run saved its checkpoint; stop the comparison
                raise SystemExit(130)
            if rc:
                failed.append(f"{run_dir}: idiff finetune exited with {rc}")
    if args.dry_run:
        return

    runs = {p.method: [args.out / p.method / f"seed{s}" for s in seeds
                       if finished_step(args.out / p.method / f"seed{s}") == p.steps] for p in plans}
    runs = {m: dirs for m, dirs in runs.items() if dirs}
    summaries = {m: [summarise_run(d) for d in dirs] for m, dirs in runs.items()}
    keys = ("steps", "net_evals", "sequential_calls", "reward_gain", "kl", "label_kept", "wall_s")
    aggregates = {m: {"seeds": len(s), **{k: seed_stats(s, k) for k in keys}} for m, s in summaries.items()}
    settings = (f"`idiff finetune` from {args.from_run}, reward {args.reward}, λ={args.lam}, β={args.beta}, "
                f"lr {args.lr}, T={args.T}, M={args.M}, batch {args.batch}; budget {budget} image evaluations "
                f"({args.budget}); mean (min..max) over seeds {','.join(map(str, seeds))}. Reward gain: "
                f"eval_reward of {args.grid_n} fixed-key samples, end − step 0; KL: {args.kl_n} fresh paths at "
                f"the end, ± SE of the seed mean; label kept: {args.label_n} fixed-key samples; wall s: the "
                f"run's clock (compile, outer steps, last KL).")
    table = markdown(aggregates, settings)
    print("\n" + table)
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out / "comparison.md") as tmp:
        tmp.write_text("# Finetuning methods at equal image evaluations\n\n" + table)
    record = {"settings": {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()},
              "budget": budget, "plan": [{**p._asdict(), "net_evals": p.net_evals} for p in plans],
              "runs": [{"method": m, "dir": str(d), **s} for m in runs for d, s in zip(runs[m], summaries[m])],
              "methods": aggregates}
    with atomic_path(args.out / "comparison.json") as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n")
    written = [args.out / "comparison.md", args.out / "comparison.json"]
    if runs:
        written.append(save_figure(comparison_figure(runs, summaries), args.out / "comparison.png"))
        rc = subprocess.run([idiff, "report", *(str(d) for dirs in runs.values() for d in dirs), "--x", "net_evals",
                             "--out", str(args.out / "report")]).returncode
        failed += [f"idiff report exited with {rc}"] if rc else []
    print("wrote " + ", ".join(map(str, written)))
    if failed:
        print("failed:\n  " + "\n  ".join(failed), file=sys.stderr)
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:
        compare(argv[1:])
    else:
        per_step(argv)


if __name__ == "__main__":
    main()
