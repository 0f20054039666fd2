"""Diffusers model directories, read and written: the config and scheduler JSON files, the safetensors
weights, and the Flax network and noise process they describe (the model layer's diffusers I/O).

A diffusers model directory holds `config.json` (the UNet2DModel fields), the weights
`diffusion_pytorch_model.safetensors` (read with safetensors' numpy API: no torch) and
`scheduler_config.json` (a DDPMScheduler); a pipeline directory holds them under unet/ and scheduler/.
`read_source` checks them in that order and reports the first problem in one line (UserError): a
missing file, a torch pickle (.bin) without its safetensors, an unsupported field, and a weight whose
name or shape does not match the configured architecture (the first such key, in sorted order).

A run directory made from such a model keeps copies of its two config files under diffusers/
(`write_source`), from which `run_source` remakes the network and the noise process; `holds_source`
tells such a run directory apart.

Weights map name by name: the Flax module path (ddpm_unet.py) is the torch module path, a convolution
weight [O, I, kh, kw] becomes the kernel [kh, kw, I, O], a linear weight [out, in] becomes [in, out], a
GroupNorm weight its scale. The attention names of older checkpoints (query, key, value, proj_attn) are
read as diffusers reads them (to_q, to_k, to_v, to_out.0).
"""

from __future__ import annotations

import pathlib
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from idiff_cli import runs
from idiff_cli.diffusion.ddpm import BETA_SCHEDULES, PREDICTIONS, SPACINGS, VARIANCES, DiscreteDDPM
from idiff_cli.diffusion.ddpm_unet import DOWN_BLOCKS, UP_BLOCKS, DDPMUNet
from idiff_cli.errors import UserError
from idiff_cli.runs import RunDir

CONFIG, WEIGHTS, SCHEDULER = "config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json"
SOURCE_DIR = "diffusers"  # a run directory's copies of its source's config files
DOWNLOAD = "e.g. `huggingface-cli download google/ddpm-cifar10-32 --local-dir DIR`"

# UNet2DModel fields (with diffusers' defaults) that the Flax network takes.
UNET_FIELDS = dict(in_channels=3, out_channels=3, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
                   down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                   up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                   block_out_channels=(224, 448, 672, 896), layers_per_block=2, mid_block_scale_factor=1.0,
                   downsample_padding=1, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5,
                   add_attention=True, time_embedding_dim=None)
# UNet2DModel fields the Flax network supports only at these values (diffusers' defaults).
UNET_FIXED = dict(time_embedding_type="positional", class_embed_type=None, num_class_embeds=None,
                  resnet_time_scale_shift="default", act_fn="silu", downsample_type="conv", upsample_type="conv",
                  mid_block_type="UNetMidBlock2D", attn_norm_num_groups=None)
# The noise-process fields of a scheduler config, with the defaults that DDPMScheduler.from_config and
# DDIMScheduler.from_config (the schedulers idiff samples like) give a field the file leaves out, and their
# supported values. variance_type is DDPMScheduler's own (DPMSolverMultistepScheduler's field of that name
# means something else), set_alpha_to_one DDIM's (and PNDM's): whether DDIM's last step lands on ᾱ = 1 or ᾱ_0.
SCHEDULER_FIELDS = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                        trained_betas=None, variance_type="fixed_small", clip_sample=True, clip_sample_range=1.0,
                        prediction_type="epsilon", timestep_spacing="leading", steps_offset=0,
                        set_alpha_to_one=True)
SCHEDULER_CHOICES = dict(beta_schedule=BETA_SCHEDULES, variance_type=VARIANCES, prediction_type=PREDICTIONS,
                         timestep_spacing=SPACINGS)
SCHEDULER_FIXED = dict(thresholding=False, rescale_betas_zero_snr=False)
# The scheduler classes whose config files describe the noise process (SD 1.5 ships a PNDMScheduler, SD 2.1
# a DDIMScheduler); their own sampling algorithms are not idiff's: it samples with DDPM or DDIM steps.
SCHEDULER_CLASSES = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
                     "DPMSolverMultistepScheduler")
DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


