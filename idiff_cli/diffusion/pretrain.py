"""`idiff pretrain`: denoising diffusion pretraining of θ0 (paper Appendix A.2, Tables 1 and 3).

One jitted training step (denoising score matching, optax Adam, EMA of the parameters), dispatched
`log_every` times between host reads of the metrics; the global batch is split over every device of every process (`jax.sharding`, parameters
replicated), so one code path serves one CPU, a GPU box and a TPU pod slice. The host loop reads a
chunk of batches, logs, writes sample grids and orbax checkpoints (params, EMA, optimiser state, step,
key, and the data position), and resumes from the latest checkpoint when re-run into the same --out.

Run directory:
    config.json           the resolved config (architecture included)
    metrics.jsonl         per `log_every` steps: loss, learning rate, grad norm, images/s
    checkpoints/<step>/   orbax: TrainState + meta {data_position, step}
    pretrained.json       which checkpoint is θ0 for `idiff finetune` (EMA weights), `final` when done
    samples/step_*.png    sample grids during training (EMA weights, fixed key)
    figures/loss.png, figures/samples.png
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import pathlib
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from idiff_cli import config as cfglib
from idiff_cli import registry
from idiff_cli.data import datasets
from idiff_cli.diffusion.losses import denoising_loss, score_function
from idiff_cli.diffusion.samplers import Sampler
from idiff_cli.diffusion.unet import PRESETS as ARCHITECTURES
from idiff_cli.diffusion.unet import UNet
from idiff_cli.errors import UserError
from idiff_cli.parallel import batch_mesh, global_batch, replicate, replicated
from idiff_cli.runs import RunDir, atomic_path, atomic_write_bytes, console, progress_bar

ARCH_FIELDS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "groups")


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """`idiff pretrain` settings. Architecture fields left at 0/() are filled from the preset for the
    dataset's image size; `config.json` holds the filled values."""

    preset: str = "cpu"
    dataset: str = "mnist"
    data_dir: str = ""
    image_size: int = 0
    sde: str = "ou"
    sampler: str = "euler-maruyama"
    sample_steps: int = 256
    steps: int = 5000
    batch: int = 32
    lr: float = 1e-3
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    grad_clip: float = 0.0
    ema_decay: float = 0.995
    class_conditional: bool = False
    flip: bool = False
    precondition: bool = True
    ch: int = 0
    ch_mult: tuple[int, ...] = ()
    num_res_blocks: int = 0
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = -1.0
    groups: int = 0
    log_every: int = 50
    sample_every: int = 1000
    ckpt_every: int = 500
    keep_checkpoints: int = 3
    grid_n: int = 64
    fid_every: int = 0
    fid_n: int = 500
    fid_features: str = "mnist-classifier"
    seed: int = 0

    def validate(self) -> None:
        for name in ("steps", "batch", "sample_steps", "log_every", "sample_every", "ckpt_every",
                     "keep_checkpoints", "grid_n", "fid_n"):
            cfglib.require_int(self, name)
        cfglib.require_int(self, "fid_every", minimum=0)
        cfglib.require_int(self, "seed", minimum=0)
        cfglib.require_int(self, "warmup_steps", minimum=0)
        cfglib.require_int(self, "image_size", minimum=0)
        for name in ("lr", "adam_eps"):
            cfglib.require_float(self, name)
        for name in ("adam_b1", "adam_b2", "ema_decay"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise UserError(f"{cfglib.flag(self, name)} must be in [0, 1), got {value!r}")
        cfglib.require_float(self, "grad_clip", positive=False)
        for name in ("sample_every", "ckpt_every", "fid_every"):
            if getattr(self, name) % self.log_every:
                raise UserError(f"{cfglib.flag(self, name)} ({getattr(self, name)}) must be a multiple of "
                                f"--log-every ({self.log_every})")
        registry.get("sde", self.sde)
        registry.get("sampler", self.sampler)


# Tables 1 (MNIST) and 3 (CIFAR-10, LSUN) of the paper, per dataset family and preset.
DIGITS = dict(sde="ou", sampler="euler-maruyama", sample_steps=256, batch=32, lr=1e-3, adam_b1=0.9,
              adam_b2=0.999, adam_eps=1e-8, ema_decay=0.995, flip=False)
NATURAL = dict(sde="cosine", sampler="ddpm", sample_steps=1024, batch=2048, lr=2e-4, adam_b1=0.9, adam_b2=0.99,
               adam_eps=1e-12, ema_decay=0.9999, flip=True)
DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    # ≈ 20 minutes on 2 CPU cores (~0.5 s/step): 2,400 steps give mostly recognisable digits; re-run
    # into the same --out with a larger --steps to go on.
    ("cpu", "digits"): dict(DIGITS, steps=2400, log_every=50, sample_every=800, ckpt_every=400),
    # The paper: 18k steps (7 minutes on 4 TPUv2).
    ("paper", "digits"): dict(DIGITS, steps=18000, log_every=100, sample_every=2000, ckpt_every=2000),
    # Table 3's optimiser on a CPU-sized batch; EMA 0.999 (0.9999 averages over more steps than such a run has).
    ("cpu", "natural"): dict(NATURAL, batch=32, ema_decay=0.999, sample_steps=256, steps=5000, log_every=50,
                             sample_every=2500, ckpt_every=500),
    # Table 3 (500k steps, 30 h on 16 TPUv2 for CIFAR-10); warm-up and clipping as in Ho et al. (2020).
    ("paper", "natural"): dict(NATURAL, steps=500_000, warmup_steps=5000, grad_clip=1.0, log_every=100,
                               sample_every=10_000, ckpt_every=5000),
}
PRESET_NAMES = ("cpu", "paper")
# The paper's CIFAR-10 model was label-conditioned.
CONDITIONAL_IN_PAPER = {"cifar10"}


