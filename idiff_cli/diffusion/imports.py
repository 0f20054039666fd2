"""`idiff import diffusers DIR`: a diffusers `UNet2DModel` directory as an imported run directory.

The model is read and checked first (diffusers_io.read_source: one line for the first problem), so a
bad source writes nothing. The run directory it writes holds config.json (the `import` options),
diffusers/ (copies of the source's config.json and scheduler_config.json, from which the model layer
remakes the network and the noise process), checkpoints/ (the Flax variables, orbax, step 0) and
pretrained.json (image shape, dataset), so `model.load` reads it like a pretrain run.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import numpy as np

from idiff_cli.checkpoint import Checkpointer
from idiff_cli.config import to_dict
from idiff_cli.diffusion.diffusers_io import Source, read_source, write_source
from idiff_cli.errors import UserError
from idiff_cli.runs import RunDir, default_run_dir


def write_run(cfg: Any, source: Source, run_dir: RunDir) -> None:
    """The imported run directory (module docstring); pretrained.json last, as the mark of a complete run."""
    run_dir.create()
    write_source(run_dir, source)
    run_dir.write_json("config.json", {"command": "import", **to_dict(cfg)})
    with Checkpointer(run_dir.path / "checkpoints", keep=1) as ckpt:
        ckpt.save(0, source.params)
    run_dir.write_json("pretrained.json", {"checkpoints": "checkpoints", "step": 0, "weights": "imported",
                                           "final": True, "image_shape": list(source.image_shape),
                                           "num_classes": 0, "dataset": cfg.dataset, "data": f"imported from {cfg.dir}"})


def main(cfg: Any, out: pathlib.Path | None) -> Source:
    """`idiff import diffusers DIR`: reads and checks the model before anything is written."""
    run_dir = RunDir(out or default_run_dir("import"))
    if run_dir.path.exists() and (not run_dir.path.is_dir() or any(run_dir.path.iterdir())):
        raise UserError(f"--out '{run_dir.path}' exists and is not an empty directory; choose another --out")
    source = read_source(cfg.dir)
    n = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(source.params))
    write_run(cfg, source, run_dir)
    print(f"imported {cfg.dir} ({n / 1e6:.2f} M parameters, {source.image_shape[0]}×{source.image_shape[1]}, "
          f"{source.sde.num_train_timesteps} training timesteps) -> {run_dir.path}")
    return source