class Source(NamedTuple):
    """A checked diffusers model: its raw config dicts, the Flax network, noise process, image shape
    (H, W, C) and variables {"params": ...}."""

    unet_config: dict[str, Any]
    scheduler_config: dict[str, Any]
    model: DDPMUNet
    sde: DiscreteDDPM
    image_shape: tuple[int, int, int]
    params: Any


def locate(directory: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """(config.json, the safetensors file, scheduler_config.json) of a model or pipeline directory."""
    if not directory.is_dir():
        raise UserError(f"'{directory}' is not a directory; give the downloaded diffusers model directory "
                        f"({DOWNLOAD})")
    unet, scheduler = directory, directory
    if not (directory / CONFIG).exists() and (directory / "unet" / CONFIG).exists():
        unet, scheduler = directory / "unet", directory / "scheduler"
    if not (unet / CONFIG).exists():
        raise UserError(f"'{directory}' has no {CONFIG} (nor unet/{CONFIG}): download the whole model directory "
                        f"({DOWNLOAD})")
    if not (unet / WEIGHTS).exists():
        pickles = sorted(unet.glob("*.bin"))
        if pickles:
            raise UserError(f"'{pickles[0]}' is a torch pickle, which idiff does not read: download the "
                            f"{WEIGHTS} of the model, or convert it where torch is installed: python -c \"import "
                            f"torch, safetensors.torch as s; s.save_file(torch.load('{pickles[0]}'), "
                            f"'{unet / WEIGHTS}')\"")
        raise UserError(f"'{unet}' has no {WEIGHTS}: download it with the model ({DOWNLOAD})")
    if not (scheduler / SCHEDULER).exists():
        raise UserError(f"'{directory}' has no {SCHEDULER}: download it with the model ({DOWNLOAD}); idiff needs "
                        "the DDPMScheduler's noise schedule")
    return unet / CONFIG, unet / WEIGHTS, scheduler / SCHEDULER


def read_json(path: pathlib.Path) -> dict[str, Any]:
    """A config file of a model directory, or of its copies in a run directory (runs.read_json)."""
    return runs.read_json(path, what="download the model directory again (or re-run the import)")


def _fields(config: Mapping[str, Any], file: str, class_name: str, why: str, fixed: Mapping[str, Any],
            defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The values of `defaults`' fields in a diffusers config file (each default where it is absent), after
    checking its _class_name and that each field of `fixed` has the one value supported; UserError naming
    the first that does not."""
    if config.get("_class_name", class_name) != class_name:
        raise UserError(f"{file}: unsupported _class_name {config['_class_name']!r}; {why}")
    for name, value in fixed.items():
        if config.get(name, value) != value:
            raise UserError(f"{file} of a {class_name}: unsupported {name} = {config[name]!r} (supported: {value!r})")
    return {name: config.get(name, default) for name, default in defaults.items()}


def unet_fields(config: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[int, int]]:
    """The DDPMUNet fields and the image size (H, W) of a UNet2DModel config.json; UserError naming the
    first unsupported field."""
    what = f"{CONFIG} of a UNet2DModel"
    fields = _fields(config, CONFIG, "UNet2DModel", "idiff imports UNet2DModel (unconditional DDPM U-Nets)",
                     UNET_FIXED, UNET_FIELDS)
    for name in ("down_block_types", "up_block_types", "block_out_channels"):
        fields[name] = tuple(fields[name])
    for name, supported in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
        for kind in fields[name]:
            if kind not in supported:
                raise UserError(f"{what}: unsupported {name} entry {kind!r} (supported: {', '.join(supported)})")
    if not len(fields["down_block_types"]) == len(fields["up_block_types"]) == len(fields["block_out_channels"]):
        raise UserError(f"{what}: down_block_types, up_block_types and block_out_channels differ in length")
    if fields["norm_num_groups"] is None:
        raise UserError(f"{what}: unsupported norm_num_groups = None")
    size = config.get("sample_size")
    if size is None:
        raise UserError(f"{what}: no sample_size (the image size)")
    hw = (size, size) if isinstance(size, int) else tuple(size)
    return fields, hw


def scheduler_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """The DiscreteDDPM fields of a scheduler_config.json of one of SCHEDULER_CLASSES, as
    DDPMScheduler/DDIMScheduler.from_config read them; UserError naming the first unsupported field."""
    kind = config.get("_class_name", "DDPMScheduler")
    if kind not in SCHEDULER_CLASSES:
        raise UserError(f"{SCHEDULER}: unsupported _class_name {kind!r}; idiff reads the noise schedule of "
                        f"{', '.join(SCHEDULER_CLASSES)}")
    what = f"{SCHEDULER} of a {kind}"
    fields = _fields(config, SCHEDULER, kind, "", SCHEDULER_FIXED, SCHEDULER_FIELDS)
    if kind != "DDPMScheduler":
        fields["variance_type"] = SCHEDULER_FIELDS["variance_type"]
    for name, supported in SCHEDULER_CHOICES.items():
        if fields[name] not in supported:
            raise UserError(f"{what}: unsupported {name} = {fields[name]!r} (supported: {', '.join(supported)})")
    fields["trained_betas"] = tuple(float(b) for b in fields["trained_betas"] or ())
    if fields["trained_betas"] and len(fields["trained_betas"]) != fields["num_train_timesteps"]:
        raise UserError(f"{what}: {len(fields['trained_betas'])} trained_betas for "
                        f"{fields['num_train_timesteps']} num_train_timesteps")
    return fields


def build(unet_config: Mapping[str, Any], scheduler_config: Mapping[str, Any]):
    """(network, noise process, image shape (H, W, C)) of the two diffusers configs."""
    fields, (h, w) = unet_fields(unet_config)
    sde = DiscreteDDPM(**scheduler_fields(scheduler_config))
    v_alphas = tuple(float(a) for a in sde.alphas_cumprod) if sde.prediction_type == "v_prediction" else ()
    model = DDPMUNet(**fields, v_prediction_alphas_cumprod=v_alphas)
    factor = 2 ** (len(fields["block_out_channels"]) - 1)
    if h % factor or w % factor:
        raise UserError(f"{CONFIG}: sample_size {h}×{w} is not a multiple of {factor} (the U-Net halves it "
                        f"{len(fields['block_out_channels']) - 1} times)")
    return model, sde, (h, w, fields["in_channels"])


def param_shapes(model: DDPMUNet, image_shape) -> Any:
    """The variables {"params": ...} of `model` as ShapeDtypeStructs (no initialisation)."""
    x = jnp.zeros((1, *image_shape))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x, jnp.zeros((1,))))


def torch_name(path: tuple[str, ...]) -> str:
    """The state-dict key of the Flax parameter at `path` (without the leading "params")."""
    leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}[path[-1]]
    return ".".join([p.replace("__", ".") for p in path[:-1]] + [leaf])


def to_flax(array: np.ndarray, leaf: str = "kernel") -> np.ndarray:
    """A torch tensor in the layout of its Flax parameter `leaf`: a convolution's OIHW -> HWIO, a linear
    layer's [out, in] -> [in, out]; an embedding table [vocab, dim] and 1-D tensors as they are."""
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    return array.T if array.ndim == 2 and leaf == "kernel" else array


def torch_shape(flax_shape: tuple[int, ...], leaf: str = "kernel") -> tuple[int, ...]:
    if len(flax_shape) == 4:
        return tuple(flax_shape[i] for i in (3, 2, 0, 1))
    return tuple(reversed(flax_shape)) if leaf == "kernel" else tuple(flax_shape)


def to_torch(array: np.ndarray, leaf: str = "kernel") -> np.ndarray:
    """A Flax parameter in the layout of its torch tensor (the inverse of `to_flax`)."""
    if array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    return array.T if array.ndim == 2 and leaf == "kernel" else array


def tensors_from_params(params: Any) -> dict[str, np.ndarray]:
    """The state dict of variables {"params": ...} (the inverse of `params_from_tensors`): diffusers' key
    of each parameter, in torch's layout and the parameter's dtype."""
    flat = jax.tree_util.tree_flatten_with_path(params["params"])[0]
    return {torch_name(tuple(p.key for p in path)): np.ascontiguousarray(to_torch(np.asarray(leaf), path[-1].key))
            for path, leaf in flat}


def _renamed(key: str) -> str:
    """diffusers' names for the attention weights of older checkpoints."""
    parts = key.split(".")
    if "attentions" in parts and len(parts) >= 2 and parts[-2] in DEPRECATED_ATTENTION:
        return ".".join(parts[:-2] + [DEPRECATED_ATTENTION[parts[-2]], parts[-1]])
    return key


def params_from_tensors(shapes: Any, tensors: Mapping[str, np.ndarray], source: str, what: str = "UNet2DModel",
                        config: str = CONFIG, ignored: tuple[str, ...] = (),
                        dtype: Any = np.float32) -> Any:
    """The variables with the structure of `shapes` filled from a state dict (as `dtype`); UserError
    naming the first key (sorted) that is missing, unexpected or of the wrong shape. `what` names the
    network `config` describes; keys ending in one of `ignored` (buffers such as CLIP's position_ids)
    are skipped."""
    tensors = {_renamed(k): v for k, v in tensors.items() if not k.endswith(ignored)}
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes["params"])
    leaves = {torch_name(tuple(p.key for p in path)): (path[-1].key, leaf.shape) for path, leaf in flat}
    expected = {key: torch_shape(shape, leaf) for key, (leaf, shape) in leaves.items()}
    for key in sorted(set(expected) | set(tensors)):
        if key not in tensors:
            raise UserError(f"{source}: no weight '{key}', which {config} implies (shape "
                            f"{expected[key]}); the file and {config} do not belong together")
        if key not in expected:
            raise UserError(f"{source}: weight '{key}' {tuple(tensors[key].shape)} is not a parameter of the "
                            f"{what} that {config} describes")
        if tuple(tensors[key].shape) != expected[key]:
            raise UserError(f"{source}: weight '{key}' has shape {tuple(tensors[key].shape)}, {config} implies "
                            f"{expected[key]}")
    values = [to_flax(np.asarray(tensors[key], dtype), leaves[key][0]) for key in
              (torch_name(tuple(p.key for p in path)) for path, _ in flat)]
    return {"params": jax.tree_util.tree_unflatten(treedef, [jnp.asarray(v) for v in values])}


def read_weights(path: pathlib.Path) -> dict[str, np.ndarray]:
    """The state dict of a safetensors file, as numpy arrays."""
    try:
        return load_file(str(path))
    except Exception as e:  # a truncated or foreign file: one line
        raise UserError(f"cannot read '{path}' as safetensors: {e}") from None


def read_source(directory: str | pathlib.Path) -> Source:
    """The checked diffusers model in `directory` (module docstring)."""
    config_path, weights_path, scheduler_path = locate(pathlib.Path(directory))
    unet_config, scheduler_config = read_json(config_path), read_json(scheduler_path)
    model, sde, image_shape = build(unet_config, scheduler_config)
    params = params_from_tensors(param_shapes(model, image_shape), read_weights(weights_path), str(weights_path))
    return Source(unet_config, scheduler_config, model, sde, image_shape, params)


def write_source(run_dir: RunDir, source: Source) -> None:
    """Copies of the source's config.json and scheduler_config.json into `run_dir`/diffusers/."""
    run_dir.write_json(f"{SOURCE_DIR}/{CONFIG}", source.unet_config)
    run_dir.write_json(f"{SOURCE_DIR}/{SCHEDULER}", source.scheduler_config)


def holds_source(run_dir: pathlib.Path) -> bool:
    """Whether `run_dir` holds the diffusers/ copies of a source's config files (`write_source`)."""
    return (run_dir / SOURCE_DIR / CONFIG).is_file()


def run_source(run_dir: pathlib.Path):
    """(network, noise process, image shape) of a run directory, from its diffusers/ copies."""
    return build(read_json(run_dir / SOURCE_DIR / CONFIG), read_json(run_dir / SOURCE_DIR / SCHEDULER))