def resolve_config(dataset: str, preset: str, config_file=None, flags: dict[str, Any] | None = None) -> PretrainConfig:
    """defaults < preset × dataset family (Tables 1/3) < --config file < flags."""
    if preset not in PRESET_NAMES:
        raise UserError(f"unknown preset '{preset}'; valid choices: {', '.join(PRESET_NAMES)}")
    base = dict(DEFAULTS[(preset, datasets.family(dataset))], dataset=dataset)
    if preset == "paper" and dataset in CONDITIONAL_IN_PAPER:
        base["class_conditional"] = True
    return cfglib.resolve(PretrainConfig, {preset: base}, preset, config_file, flags)


def complete_config(cfg: PretrainConfig, ds: datasets.ImageDataset) -> PretrainConfig:
    """Fills the image size and the architecture from the preset; checks the model can take the images."""
    size = ds.image_shape[0]
    arch = ARCHITECTURES[cfg.preset](size)
    filled = {name: getattr(cfg, name) for name in ARCH_FIELDS}
    for name, empty in (("ch", 0), ("ch_mult", ()), ("num_res_blocks", 0), ("attn_resolutions", ()),
                        ("dropout", -1.0), ("groups", 0)):
        if filled[name] == empty:
            filled[name] = arch[name]
    cfg = dataclasses.replace(cfg, image_size=size, **filled)
    problem = UNet.cannot_take(size, cfg.ch_mult)
    if problem:
        raise UserError(f"{problem}; pick --image-size or --ch-mult to match")
    if cfg.class_conditional and not ds.num_classes:
        raise UserError(f"--class-conditional: dataset '{cfg.dataset}' has no labels")
    return cfg


# ---- the model, the noise process, the optimiser and the training state ----


