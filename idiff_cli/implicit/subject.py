"""What a finetune run trains and what it holds fixed (paper §5.2: θ the denoiser's weights, θ0 the
pretrained ones), for the pixel U-Nets and for latent text-to-image models.

    subject = pixel(model) | pixel(model, adapters, spec) | text_to_image(model, prompts, …)
    frozen = subject.frozen             # a pytree of arrays, passed to every jitted program as an argument
    score = subject.score(frozen)       # score(θ, x, t, labels) -> sθ(x, t | labels) [B, ...]
    labels = subject.labels(frozen)     # labels [B] of every slot, labels(slot_key) -> [B], or None

θ is either all the network's weights or LoRA adapters over frozen base weights (diffusion/lora.py:
W' = W + (α/r)·B·A); θ0, the model θ starts from and the KL compares with, is subject.reference(frozen)
(for LoRA, the adapters at step 0: the base network itself when they start from zero). The frozen
weights (a LoRA's base, the VAE, the prompts' text embeddings, θ0) are arguments of the jitted programs,
never closed over: XLA would embed closed-over arrays in every program as constants.

A text-to-image run's state is the latent z [B, h, w, C]; a slot draws its prompts from its slot key
(uniformly, with replacement, from the training prompts), so the queue and the adjoints carry no text:
the score looks up the prompts' CLIP embeddings (computed once per prompt) and applies classifier-free
guidance, ε̃ = ε(z, t, c̄) + g (ε(z, t, c) − ε(z, t, c̄)) (text2image.py). The KL is therefore between
the *guided* transitions of θ and θ0. The reward sees decode(z_0), so its gradient passes through the
VAE decoder.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from idiff_cli.diffusion import lora
from idiff_cli.diffusion.model import ImportedModel, TextToImageModel
from idiff_cli.diffusion.prompt_sampling import DTYPE, GUIDANCE, NEGATIVE, read_prompt_records, token_ids
from idiff_cli.diffusion.sde import _expand
from idiff_cli.errors import UserError
from idiff_cli.implicit import per_device

PROMPT_STREAM = 0x5EED  # fold_in(slot_key, PROMPT_STREAM) draws a slot's prompts; split(slot_key) its noise


class Subject(NamedTuple):
    """theta0: θ at step 0 (concrete); frozen: the arrays every program takes (concrete); score(frozen)
    -> score(θ, x, t, labels); labels(frozen, evaluation) -> the training slots' labels (a function of
    the slot key, or fixed [B], or None), or with `evaluation` those of the fixed-key grids; decode(frozen)
    -> images(x) of the sampler's last state, or None (the state is the image); reference(frozen) -> θ0;
    shape: one batch of states [B, ...]; image_shape: an image the reward sees (H, W, C); lora: the
    adapters' spec, None when θ is all the weights; n_labels: the training labels lie in [0, n_labels)
    (the class labels or the training prompts; 0: unconditional); texts: what each label stands for, the
    table a prompt-aware reward reads (rewards.Prompts: the training then evaluation prompts, or the
    class indices "0", "1", …; empty: unconditional)."""

    theta0: Any
    frozen: Any
    score: Callable[[Any], Callable]
    labels: Callable[[Any, bool], Any]
    decode: Optional[Callable[[Any], Callable]]
    reference: Callable[[Any], Any]
    shape: tuple[int, ...]
    image_shape: tuple[int, int, int]
    lora: Optional[lora.LoRASpec] = None
    n_labels: int = 0
    texts: tuple[str, ...] = ()


def _weights(spec: Optional[lora.LoRASpec], frozen: Any, theta: Any) -> Any:
    """The network's weights under θ: θ itself, or the frozen base with the adapters θ merged in."""
    return theta if spec is None else lora.merge(frozen["base"], theta, spec.scale)


