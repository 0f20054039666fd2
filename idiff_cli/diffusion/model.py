"""The model layer: a denoiser built from a pretrain config, and θ0 / finetuned θ saved and loaded.

    model = load("runs/pretrain-mnist-cpu")               # EMA weights of the checkpoint in pretrained.json
    score = lambda x, t: model.score(model.params, x, t)  # s_θ0(x, t), x [B, H, W, C], t [B]
    x0 = model.sampler().sample(score, key, (16, *model.image_shape))   # the run's sampler and step count

A pretrain run directory holds `pretrained.json` (`write_pretrained`): the checkpoint that is θ0
(the last one saved; `final` once the run has finished), the image shape, the number of classes and
the data source; its checkpoints hold a `TrainState`, whose EMA weights are θ0 (`weights="params"`:
the raw weights). An imported run directory (`idiff import`) holds its network's variables as
checkpoint 0 and the diffusers config files they come from (diffusers_io.py), and loads as an
`ImportedModel`: the discrete DDPM process and samplers of ddpm.py; an imported Stable Diffusion pipeline
(pipeline_io.py) loads as a `TextToImageModel`, whose `model` is a text2image.TextToImage and whose
params are {"unet", "vae", "text_encoder"}. A finetune run directory holds
`finetuned.json` (`write_finetuned`): its base run (`from`) and the directory of its θ checkpoints
(`weights/`, orbax, one per checkpoint step); it loads as the base model with the finetuned θ of its
last (or the given) step.

Everything here builds on sde.py, unet.py, ddpm.py, losses.py, samplers.py, diffusers_io.py and
pipeline_io.py;
nothing here knows about the commands that train, import or evaluate models.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from idiff_cli import registry, storage
from idiff_cli.checkpoint import Checkpointer, restore_template
from idiff_cli.diffusion import diffusers_io, lora, pipeline_io
from idiff_cli.diffusion.ddpm import DISCRETE_STEPS
from idiff_cli.diffusion.losses import score_function
from idiff_cli.diffusion.options import PRETRAIN
from idiff_cli.diffusion.samplers import Sampler
from idiff_cli.diffusion.unet import UNet
from idiff_cli.errors import UserError
from idiff_cli.runs import RunDir
from idiff_cli.sharding import replicated

PRETRAINED, FINETUNED = "pretrained.json", "finetuned.json"
WEIGHTS_DIR = "weights"  # a finetune run's θ checkpoints
RECORD_KEYS = ("checkpoints", "step", "final", "image_shape", "num_classes")  # of pretrained.json


# ---- the model, the noise process, the sampler and the optimiser of a pretrain config ----


def make_model(cfg: Any, num_classes: int) -> UNet:
    """The U-Net of a (completed) pretrain config; label-conditioned on `num_classes` when the config is."""
    return UNet(ch=cfg.ch, ch_mult=tuple(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks,
                attn_resolutions=tuple(cfg.attn_resolutions), dropout=cfg.dropout,
                num_classes=num_classes if cfg.class_conditional else 0, groups=cfg.groups)


def make_sde(cfg: Any):
    return registry.get("sde", cfg.sde)()


def make_sampler(cfg: Any, sde, n_steps: int | None = None, name: str | None = None) -> Sampler:
    """The config's sampler and step count, or `name` with `n_steps` steps."""
    return Sampler(sde, n_steps or cfg.sample_steps, registry.get("sampler", name or cfg.sampler))


def learning_rate(cfg: Any) -> optax.Schedule:
    """Constant `lr`, after a linear warm-up over `warmup_steps` when given (Ho et al. 2020)."""
    if cfg.warmup_steps:
        return optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    return optax.constant_schedule(cfg.lr)


def make_optimizer(cfg: Any) -> optax.GradientTransformation:
    """Adam (Tables 1/3), after clipping the gradient's global norm when `grad_clip` > 0."""
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
    shapes = jax.eval_shape(lambda: init_state(model, optimizer, image_shape, 0))
    return jax.jit(lambda: restore_template(shapes), out_shardings=sharding)()


def model_apply(model: UNet):
    """apply(params, x, level, labels) of the U-Net in evaluation mode (no dropout)."""
    return lambda params, x, level, labels=None: model.apply(params, x, level, labels)


