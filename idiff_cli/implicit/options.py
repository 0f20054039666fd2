"""The options of `idiff finetune` (JAX-free: `--help` and bad flags answer without starting JAX).

M, T and batch default to the pretrained model's dataset and the preset (paper Tables 2 and 4);
`finetune.complete` fills them in and config.json holds the filled values.
"""

from __future__ import annotations

from typing import Any

from idiff_cli import config as cfglib
from idiff_cli.errors import UserError

# Stochastic samplers (Gaussian transitions: the Girsanov KL applies) and deterministic ones (β = 0 only).
# euler-maruyama and probability-flow discretise a continuous-time process; ddpm (ancestral) and ddim
# also step an imported discrete DDPM model.
STOCHASTIC_SAMPLERS = ("euler-maruyama", "ddpm")
DETERMINISTIC_SAMPLERS = ("probability-flow", "ddim")
SAMPLERS = STOCHASTIC_SAMPLERS + DETERMINISTIC_SAMPLERS
ADJOINTS = ("full", "pipelined", "continuous")
FINAL_STEPS = ("tweedie", "none")
ADVANTAGES = ("normalized", "raw")
# --method ddpo's own options and their defaults (ddpo.PPO's), which another method's config keeps
DDPO_OPTIONS = {"advantage": "normalized", "clip_range": 0.2, "inner_epochs": 1}

# (M, T, batch) by dataset: the paper's (Tables 2 and 4) and the cpu preset's.
DATASET_DEFAULTS = {
    "paper": {"mnist": (4, 64, 32), "colored-mnist": (4, 64, 32), "cifar10": (4, 64, 32),
              "lsun-bedroom": (2, 64, 16)},
    "cpu": {"mnist": (4, 16, 8), "colored-mnist": (4, 16, 8), "cifar10": (4, 16, 8),
            "lsun-bedroom": (2, 16, 8)},
}
BY_DATASET = "by the pretrained model's dataset and the preset (cpu: 16/4/8; paper: MNIST M=4 T=64 batch 32, LSUN M=2 batch 16)"


def _sampler_checks(cfg: Any) -> None:
    """The sampler and the adjoint and KL that apply to it (once the sampler is known)."""
    if cfg.sampler is None:
        return
    if cfg.adjoint == "continuous" and cfg.sampler != "probability-flow":
        raise UserError("--adjoint continuous is the adjoint ODE of the probability flow: it needs "
                        "--sampler probability-flow (and --beta 0)")
    if cfg.sampler in DETERMINISTIC_SAMPLERS and cfg.beta:
        raise UserError(f"--sampler {cfg.sampler} is deterministic: the Girsanov KL needs noise; "
                        "use --beta 0 or a stochastic sampler (euler-maruyama, ddpm)")


def _ddpo_checks(cfg: Any) -> None:
    """--method ddpo's policy is the sampler's chain of Gaussian transitions; its options (at other values
    than their defaults) belong to it alone."""
    if cfg.method == "ddpo":
        if cfg.sampler in DETERMINISTIC_SAMPLERS:
            raise UserError(f"--method ddpo needs a stochastic sampler (euler-maruyama, ddpm): --sampler {cfg.sampler} "
                            "is deterministic, its steps have no transition probabilities")
        return
    changed = [name for name, default in DDPO_OPTIONS.items() if getattr(cfg, name) != default]
    if changed:
        flags = ", ".join("--" + name.replace("_", "-") for name in changed)
        raise UserError(f"{flags}: --method ddpo's option(s); --method {cfg.method} does not use them")


def _m_divides_t(cfg: Any) -> None:
    if cfg.M is not None and cfg.T is not None and cfg.T % cfg.M:
        raise UserError(f"--M ({cfg.M}) must divide --T ({cfg.T})")


def _kl_paths_in_batches(cfg: Any) -> None:
    if cfg.batch is not None and cfg.kl_n % cfg.batch:
        raise UserError(f"--kl-n ({cfg.kl_n}) must be a multiple of --batch ({cfg.batch}): the KL's fresh paths "
                        f"are sampled in batches of the run's shape")


