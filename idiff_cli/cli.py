"""The `idiff` command line: one thin function per subcommand (parse -> config -> run).

Every subcommand shares --out, --seed, --preset and --config; per-field flags override the preset
and the config file. Bad input prints one line `error: ...` and exits with code 2.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Annotated, Callable, Optional

from idiff_cli.parallel import use_host_cores

use_host_cores()  # before JAX starts: one XLA host device per CPU core

import typer  # noqa: E402

from idiff_cli import __version__  # noqa: E402
from idiff_cli.errors import UserError  # noqa: E402

app = typer.Typer(
    name="idiff",
    help="Implicit Diffusion (Marion et al., AISTATS 2025): optimise through stochastic sampling.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)

# ---- options shared by every subcommand ----
Out = Annotated[Optional[pathlib.Path], typer.Option("--out", help="Run directory (default: runs/<command>-<timestamp>).")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Root random seed of the run (default: 0).")]
ConfigFile = Annotated[Optional[pathlib.Path], typer.Option("--config", help="JSON or TOML file of config overrides (flags win).")]
FidEvery = Annotated[Optional[int], typer.Option(help="Log the FID of --fid-n samples (fixed keys) every N steps into "
                                                 "metrics.jsonl; 0: off. (default: 0)")]
FidN = Annotated[Optional[int], typer.Option(help="Samples per periodic FID. (default: 500 pretrain, 64 finetune)")]
FidFeatures = Annotated[Optional[str], typer.Option(help="Feature extractor of the periodic FID: mnist-classifier "
                                                    "(offline, 28×28) or inception (needs its weights, see "
                                                    "`idiff evaluate-fid --help`). (default: mnist-classifier)")]


def user_errors(fn: Callable) -> Callable:
    """Turns UserError into one line on stderr and exit code 2; Ctrl-C into exit code 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: files written so far are complete and kept", err=True)
            raise typer.Exit(130) from None

    return wrapper


def run_dir_for(out: Optional[pathlib.Path], command: str):
    from idiff_cli.runs import RunDir, default_run_dir

    return RunDir(out or default_run_dir(command))


def parse_list(values: Optional[list[str]], cast: Callable, flag: str) -> Optional[tuple]:
    """`--T 1,10 --T 100` -> (1, 10, 100); None when the flag is absent."""
    if not values:
        return None
    items = [v for value in values for v in value.replace(",", " ").split()]
    try:
        return tuple(cast(v) for v in items)
    except ValueError:
        raise UserError(f"{flag} takes numbers separated by commas, got {','.join(values)!r}") from None


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"idiff {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=version_callback, is_eager=True,
                                                     help="Print the version and exit.")] = None,
) -> None:
    """Implicit Diffusion experiment runner. Run `idiff COMMAND --help` for a command's options."""