def make_model(cfg: PretrainConfig, num_classes: int) -> UNet:
    return UNet(ch=cfg.ch, ch_mult=tuple(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks,
                attn_resolutions=tuple(cfg.attn_resolutions), dropout=cfg.dropout,
                num_classes=num_classes if cfg.class_conditional else 0, groups=cfg.groups)


def make_sde(cfg: PretrainConfig):
    return registry.get("sde", cfg.sde)()


def make_sampler(cfg: PretrainConfig, sde, n_steps: int | None = None, name: str | None = None) -> Sampler:
    return Sampler(sde, n_steps or cfg.sample_steps, registry.get("sampler", name or cfg.sampler))


def learning_rate(cfg: PretrainConfig) -> optax.Schedule:
    if cfg.warmup_steps:
        return optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    return optax.constant_schedule(cfg.lr)


def make_optimizer(cfg: PretrainConfig) -> optax.GradientTransformation:
    adam = optax.adam(learning_rate(cfg), b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adam) if cfg.grad_clip else adam


class TrainState(NamedTuple):
    step: jax.Array  # int32 []
    params: Any  # Flax variables {"params": ...}
    ema: Any
    opt_state: Any
    key: jax.Array  # typed PRNG key; step k uses fold_in(key, k)


def init_state(model: UNet, optimizer, image_shape, seed: int) -> TrainState:
    """The initial state of a run with root seed `seed` (traceable, no array inputs: jit it with
    replicated out_shardings and every process builds the same global state)."""
    init_key, train_key = jax.random.split(jax.random.fold_in(jax.random.key(seed), 0))
    x = jnp.zeros((1, *image_shape))
    params = model.init(init_key, x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
    return TrainState(jnp.zeros((), jnp.int32), params, params, optimizer.init(params), train_key)


def state_template(model: UNet, optimizer, image_shape, sharding=None) -> TrainState:
    """The structure, dtypes and placement of `init_state`, filled with zeros (a restore template that
    costs no initialisation)."""
    from idiff_cli.checkpoint import restore_template

    shapes = jax.eval_shape(lambda: init_state(model, optimizer, image_shape, 0))
    return jax.jit(lambda: restore_template(shapes), out_shardings=sharding)()


def model_apply(model: UNet):
    """apply(params, x, level, labels) of the U-Net in evaluation mode (no dropout)."""
    return lambda params, x, level, labels=None: model.apply(params, x, level, labels)


def make_train_step(cfg: PretrainConfig, model: UNet, sde, optimizer):
    """step(state, (images uint8 [B, H, W, C], labels [B])) -> (state, (loss, grad norm, learning rate))."""
    schedule = learning_rate(cfg)

    def loss_fn(params, x, labels, key):
        loss_key, dropout_key = jax.random.split(key)
        apply = lambda p, xt, level, y: model.apply(p, xt, level, y, train=True, rngs={"dropout": dropout_key})  # noqa: E731
        score = score_function(apply, sde, cfg.precondition)
        return jnp.mean(denoising_loss(lambda xt, t: score(params, xt, t, labels), sde, x, loss_key))

    def step(state: TrainState, batch):
        images, labels = batch
        flip_key, loss_key = jax.random.split(jax.random.fold_in(state.key, state.step))
        x = images.astype(jnp.float32) / 127.5 - 1.0
        if cfg.flip:
            flip = jax.random.bernoulli(flip_key, 0.5, (x.shape[0], 1, 1, 1))
            x = jnp.where(flip, x[:, :, ::-1], x)
        loss, grads = jax.value_and_grad(loss_fn)(state.params, x, labels, loss_key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        d = cfg.ema_decay
        ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, state.ema, params)
        metrics = (loss, optax.tree.norm(grads), schedule(state.step))
        return TrainState(state.step + 1, params, ema, opt_state, state.key), metrics

    return step


def make_step_fn(step, mesh):
    """jit(step): batch sharded over `mesh`, state replicated, state buffers donated.

    The host dispatches one call per step without waiting (dispatch is asynchronous; the metrics
    are read once per `log_every` steps), which keeps logging, checkpoints and preemption between
    steps at no cost.
    """
    return jax.jit(step, out_shardings=replicated(mesh), donate_argnums=0)


def make_sample_fn(cfg: PretrainConfig, model: UNet, sde, sampler: Sampler, image_shape, n: int, mesh=None):
    """jit: (params, key data [2] uint32, labels [n]) -> images [n, H, W, C] in [-1, 1] (batch sharded
    over `mesh` when n divides evenly). The key travels as raw key data, so that every process can
    pass the same host value."""
    score = score_function(model_apply(model), sde, cfg.precondition)
    conditional = model.num_classes > 0

    def sample(params, key_data, labels):
        fn = lambda x, t: score(params, x, t, labels if conditional else None)  # noqa: E731
        return sampler.sample(fn, jax.random.wrap_key_data(key_data), (n, *image_shape))

    out = None
    if mesh is not None:
        from jax.sharding import NamedSharding, PartitionSpec

        out = NamedSharding(mesh, PartitionSpec(mesh.axis_names[0])) if n % mesh.size == 0 else replicated(mesh)
    return jax.jit(sample, out_shardings=out)


def to_host(x: jax.Array) -> np.ndarray:
    """A (possibly sharded, possibly multi-process) array as one numpy array on every process."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


# ---- data: a deterministic order that a checkpoint can resume exactly ----


class DataStream:
    """Batches of a dataset in epochs of a seeded permutation (epoch e: rng(seed, e)); the position is
    the number of examples consumed, so `indices(position, k)` is all a resumed run needs. Each
    process reads its contiguous slice of every global batch."""

    def __init__(self, ds: datasets.ImageDataset, batch: int, seed: int, process_index: int = 0, process_count: int = 1):
        if ds.num_examples < batch:
            raise UserError(f"dataset '{ds.name}' has {ds.num_examples} images, fewer than --batch {batch}")
        self.ds, self.batch, self.seed = ds, batch, seed
        self.per_epoch = (ds.num_examples // batch) * batch  # drop the remainder of each epoch
        self.local = batch // process_count
        self.offset = process_index * self.local
        self._perm: tuple[int, np.ndarray] | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng((self.seed, epoch)).permutation(self.ds.num_examples))
        return self._perm[1]

    def indices(self, position: int, n_batches: int) -> np.ndarray:
        """This process's example indices [n_batches, local batch] from `position` on."""
        out = []
        for b in range(n_batches):
            p = position + b * self.batch
            start = p % self.per_epoch + self.offset
            out.append(self._permutation(p // self.per_epoch)[start : start + self.local])
        return np.stack(out)

    def read(self, position: int, n_batches: int) -> tuple[np.ndarray, np.ndarray]:
        idx = self.indices(position, n_batches)
        images, labels = self.ds.batch(idx.reshape(-1))
        return images.reshape(*idx.shape, *images.shape[1:]), labels.reshape(idx.shape)


# ---- figures ----


def save_grid(images: np.ndarray, path, upscale: int = 2) -> None:
    """Images in [-1, 1] [n, H, W, C] as a square PNG grid (2-pixel gutters), written atomically."""
    from PIL import Image

    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    pixels = np.clip(np.round((np.asarray(images) + 1) * 127.5), 0, 255).astype(np.uint8)
    grid = np.full((rows * (h + 2) + 2, cols * (w + 2) + 2, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        grid[2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + col * (w + 2) : 2 + col * (w + 2) + w] = pixels[i]
    image = Image.fromarray(grid[..., 0] if c == 1 else grid)
    image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def plot_loss(run_dir: RunDir) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = run_dir.read_metrics()
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.plot(steps, [r["loss"] for r in rows], lw=1)
    ax1.set(xlabel="training step", ylabel="denoising loss (mean over log window)", yscale="log",
            title="denoising score matching")
    ax2.plot(steps, [r["grad_norm"] for r in rows], lw=1, color="tab:orange")
    ax2.set(xlabel="training step", ylabel="gradient norm", yscale="log", title="gradient norm")
    fig.tight_layout()
    run_dir.save_figure(fig, "loss.png")


# ---- the run ----

# Fields added after runs were written, with the value that reproduces those runs.
LEGACY_DEFAULTS = {"precondition": False}


def read_config(run_dir: pathlib.Path | str) -> dict[str, Any]:
    """A run directory's config.json as a dict, fields it predates filled with `LEGACY_DEFAULTS`."""
    config = json.loads((pathlib.Path(run_dir) / "config.json").read_text())
    return {**LEGACY_DEFAULTS, **config}


def _claim(run_dir: RunDir, cfg: PretrainConfig, is_main: bool) -> None:
    """Writes config.json; a run directory holding another config (other than --steps) is refused."""
    config = json.loads(json.dumps(cfglib.to_dict(cfg)))
    path = run_dir.path / "config.json"
    if path.exists():
        previous = read_config(run_dir.path)
        changed = sorted(k for k in config if k != "steps" and previous.get(k) != config[k])
        if changed:
            raise UserError(f"run directory '{run_dir.path}' holds a run with another config (differs in "
                            f"{', '.join(changed)}); pick a new --out")
    if is_main:
        run_dir.write_json("config.json", config)


def write_pretrained(run_dir: RunDir, step: int, final: bool, ds: datasets.ImageDataset) -> None:
    """pretrained.json: which checkpoint is θ0 (read by `load_pretrained`)."""
    run_dir.write_json("pretrained.json", {"checkpoints": "checkpoints", "step": int(step), "weights": "ema",
                                           "final": bool(final), "image_shape": list(ds.image_shape),
                                           "num_classes": ds.num_classes, "dataset": ds.name, "data": ds.source})


def use_compilation_cache() -> None:
    """Keeps compiled programs on disk ($IDIFF_JAX_CACHE, default ~/.cache/idiff/jax): compiling the
    U-Net's training step takes about a minute on two CPU cores, and a resumed run, `idiff sample`
    and a re-run with the same shapes then skip it."""
    import os

    path = os.environ.get("IDIFF_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "idiff", "jax")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)


def run(cfg: PretrainConfig, run_dir: RunDir) -> TrainState:
    """Trains (or resumes) the run in `run_dir`; returns the final state."""
    from idiff_cli.checkpoint import Checkpointer

    use_compilation_cache()
    is_main = jax.process_index() == 0
    ds = datasets.load(cfg.dataset, cfg.data_dir or None, cfg.image_size)
    cfg = complete_config(cfg, ds)
    mesh = batch_mesh()
    if cfg.batch % mesh.size:
        raise UserError(f"--batch {cfg.batch} is not divisible by the {mesh.size} devices "
                        f"({jax.process_count()} process(es)); pick a multiple of {mesh.size}")
    ckpt = Checkpointer(run_dir.path / "checkpoints", keep=cfg.keep_checkpoints)
    resume_step = ckpt.latest_step()
    if resume_step is not None and resume_step > cfg.steps:
        ckpt.close()
        raise UserError(f"the run in '{run_dir.path}' is at step {resume_step}; --steps must be at least that")
    _claim(run_dir, cfg, is_main)

    model, sde, optimizer = make_model(cfg, ds.num_classes), make_sde(cfg), make_optimizer(cfg)
    image_shape = ds.image_shape
    if resume_step is None:
        init = jax.jit(lambda: init_state(model, optimizer, image_shape, cfg.seed), out_shardings=replicated(mesh))
        state, position = init(), 0
        if is_main:
            run_dir.reset_metrics()
    else:
        state, meta = ckpt.restore(state_template(model, optimizer, image_shape, replicated(mesh)))
        position = int(meta["data_position"])
        if is_main:  # rows logged after the checkpoint are written again
            rows = [r for r in run_dir.read_metrics() if r["step"] <= resume_step]
            run_dir.reset_metrics()
            run_dir.append_metrics(rows)
    start = int(state.step)

    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    if is_main:
        console.print(f"[bold]pretrain[/] {cfg.dataset} ({cfg.preset} preset): {n_params / 1e6:.2f} M-parameter U-Net, "
                      f"{cfg.sde} noise, batch {cfg.batch} on {mesh.size} device(s) / {jax.process_count()} process(es), "
                      f"{cfg.steps} steps -> {run_dir.path}", highlight=False)
        console.print(f"data: {ds.source}", highlight=False)
        if resume_step is not None:
            console.print(f"resuming from checkpoint step {resume_step} (data position {position})", highlight=False)

    stream = DataStream(ds, cfg.batch, cfg.seed, jax.process_index(), jax.process_count())
    step_fn = make_step_fn(make_train_step(cfg, model, sde, optimizer), mesh)
    grid_fn = make_sample_fn(cfg, model, sde, make_sampler(cfg, sde), image_shape, cfg.grid_n, mesh)
    grid_inputs = replicate((jax.random.key_data(jax.random.fold_in(jax.random.key(cfg.seed), 2)),
                             np.arange(cfg.grid_n) % max(ds.num_classes, 1)), mesh)

    def save_samples(path) -> None:
        images = to_host(grid_fn(state.ema, *grid_inputs))
        if is_main:
            save_grid(images, path)

    if cfg.fid_every:  # FID of fid_n samples of the EMA weights from fixed keys, every fid_every steps
        from idiff_cli.fid.evaluate import PeriodicFID

        fid = PeriodicFID(cfg.fid_features, cfg.dataset, cfg.data_dir, cfg.image_size, image_shape,
                          run_dir.path / "fid")
        fid_fn = make_sample_fn(cfg, model, sde, make_sampler(cfg, sde), image_shape, cfg.fid_n, mesh)
        fid_inputs = replicate((jax.random.key_data(jax.random.fold_in(jax.random.key(cfg.seed), 3)),
                                np.arange(cfg.fid_n) % max(ds.num_classes, 1)), mesh)

    def checkpoint(step: int, final: bool) -> None:
        ckpt.save(step, state, meta={"data_position": position})
        ckpt.wait()
        if is_main:
            write_pretrained(run_dir, step, final, ds)
            plot_loss(run_dir)

    with (progress_bar("loss") if is_main else _NoProgress()) as progress:
        task = progress.add_task(f"pretrain {cfg.dataset}", total=cfg.steps, completed=start, rate="", loss="-")
        step = start
        while step < cfg.steps:
            t0 = time.perf_counter()
            k = min(cfg.log_every - step % cfg.log_every, cfg.steps - step)  # to the next log boundary
            images, labels = stream.read(position, k)
            metrics = []
            for i in range(k):  # asynchronous dispatch: the host runs ahead of the devices
                state, m = step_fn(state, global_batch((images[i], labels[i]), mesh))
                metrics.append(m)
            step, position = step + k, position + k * cfg.batch
            values = np.array([[float(v) for v in m] for m in metrics])  # [k, 3]: loss, grad norm, lr
            row = {"step": step, "loss": float(values[:, 0].mean()), "grad_norm": float(values[:, 1].mean()),
                   "lr": float(values[-1, 2]), "images_per_s": k * cfg.batch / (time.perf_counter() - t0),
                   "data_position": position}
            if not np.isfinite(row["loss"]):
                raise UserError(f"the loss is {row['loss']} at step {step}: lower --lr or set --grad-clip")
            if cfg.fid_every and step % cfg.fid_every == 0:
                row["fid"], row["fid_n"] = fid(to_host(fid_fn(state.ema, *fid_inputs))), cfg.fid_n
            if is_main:
                run_dir.append_metrics([row])
                progress.update(task, completed=step, rate=f"{row['images_per_s']:,.0f} img/s", loss=f"{row['loss']:.4f}")
            if step % cfg.sample_every == 0 and step < cfg.steps:
                save_samples(run_dir.path / "samples" / f"step_{step:07d}.png")
            if step % cfg.ckpt_every == 0 and step < cfg.steps:
                checkpoint(step, final=False)

    if ckpt.latest_step() != cfg.steps:
        checkpoint(cfg.steps, final=True)
    elif is_main:
        write_pretrained(run_dir, cfg.steps, True, ds)
    ckpt.close()
    save_samples(run_dir.path / "figures" / "samples.png")
    if is_main:
        plot_loss(run_dir)
        last = run_dir.read_metrics()[-1:]
        loss = f"final loss {last[0]['loss']:.4f}, " if last else ""
        console.print(f"done: {loss}θ0 = EMA weights of checkpoint {cfg.steps}; outputs: {run_dir.path}/"
                      "{config.json, metrics.jsonl, checkpoints/, pretrained.json, samples/, figures/}", highlight=False)
    return state


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *args, **kwargs):
        return 0

    def update(self, *args, **kwargs):
        pass


def sample_run(run_dir: pathlib.Path, n: int, sampler: str | None = None, sample_steps: int | None = None,
               seed: int = 0, weights: str = "ema", step: int | None = None, batch: int = 256,
               out: pathlib.Path | None = None) -> tuple[pathlib.Path, pathlib.Path]:
    """`idiff sample`: n images from a run's θ0 -> a PNG grid (at most 256 shown) and an .npz
    (`images` uint8 [n, H, W, C], `labels` [n]). Returns the two paths."""
    from idiff_cli.diffusion.pretrained import load_pretrained

    if sampler is not None:
        registry.get("sampler", sampler)
    use_compilation_cache()
    pre = load_pretrained(run_dir, weights=weights, step=step)
    chosen = pre.sampler(sample_steps, sampler)
    name = sampler or pre.cfg.sampler
    mesh = batch_mesh()
    batch = min(batch, n)
    batch -= batch % mesh.size if batch >= mesh.size else 0
    fn = make_sample_fn(pre.cfg, pre.model, pre.sde, chosen, pre.image_shape, batch, mesh)
    params = replicate(pre.params, mesh)
    labels = np.arange(n + batch) % max(pre.num_classes, 1)
    images = []
    with progress_bar() as progress:
        task = progress.add_task(f"sample {chosen.n_steps} {name} steps", total=n, rate="")
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            key = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), i // batch))
            x = to_host(fn(params, *replicate((key, labels[i : i + batch]), mesh)))
            images.append(x[: n - i])
            done = min(n, i + batch)
            progress.update(task, completed=done, rate=f"{done / (time.perf_counter() - t0):,.1f} img/s")
    images = np.concatenate(images)
    stem = out or run_dir / "samples" / f"sample-step{pre.step}-{pre.weights}-{name}{chosen.n_steps}-seed{seed}-n{n}"
    png, npz = pathlib.Path(f"{stem}.png"), pathlib.Path(f"{stem}.npz")
    save_grid(images[:256], png)
    pixels = np.clip(np.round((images + 1) * 127.5), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=pixels, labels=labels[:n])
    atomic_write_bytes(npz, buffer.getvalue())
    return png, npz


def resume_config(run_dir: pathlib.Path, dataset: str | None, preset: str | None, config_file,
                  flags: dict[str, Any]) -> PretrainConfig:
    """The config of the run in `run_dir` (its config.json), with `flags` on top (only --steps may differ)."""
    if not (pathlib.Path(run_dir) / "config.json").exists():
        raise UserError(f"--resume: '{run_dir}' holds no run (no config.json)")
    previous = read_config(run_dir)
    for name, given in (("DATASET", dataset), ("--preset", preset)):
        key = "dataset" if name == "DATASET" else "preset"
        if given is not None and given != previous[key]:
            raise UserError(f"--resume: the run in '{run_dir}' has {name} {previous[key]}, not {given}")
    base = {k: v for k, v in previous.items() if k != "preset"}
    return cfglib.resolve(PretrainConfig, {previous["preset"]: base}, previous["preset"], config_file, flags)