O = cfglib.Option
SCHEMA = cfglib.Schema(
    "finetune",
    "Reward training of a pretrained diffusion model with Implicit Diffusion (paper §5.2, Algorithm 2): "
    "minimises −λ E R(x) + β KL(P_θ ‖ P_θ0) over the U-Net weights, the KL being that of the sampler's "
    "paths up to x_{t_min}. Writes config.json, metrics.jsonl, "
    "samples/ (same-seed grids), figures/ (reward_kl.png, evolution.png), checkpoints/ and weights/ with "
    "finetuned.json; re-running into the same --out resumes.",
    (
        O("from_run", "path", None, "An `idiff pretrain` run directory.", flags=("--from",),
          rule="the most recent run under runs/ holding pretrained.json"),
        O("reward", str, "brightness", "Reward R(x) on images [B,H,W,C] in [-1,1]: brightness, red, digit:N "
          "(log p(N | x) under the MNIST classifier), compressibility / incompressibility (∓ JPEG kB at quality "
          "95; not differentiable: --method ddpo only), or package.module:function.", choices="image-reward"),
        O("lam", float, 10.0, "Reward weight λ in F = −λ E R + β KL; negative λ lowers the reward.",
          flags=("--lambda",)),
        O("beta", float, 0.1, "KL weight β. The penalty is the Girsanov KL between the sampler's path measures "
          "under θ and θ0: its T Gaussian transitions (Euler–Maruyama or DDPM ancestral) from x_{t_max} to "
          "x_{t_min}, each ‖Δmean‖²/2·variance. The final Tweedie step (--final-step tweedie) is deterministic, not a Gaussian transition: it has no Girsanov "
          "term and is not penalised. The reward gained at the reward/KL balance grows as λ/β.", minimum=0),
        O("final_step", str, "tweedie", "What the reward sees: tweedie = the denoised mean (x + σ² sθ(x))/α of "
          "the last state x = x_{t_min} (a θ-dependent map outside the KL penalty); none = x_{t_min} itself, so "
          "the penalty is exactly the path KL of what is rewarded. Clipped with --clip. Used by this run's "
          "training, grids, eval_reward and periodic FID; `idiff sample` and `idiff evaluate-fid` of the run "
          "denoise as the model's own sampler does.", choices=FINAL_STEPS),
        O("method", str, "implicit", "implicit (Algorithm 2), nested, truncated-K (e.g. truncated-1), "
          "full-backprop, ddpo (policy gradient with PPO clipping and the KL of DPOK: needs no ∇R; a "
          "stochastic sampler), or package.module:builder."),
        O("advantage", str, DDPO_OPTIONS["advantage"], "ddpo: the advantage of a path, λ (R − mean R)/(std R + "
          "1e-8) over the batch (normalized) or λ R (raw).", choices=ADVANTAGES),
        O("clip_range", float, DDPO_OPTIONS["clip_range"], "ddpo: PPO clip range ε of the per-step ratios "
          "π_θ/π_θold (Schulman et al.'s 0.2; it binds from the second update on a batch, --inner-epochs > 1: "
          "the first has ratio 1).", positive=True),
        O("inner_epochs", int, DDPO_OPTIONS["inner_epochs"], "ddpo: outer steps (updates) per sampled batch; a "
          "new batch is sampled under the current θ every --inner-epochs outer steps.", positive=True),
        O("adjoint", str, "full", "Gradient through the sampler: full (exact discrete adjoint of the completed "
          "batch), pipelined (implicit only: a queue of adjoint states, constant sequential calls with M = T), "
          "or continuous (probability-flow ODE adjoint).", choices=ADJOINTS),
        O("clip", bool, True, "Clip the samples to [-1, 1] before the reward (no gain from pixels past white "
          "or black)."),
        O("M", int, None, "Queue length M; must divide T.", flags=("--M",), rule=BY_DATASET, positive=True),
        O("T", int, None, "Sampling steps T.", flags=("--T",), rule=BY_DATASET, positive=True),
        O("batch", int, None, "Images per batch.", rule=BY_DATASET, positive=True),
        O("lr", float, 1e-4, "Adam learning rate.", positive=True),
        O("steps", int, 200, "Outer steps (θ updates).", defining=False, positive=True),
        O("sampler", str, None, "euler-maruyama or ddpm (stochastic), probability-flow or ddim (deterministic: "
          "--beta 0 only). Imported DDPM models step with ddpm or ddim.", choices=SAMPLERS,
          rule="euler-maruyama for idiff-pretrained models, ddpm for imported DDPM models"),
        O("log_every", int, 10, "Outer steps per log line (the KL is logged on it).", defining=False,
          positive=True),
        O("kl_n", int, 64, "Fresh paths sampled under the current θ from fixed keys for the logged KL and its "
          "standard error (kl, kl_se), at step 0 and on every log line; a multiple of --batch. Their network "
          "evaluations are logged apart (kl_net_evals). Not with a deterministic sampler (probability-flow, "
          "ddim): its paths have no Girsanov KL.", defining=False, minimum=2),
        O("label_every", int, 0, "Log label_kept every N steps: the fraction of --label-n fixed-key samples whose "
          "digit (by a second MNIST classifier, not any reward's: implicit/labels.py) is the one they had under "
          "θ0; 0: off. 28×28 models only.", defining=False, minimum=0),
        O("label_n", int, 256, "Fixed-key samples per label_kept.", defining=False,
          minimum=256),
        O("devices", int, None, "Local devices (on the CPU: cores exposed as host devices) the batch is split over, "
          "on every process; θ and the optimiser are replicated. It must divide --batch (times the process "
          "count).", defining=False, positive=True,
          rule="every local device, or the largest count that divides the batch (said in one line)"),
        O("sample_every", int, 50, "Re-sample the fixed-key grid every N steps.", defining=False, positive=True),
        O("ckpt_every", int, 50, "Checkpoint (and write weights/) every N steps.", defining=False, positive=True),
        O("grid_n", int, 16, "Images in the fixed-key grid.", defining=False, positive=True),
        O("fid_every", int, 0, "Log the FID of --fid-n fixed-key samples every N steps; 0: off.", defining=False,
          minimum=0),
        O("fid_n", int, 64, "Samples per periodic FID.", defining=False, positive=True),
        O("fid_features", str, "mnist-classifier", "Feature extractor of the periodic FID: mnist-classifier "
          "(offline, 28×28) or inception (needs its weights, see `idiff evaluate-fid --help`).",
          choices="features"),
        cfglib.preset_option({"cpu": "T=16, M=4, batch 8", "paper": "Tables 2 and 4 by dataset"}, "cpu"),
        cfglib.out_option("Run directory"),
        cfglib.seed_option(),
        *cfglib.tracking_options(),
        cfglib.CONFIG_OPTION,
    ),
    presets={"cpu": {}, "paper": {}},
    checks=(cfglib.check_tracking, _sampler_checks, _ddpo_checks, _m_divides_t, _kl_paths_in_batches,
            cfglib.multiple_of(("steps", "sample_every", "ckpt_every", "fid_every", "label_every"))),
)


def dataset_defaults(preset: str, dataset: str) -> tuple[int, int, int]:
    """(M, T, batch) for `dataset` (a name, or name:variant) under `preset`; unknown datasets take MNIST's."""
    table = DATASET_DEFAULTS[preset]
    return table.get(dataset.split(":")[0], table["mnist"])
