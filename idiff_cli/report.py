"""`idiff report RUN...`: redraws the figures of runs from their files alone, for every run kind.

One run: its figures again, into RUN/figures/ (or --out). Several runs of one kind: their curves
overlaid in --out. The run kind is the `command` of each run's config.json; each kind's figures
live in its package (`report(run_dirs, out) -> [paths]`), imported when a report is drawn.
Beside the figures, report.md: the options that differ between the runs, the final value of each
metric of each run (and method) — `mean (min..max)` where the run logs a statistic over seeds as
NAME_mean, NAME_min, NAME_max — and links to the figures.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
from typing import Any

from idiff_cli import config as cfglib
from idiff_cli.errors import UserError
from idiff_cli import storage
from idiff_cli.runs import RunDir, atomic_path, console, read_json

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
    path = storage.path(run_dir) / "config.json"
    if not path.exists():
        raise UserError(f"'{run_dir}' is not a run directory (no config.json)")
    command = read_json(path).get("command")
    if command not in FIGURES:
        raise UserError(f"'{run_dir}' holds a run of kind '{command}'; `idiff report` draws: {', '.join(FIGURES)}")
    return command


def main(cfg: Any, out: pathlib.Path | None) -> list[pathlib.Path]:
    runs = [storage.path(r) for r in cfg.runs]
    kinds = {run_kind(r) for r in runs}
    if len(kinds) > 1:
        raise UserError(f"runs of different kinds ({', '.join(sorted(kinds))}); report one kind at a time")
    kind = kinds.pop()
    target = out or (runs[0] / "figures" if len(runs) == 1 else pathlib.Path("runs") / "report")
    RunDir(target).check_writable()
    module, _, function = FIGURES[kind].partition(":")
    written = getattr(importlib.import_module(module), function)(runs, target, cfg.x)
    written.append(write_markdown(runs, written, target / "report.md"))
    for path in written:
        console.print(f"wrote {path}", highlight=False)
    return written


def final_metrics(rows: list[dict]) -> dict[str, dict[str, float]]:
    """method ("" for rows without one) -> each numeric metric's value on the last row that logs it."""
    final: dict[str, dict[str, float]] = {}
    for row in rows:
        values = final.setdefault(str(row.get("method", "")), {})
        values.update({k: v for k, v in row.items() if k != "method" and isinstance(v, (int, float))
                       and not isinstance(v, bool)})
    return final


def _number(value: float) -> str:
    return f"{value:d}" if isinstance(value, int) else f"{value:.5g}"


def seed_columns(values: dict[str, float]) -> dict[str, str]:
    """Cells of one table row: NAME_mean, NAME_min and NAME_max (a statistic over seeds) as one cell
    NAME = "mean (min..max)"; any other metric as its number."""
    cells = {}
    for key, value in values.items():
        stem = key.rsplit("_", 1)[0]
        if key.endswith("_mean") and f"{stem}_min" in values and f"{stem}_max" in values:
            cells[stem] = f"{_number(value)} ({_number(values[stem + '_min'])}..{_number(values[stem + '_max'])})"
        elif not (key.endswith(("_min", "_max")) and f"{stem}_mean" in values):
            cells[key] = _number(value)
    return cells


def differing_options(runs: list[pathlib.Path]) -> list[tuple[str, list[Any]]]:
    """(option, its value in each run) for the config.json entries that differ between the runs."""
    configs = [read_json(run / "config.json") for run in runs]
    keys = dict.fromkeys(k for c in configs for k in c)
    return [(k, [c.get(k) for c in configs]) for k in keys if len({json.dumps(c.get(k)) for c in configs}) > 1]


def write_markdown(runs: list[pathlib.Path], figures: list[pathlib.Path], path: pathlib.Path) -> pathlib.Path:
    """`path` (report.md): the table of final metrics, one line per run and method, with the options
    that differ between the runs as leading columns, then links to `figures` (relative to `path`)."""
    options = differing_options(runs) if len(runs) > 1 else []
    lines = []
    for i, run in enumerate(runs):
        for method, values in final_metrics(RunDir(run).read_metrics()).items():
            lines.append(({"run": str(run), **({"method": method} if method else {}),
                           **{k: json.dumps(v[i]) for k, v in options}}, seed_columns(values)))
    keys = list(dict.fromkeys(k for head, cells in lines for k in [*head, *cells]))
    table = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    table += ["| " + " | ".join({**head, **cells}.get(k, "") for k in keys) + " |" for head, cells in lines]
    links = [f"- [{figure.name}]({os.path.relpath(figure, path.parent)})" for figure in figures]
    text = "\n".join(["# Report", "", "Final metrics (last logged value of each; `mean (min..max)` over seeds).", "",
                      *table, "", "## Figures", "", *links, ""])
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path