@user_errors
def langevin_reward(
    baseline: Annotated[Optional[str], typer.Option(
        "--baseline", help="Method(s) to run: all, implicit, langevin-theta0, nested, unrolled, guidance, "
                           "langevin-theta-opt, a comma-separated list, or package.module:builder. "
                           "`implicit` always runs too: its final θ is θ_opt. (default: all)")] = None,
    T: Annotated[Optional[list[str]], typer.Option(
        "--T", help="Inner sampling steps per θ update for nested and unrolled; several values run "
                    "each (--T 1,10,100). (default: 1,10,100)")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Outer (θ update) steps K. (default: 5000)")] = None,
    batch: Annotated[Optional[int], typer.Option(help="Particles per seed. (default: 1000)")] = None,
    seeds: Annotated[Optional[int], typer.Option(help="Independent repetitions, run together. (default: 10)")] = None,
    gamma: Annotated[Optional[float], typer.Option(help="ULA step size γ. (default: 0.2)")] = None,
    eta: Annotated[Optional[float], typer.Option(help="Learning rate η of θ (SGD). (default: 0.1)")] = None,
    lam: Annotated[Optional[float], typer.Option("--lambda", help="Guidance strength λ of the guidance "
                                                  "baseline, V(·,θ0) − λ R_smooth. (default: 1)")] = None,
    eta_schedule: Annotated[Optional[str], typer.Option(help="constant or inv-sqrt (η/√(k+1)). (default: constant)")] = None,
    lambda_kl: Annotated[Optional[float], typer.Option(
        "--lambda-kl", help="β of a KL penalty: θ updates add β Γ_ref with exact draws of π*(θ0), the gradient "
                            "of β KL(π*(θ0) ‖ π*(θ)). (default: 0)")] = None,
    log_every: Annotated[Optional[int], typer.Option(help="Log metrics every N outer steps. (default: 10)")] = None,
    potential: Annotated[Optional[str], typer.Option(help="Potential V(x, θ): hexagon, hexagon-paper, or "
                                                      "package.module:function. (default: by preset)")] = None,
    reward: Annotated[Optional[str], typer.Option(help="Reward R(x): corner, corner-paper, or "
                                                   "package.module:function. (default: by preset)")] = None,
    theta0: Annotated[Optional[str], typer.Option(help="Initial θ0, comma-separated. (default: by preset)")] = None,
    preset: Annotated[str, typer.Option(help="reference (the authors' released constants) or paper "
                                             "(the text of Appendix A.1).")] = "reference",
    out: Out = None,
    seed: Seed = None,
    config: ConfigFile = None,
) -> None:
    """Reward training of Langevin processes (paper §5.1, Appendix A.1).

    Implicit Diffusion and its five baselines on a 2-D Gaussian mixture, 10 seeds run together. Writes config.json, metrics.jsonl, arrays.npz and figures/ (Figs 4, 5, 8, 10) to the run directory.
    """
    from idiff_cli import config as cfglib
    from idiff_cli.langevin import experiment

    flags = dict(baseline=baseline, T=parse_list(T, int, "--T"), steps=steps, batch=batch, seeds=seeds,
                 gamma=gamma, eta=eta, guidance_lambda=lam, eta_schedule=eta_schedule, lambda_kl=lambda_kl,
                 log_every=log_every,
                 potential=potential, reward=reward, theta0=parse_list([theta0] if theta0 else None, float, "--theta0"),
                 seed=seed)
    cfg = cfglib.resolve(experiment.LangevinConfig, experiment.PRESETS, preset, config, flags)
    experiment.run(cfg, run_dir_for(out, "langevin-reward"))


app.command("langevin-reward")(langevin_reward)
app.command("langevin", help="Alias of `langevin-reward`.")(langevin_reward)


@user_errors
def ebm_train(
    energy: Annotated[Optional[str], typer.Option(help="Energy V(x, θ): wells (7-well mixture, θ ∈ R⁷), mlp "
                                                   "(Flax MLP), or package.module:attribute. (default: by preset)")] = None,
    data: Annotated[Optional[str], typer.Option(help="Data: wells (exact draws of the A.1 target), two-moons, "
                                                 "eight-gaussians, checkerboard, rings, or FILE.npy ([N, 2]). "
                                                 "(default: by preset)")] = None,
    method: Annotated[Optional[str], typer.Option(help="implicit (1 ULA step per update, persistent chains), nested "
                                                   "(T steps), short-run (restart from N(0, I), T steps), a "
                                                   "comma-separated list, or all. (default: implicit)")] = None,
    T: Annotated[Optional[list[str]], typer.Option("--T", help="Inner ULA steps of nested and short-run; several "
                                                   "values run each (--T 10,100). (default: 10)")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Outer (θ update) steps. (default: 40000; mlp: 5000)")] = None,
    batch: Annotated[Optional[int], typer.Option(help="Chains and data points per update, per seed. (default: 1000)")] = None,
    seeds: Annotated[Optional[int], typer.Option(help="Independent repetitions, run together. (default: 10; mlp: 2)")] = None,
    gamma: Annotated[Optional[float], typer.Option(help="ULA step size γ. (default: 0.2; mlp: 0.05)")] = None,
    optimizer: Annotated[Optional[str], typer.Option(help="sgd or adam (optax). (default: sgd; mlp: adam)")] = None,
    eta: Annotated[Optional[float], typer.Option(help="Learning rate of θ. (default: 0.1; mlp: 0.0001)")] = None,
    eta_schedule: Annotated[Optional[str], typer.Option(help="constant or inv-sqrt (η/√(k+1)). (default: constant)")] = None,
    theta0: Annotated[Optional[str], typer.Option(help="Initial θ of the wells energy, comma-separated. "
                                                   "(default: -7,-7,-7,-7,-7,-7,11)")] = None,
    hidden: Annotated[Optional[str], typer.Option(help="Hidden widths of the mlp energy. (default: 64,64)")] = None,
    samplers: Annotated[Optional[bool], typer.Option("--samplers/--no-samplers", help="Also run Langevin at θ0 and at "
                                                     "the trained θ (Figs 11-12). (default: on)")] = None,
    log_every: Annotated[Optional[int], typer.Option(help="Log metrics every N outer steps. (default: 100)")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="Orbax checkpoint every N outer steps (a multiple "
                                                            "of --log-every). (default: 10000; mlp: 1000)")] = None,
    n_test: Annotated[Optional[int], typer.Option(help="Held-out points for the NLL. (default: 10000)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its latest checkpoints.")] = False,
    preset: Annotated[Optional[str], typer.Option(help="paper (Appendix A.1; default) or mlp (default with "
                                                       "--energy mlp).")] = None,
    out: Out = None,
    seed: Seed = None,
    config: ConfigFile = None,
) -> None:
    """Energy-based models trained by Implicit Diffusion (paper Appendix A.1, "training from scratch").

    Fits V(·, θ) to data with Γ_ref = E_data[∇θV] − E_chains[∇θV]; exact KLs and NLL by quadrature. Writes config.json, metrics.jsonl, methods/, summary.json, checkpoints/ and figures/ (Figs 11, 12) to the run directory.
    """
    from idiff_cli import config as cfglib
    from idiff_cli.ebm import experiment

    flags = dict(energy=energy, data=data, method=method, T=parse_list(T, int, "--T"), steps=steps, batch=batch,
                 seeds=seeds, gamma=gamma, optimizer=optimizer, eta=eta, eta_schedule=eta_schedule,
                 theta0=parse_list([theta0] if theta0 else None, float, "--theta0"),
                 hidden=parse_list([hidden] if hidden else None, int, "--hidden"), samplers=samplers,
                 log_every=log_every, checkpoint_every=checkpoint_every, n_test=n_test, seed=seed)
    if resume:
        if out is None:
            raise UserError("--resume needs --out, the run directory to continue")
        run_dir = run_dir_for(out, "ebm-train")
        cfg = experiment.resumed_config(run_dir, flags, preset, config)
    else:
        preset = preset or ("mlp" if energy == "mlp" else "paper")
        cfg = cfglib.resolve(experiment.EBMConfig, experiment.PRESETS, preset, config, flags)
        run_dir = run_dir_for(out, "ebm-train")
    experiment.run(cfg, run_dir, resume=resume)


app.command("ebm-train")(ebm_train)


@user_errors
def evaluate_fid(
    run_dir: Annotated[Optional[pathlib.Path], typer.Argument(
        help="An `idiff pretrain` run directory: its samples are evaluated and fid.json is written there.")] = None,
    checkpoint: Annotated[Optional[int], typer.Option(help="Checkpoint step to sample from. (default: θ0 of pretrained.json)")] = None,
    n: Annotated[int, typer.Option("--n", help="Number of samples.")] = 50000,
    batch: Annotated[int, typer.Option(help="Samples per batch (split over the devices); features are kept per batch.")] = 250,
    sampler: Annotated[Optional[str], typer.Option(help="euler-maruyama, probability-flow or ddpm. (default: the run's)")] = None,
    sample_steps: Annotated[Optional[int], typer.Option(help="Sampling steps. (default: the run's)")] = None,
    features: Annotated[str, typer.Option(help="mnist-classifier (offline: 'FID (MNIST classifier features)'), inception "
                                               "(pytorch-fid's network: the standard FID), or package.module:function.")] = "mnist-classifier",
    inception_weights: Annotated[Optional[pathlib.Path], typer.Option(
        help="The .npz converted from pytorch-fid's weights (python -m idiff_cli.fid.convert). "
             "(default: $IDIFF_INCEPTION_WEIGHTS)")] = None,
    ref_stats: Annotated[Optional[pathlib.Path], typer.Option(help="Reference statistics: .npz with mu and sigma.")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="Reference dataset when no --ref-stats: mnist, colored-mnist, "
                                                        "cifar10, lsun-bedroom or a tfds name. (default: the run's)")] = None,
    data_dir: Annotated[Optional[str], typer.Option(help="tfds data directory.")] = None,
    save_stats: Annotated[Optional[pathlib.Path], typer.Option(
        help="Write the statistics of --dataset (or of --samples) to this .npz and exit.")] = None,
    samples: Annotated[Optional[pathlib.Path], typer.Option(
        help="Evaluate the images in this .npz ([N, H, W, C], uint8 or float in [-1, 1]) instead of sampling.")] = None,
    out: Out = None,
    seed: Seed = None,
) -> None:
    """Fréchet distance of samples to reference statistics (FID; pytorch-fid's definition with --features inception).

    Writes fid.json (value, n, features, reference, checkpoint, sampler) into RUN_DIR (or --out with --samples).
    """
    from idiff_cli.fid import evaluate
    from idiff_cli.fid.stats import image_statistics, save_stats as write_stats
    from idiff_cli.runs import console

    for name, value in (("--n", n), ("--batch", batch)):
        if value < 1:
            raise UserError(f"{name} must be an integer >= 1, got {value}")
    modes = [m for m, given in (("RUN_DIR", run_dir), ("--samples", samples)) if given]
    if len(modes) > 1:
        raise UserError("give RUN_DIR or --samples, not both")
    if not modes and not (save_stats and dataset):
        raise UserError("give RUN_DIR, --samples FILE.npz, or --dataset NAME --save-stats FILE.npz")
    extractor = evaluate.get_features(features, str(inception_weights) if inception_weights else None)
    if save_stats:
        if run_dir:
            raise UserError("--save-stats writes the statistics of --dataset or --samples, not of a run")
        from idiff_cli.fid.stats import dataset_images

        images = evaluate.load_samples(samples) if samples else dataset_images(dataset, data_dir)
        mu, sigma = image_statistics(extractor, images, batch)
        write_stats(save_stats, mu, sigma, features=extractor.name, n=len(images),
                    source=str(samples) if samples else f"dataset {dataset}")
        console.print(f"wrote {save_stats}: {extractor.name} statistics of {len(images)} images", highlight=False)
        return
    if samples:
        images = evaluate.load_samples(samples)
        extractor.check_shape(images.shape)
        ref = evaluate.reference(extractor, ref_stats, dataset or ("mnist" if extractor.name == "mnist-classifier" else None),
                                 data_dir, batch=batch)
        result = evaluate.evaluate_images(images, extractor, ref, out or run_dir_for(None, "evaluate-fid").path,
                                          str(samples), batch)
    else:
        result = evaluate.evaluate_run(run_dir, extractor, checkpoint=checkpoint, n=n, batch=batch,
                                       sampler_name=sampler, sample_steps=sample_steps, seed=seed or 0,
                                       ref_stats=ref_stats, dataset=dataset, data_dir=data_dir)
    console.print(evaluate.summary(result), highlight=False)