def make_sample_fn(cfg: Any, model: UNet, sde, sampler: Sampler, image_shape, n: int, mesh=None):
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
        out = NamedSharding(mesh, PartitionSpec(mesh.axis_names[0])) if n % mesh.size == 0 else replicated(mesh)
    return jax.jit(sample, out_shardings=out)


# ---- a trained model ----


@dataclasses.dataclass(frozen=True)
class Model:
    """A trained denoiser: `model` (Flax U-Net), `params` (its variables), the noise process `sde`,
    and the run's pretrain config `cfg` (as config.json holds it). `weights` names the params: "ema"
    or "params" of a pretrain run, "finetuned" for the θ of a finetune run; `step` is their
    checkpoint, `final` whether that is the finished run's last."""

    model: UNet
    params: Any
    sde: Any
    cfg: Any
    image_shape: tuple[int, int, int]
    num_classes: int
    step: int
    final: bool
    weights: str

    @property
    def continuous_time(self) -> bool:
        """Whether the noise process is a continuous-time SDE (sde.py), which the continuous-time samplers
        (euler-maruyama, probability-flow) and the continuous adjoint discretise."""
        return True

    @functools.cached_property
    def network(self):
        """jit(ε_θ): the network's forward pass as one jitted function, so that a program calling it at
        several places (a sampler's step, the adjoint's VJP, Tweedie's denoiser, both KL transitions)
        traces the Python network once per input shape and reuses that trace (the count and its cost:
        docs/results.md, "Compilation cache and the test suite")."""
        return jax.jit(self.model.apply)

    def apply(self, params, x, level, labels=None):
        """ε_θ(x, level, labels): the network's noise prediction (evaluation mode)."""
        return self.network(params, x, level, labels if self.num_classes else None)

    def score(self, params, x, t, labels=None):
        """s_θ(x, t) = −ε_θ(x, t)/σ(t) (with the run's preconditioning)."""
        return score_function(self.apply, self.sde, self.cfg.precondition)(params, x, t, labels)

    def sampler(self, n_steps: int | None = None, name: str | None = None, eta: float = 0.0) -> Sampler:
        """The run's sampler (Tables 1/3: Euler–Maruyama 256 steps for MNIST, DDPM 1024 for CIFAR/LSUN),
        or `name` ("euler-maruyama", "probability-flow", "ddpm", "ddim") with `n_steps` steps. DDIM's η > 0
        is a step of the discrete chain of an imported model only (UserError here)."""
        if eta:
            raise UserError(f"--ddim-eta {eta:g} applies to the discrete chain of an imported model; this run "
                            "samples a continuous-time process (its ddim sampler is deterministic)")
        return make_sampler(self.cfg, self.sde, n_steps, name)


@dataclasses.dataclass(frozen=True)
class ImportedConfig:
    """What the model layer's users read of an imported run's config: its `import` options, the image
    size, and no preconditioning (the imported network predicts ε itself)."""

    dataset: str
    data_dir: str | None
    sampler: str
    sample_steps: int
    image_size: int
    source: str
    precondition: bool = False


@dataclasses.dataclass(frozen=True)
class ImportedModel(Model):
    """A published model (`idiff import`): `sde` is its discrete DDPM process (ddpm.py)."""

    @property
    def continuous_time(self) -> bool:
        """False: the process is the discrete chain of the model's training timesteps."""
        return False

    def sampler(self, n_steps: int | None = None, name: str | None = None, eta: float = 0.0) -> Sampler:
        """`n_steps` respaced steps (default: the import's) of "ddpm" (ancestral) or "ddim" (with `eta`);
        UserError for the continuous-time samplers, which need a continuous-time process."""
        name = name or self.cfg.sampler
        if name not in DISCRETE_STEPS:
            raise UserError(f"an imported diffusers model is a discrete chain of training timesteps: it samples "
                            f"with {' or '.join(DISCRETE_STEPS)}, not '{name}' (pass --sampler ddim)")
        if eta and name != "ddim":
            raise UserError(f"--ddim-eta {eta:g} applies to the ddim sampler, not '{name}' (pass --sampler ddim)")
        n_steps = n_steps or self.cfg.sample_steps
        if n_steps > self.sde.num_train_timesteps:
            raise UserError(f"{n_steps} sampling steps exceed the model's {self.sde.num_train_timesteps} "
                            "training timesteps")
        return self.sde.sampler(n_steps, name, eta)


