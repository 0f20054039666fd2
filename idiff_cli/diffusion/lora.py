"""LoRA adapters for Flax networks whose module names are diffusers' (the SD U-Net, sd_unet.CondUNet), and
their files in diffusers' LoRA format.

A low-rank adapter (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") leaves a
module's weight W [out, in] frozen and trains two factors A [r, in] and B [out, r], r small:

    W' = W + (α/r)·B·A,

with α the LoRA alpha; B starts at zero, so W' = W at step 0. Conventions are peft's (LoraConfig,
diffusers' loaders build on it): A ("lora_A", here `down`) is initialised kaiming-uniform with a = √5,
i.e. U(-1/√fan_in, 1/√fan_in), and B ("lora_B", here `up`) with zeros; a module is targeted when its
dotted name equals a target or ends with "." + target; a convolution's A is a convolution of the
module's kernel size from `in` to r channels and its B a 1×1 convolution from r to `out` channels, so
ΔW[o, i, kh, kw] = Σ_r B[o, r]·A[r, i, kh, kw].

In Flax's layouts (diffusers_io.to_flax): a Dense kernel [in, out] gets down [in, r] and up [r, out]
(ΔW = down @ up); a Conv kernel [kh, kw, in, out] gets down [kh, kw, in, r] and up [1, 1, r, out]. The
adapters are a tree {"params": …} with the nesting of the network's variables, one {"down", "up"} per
adapted module, float32 whatever the network's dtype.

Files. diffusers saves a U-Net's LoRA as `pytorch_lora_weights.safetensors` with keys
"unet.<module>.lora_A.weight" / ".lora_B.weight" (peft's names; diffusers' older names
".lora.down.weight" / ".lora.up.weight", optionally with "<module>.alpha" scalars, are read too) in
torch's layouts. α is not a tensor there: a file may carry it in its safetensors metadata
("lora_adapter_metadata", the peft LoraConfig as JSON, keys prefixed "unet."), and without it diffusers
loads with α = r (scale 1). `write` therefore folds α/r into B and stores no metadata; `read` folds the
file's scale into `up`, so what it returns merges with scale 1.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import pathlib
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save

from idiff_cli import runs, storage
from idiff_cli.diffusion import diffusers_io
from idiff_cli.errors import UserError

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
SD_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections of UNet2DConditionModel
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors-metadata entry holding the peft LoraConfig
# Key endings of the two formats, (down, up): peft's, and diffusers' older one.
SUFFIXES = ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"))


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """Rank r, alpha α and the target patterns (peft's rule: a module is adapted when its dotted name equals
    a pattern or ends with "." + pattern)."""

    rank: int
    alpha: float
    targets: tuple[str, ...]

    @property
    def scale(self) -> float:
        """α/r, the factor of B·A in W' = W + (α/r)·B·A."""
        return self.alpha / self.rank


def check_spec(rank: int, alpha: float) -> None:
    """UserError for a rank below 1 or a non-positive alpha."""
    if rank < 1:
        raise UserError(f"--lora-rank must be >= 1, got {rank}")
    if not alpha > 0:
        raise UserError(f"--lora-alpha must be > 0, got {alpha}")


def _modules(params: Any) -> dict[str, tuple[str, ...]]:
    """Dotted name -> Flax path (without "params") of every module holding a 2-D or 4-D 'kernel'."""
    found = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params["params"])[0]:
        keys = tuple(p.key for p in path)
        if keys[-1] == "kernel" and len(leaf.shape) in (2, 4):
            found[diffusers_io.torch_name(keys).removesuffix(".weight")] = keys[:-1]
    return found


def module_names(params: Any) -> tuple[str, ...]:
    """Dotted diffusers-style names (e.g. 'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q') of
    every module of variables {"params": ...} holding a 2-D Dense 'kernel' or a 4-D Conv 'kernel', sorted."""
    return tuple(sorted(_modules(params)))


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def select(params: Any, targets: tuple[str, ...]) -> tuple[str, ...]:
    """The module names (sorted) matched by the target patterns; UserError for no targets, and for a pattern
    that matches no module, naming the closest module-name suffixes."""
    if not targets:
        raise UserError("no LoRA target modules given; give module names such as " + ", ".join(SD_TARGETS))
    names = module_names(params)
    for target in targets:
        if not any(_matches(name, target) for name in names):
            parts = [name.split(".") for name in names]
            suffixes = sorted({".".join(p[i:]) for p in parts for i in range(len(p))})
            close = difflib.get_close_matches(target, suffixes, n=4, cutoff=0.5)
            hint = f"closest: {', '.join(close)}" if close else f"e.g. {', '.join(names[:4])}"
            raise UserError(f"LoRA target {target!r} matches no module of the network ({hint})")
    return tuple(name for name in names if any(_matches(name, t) for t in targets))


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _adapted(adapters: Any) -> list[tuple[tuple[str, ...], Mapping[str, Any]]]:
    """(Flax path without "params", {"down", "up"}) of every adapter, in tree order."""
    found = []

    def walk(node: Mapping[str, Any], path: tuple[str, ...]) -> None:
        if set(node) == {"down", "up"}:
            found.append((path, node))
            return
        for key in sorted(node):
            walk(node[key], path + (key,))

    walk(adapters["params"], ())
    return found