app.command("evaluate-fid")(evaluate_fid)


@user_errors
def pretrain(
    dataset: Annotated[Optional[str], typer.Argument(
        help="mnist, colored-mnist, cifar10, lsun-bedroom, any tensorflow-datasets image dataset name, or "
             "package.module:function. mnist falls back to 5,000 embedded digits when tfds data is absent.",
        show_default=False)] = None,
    data_dir: Annotated[Optional[str], typer.Option(help="tfds data directory with array_record files "
                                                   "(default: ~/tensorflow_datasets or $TFDS_DATA_DIR).")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Crop and resize images of varying size to this "
                                                     "(default: the dataset's; lsun-bedroom 64).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Training steps. (default: cpu 2400 MNIST, 5000 CIFAR/LSUN; paper 18000 MNIST, 500000 CIFAR/LSUN)")] = None,
    batch: Annotated[Optional[int], typer.Option(help="Global batch, split over all devices. (default: 32; paper CIFAR/LSUN 2048)")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Adam learning rate. (default: 1e-3 MNIST, 2e-4 CIFAR/LSUN)")] = None,
    ema_decay: Annotated[Optional[float], typer.Option(help="EMA decay of the weights. (default: 0.995 MNIST, 0.9999 CIFAR/LSUN paper)")] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(help="Linear learning-rate warm-up steps. (default: 0; paper CIFAR/LSUN 5000)")] = None,
    grad_clip: Annotated[Optional[float], typer.Option(help="Clip the gradient's global norm (0: off). (default: 0; paper CIFAR/LSUN 1)")] = None,
    sde: Annotated[Optional[str], typer.Option(help="Noise process: ou or cosine. (default: ou MNIST, cosine CIFAR/LSUN)")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="euler-maruyama, probability-flow or ddpm, for the sample "
                                                   "grids. (default: euler-maruyama MNIST, ddpm CIFAR/LSUN)")] = None,
    sample_steps: Annotated[Optional[int], typer.Option(help="Sampling steps. (default: 256; paper CIFAR/LSUN 1024)")] = None,
    class_conditional: Annotated[Optional[bool], typer.Option("--class-conditional/--unconditional",
                                 help="Condition the U-Net on labels. (default: paper CIFAR-10 yes, else no)")] = None,
    flip: Annotated[Optional[bool], typer.Option("--flip/--no-flip", help="Random horizontal flips. (default: CIFAR/LSUN yes)")] = None,
    precondition: Annotated[Optional[bool], typer.Option("--precondition/--no-precondition",
                            help="EDM-style preconditioning of ε_θ: keeps each image's colour through the sampler. (default: yes)")] = None,
    ch: Annotated[Optional[int], typer.Option(help="U-Net base channels. (default: by preset: cpu 16, paper 64-128)")] = None,
    ch_mult: Annotated[Optional[str], typer.Option(help="Channel multipliers per resolution, e.g. 1,2,2. (default: by preset)")] = None,
    num_res_blocks: Annotated[Optional[int], typer.Option(help="Residual blocks per resolution. (default: cpu 1, paper 2)")] = None,
    attn_resolutions: Annotated[Optional[str], typer.Option(help="Resolutions with self-attention, e.g. 16. (default: by preset)")] = None,
    dropout: Annotated[Optional[float], typer.Option(help="Dropout. (default: cpu 0, paper 0.1)")] = None,
    log_every: Annotated[Optional[int], typer.Option(help="Log metrics every N steps (one jitted call). (default: 50)")] = None,
    sample_every: Annotated[Optional[int], typer.Option(help="Write a sample grid every N steps. (default: by preset and dataset, e.g. cpu MNIST 800)")] = None,
    ckpt_every: Annotated[Optional[int], typer.Option(help="Checkpoint every N steps. (default: by preset and dataset, e.g. cpu MNIST 400)")] = None,
    keep_checkpoints: Annotated[Optional[int], typer.Option(help="Keep the last k checkpoints. (default: 3)")] = None,
    grid_n: Annotated[Optional[int], typer.Option(help="Images per sample grid. (default: 64)")] = None,
    fid_every: FidEvery = None,
    fid_n: FidN = None,
    fid_features: FidFeatures = None,
    resume: Annotated[Optional[pathlib.Path], typer.Option(help="Continue the run in this directory with its own "
                                                           "config (--steps may be raised).")] = None,
    preset: Annotated[Optional[str], typer.Option(help="cpu (≈1 M-parameter U-Net, the default) or paper "
                                                  "(DDPM-size U-Net, Tables 1/3).")] = None,
    out: Out = None,
    seed: Seed = None,
    config: ConfigFile = None,
) -> None:
    """Pretrain a denoising diffusion model θ0 (paper Appendix A.2, Tables 1 and 3).

    Denoising score matching with a Flax U-Net, Adam and EMA; the batch is sharded over all devices (and processes: set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, or run on a multi-host TPU VM). Writes config.json, metrics.jsonl, checkpoints/, pretrained.json, samples/ and figures/ to the run directory; re-running into the same --out resumes from the latest checkpoint.
    """
    from idiff_cli.parallel import initialize_distributed_from_env

    initialize_distributed_from_env()
    from idiff_cli.diffusion import pretrain as experiment
    from idiff_cli.errors import UserError as _UserError

    flags = dict(data_dir=data_dir, image_size=image_size, steps=steps, batch=batch, lr=lr, ema_decay=ema_decay,
                 warmup_steps=warmup_steps, grad_clip=grad_clip, sde=sde, sampler=sampler, sample_steps=sample_steps,
                 class_conditional=class_conditional, flip=flip, precondition=precondition, ch=ch, ch_mult=parse_list([ch_mult] if ch_mult else None, int, "--ch-mult"),
                 num_res_blocks=num_res_blocks, attn_resolutions=parse_list([attn_resolutions] if attn_resolutions else None, int, "--attn-resolutions"),
                 dropout=dropout, log_every=log_every, sample_every=sample_every, ckpt_every=ckpt_every,
                 keep_checkpoints=keep_checkpoints, grid_n=grid_n, fid_every=fid_every, fid_n=fid_n,
                 fid_features=fid_features, seed=seed)
    if resume is not None:
        if out is not None and out != resume:
            raise _UserError("--resume names the run directory; leave out --out")
        cfg = experiment.resume_config(resume, dataset, preset, config, flags)
        out = resume
    else:
        if dataset is None:
            raise _UserError("missing DATASET (mnist, colored-mnist, cifar10, lsun-bedroom or a tfds name), or --resume RUN_DIR")
        cfg = experiment.resolve_config(dataset, preset or "cpu", config, flags)
    experiment.run(cfg, run_dir_for(out, f"pretrain-{cfg.dataset.replace(':', '-').replace('/', '-')}"))