@dataclasses.dataclass(frozen=True)
class TextToImageModel(ImportedModel):
    """An imported Stable Diffusion pipeline: `model` is its text2image.TextToImage (networks, tokenizer,
    latent and image shapes), `params` {"unet", "vae", "text_encoder"}; it samples from prompts."""


def write_pretrained(run_dir: RunDir, step: int, final: bool, image_shape, num_classes: int, dataset: str,
                     source: str) -> None:
    """pretrained.json: θ0 is the EMA weights of checkpoint `step` of checkpoints/ (read by `load`)."""
    run_dir.write_json(PRETRAINED, {"checkpoints": "checkpoints", "step": int(step), "weights": "ema",
                                    "final": bool(final), "image_shape": list(image_shape),
                                    "num_classes": int(num_classes), "dataset": dataset, "data": source})


def write_finetuned(run_dir: RunDir, from_run: str | pathlib.Path, step: int, final: bool,
                    spec: lora.LoRASpec | None = None) -> None:
    """finetuned.json: θ of checkpoint `step` in weights/ finetunes the model of `from_run` (read by `load`):
    all its U-Net's weights, or the LoRA adapters of `spec` over them."""
    record = {"from": str(from_run), "weights": WEIGHTS_DIR, "step": int(step), "final": bool(final)}
    if spec is not None:
        record["lora"] = {"rank": spec.rank, "alpha": spec.alpha, "targets": list(spec.targets)}
    run_dir.write_json(FINETUNED, record)


def finetuned_weights(run_dir: RunDir, keep: int) -> Checkpointer:
    """The orbax store of a finetune run's θ, one entry per checkpoint step (`save(step, params)`)."""
    return Checkpointer(run_dir.path / WEIGHTS_DIR, keep=keep)


def load(run_dir: str | pathlib.Path, weights: str = "ema", step: int | None = None) -> Model:
    """The model of a pretrain or finetune run directory (see the module docstring). Raises UserError
    when the directory holds neither, or has no checkpoint `step`."""
    run_dir = storage.path(run_dir)
    if (run_dir / FINETUNED).exists():
        if weights != "ema":
            raise UserError(f"'{run_dir}' is a finetune run: it holds only its finetuned weights, so weights "
                            f"'{weights}' does not apply (leave the default)")
        return _load_finetuned(run_dir, step)
    if (run_dir / PRETRAINED).exists() and pipeline_io.holds_pipeline(run_dir):
        return _load_text_to_image(run_dir, weights, step)
    if (run_dir / PRETRAINED).exists() and diffusers_io.holds_source(run_dir):
        return _load_imported(run_dir, weights, step)
    if not (run_dir / PRETRAINED).exists():
        raise UserError(f"'{run_dir}' holds no trained model (no {PRETRAINED} or {FINETUNED}); run "
                        "`idiff pretrain` into it first")
    if weights not in ("ema", "params"):
        raise UserError(f"weights must be 'ema' or 'params', got '{weights}'")
    run = RunDir(run_dir)
    record = run.read_json(PRETRAINED, RECORD_KEYS)
    cfg = PRETRAIN.from_json(run.read_json("config.json"), str(run_dir / "config.json"))
    model = make_model(cfg, record["num_classes"])
    image_shape = tuple(record["image_shape"])
    chosen = record["step"] if step is None else step
    with Checkpointer(run_dir / record["checkpoints"], keep=cfg.keep_checkpoints) as ckpt:
        if chosen not in ckpt.all_steps():
            raise UserError(f"'{run_dir}' has no checkpoint {chosen}; available: {ckpt.all_steps()}")
        state, _ = ckpt.restore(state_template(model, make_optimizer(cfg), image_shape), step=chosen)
    params = state.ema if weights == "ema" else state.params
    return Model(model, params, make_sde(cfg), cfg, image_shape, model.num_classes, int(chosen),
                 bool(record["final"]) and step in (None, record["step"]), weights)