def pixel(model: Any, batch: int, adapters: Any = None, spec: Optional[lora.LoRASpec] = None) -> Subject:
    """A pixel-space model (diffusion.model.Model, or per_device.BatchSharded of one): θ all its weights
    (frozen = θ0 = the pretrained weights), or the LoRA `adapters` of `spec` over them; class labels
    fixed per batch position (b mod the number of classes)."""
    labels = jnp.arange(batch) % model.num_classes if model.num_classes else None
    if spec is None:
        frozen, reference = model.params, (lambda frozen: frozen)
    else:
        frozen, reference = {"base": model.params, "theta0": adapters}, (lambda frozen: frozen["theta0"])

    def score(frozen):
        return lambda theta, x, t, y: model.score(_weights(spec, frozen, theta), x, t, y)

    return Subject(frozen if spec is None else adapters, frozen, score, lambda frozen, evaluation: labels, None,
                   reference, (batch, *model.image_shape), model.image_shape, spec, model.num_classes or 0,
                   tuple(str(c) for c in range(model.num_classes or 0)))


def text_to_image(t2i: Any, unet: Any, vae: Any, texts: tuple[str, ...], contexts: jax.Array, negatives: jax.Array,
                  n_train: int, guidance: float, batch: int, split: Callable = lambda score: score,
                  adapters: Any = None, spec: Optional[lora.LoRASpec] = None) -> Subject:
    """A latent text-to-image model: `t2i` (text2image.TextToImage, in the run's dtype) with U-Net
    weights `unet` (θ, or the LoRA base) and VAE weights `vae`; `texts` [P] the prompts, `contexts` and
    `negatives` [P, 77, D] the CLIP embeddings of the prompts and of their negative prompts, rows < n_train
    the training prompts, the rest the evaluation prompts (grid image b shows evaluation prompt b mod
    their number); `guidance` g; `split` wraps the score for the device mesh (per_device.split_rows)."""
    n_eval = contexts.shape[0] - n_train
    frozen = {"vae": vae, "contexts": contexts, "negatives": negatives,
              **({"theta0": unet} if spec is None else {"base": unet, "theta0": adapters})}

    # the rows' embeddings by a one-hot product (exact at HIGHEST precision): an indexing gather of the
    # replicated table fails inside the per-device shard_maps, whose mesh axis is manual
    def score(frozen):
        def s(theta, z, t, rows):
            pick = jax.nn.one_hot(rows, contexts.shape[0], dtype=jnp.float32)
            context, negative = (jnp.einsum("bp,p...->b...", pick, frozen[name], precision=jax.lax.Precision.HIGHEST)
                                 for name in ("contexts", "negatives"))
            eps = t2i.guided_eps({"unet": _weights(spec, frozen, theta)}, z, t, context, negative, guidance)
            return -eps / _expand(t2i.sde.sigma(t), z)

        return split(s)

    def labels(frozen, evaluation):
        if evaluation:
            return n_train + jnp.arange(batch) % n_eval
        return lambda slot_key: jax.random.randint(jax.random.fold_in(slot_key, PROMPT_STREAM), (batch,), 0, n_train)

    def decode(frozen):
        return lambda z: t2i.decode({"vae": frozen["vae"]}, z)

    return Subject(unet if spec is None else adapters, frozen, score, labels, decode, lambda frozen: frozen["theta0"],
                   (batch, *t2i.latent_shape), t2i.image_shape, spec, n_train, tuple(texts))


# ---- a run's subject from its config ----

# the default --prompts and --eval-prompts: single animal names, the kind of DDPO's "simple animals" set
ANIMALS = ("cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow", "goat",
           "lion", "tiger", "bear", "raccoon")
PIXEL_DDPM_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")  # imported UNet2DModel
LORA_KEY = 5  # fold_in(root, LORA_KEY): the adapters' initial down-projections
DEFAULT_RANK = 4


def default_targets(model: Any, params: Any) -> tuple[str, ...]:
    """--lora-targets by model family: the SD U-Net's attention projections; an imported UNet2DModel's
    attention projections and residual convolutions; every convolution and dense layer inside the
    residual and attention blocks of idiff's own U-Net (its modules have no diffusers names)."""
    if isinstance(model, TextToImageModel):
        return lora.SD_TARGETS
    if isinstance(model, ImportedModel):
        return PIXEL_DDPM_TARGETS
    return tuple(name for name in lora.module_names(params)
                 if any(part.startswith(("ResBlock", "AttnBlock")) for part in name.split(".")))