@user_errors
def sample(
    run_dir: Annotated[pathlib.Path, typer.Argument(help="An `idiff pretrain` run directory.", show_default=False)],
    n: Annotated[int, typer.Option(help="Number of images.")] = 64,
    sampler: Annotated[Optional[str], typer.Option(help="euler-maruyama, probability-flow or ddpm. (default: the run's)")] = None,
    sample_steps: Annotated[Optional[int], typer.Option(help="Sampling steps. (default: the run's: 256 MNIST, 1024 CIFAR/LSUN paper)")] = None,
    weights: Annotated[str, typer.Option(help="ema (θ0) or params (the raw weights) of a pretrain run; a finetune run has only its finetuned weights.")] = "ema",
    step: Annotated[Optional[int], typer.Option(help="Checkpoint step. (default: the one in pretrained.json)")] = None,
    batch: Annotated[int, typer.Option(help="Images per jitted call, split over the devices.")] = 256,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    out: Annotated[Optional[pathlib.Path], typer.Option("--out", help="Output path without suffix (default: "
                                                         "RUN_DIR/samples/sample-step<S>-<weights>-<sampler><steps>-seed<seed>-n<n>).")] = None,
) -> None:
    """Sample a pretrained model: a PNG grid (first 256 images) and an .npz of all n images (uint8)."""
    from idiff_cli.diffusion import pretrain as experiment
    from idiff_cli.errors import UserError as _UserError
    from idiff_cli.runs import console

    if n < 1 or batch < 1 or (sample_steps is not None and sample_steps < 1):
        raise _UserError("--n, --batch and --sample-steps must be integers >= 1")
    png, npz = experiment.sample_run(run_dir, n, sampler, sample_steps, seed, weights, step, batch, out)
    console.print(f"wrote {png} and {npz}", highlight=False)