def _load_imported(run_dir: pathlib.Path, weights: str, step: int | None) -> ImportedModel:
    """The model of an `idiff import` run directory (its one checkpoint, step 0)."""
    if weights != "ema":
        raise UserError(f"'{run_dir}' is an imported model: it holds one set of weights, so weights '{weights}' "
                        "does not apply (leave the default)")
    if step not in (None, 0):
        raise UserError(f"'{run_dir}' is an imported model: its only checkpoint is step 0")
    run = RunDir(run_dir)
    model, sde, image_shape = diffusers_io.run_source(run_dir)
    with Checkpointer(run_dir / run.read_json(PRETRAINED, RECORD_KEYS)["checkpoints"], keep=1) as ckpt:
        params, _ = ckpt.restore(restore_template(diffusers_io.param_shapes(model, image_shape)), step=0)
    cfg = _imported_config(run_dir, image_shape[0])
    return ImportedModel(model, params, sde, cfg, image_shape, 0, 0, True, "imported")


def _imported_config(run_dir: pathlib.Path, image_size: int) -> ImportedConfig:
    config = RunDir(run_dir).read_json("config.json", ("dataset", "data_dir", "sampler", "sample_steps", "dir"))
    return ImportedConfig(config["dataset"], config["data_dir"], config["sampler"], config["sample_steps"],
                          image_size, config["dir"])


def _load_text_to_image(run_dir: pathlib.Path, weights: str, step: int | None) -> TextToImageModel:
    """The model of an imported SD pipeline run directory (its one checkpoint, step 0)."""
    if weights != "ema" or step not in (None, 0):
        raise UserError(f"'{run_dir}' is an imported model: it holds one set of weights, checkpoint 0 (leave "
                        "--weights and --step at their defaults)")
    model = pipeline_io.run_pipeline(run_dir)
    record = RunDir(run_dir).read_json(PRETRAINED, RECORD_KEYS)
    shapes = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, record.get("dtype", "float32")),
                                    pipeline_io.param_shapes(model))
    with Checkpointer(run_dir / record["checkpoints"], keep=1) as ckpt:
        params, _ = ckpt.restore(restore_template(shapes), step=0)
    cfg = _imported_config(run_dir, model.image_shape[0])
    return TextToImageModel(model, params, model.sde, cfg, model.image_shape, 0, 0, True, "imported")


def unet_params(model: Model) -> Any:
    """The variables of the model's denoising network (a text-to-image model's U-Net)."""
    return model.params["unet"] if isinstance(model, TextToImageModel) else model.params


def with_unet_params(model: Model, params: Any) -> Any:
    """The model's params with its denoising network's variables replaced."""
    return {**model.params, "unet": params} if isinstance(model, TextToImageModel) else params


def load_adapters(run_dir: str | pathlib.Path, step: int | None = None) -> tuple[Model, Any, lora.LoRASpec | None, int, bool]:
    """(base model, θ, the LoRA spec or None, the step, whether it is the finished run's last) of a finetune
    run: θ the adapters of a LoRA run, else the network's weights."""
    run_dir = storage.path(run_dir)
    record = RunDir(run_dir).read_json(FINETUNED, ("from", "weights", "step", "final"))
    base = load(record["from"])
    spec = None
    template = unet_params(base)
    if "lora" in record:
        fields = record["lora"]
        spec = lora.LoRASpec(int(fields["rank"]), float(fields["alpha"]), tuple(fields["targets"]))
        template = jax.eval_shape(lambda: lora.init(jax.random.key(0), unet_params(base), spec))
    with Checkpointer(run_dir / record["weights"]) as ckpt:
        chosen = record["step"] if step is None else step
        if chosen not in ckpt.all_steps():
            raise UserError(f"'{run_dir}' has no finetuned weights at step {chosen}; available: {ckpt.all_steps()}")
        theta, _ = ckpt.restore(restore_template(template) if spec else template, step=chosen)
    return base, theta, spec, int(chosen), bool(record["final"]) and step in (None, record["step"])


def _load_finetuned(run_dir: pathlib.Path, step: int | None) -> Model:
    """The base model of a finetune run with the finetuned θ of `step` (default: the last saved); a LoRA
    run's adapters merged into the base network."""
    base, theta, spec, chosen, final = load_adapters(run_dir, step)
    network = theta if spec is None else lora.merge(unet_params(base), theta, spec.scale)
    return dataclasses.replace(base, params=with_unet_params(base, network), step=chosen, weights="finetuned",
                               final=final)
