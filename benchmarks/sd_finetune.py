"""The cost of one `idiff finetune` outer step of Stable Diffusion 1.5 at its real size (random weights) on
this machine, per gradient method: seconds and peak host memory.

The run is the CLI's text-to-image finetune with its defaults (reward brightness of the VAE-decoded image,
λ 10, β 0.1 (the Girsanov KL: θ0's U-Net beside θ's at every transition), the ddpm sampler (its last
ancestral step lands on z_0: no extra denoiser pass), classifier-free guidance 7.5 with the empty
negative prompt, Adam at 1e-4, ddpo with 1 inner epoch and raw advantages: normalized ones of one path are 0) at

* SD 1.5's published configs (tests/fixtures/sd_tiny/sd15_configs.json): U-Net 859,520,964 parameters,
  autoencoder 83,653,863, CLIP ViT-L/14 text encoder 123,060,480, each at its real size with random
  weights (benchmarks/sd.py's fill: kernels ~ N(0, 1/fan_in), biases 0, norm scales 1; the text
  encoder's token and position embeddings ~ N(0, 0.02²)); the tokenizer is the tiny fixture's
  (tests/fixtures/sd_tiny/sd1/tokenizer: token ids only). The prompt embeddings [32, 77, 768] of the
  16 default training and 16 evaluation prompts (and their negatives) come from that real-size encoder;
* 32×32×4 latents (256×256 images), batch 1 (each guided U-Net call runs on 2 latents), T = 4, M = 2;
* LoRA rank 4 (α 4) on the default targets to_q, to_k, to_v, to_out.0: θ the adapters, the U-Net,
  VAE and embeddings frozen (Parts.frozen: an argument of every jitted program, never a constant);
* float32 for time and memory; bfloat16 (`--dtype bfloat16`: the frozen weights and activations,
  adapters and latents float32) for its peak memory. XLA:CPU computes bf16 convolutions and dots in
  float32 (docs/results.md, "Stable Diffusion 1.5 on the CPU"), so a bfloat16 time here is only what
  this CPU measured, not a figure for an accelerator. The bfloat16 weights are created in bfloat16
  (as a pipeline stored in bfloat16 loads); a float32-stored pipeline would also hold its float32 copy.

Methods (`--methods`): implicit (Algorithm 2, full adjoint), implicit-pipelined (--adjoint pipelined),
nested, truncated-1, full-backprop, ddpo. Each (method, dtype) runs in a fresh process, one at a time
(the float32 U-Net alone is 3.4 GB): it builds the model and the run's parts exactly as `idiff finetune`
does (finetune.build, subject.subject_of, finetune.check_against_model) and times

* warm-up: `start_state` jitted with the frozen weights as an argument (finetune_unit's `fresh`):
  compiling and running it (the method's warm carry: the queues of implicit, nothing for nested);
* first step: the first outer step, `make_outer_step`'s jitted program, compiling and running it
  (no persistent compilation cache: a cold compile);
* step: the median of `--steps` further outer steps (run only; bfloat16 rows run `--bf16-steps`, 0 by
  default: their memory is the figure, and the first step's peak is that of every step);

and the process's peak resident memory, getrusage(RUSAGE_SELF).ru_maxrss (weights, compiler and
activations; the largest it reached). One XLA CPU device with intra-op threads on every core (batch 1).
The numbers go to docs/results.md ("Finetuning Stable Diffusion 1.5 on the CPU").

    python benchmarks/sd_finetune.py --json sd_finetune.json     # ≈ 55 min quiet: float32 ≈ 33, bf16 ≈ 22
        [--methods implicit,implicit-pipelined,nested,truncated-1,full-backprop,ddpo]
        [--dtype float32,bfloat16] [--steps 2] [--bf16-steps 0] [--jobs 1]
    python benchmarks/sd_finetune.py --quick     # smoke test: a micro pipeline, float32, ~2-3 min

`--quick` builds the fixture's pipeline (tests/fixtures/sd_tiny/sd1) cut to a one-level U-Net (8
channels) and VAE (8×8 latents and images), like tests/micro_pipeline.py's micro model, and runs
2 rows at a time (`--jobs`): its numbers only show that every method runs; most of its time is XLA's
compiling. The full-size estimate above is from benchmarks/sd.py's per-call times (guided U-Net call
2.8 s, VAE decode 2.5 s) and each method's passes per step (methods.Cost), not from a run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import importlib.metadata
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import sd  # benchmarks/sd.py: SD 1.5's configs, the random fill, peak RSS, the CPU's name

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "sd_tiny" / "sd1"
METHODS = {"implicit": ("implicit", "full"), "implicit-pipelined": ("implicit", "pipelined"),
           "nested": ("nested", "full"), "truncated-1": ("truncated-1", "full"),
           "full-backprop": ("full-backprop", "full"), "ddpo": ("ddpo", "full")}
DTYPES = ("float32", "bfloat16")
LATENT, T, M, BATCH = 32, 4, 2, 1
EMBEDDING_STD = 0.02  # CLIP's initializer_range: its token and position embeddings


# ---- one measurement, in a fresh process ----


def pipeline_configs(quick: bool) -> dict:
    """The component configs: SD 1.5's with a 32×32 latent, or with `quick` the fixture's pipeline cut to a
    one-level U-Net (8 channels, one cross-attention block) and VAE (8 channels: latent = image size),
    text width 32 (like tests/micro_pipeline.py's micro model): 8×8×4 latents, 8×8 images."""
    if quick:
        files = {"unet": "unet/config.json", "vae": "vae/config.json", "text_encoder": "text_encoder/config.json",
                 "scheduler": "scheduler/scheduler_config.json"}
        configs = {name: json.loads((FIXTURE / file).read_text()) for name, file in files.items()}
        configs["unet"].update(block_out_channels=[8], down_block_types=["CrossAttnDownBlock2D"],
                               up_block_types=["CrossAttnUpBlock2D"], norm_num_groups=4, attention_head_dim=4)
        configs["vae"].update(block_out_channels=[8], down_block_types=["DownEncoderBlock2D"],
                              up_block_types=["UpDecoderBlock2D"])
        return configs
    configs = {k: v for k, v in sd.configs().items() if k != "param_counts"}
    configs["unet"] = {**configs["unet"], "sample_size": LATENT}
    return configs


def random_model(quick: bool, dtype: str):
    """A TextToImageModel of the pipeline with random weights stored in `dtype` (sd.random_params; the text
    encoder's embeddings ~ N(0, 0.02²), which sd's fill would leave at 0)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from idiff_cli.diffusion import pipeline_io
    from idiff_cli.diffusion.model import ImportedConfig, TextToImageModel

    t2i = pipeline_io.build(pipeline_configs(quick), FIXTURE / "tokenizer")
    shapes = pipeline_io.param_shapes(t2i)
    params = sd.random_params(shapes, dtype)
    rng = np.random.default_rng(1)

    def embedding(path, leaf):
        if path[-1].key != "embedding":
            return leaf
        return jnp.asarray(EMBEDDING_STD * rng.standard_normal(leaf.shape, np.float32), leaf.dtype)

    params["text_encoder"] = jax.tree_util.tree_map_with_path(embedding, params["text_encoder"])
    cfg = ImportedConfig("sd15-random", None, "ddpm", T, t2i.image_shape[0], "random weights")
    return TextToImageModel(t2i, params, t2i.sde, cfg, t2i.image_shape, 0, 0, True, "imported")


def blocked(fn):
    """(result, seconds) of fn() once its arrays are ready."""
    import jax

    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def worker(name: str, dtype: str, quick: bool, steps: int) -> dict:
    from idiff_cli.devices import use_host_cores

    use_host_cores(1)  # batch 1: one device whose intra-op threads use every core (as benchmarks/sd.py)
    import jax
    import numpy as np

    from idiff_cli.diffusion.prompt_sampling import GUIDANCE
    from idiff_cli.implicit import finetune
    from idiff_cli.implicit.options import SCHEMA
    from idiff_cli.implicit.subject import subject_of

    peaks = {}
    start = time.perf_counter()
    model = random_model(quick, dtype)
    method, kind = METHODS[name]
    # ddpo at batch 1: raw advantages (normalized ones of one path are 0); the cost is the same
    advantage = {"advantage": "raw"} if method == "ddpo" else {}
    cfg = finetune.complete(SCHEMA.resolve(dict(method=method, adjoint=kind, dtype=dtype, T=T, M=M, batch=BATCH,
                                                **advantage)), pathlib.Path("sd15-random"), model)
    subject = subject_of(cfg, model)
    parts = finetune.build(cfg, model, subject)
    finetune.check_against_model(cfg, model)
    finetune.check_method(cfg, parts)
    frozen = jax.block_until_ready(parts.frozen)
    build_s = time.perf_counter() - start
    peaks["build"] = sd.peak_rss_gib()
    counts = {net: int(sum(x.size for x in jax.tree.leaves(p))) for net, p in model.params.items()}
    counts["lora"] = int(sum(x.size for x in jax.tree.leaves(subject.theta0)))

    key = jax.random.fold_in(jax.random.key(cfg.seed), finetune.METHOD_KEY)

    @jax.jit
    def fresh(frozen, key):  # finetune_unit's warm-up (its logged-KL count aside)
        return finetune.start_state(parts.bind(frozen)[1], parts.optimizer, subject.reference(frozen["subject"]), key, 0)

    compiled, warmup_compile_s = blocked(lambda: fresh.lower(frozen, key).compile())
    state, warmup_run_s = blocked(lambda: compiled(frozen, key))
    peaks["warmup"] = sd.peak_rss_gib()

    outer = finetune.make_outer_step(parts.bind, parts.optimizer, frozen, (cfg.lam, cfg.beta))
    (state, metrics), first_s = blocked(lambda: outer(state, 0))
    peaks["first_step"] = sd.peak_rss_gib()
    rows, times = [{k: float(v) for k, v in jax.device_get(metrics).items()}], []
    for i in range(1, steps + 1):
        (state, metrics), seconds = blocked(lambda: outer(state, i))
        times.append(seconds)
        rows.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    m = parts.bind(frozen)[1]
    return {"method": name, "dtype": dtype, "quick": quick, "params": counts, "build_s": build_s,
            "warmup_s": warmup_compile_s + warmup_run_s, "warmup_compile_s": warmup_compile_s,
            "warmup_run_s": warmup_run_s, "first_step_s": first_s, "step_times": times,
            "step_s": statistics.median(times) if times else None, "peak_rss_gib": sd.peak_rss_gib(),
            "peak_rss_by_phase_gib": peaks, "metrics": rows,  # per outer step: reward_mean, reward_std, grad_norm, …
            "finite": bool(all(np.isfinite(v) for row in rows for v in row.values())),
            "cost": {"step": m.cost._asdict(), "warmup": m.warmup._asdict()},
            "latent_shape": list(model.model.latent_shape), "image_shape": list(model.image_shape),
            "guidance": GUIDANCE if cfg.guidance is None else cfg.guidance, "T": cfg.T, "M": cfg.M, "batch": cfg.batch,
            "lora_rank": subject.lora.rank, "lora_modules": len(subject.lora.targets),
            "jax": jax.__version__, "backend": jax.default_backend(), "device": jax.devices()[0].device_kind}


# ---- the driver ----


def run_worker(name: str, dtype: str, quick: bool, steps: int) -> dict:
    """The worker's JSON (last stdout line), or {"error": …} when it failed (an error, or killed: e.g. -9
    for the kernel's out-of-memory killer)."""
    args = [sys.executable, __file__, "--worker", f"{name}:{dtype}", "--steps", str(steps)] + (["--quick"] * quick)
    start = time.perf_counter()
    out = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if out.returncode:
        return {"method": name, "dtype": dtype, "error": f"exit status {out.returncode}: {out.stderr[-2000:]}",
                "wall_s": wall}
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "wall_s": wall}