app.command("pretrain")(pretrain)
app.command("sample")(sample)


@user_errors
def finetune(
    from_run: Annotated[Optional[pathlib.Path], typer.Option(
        "--from", help="An `idiff pretrain` run directory (default: the most recent one under runs/).")] = None,
    reward: Annotated[Optional[str], typer.Option(
        help="Reward R(x): brightness, red, or package.module:function mapping images [B,H,W,C] in [-1,1] "
             "to [B]. (default: brightness)")] = None,
    lam: Annotated[Optional[float], typer.Option("--lambda", help="Reward weight λ in F = −λ E R + β KL; "
                                                  "negative λ lowers the reward. (default: 10)")] = None,
    beta: Annotated[Optional[float], typer.Option(
        help="KL weight β >= 0; the reward gained at the reward/KL balance grows as λ/β. (default: 0.1)")] = None,
    method: Annotated[Optional[str], typer.Option(
        help="implicit (Algorithm 2), nested, truncated-K (e.g. truncated-1), full-backprop, or "
             "package.module:builder. (default: implicit)")] = None,
    adjoint: Annotated[Optional[str], typer.Option(
        help="Gradient through the sampler: full (exact discrete adjoint of the completed batch), pipelined "
             "(implicit only: a queue of adjoint states, constant sequential calls with M = T), or continuous "
             "(probability-flow ODE adjoint; needs --sampler probability-flow). (default: full)")] = None,
    clip: Annotated[Optional[bool], typer.Option("--clip/--no-clip", help="Clip the samples to [-1, 1] before the "
                                                 "reward (no gain from pixels past white or black). (default: clip)")] = None,
    M: Annotated[Optional[int], typer.Option("--M", help="Queue length M; must divide T. (default: by dataset/preset)")] = None,
    T: Annotated[Optional[int], typer.Option("--T", help="Sampling steps T. (default: by dataset/preset)")] = None,
    batch: Annotated[Optional[int], typer.Option(help="Images per batch. (default: by dataset/preset)")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Adam learning rate. (default: 1e-4)")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Outer steps (θ updates). (default: 200)")] = None,
    sampler: Annotated[Optional[str], typer.Option(
        help="euler-maruyama or probability-flow (needs --beta 0). (default: euler-maruyama)")] = None,
    log_every: Annotated[Optional[int], typer.Option(help="Outer steps per jitted chunk and log line. (default: 10)")] = None,
    sample_every: Annotated[Optional[int], typer.Option(help="Re-sample the fixed-key grid every N steps. (default: 50)")] = None,
    ckpt_every: Annotated[Optional[int], typer.Option(help="Checkpoint every N steps. (default: 50)")] = None,
    grid_n: Annotated[Optional[int], typer.Option(help="Images in the fixed-key grid. (default: 16)")] = None,
    fid_every: FidEvery = None,
    fid_n: FidN = None,
    fid_features: FidFeatures = None,
    preset: Annotated[str, typer.Option(help="cpu (T=16, M=4, batch 8) or paper (Tables 2 and 4 by dataset: "
                                             "MNIST M=4, T=64, batch 32; LSUN M=2, batch 16).")] = "cpu",
    out: Out = None,
    seed: Seed = None,
    config: ConfigFile = None,
) -> None:
    """Reward training of a pretrained diffusion model with Implicit Diffusion (paper §5.2, Algorithm 2).

    Minimises −λ E R(x) + β KL(p ‖ π*(θ0)) over the U-Net weights. Writes config.json, metrics.jsonl, samples/ (same-seed grids), figures/ (reward_kl.png, evolution.png) and checkpoints/; re-running into the same --out resumes.
    """
    from idiff_cli import config as cfglib
    from idiff_cli.implicit import finetune as experiment

    flags = dict(from_run=str(from_run) if from_run else None, reward=reward, lam=lam, beta=beta, method=method,
                 adjoint=adjoint, clip=clip,
                 M=M, T=T, batch=batch, lr=lr, steps=steps, sampler=sampler, log_every=log_every,
                 sample_every=sample_every, ckpt_every=ckpt_every, grid_n=grid_n, fid_every=fid_every, fid_n=fid_n,
                 fid_features=fid_features, seed=seed)
    cfg = cfglib.resolve(experiment.FinetuneConfig, experiment.PRESETS, preset, config, flags)
    experiment.run(cfg, run_dir_for(out, "finetune"))


@user_errors
def report(
    runs: Annotated[list[pathlib.Path], typer.Argument(help="`idiff finetune` run directories to overlay.",
                                                      show_default=False)],
    x: Annotated[str, typer.Option(help="x axis: step, net_evals, sequential_calls or wall_s.")] = "step",
    out: Out = None,
) -> None:
    """Overlay the reward and KL curves of several finetuning runs (paper Figs 6, 15, 17)."""
    from idiff_cli.implicit.report import report as make_report
    from idiff_cli.runs import console

    for path in make_report(runs, out or pathlib.Path("runs") / "report", x):
        console.print(f"wrote {path}", highlight=False)


app.command("finetune")(finetune)
app.command("report")(report)


def main() -> None:
    app()
