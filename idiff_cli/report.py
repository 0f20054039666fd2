"""`idiff report RUN...`: redraws the figures of runs from their files alone, for every run kind.

One run: its figures again, into RUN/figures/ (or --out). Several runs of one kind: their curves
overlaid in --out. The run kind is the `command` of each run's config.json; each kind's figures
live in its package (`report(run_dirs, out) -> [paths]`), imported when a report is drawn.
"""

from __future__ import annotations

import importlib
import json
import pathlib
from typing import Any

from idiff_cli import config as cfglib
from idiff_cli.errors import UserError
from idiff_cli.runs import console

# run kind (config.json's `command`) -> "module:function" drawing its figures
FIGURES = {
    "langevin-reward": "idiff_cli.langevin.figures:report",
    "ebm-train": "idiff_cli.ebm.figures:report",
    "pretrain": "idiff_cli.diffusion.figures:report",
    "finetune": "idiff_cli.implicit.report:report",
}
X_AXES = ("step", "net_evals", "sequential_calls", "wall_s", "grad_evals")

SCHEMA = cfglib.Schema(
    "report",
    "Redraw the figures of runs from their files (metrics.jsonl, arrays); several runs of one kind are "
    "overlaid (paper Figs 5, 6, 12, 15, 17).",
    (
        cfglib.Option("runs", "path", None, "Run directories of one kind (langevin-reward, ebm-train, pretrain "
                      "or finetune).", argument=True, many=True, required=True),
        cfglib.Option("x", str, "step", "x axis of the curves, where the run kind logs it.", choices=X_AXES),
        cfglib.out_option("Where the figures go (one run: RUN/figures; several: runs/report)"),
        cfglib.CONFIG_OPTION,
    ),
)


def run_kind(run_dir: pathlib.Path) -> str:
    """The command that made `run_dir` (its config.json's `command`)."""
    path = pathlib.Path(run_dir) / "config.json"
    if not path.exists():
        raise UserError(f"'{run_dir}' is not a run directory (no config.json)")
    command = json.loads(path.read_text()).get("command")
    if command not in FIGURES:
        raise UserError(f"'{run_dir}' holds a run of kind '{command}'; `idiff report` draws: {', '.join(FIGURES)}")
    return command


def main(cfg: Any, out: pathlib.Path | None) -> list[pathlib.Path]:
    runs = [pathlib.Path(r) for r in cfg.runs]
    kinds = {run_kind(r) for r in runs}
    if len(kinds) > 1:
        raise UserError(f"runs of different kinds ({', '.join(sorted(kinds))}); report one kind at a time")
    kind = kinds.pop()
    target = out or (runs[0] / "figures" if len(runs) == 1 else pathlib.Path("runs") / "report")
    module, _, function = FIGURES[kind].partition(":")
    written = getattr(importlib.import_module(module), function)(runs, target, cfg.x)
    for path in written:
        console.print(f"wrote {path}", highlight=False)
    return written