def init(key: jax.Array, params: Any, spec: LoRASpec) -> Any:
    """Adapters {"params": …} for the modules `spec.targets` selects (module docstring for the shapes):
    down ~ U(-1/√fan_in, 1/√fan_in), fan_in = in·kh·kw (peft's kaiming-uniform with a = √5), up zeros,
    float32; UserError for a bad spec or a target matching nothing."""
    check_spec(spec.rank, spec.alpha)
    paths = _modules(params)
    names = select(params, spec.targets)
    adapters: dict = {}
    for name, k in zip(names, jax.random.split(key, len(names))):
        shape = _get(params["params"], paths[name] + ("kernel",)).shape
        bound = 1.0 / math.sqrt(math.prod(shape[:-1]))  # fan_in = kh·kw·in
        down = jax.random.uniform(k, (*shape[:-1], spec.rank), jnp.float32, -bound, bound)
        up = jnp.zeros((*(1,) * (len(shape) - 2), spec.rank, shape[-1]), jnp.float32)
        _set(adapters, ("params",) + paths[name], {"down": down, "up": up})
    return adapters


def delta(adapter: Mapping[str, Any], scale: float) -> jax.Array:
    """scale·ΔW of one module in its kernel's layout: [in, out] = down [in, r] @ up [r, out], or
    [kh, kw, in, out] = Σ_r down [kh, kw, in, r]·up [1, 1, r, out]; float32 (float64 for float64 adapters),
    so that the product of the factors is not rounded to a bfloat16 or float16 network's precision."""
    dtype = jnp.promote_types(jnp.float32, jnp.result_type(adapter["down"], adapter["up"]))
    down, up = jnp.asarray(adapter["down"], dtype), jnp.asarray(adapter["up"], dtype)
    return scale * jnp.einsum("...r,ro->...o", down, up.reshape(up.shape[-2:]))


def merge(params: Any, adapters: Any, scale: float) -> Any:
    """`params` with kernel ← kernel + scale·ΔW for every adapted module, in the kernel's dtype (ΔW in float32,
    the sum cast back); differentiable in `adapters`; the other leaves are the same objects."""
    merged = dict(params)
    merged["params"] = _copy_along(params["params"], [path for path, _ in _adapted(adapters)])
    for path, adapter in _adapted(adapters):
        kernel = _get(params["params"], path + ("kernel",))
        _get(merged["params"], path)["kernel"] = (kernel + delta(adapter, scale)).astype(kernel.dtype)
    return merged


def _copy_along(tree: Mapping[str, Any], paths: list[tuple[str, ...]]) -> dict:
    """A shallow copy of `tree` with fresh dicts along `paths` (so that setting a leaf there leaves `tree`
    as it was), sharing every other subtree."""
    copy = dict(tree)
    heads: dict[str, list] = {}
    for path in paths:
        heads.setdefault(path[0], []).append(path[1:])
    for head, rests in heads.items():
        copy[head] = _copy_along(tree[head], [r for r in rests if r])
    return copy


def to_diffusers(adapters: Any, scale: float, prefix: str = "unet") -> dict[str, np.ndarray]:
    """diffusers' (peft) LoRA state dict of the adapters, float32: "<prefix>.<module>.lora_A.weight" = down as
    [r, in] or [r, in, kh, kw], "<prefix>.<module>.lora_B.weight" = scale·up as [out, r] or [out, r, 1, 1]
    (α/r folded into B: the file stores no alpha)."""
    tensors = {}
    for path, adapter in _adapted(adapters):
        name = f"{prefix}.{diffusers_io.torch_name(path + ('kernel',)).removesuffix('.weight')}"
        down = np.asarray(adapter["down"], np.float32)
        up = scale * np.asarray(adapter["up"], np.float32)
        tensors[name + ".lora_A.weight"] = np.ascontiguousarray(diffusers_io.to_torch(down))
        tensors[name + ".lora_B.weight"] = np.ascontiguousarray(diffusers_io.to_torch(up))
    return tensors


def _file_scale(metadata: Mapping[str, str] | None, prefix: str, source: str):
    """A function (module name, rank) -> α/r of the peft LoraConfig in a file's safetensors metadata (its
    lora_alpha, alpha_pattern and use_rslora: α/√r), or None when the file carries no config."""
    raw = (metadata or {}).get(METADATA_KEY)
    if not raw:
        return None
    try:
        config = {k.removeprefix(prefix + "."): v for k, v in json.loads(raw).items() if k.startswith(prefix + ".")}
    except (ValueError, AttributeError) as e:
        raise UserError(f"{source}: unreadable {METADATA_KEY} metadata ({e})") from None
    if not config:
        return None
    if config.get("use_dora") or config.get("lora_bias"):
        raise UserError(f"{source}: a DoRA or LoRA-bias adapter (peft use_dora / lora_bias); idiff reads plain "
                        "LoRA adapters")
    pattern = config.get("alpha_pattern") or {}

    def scale(name: str, rank: int) -> float:
        # peft's get_pattern_key: the first pattern that matches the end of the name on a "." boundary
        key = next((k for k in pattern if re.match(rf"(.*\.)?({k})$", name)), None)
        alpha = float(pattern[key] if key is not None else config.get("lora_alpha", rank))
        return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)

    return scale


