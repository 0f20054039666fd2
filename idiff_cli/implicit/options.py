"""The options of `idiff finetune` (JAX-free: `--help` and bad flags answer without starting JAX).

M, T and batch depend on the preset and the pretrained model's dataset (paper Tables 2 and 4), the
sampler on the model's kind: `TABLE` holds them, known once the model is loaded (`finetune.complete`
applies it with `Schema.complete`); config.json holds the completed values. The schema checks what the
config alone decides; what needs the pretrained model is `finetune.check_against_model`'s.
"""

from __future__ import annotations

from typing import Any, Mapping

from idiff_cli import config as cfglib
from idiff_cli.errors import UserError
from idiff_cli.implicit.ppo import ADVANTAGES, PPO

# The --sampler names, stochastic or deterministic as Sampler.stochastic decides: these JAX-free names serve
# the choices, the help and the error messages (tests/test_diffusion_samplers.py checks that they agree).
# euler-maruyama and probability-flow discretise a continuous-time process; ddpm (ancestral) and ddim
# also step an imported discrete DDPM model.
STOCHASTIC_SAMPLERS = ("euler-maruyama", "ddpm")
DETERMINISTIC_SAMPLERS = ("probability-flow", "ddim")
SAMPLERS = STOCHASTIC_SAMPLERS + DETERMINISTIC_SAMPLERS
ADJOINTS = ("full", "pipelined", "continuous")
FINAL_STEPS = ("tweedie", "none", "noisy")
DDPO_DEFAULTS = PPO()  # --method ddpo's own options (PPO's fields) at their defaults, which another method keeps

TRAIN = ("all", "lora")
DTYPES = ("float32", "bfloat16")
LORA_OPTIONS = ("lora_rank", "lora_alpha", "lora_targets", "lora")
TEXT_OPTIONS = ("prompts", "eval_prompts", "negative_prompt", "guidance", "dtype")

# (M, T, batch) by the pretrained model's dataset: the paper's (Tables 2 and 4) and the cpu preset's; a
# text-to-image model's: a CPU-sized queue, and DDPO's 50 steps (its batch per device: 8).
OTHER = "other datasets"
TEXT_TO_IMAGE = "text-to-image"
ROWS = {
    ("cpu", OTHER): dict(M=4, T=16, batch=8),
    ("cpu", "lsun-bedroom"): dict(M=2, T=16, batch=8),
    ("cpu", TEXT_TO_IMAGE): dict(M=2, T=8, batch=2),
    ("paper", OTHER): dict(M=4, T=64, batch=32),
    ("paper", "lsun-bedroom"): dict(M=2, T=64, batch=16),
    ("paper", TEXT_TO_IMAGE): dict(M=5, T=50, batch=8),
}


def _family(values: Mapping[str, Any], context: Mapping[str, Any] | None) -> str | None:
    """The pretrained model's dataset (context["dataset"], a name or name:variant), once it is loaded; a
    text-to-image model's family is its own."""
    if context is None:
        return None
    if context["text_to_image"]:
        return TEXT_TO_IMAGE
    return "lsun-bedroom" if context["dataset"].split(":")[0] == "lsun-bedroom" else OTHER


