"""Sampling an imported text-to-image run from the command line (`sample`, `evaluate-fid`): the prompts
of --prompt / --prompts, the options of text2image.py checked against the run, and one jitted function
that draws a batch of guided images.

    settings = settings_of(cfg, isinstance(model, TextToImageModel))   # UserError for options that do not apply
    draw, params = batch_sampler(model, settings, sampler)
    images = draw(params, key_data, rows)        # rows [B] int32: indices into settings.prompts

Row i of a batch samples prompts[rows[i]]; z_T and the sampler's noise come from the batch's key.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from idiff_cli.errors import UserError
from idiff_cli.runs import console
from idiff_cli.sharding import replicated

GUIDANCE, NEGATIVE, DTYPE = 7.5, "", "float32"  # the defaults of the options' rules


@dataclasses.dataclass(frozen=True)
class Settings:
    """The resolved text-to-image options of one command."""

    prompts: tuple[str, ...]
    negative_prompt: str
    guidance: float
    dtype: str


def read_prompts(path: str | pathlib.Path) -> list[str]:
    """The non-blank lines of a prompts file (trailing whitespace removed); UserError when it cannot be
    read or holds none."""
    try:
        lines = pathlib.Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read --prompts '{path}': {e}") from None
    prompts = [line.rstrip() for line in lines if line.strip()]
    if not prompts:
        raise UserError(f"--prompts '{path}' holds no prompt (one per line)")
    return prompts


RECORD_KEYS = ("prompt", "negative")


def read_prompt_records(path: str | pathlib.Path) -> list[tuple[str, str | None]]:
    """(prompt, its own negative prompt or None) of every prompt of a prompts file: JSONL (a `.jsonl`
    file: one {"prompt": …, "negative": …} object per non-blank line, "negative" optional) or text (one
    prompt per line, `read_prompts`). UserError naming the line of a malformed record."""
    if pathlib.Path(path).suffix != ".jsonl":
        return [(prompt, None) for prompt in read_prompts(path)]
    records = []
    for number, line in enumerate(read_prompts(path), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"--prompts '{path}' record {number}: not a JSON object ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise UserError(f"--prompts '{path}' record {number}: expected {{\"prompt\": TEXT}} (optionally "
                            f"\"negative\": TEXT), got {line[:60]}")
        unknown = sorted(set(record) - set(RECORD_KEYS))
        if unknown:
            raise UserError(f"--prompts '{path}' record {number}: unknown key '{unknown[0]}'; valid keys: "
                            f"{', '.join(RECORD_KEYS)}")
        negative = record.get("negative")
        if negative is not None and not isinstance(negative, str):
            raise UserError(f"--prompts '{path}' record {number}: \"negative\" must be a string, got {negative!r}")
        records.append((record["prompt"], negative))
    return records


def settings_of(cfg: Any, text_to_image: bool) -> Settings | None:
    """The text-to-image options of `cfg` (a sample or evaluate-fid config): None for a run that is not
    text-to-image, where giving one is a UserError; for a text-to-image run, UserError without a prompt."""
    given = {name: getattr(cfg, name, None) for name in ("prompt", "prompts", "negative_prompt", "guidance", "dtype")}
    if not text_to_image:
        for name, value in given.items():
            if value is not None:
                flag = "--" + name.replace("_", "-")
                what = (f"'{cfg.run_dir}' is an unconditional or label-conditioned model" if cfg.run_dir else
                        "this evaluates given images or a dataset")
                raise UserError(f"{flag} applies to sampling a text-to-image run (an imported Stable Diffusion "
                                f"pipeline); {what}")
        return None
    prompts = ([given["prompt"]] if given["prompt"] is not None else []) + (
        read_prompts(given["prompts"]) if given["prompts"] else [])
    if not prompts:
        raise UserError(f"'{cfg.run_dir}' is a text-to-image model: give --prompt TEXT or --prompts FILE")
    return Settings(tuple(prompts), given["negative_prompt"] if given["negative_prompt"] is not None else NEGATIVE,
                    GUIDANCE if given["guidance"] is None else float(given["guidance"]), given["dtype"] or DTYPE)


def token_ids(tokenizer, prompts: Sequence[str], what: str = "prompt") -> np.ndarray:
    """Token ids [P, 77] of the prompts, saying once which were truncated (as diffusers truncates)."""
    ids, truncated = tokenizer.encode(list(prompts))
    cut = [i for i, t in enumerate(truncated) if t]
    if cut:
        console.print(f"{len(cut)} {what}(s) longer than {ids.shape[1]} tokens (the first: {prompts[cut[0]][:60]!r}) "
                      f"truncated to their first {ids.shape[1]}, as diffusers does", highlight=False)
    return ids


def batch_sampler(model, settings: Settings, sampler, mesh=None):
    """(draw, params): draw is jit (params, key data [2] uint32, rows [B] int32) -> images [B, H, W, 3] in
    [−1, 1] of the model (a model.TextToImageModel) cast to the settings' dtype, params its weights in it.
    With a `mesh`, pass the inputs replicated over it (sharding.replicate): params are put there, and a
    batch that divides evenly is split over its devices."""
    t2i, params = model.model.with_dtype(model.params, settings.dtype)
    ids = jnp.asarray(token_ids(t2i.tokenizer, settings.prompts))
    negative_ids = jnp.asarray(token_ids(t2i.tokenizer, [settings.negative_prompt], "negative prompt"))
    split = None if mesh is None else NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))

    def draw(params, key_data, rows):
        context = t2i.embed(params, ids[rows])  # the batch's prompts only, however many the file holds
        if split is not None and rows.shape[0] % mesh.size == 0:
            context = jax.lax.with_sharding_constraint(context, split)
        negative = t2i.embed(params, negative_ids)
        return t2i.sample(params, context, negative, jax.random.wrap_key_data(key_data), sampler, settings.guidance)

    if mesh is not None:
        params = jax.device_put(params, replicated(mesh))
    return jax.jit(draw), params