def adapters_of(cfg: Any, model: Any, params: Any, key: jax.Array) -> tuple[Any, lora.LoRASpec]:
    """The adapters θ starts from and their spec: read from --lora (its rank and modules), or new ones of
    --lora-rank/--lora-alpha on --lora-targets (B = 0: θ = θ0 at step 0)."""
    if cfg.lora is not None:
        given = [name for name in ("lora_rank", "lora_alpha", "lora_targets") if getattr(cfg, name) is not None]
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise UserError(f"{flags} with --lora: the file sets the adapters' rank, scale and modules")
        return lora.read(cfg.lora, params)
    rank = DEFAULT_RANK if cfg.lora_rank is None else cfg.lora_rank
    alpha = float(rank) if cfg.lora_alpha is None else cfg.lora_alpha
    lora.check_spec(rank, alpha)
    targets = tuple(cfg.lora_targets) if cfg.lora_targets else default_targets(model, params)
    spec = lora.LoRASpec(rank, alpha, lora.select(params, targets))
    return lora.init(key, params, spec), spec


def prompt_table(t2i: Any, params: Any, records: list[tuple[str, str | None]], negative: str) -> tuple[jax.Array, jax.Array]:
    """CLIP embeddings [P, 77, D] (float32) of the prompts and of their negative prompts (a record's own, else
    `negative`), each computed once."""
    ids = token_ids(t2i.tokenizer, [prompt for prompt, _ in records])
    negative_ids = token_ids(t2i.tokenizer, [own if own is not None else negative for _, own in records],
                             "negative prompt")
    embed = jax.jit(t2i.embed)
    return embed(params, jnp.asarray(ids)), embed(params, jnp.asarray(negative_ids))


def subject_of(cfg: Any, model: Any, mesh: Any = None) -> Subject:
    """What the run `cfg` trains on the pretrained `model` (a diffusion.model.Model), its batches split over
    `mesh`: all the weights or LoRA adapters (cfg.train); for a text-to-image model, its prompts'
    embeddings, guidance, dtype and rematerialisation. UserError for bad prompts files, LoRA options or files."""
    key = jax.random.fold_in(jax.random.key(cfg.seed), LORA_KEY)
    if not isinstance(model, TextToImageModel):
        sharded = model if mesh is None else per_device.BatchSharded(model, mesh)
        if cfg.train == "all":
            return pixel(sharded, cfg.batch)
        adapters, spec = adapters_of(cfg, model, model.params, key)
        return pixel(sharded, cfg.batch, adapters, spec)
    t2i, params = model.model.with_dtype(model.params, cfg.dtype or DTYPE)
    t2i = t2i.with_remat() if cfg.remat else t2i
    train = read_prompt_records(cfg.prompts) if cfg.prompts else [(p, None) for p in ANIMALS]
    evaluation = read_prompt_records(cfg.eval_prompts) if cfg.eval_prompts else [(p, None) for p in ANIMALS]
    contexts, negatives = prompt_table(t2i, params, train + evaluation,
                                       NEGATIVE if cfg.negative_prompt is None else cfg.negative_prompt)
    guidance = GUIDANCE if cfg.guidance is None else cfg.guidance
    texts = tuple(prompt for prompt, _ in train + evaluation)
    split = (lambda score: score) if mesh is None else functools.partial(per_device.split_rows, mesh=mesh)
    if cfg.train == "all":
        unet = jax.tree.map(lambda p: p.astype(jnp.float32), model.params["unet"])  # float32 θ; compute in dtype
        return text_to_image(t2i, unet, params["vae"], texts, contexts, negatives, len(train), guidance, cfg.batch,
                             split)
    adapters, spec = adapters_of(cfg, model, params["unet"], key)
    return text_to_image(t2i, params["unet"], params["vae"], texts, contexts, negatives, len(train), guidance,
                         cfg.batch, split, adapters, spec)