def _derived(values: Mapping[str, Any], context: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The pretrained run (--from), its sampler (ddpm for an imported DDPM model, a discrete chain;
    euler-maruyama for a continuous-time one; for --method ddpo on a text-to-image model, DDPO's DDIM
    with η = 1), ddim's η (1 for --method ddpo, else 0) and what is trained: LoRA adapters on a
    text-to-image model or when a LoRA option is given, else all the weights."""
    if context is None:
        return None
    lora = context["text_to_image"] or any(values.get(name) is not None for name in LORA_OPTIONS)
    ddpo = values.get("method") == "ddpo"
    sampler = values.get("sampler") or ("ddim" if ddpo and context["text_to_image"] else
                                        "ddpm" if context["imported"] else "euler-maruyama")
    return {"from_run": str(context["from_run"]), "sampler": sampler,
            "ddim_eta": 1.0 if ddpo and sampler == "ddim" else 0.0, "train": "lora" if lora else "all"}


TABLE = cfglib.Table(family=_family, what="the pretrained model's dataset", rows=ROWS, derive=_derived,
                     derived_help={"from_run": "the most recent run under runs/ holding pretrained.json",
                                   "sampler": "euler-maruyama for idiff-pretrained models, ddpm for imported DDPM "
                                              "models and pipelines; ddim (η = 1) for --method ddpo on a "
                                              "text-to-image model, as DDPO samples",
                                   "ddim_eta": "1 for --method ddpo (DDPO's), else 0",
                                   "train": "lora on a text-to-image model or with a --lora* option, else all"})


def _ddpo_options(cfg: Any) -> None:
    """--method ddpo's options belong to it alone: another method keeps them at their defaults."""
    if cfg.method == "ddpo":
        return
    changed = [name for name, default in DDPO_DEFAULTS._asdict().items() if getattr(cfg, name) != default]
    if changed:
        flags = ", ".join("--" + name.replace("_", "-") for name in changed)
        raise UserError(f"{flags}: --method ddpo's option(s); --method {cfg.method} does not use them")


def _ddpo_batch(cfg: Any) -> None:
    """Normalized advantages compare the paths of a batch: one path's is 0 and leaves no reward signal."""
    if cfg.method == "ddpo" and cfg.advantage == "normalized" and cfg.batch < 2:
        raise UserError("--method ddpo normalizes each path's reward over the batch: with --batch 1 every advantage "
                        "is 0; use --batch 2 or more, or --advantage raw")


def _ddpo_train_batch(cfg: Any) -> None:
    """Each pass over a round cuts its --batch paths into minibatches of --train-batch."""
    if cfg.method == "ddpo" and cfg.train_batch is not None and cfg.batch % cfg.train_batch:
        raise UserError(f"--train-batch ({cfg.train_batch}) must divide --batch ({cfg.batch}): each pass over a "
                        f"round cuts its paths into minibatches of --train-batch")


def _ddpo_adv_clip(cfg: Any) -> None:
    """--adv-clip bounds normalized advantages: raw ones have none."""
    if cfg.method == "ddpo" and cfg.advantage == "raw" and cfg.adv_clip != DDPO_DEFAULTS.adv_clip:
        raise UserError("--adv-clip bounds the normalized advantages; --advantage raw keeps λ R unclipped")


def _lora_options(cfg: Any) -> None:
    """The LoRA options shape the adapters: with --train all there are none."""
    if cfg.train == "all":
        given = [name for name in LORA_OPTIONS if getattr(cfg, name) is not None]
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise UserError(f"{flags}: LoRA option(s); --train all trains every weight (use --train lora)")


def _ddim_eta(cfg: Any) -> None:
    """η is the ddim sampler's noise: no other sampler has one."""
    if cfg.ddim_eta and cfg.sampler != "ddim":
        raise UserError(f"--ddim-eta {cfg.ddim_eta:g} applies to --sampler ddim, not {cfg.sampler}")


def _m_divides_t(cfg: Any) -> None:
    if cfg.T % cfg.M:
        raise UserError(f"--M ({cfg.M}) must divide --T ({cfg.T})")


def _kl_paths_in_batches(cfg: Any) -> None:
    if cfg.kl_n % cfg.batch:
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
        O("from_run", "path", None, "An `idiff pretrain` run directory.", flags=("--from",)),
        O("reward", str, "brightness", "Reward R(x) on images [B,H,W,C] in [-1,1]: brightness, red, digit:N "
          "(log p(N | x) under the MNIST classifier), jpeg-compressibility / jpeg-incompressibility (∓ JPEG kB at "
          "quality 95; not differentiable: --method ddpo only; also named compressibility / incompressibility), "
          "aesthetic (the LAION aesthetic predictor v2 on CLIP ViT-L/14), clip-score (cosine of CLIP ViT-L/14's "
          "image and prompt embeddings; both: --reward-weights), or "
          "package.module:function, R(images) or R(images, prompts).", choices="image-reward"),
        O("reward_weights", "path", None, "Directory of the weight files a reward reads: openai/clip-vit-large-"
          "patch14's config.json and model.safetensors, with the LAION head sac+logos+ava1-l14-linearMSE.pth "
          "(aesthetic) or CLIP's tokenizer files (clip-score).", rule="$IDIFF_CACHE_DIR/clip-vit-large-patch14"),
        O("lam", float, 10.0, "Reward weight λ in F = −λ E R + β KL; negative λ lowers the reward.",
          flags=("--lambda",)),
        O("beta", float, 0.1, "KL weight β. The penalty is the Girsanov KL between the sampler's path measures "
          "under θ and θ0: its T Gaussian transitions (Euler–Maruyama or DDPM ancestral) from x_{t_max} to "
          "x_{t_min}, each ‖Δmean‖²/2·variance. The final Tweedie step (--final-step tweedie) is deterministic, "
          "not a Gaussian transition: it has no Girsanov term and is not penalised; nor, with --sampler ddpm, is "
          "a step that draws no noise (from t = 0, or into x_0 with fixed_small variance), a θ-dependent map, "
          "unless --final-step noisy (docs/import.md). The reward gained at the reward/KL balance grows as λ/β.",
          minimum=0),
        O("final_step", str, "tweedie", "What the reward sees: tweedie = the denoised mean (x + σ² sθ(x))/α of "
          "the last state x = x_{t_min} (a θ-dependent map outside the KL penalty); none = x_{t_min} itself, so "
          "the penalty is exactly the path KL of what is rewarded. Clipped with --clip. Used by this run's "
          "training, grids, eval_reward and periodic FID; `idiff sample` and `idiff evaluate-fid` of the run "
          "denoise as the model's own sampler does. An imported DDPM chain (--sampler ddpm) has no Tweedie "
          "step: its last ancestral step lands on x_0 with tweedie or none, outside the penalty when it draws "
          "no noise; noisy = that step draws noise of variance 1 − ᾱ_t (fixed_large's; std 0.01 from t = 0), "
          "so the penalty counts it: the KL between the whole θ and θ0 chains, a bound on the KL of the "
          "rewarded images.",
          choices=FINAL_STEPS),
        O("method", str, "implicit", "implicit (Algorithm 2), nested, truncated-K (e.g. truncated-1), "
          "full-backprop, ddpo (policy gradient with PPO clipping and the KL of DPOK: needs no ∇R; a "
          "stochastic sampler; one outer step is a sampling round of --batch paths under the current θ and "
          "its --inner-epochs passes of --batch/--train-batch updates each), or package.module:builder."),
        O("advantage", str, DDPO_DEFAULTS.advantage, "ddpo: the advantage of a path: normalized = λ "
          "clip((R − mean)/(std + eps), ±--adv-clip), the mean and std of the last 16 rewards of the path's "
          "class label or prompt once it has 16, before that of the round (ddpo-pytorch's per-prompt stat "
          "tracking; an unconditional model: the round's); raw = λ R.", choices=ADVANTAGES),
        O("adv_clip", float, DDPO_DEFAULTS.adv_clip, "ddpo: the bound of the normalized advantages "
          "(ddpo-pytorch's adv_clip_max).", positive=True),
        O("clip_range", float, DDPO_DEFAULTS.clip_range, "ddpo: PPO clip range ε of the per-step ratios "
          "π_θ/π_θold (ddpo-pytorch's 1e-4; it binds from a round's second update on: the first has ratio 1).",
          positive=True),
        O("inner_epochs", int, DDPO_DEFAULTS.inner_epochs, "ddpo: passes over each sampling round, each a fresh "
          "permutation of its paths cut into minibatches of --train-batch, one update each.", positive=True),
        O("train_batch", int, DDPO_DEFAULTS.train_batch, "ddpo: paths per update (a minibatch of the round); "
          "must divide --batch.", positive=True, rule="--batch // 2, at least 1 (two updates per pass)"),
        O("adjoint", str, "full", "Gradient through the sampler: full (exact discrete adjoint of the completed "
          "batch), pipelined (implicit only: a queue of adjoint states, constant sequential calls with M = T), "
          "or continuous (probability-flow ODE adjoint).", choices=ADJOINTS),
        O("clip", bool, True, "Clip the samples to [-1, 1] before the reward (no gain from pixels past white "
          "or black)."),
        O("train", str, None, "What θ is: lora (low-rank adapters W + (α/r)·B·A on --lora-targets, B = 0 at "
          "the start, the base weights frozen) or all (every weight of the U-Net).", choices=TRAIN),
        O("lora_rank", int, None, "LoRA rank r.", positive=True, rule="4 (with --train lora)"),
        O("lora_alpha", float, None, "LoRA α (the update is scaled by α/r).", positive=True, rule="the rank"),
        O("lora_targets", str, None, "Modules given adapters, by diffusers' module names or their last parts "
          "(peft's rule: a name equal to a target or ending in .target).", many=True,
          rule="to_q,to_k,to_v,to_out.0 (Stable Diffusion, imported DDPM U-Nets); every attention and "
               "convolution layer of idiff's own U-Net (docs/finetune.md)"),
        O("lora", "path", None, "Start from an existing diffusers LoRA file (pytorch_lora_weights.safetensors: "
          "its rank and modules; θ0 of the KL is the model with it)."),
        O("prompts", "path", None, "Text-to-image: training prompts, a text file (one per line) or a .jsonl "
          "file ({\"prompt\": …, \"negative\": …} per line); each batch draws its prompts uniformly from them.",
          rule="16 built-in animal names (DDPO's simple-animals kind)"),
        O("eval_prompts", "path", None, "Text-to-image: held-out prompts of the sample grids and eval_reward "
          "(grid image b shows prompt b mod their number).", rule="the built-in animals"),
        O("negative_prompt", str, None, "Text-to-image: negative prompt of classifier-free guidance (a JSONL "
          "line's \"negative\" overrides it).", rule="\"\" (empty)"),
        O("guidance", float, None, "Text-to-image: classifier-free guidance scale g of the finetuning sampler "
          "(the KL is between the guided transitions); g <= 1: the conditional model alone.", minimum=0,
          rule="7.5"),
        O("dtype", str, None, "Text-to-image: dtype of the activations and frozen weights (bfloat16 on "
          "accelerators); adapters, optimiser state, latents and KL sums stay float32.", choices=DTYPES,
          rule="float32"),
        O("remat", bool, False, "Text-to-image: rematerialise the U-Net's and the VAE decoder's blocks in the "
          "backward passes (jax.checkpoint of each ResNet, transformer and mid block: block inputs kept, the "
          "rest recomputed; the same gradients for about one more forward pass of memory-bound work)."),
        O("M", int, None, "Queue length M; must divide T.", flags=("--M",), positive=True),
        O("T", int, None, "Sampling steps T.", flags=("--T",), positive=True),
        O("batch", int, None, "Images per batch.", positive=True),
        O("lr", float, 1e-4, "Adam learning rate.", positive=True),
        O("steps", int, 200, "Outer steps (θ updates; ddpo: sampling rounds of --inner-epochs × --batch / "
          "--train-batch updates each).", defining=False, positive=True),
        O("sampler", str, None, "euler-maruyama or ddpm (stochastic), probability-flow (deterministic: --beta 0 "
          "only) or ddim (deterministic with --ddim-eta 0, stochastic with η > 0). Imported DDPM models step with "
          "ddpm or ddim.", choices=SAMPLERS),
        O("ddim_eta", float, None, "η of the ddim sampler: σ_η² = η² × the DDPM posterior variance (0: "
          "deterministic; 1: DDPO's sampler, whose steps are Gaussian transitions with a Girsanov KL and "
          "log-probabilities).", minimum=0),
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
        cfglib.devices_option(),
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
    table=TABLE,
    checks=(cfglib.check_tracking, _ddpo_options, _ddpo_batch, _ddpo_train_batch, _ddpo_adv_clip, _ddim_eta,
            _lora_options, _m_divides_t, _kl_paths_in_batches,
            cfglib.multiple_of(("steps", "sample_every", "ckpt_every", "fid_every", "label_every"))),
)