def from_diffusers(tensors: Mapping[str, np.ndarray], params: Any, source: str, prefix: str = "unet",
                   metadata: Mapping[str, str] | None = None) -> tuple[Any, LoRASpec]:
    """Adapters (float32) from a diffusers LoRA state dict for a network of variables `params`, each file scale
    (an "<module>.alpha" entry over r, or the peft config in the safetensors `metadata`, else 1) folded into
    `up`; the spec has alpha = rank (scale 1) and the module names found as targets. UserError naming the
    first offending key (sorted) for an empty file, a key without "<prefix>.", a key of neither format, a
    module the network lacks, a missing half of a pair, shapes that do not fit the module, and ranks that
    differ between modules."""
    if not tensors:
        raise UserError(f"{source}: no LoRA weights in the file")
    paths = _modules(params)
    file_scale = _file_scale(metadata, prefix, source)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    alphas: dict[str, float] = {}
    for key in sorted(tensors):
        if not key.startswith(prefix + "."):
            raise UserError(f"{source}: key '{key}' lacks the '{prefix}.' prefix diffusers gives a {prefix} LoRA "
                            f"(idiff reads a file of the {prefix}'s LoRA weights only; diffusers ignores such keys)")
        rest = key[len(prefix) + 1:]
        endings = [(part, s) for suffixes in SUFFIXES for part, s in zip(("down", "up"), suffixes)]
        part, module = next(((part, rest.removesuffix(s)) for part, s in endings + [("alpha", ".alpha")]
                             if rest.endswith(s)), (None, rest))
        if part is None:
            raise UserError(f"{source}: key '{key}' is not a LoRA weight (expected <module> + one of "
                            f"{', '.join(s for _, s in endings)}, .alpha)")
        if module not in paths:
            raise UserError(f"{source}: key '{key}' names module '{module}', which the network lacks (a LoRA "
                            "file for another architecture?)")
        if part == "alpha":
            alphas[module] = float(np.asarray(tensors[key]).reshape(()))
        else:
            pairs.setdefault(module, {})[part] = np.asarray(tensors[key], np.float32)
    if not pairs:
        raise UserError(f"{source}: no LoRA weights in the file (only alpha entries)")
    adapters: dict = {}
    ranks: dict[int, str] = {}
    for module in sorted(pairs):
        if set(pairs[module]) != {"down", "up"}:
            missing = ({"down", "up"} - set(pairs[module])).pop()
            raise UserError(f"{source}: module '{module}' has no LoRA {missing} weight")
        kernel = _get(params["params"], paths[module] + ("kernel",)).shape
        down, up = pairs[module]["down"], pairs[module]["up"]
        rank = down.shape[0] if down.ndim else 0
        window = tuple(kernel[:-2])
        expected = ((rank, kernel[-2], *window), (kernel[-1], rank, *(1,) * len(window)))
        if (down.shape, up.shape) != expected:
            raise UserError(f"{source}: LoRA weights of '{prefix}.{module}' have shapes {down.shape} and "
                            f"{up.shape}, the network's module (weight {diffusers_io.torch_shape(kernel)}) needs "
                            f"{expected[0]} and {expected[1]} (a LoRA file for another architecture?)")
        ranks.setdefault(rank, module)
        if len(ranks) > 1:
            first = ranks[next(iter(ranks))]
            raise UserError(f"{source}: LoRA ranks differ between modules ('{first}': {next(iter(ranks))}, "
                            f"'{module}': {rank}); idiff needs one rank for all modules")
        if module in alphas:
            scale = alphas[module] / rank
        else:
            scale = file_scale(module, rank) if file_scale else 1.0
        _set(adapters, ("params",) + paths[module],
             {"down": jnp.asarray(diffusers_io.to_flax(down)), "up": jnp.asarray(scale * diffusers_io.to_flax(up))})
    rank = next(iter(ranks))
    return adapters, LoRASpec(rank=rank, alpha=float(rank), targets=tuple(sorted(pairs)))


def read(path: str | pathlib.Path, params: Any, prefix: str = "unet") -> tuple[Any, LoRASpec]:
    """`from_diffusers` of a safetensors LoRA file (with its metadata); UserError if it cannot be read."""
    tensors = diffusers_io.read_weights(pathlib.Path(path))
    with safe_open(str(path), framework="np") as f:
        metadata = f.metadata()
    return from_diffusers(tensors, params, str(path), prefix, metadata)


def write(path: str | pathlib.Path, adapters: Any, scale: float, prefix: str = "unet") -> None:
    """The adapters as a diffusers LoRA file (`to_diffusers`; safetensors metadata {"format": "pt"}, as torch
    writes it), written atomically."""
    runs.atomic_write_bytes(storage.path(path), save(to_diffusers(adapters, scale, prefix), metadata={"format": "pt"}))