def fmt(value, digits: int | None = None) -> str:
    """Seconds with 1 decimal (2 under 10 s, 3 under 1 s), or `digits`; — for none."""
    if value is None:
        return "—"
    return f"{value:.{digits if digits is not None else 3 if value < 1 else 2 if value < 10 else 1}f}"


def table(rows: list[dict]) -> str:
    lines = ["| method | dtype | warm-up s | first step s | step s | peak RSS GiB |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['dtype']} | failed: {r['error'].splitlines()[0][:60]} | | | |")
            continue
        note = "" if r["dtype"] == "float32" else " (CPU only)"
        step = fmt(r["step_s"]) + ("" if r["step_s"] is None else note)
        lines.append(f"| {r['method']} | {r['dtype']} | {fmt(r['warmup_s'])} | {fmt(r['first_step_s'])}{note} | "
                     f"{step} | {fmt(r['peak_rss_gib'], 2)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    ap.add_argument("--dtype", help="float32, bfloat16 or both, comma-separated (default both; float32 with "
                    "--quick)")
    ap.add_argument("--steps", type=int, default=2, help="further outer steps timed after the first (float32)")
    ap.add_argument("--bf16-steps", type=int, default=0, help="further outer steps of the bfloat16 rows")
    ap.add_argument("--quick", action="store_true", help="the fixture's micro pipeline, float32 unless --dtype "
                    "says otherwise, 2 rows at a time: a smoke test (~2-3 min; both dtypes ~5-6 min)")
    ap.add_argument("--jobs", type=int, help="rows measured at once (default 1; 2 with --quick): each row's peak "
                    "RSS is its own process's, but parallel rows share the cores, so their times are not a quiet "
                    "machine's; at full size keep 1 (one float32 process holds ≈ 4-10 GiB)")
    ap.add_argument("--json", metavar="FILE", help="write the machine, the settings and the rows here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:  # one (method, dtype) in this fresh process; JSON on the last line
        name, dtype = args.worker.split(":")
        print(json.dumps(worker(name, dtype, args.quick, args.steps)))
        return

    sys.stdout.reconfigure(line_buffering=True)
    methods = args.methods.split(",")
    dtypes = (args.dtype or ("float32" if args.quick else ",".join(DTYPES))).split(",")
    jobs = args.jobs or (2 if args.quick else 1)
    for name in methods:
        if name not in METHODS:
            raise SystemExit(f"error: unknown method {name!r} (known: {', '.join(METHODS)})")
    for name in dtypes:
        if name not in DTYPES:
            raise SystemExit(f"error: unknown dtype {name!r} (known: {', '.join(DTYPES)})")
    machine = {"date": str(datetime.date.today()), "cpu": sd.cpu_model(), "cores": os.cpu_count(),
               "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
               "jax": importlib.metadata.version("jax"), "jaxlib": importlib.metadata.version("jaxlib")}
    what = ("the fixture's micro pipeline (--quick; 8×8×4 latents, 8×8 images), its CLIP text encoder"
            if args.quick else
            f"SD 1.5 at its real size, random weights ({LATENT}×{LATENT}×4 latents, {8 * LATENT}×{8 * LATENT} "
            "images), real-size CLIP text encoder (random weights) embedding the prompts")
    print(f"{machine['date']}; {machine['cores']} cores ({machine['cpu']}), {machine['memory_gib']} GiB; "
          f"JAX {machine['jax']} (jaxlib {machine['jaxlib']}) on the CPU; load average {os.getloadavg()[0]:.2f}")
    print(f"{what}; batch {BATCH} (guided: 2 latents per U-Net call), T = {T}, M = {M}, LoRA rank 4 on "
          f"to_q,to_k,to_v,to_out.0; one fresh process per row, {jobs} at a time")
    settings = {"T": T, "M": M, "batch": BATCH, "steps": args.steps, "bf16_steps": args.bf16_steps, "jobs": jobs,
                "quick": args.quick, "compilation_cache": None}
    tasks = [(name, dtype) for dtype in dtypes for name in methods]  # float32 first: a run cut short keeps them
    rows: list[dict] = []

    def measure(task):
        name, dtype = task
        load = os.getloadavg()[0]
        row = run_worker(name, dtype, args.quick, args.steps if dtype == "float32" else args.bf16_steps)
        return {**row, "load": [load, os.getloadavg()[0]], "jobs": jobs}

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        for row in pool.map(measure, tasks):  # in order, each as soon as it and those before it are done
            rows.append(row)
            if "error" in row:
                print(f"  {row['method']} {row['dtype']}: FAILED after {row['wall_s']:.0f} s: {row['error']}")
            else:
                print(f"  {row['method']} {row['dtype']}: warm-up {row['warmup_s']:.1f} s, first step "
                      f"{row['first_step_s']:.1f} s, step {fmt(row['step_s'])} s, peak RSS {row['peak_rss_gib']:.2f} "
                      f"GiB (process {row['wall_s']:.0f} s, build {row['build_s']:.0f} s; first |Γ| "
                      f"{row['metrics'][0]['grad_norm']:.3g}{'' if row['finite'] else ', NOT FINITE'})")
            if args.json:  # after each row, so that a run cut short keeps what it measured
                pathlib.Path(args.json).write_text(json.dumps({**machine, "what": what, "settings": settings,
                                                                "rows": rows}, indent=1))
    done = [r for r in rows if "error" not in r]
    if done:
        p = done[0]["params"]
        print(f"\nparameters: U-Net {p['unet']:,}, VAE {p['vae']:,}, text encoder {p['text_encoder']:,}; "
              f"LoRA θ {p['lora']:,}")
    print("warm-up: compile + run of start_state; first step: compile + run; step: median of the further steps "
          "(run only). bfloat16 times are XLA:CPU's (bf16 computed in float32), not meaningful for "
          "accelerators: its peak RSS is the figure.")
    if jobs > 1:
        print(f"{jobs} rows ran at once: they shared the cores, so the times are not a quiet machine's")
    if max(max(r["load"]) for r in rows) > 1.5 * (os.cpu_count() or 1):
        print("the machine was busy (load above 1.5× its cores): these times are not a quiet machine's")
    print()
    print(table(rows))
    if args.json:
        print(f"\nrows: {args.json}")


if __name__ == "__main__":
    main()
