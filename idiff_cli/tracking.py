"""Live tracking of runs: TensorBoard event files (tensorboardX, no TensorFlow) and Weights & Biases.

    trackers = open_trackers(run_dir, "implicit", tensorboard=True, wandb="", resume_step=40)
    trackers.scalars(41, {"reward_mean": 0.3})      # every numeric field of a metrics row
    trackers.image("samples", 50, "samples/step_000050.png")
    trackers.close()

TensorBoard: one event directory per unit of work (`tb/` for a single-unit run, `tb/<method>/` for
each method of langevin-reward and ebm-train, so TensorBoard overlays the methods as runs). A resumed
unit writes a session start at the step after its checkpoint (`purge_step`): TensorBoard then hides
the events that the interrupted run logged past that checkpoint, and the curves continue as one.

Weights & Biases (`pip install -e '.[wandb]'`): one W&B run per run directory, its id kept in
`wandb.json` so that a resumed run continues the same W&B run (`resume="allow"`); steps of every
unit go to one W&B run, prefixed by the unit's name. `WANDB_MODE=offline` works without a network.
Only process 0 tracks.
"""

from __future__ import annotations

import json
import numbers
import secrets
import time
import pathlib
from typing import Any, Mapping

import numpy as np
from PIL import Image
from tensorboardX import SummaryWriter

from idiff_cli.runs import read_json


TB_DIR = "tb"


class TensorBoard:
    """Scalars and images of one unit into `directory` (event files)."""

    def __init__(self, directory: pathlib.Path, purge_step: int | None):
        # event files are named by the second they start in; the nanosecond suffix keeps a session that
        # starts in the same second as the one before it from overwriting its file (and orders them)
        self._writer = SummaryWriter(logdir=str(directory), purge_step=purge_step, flush_secs=30,
                                     filename_suffix=f".{time.time_ns()}")

    def scalars(self, step: int, values: Mapping[str, float], prefix: str) -> None:
        for name, value in values.items():  # the unit is the event directory: no prefix
            self._writer.add_scalar(name, value, step)

    def image(self, tag: str, step: int, pixels: np.ndarray, prefix: str) -> None:
        self._writer.add_image(tag, pixels, step, dataformats="HWC")

    def close(self) -> None:
        self._writer.close()


class WandB:
    """Scalars and images into one W&B run per run directory (resumed with the directory)."""

    def __init__(self, project: str, run_dir: pathlib.Path, config: Mapping[str, Any]):
        import wandb  # the optional extra (config.check_tracking refuses --wandb without it)

        record = run_dir / "wandb.json"
        run_id = read_json(record, ("id",))["id"] if record.exists() else secrets.token_hex(4)
        record.write_text(json.dumps({"id": run_id, "project": project}) + "\n")
        self._wandb = wandb
        self._run = wandb.init(project=project, id=run_id, resume="allow", dir=str(run_dir),
                               name=run_dir.name, config=dict(config))

    def scalars(self, step: int, values: Mapping[str, float], prefix: str) -> None:
        self._run.log({f"{prefix}{k}": v for k, v in values.items()}, step=step)

    def image(self, tag: str, step: int, pixels: np.ndarray, prefix: str) -> None:
        self._run.log({f"{prefix}{tag}": self._wandb.Image(pixels)}, step=step)

    def close(self) -> None:
        self._run.finish()


class Trackers:
    """The trackers of one unit (possibly none); scalars are the numeric fields of metrics rows."""

    def __init__(self, trackers: list, prefix: str = ""):
        self._trackers, self._prefix = trackers, prefix

    def __bool__(self) -> bool:
        return bool(self._trackers)

    def rows(self, rows: list[Mapping[str, Any]]) -> None:
        for row in rows:
            values = {k: float(v) for k, v in row.items()
                      if k not in ("step", "method") and isinstance(v, numbers.Real) and not isinstance(v, bool)}
            for tracker in self._trackers:
                tracker.scalars(int(row["step"]), values, self._prefix)

    def image(self, tag: str, step: int, path: pathlib.Path) -> None:
        if not self._trackers:
            return
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        for tracker in self._trackers:
            tracker.image(tag, step, pixels, self._prefix)

    def close(self) -> None:
        for tracker in self._trackers:
            tracker.close()


def open_trackers(run_dir: pathlib.Path, unit: str | None, tensorboard: bool, wandb: str,
                  config: Mapping[str, Any], resume_step: int | None) -> Trackers:
    """The trackers asked for, for one unit (`unit` None: the whole run). `resume_step`: the step of
    the checkpoint the unit continues from (None: a fresh start, whose leftover events are hidden too)."""
    trackers: list = []
    if tensorboard:
        directory = run_dir / TB_DIR / unit if unit else run_dir / TB_DIR
        trackers.append(TensorBoard(directory, purge_step=0 if resume_step is None else resume_step + 1))
    if wandb:
        trackers.append(WandB(wandb, run_dir, config))
    return Trackers(trackers, prefix=f"{unit}/" if unit else "")
