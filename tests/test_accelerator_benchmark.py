"""benchmarks/accelerator.py in its SMOKE=1 mode (tiny sizes on the CPU): every part measures its rows
and writes them as they come (rows.jsonl, results.md, machine.json), so the script that a rare
accelerator lease runs has not rotted; `--part sd` is refused in one line (not built)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).parents[1] / "benchmarks" / "accelerator.py"


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], env={**os.environ, "SMOKE": "1"},
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # compiles a tiny U-Net finetuning step and pretraining step in a child process
def test_smoke_run_writes_every_part_as_it_goes(tmp_path):
    proc = run("--out", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    finetune = [r for r in rows if r["part"] == "finetune"]
    assert [r["method"] for r in finetune] == ["nested"], finetune
    assert all(r["s_per_step"] > 0 and r["sequential_calls"] > 0 for r in finetune), finetune
    wall = [r for r in rows if r["part"] == "wall"]
    assert [r["method"] for r in wall] == ["nested"], wall
    assert all(r["outer_steps"] >= 2 and r["seconds"] >= 1.0 for r in wall), wall
    (pretrain,) = [r for r in rows if r["part"] == "pretrain"]
    assert pretrain["train_img_per_s"] > 0 and pretrain["sample_steps_per_s"] > 0
    lines = proc.stdout.splitlines()
    assert sum("s/step" in line for line in lines) == 1 and sum("img/s training" in line for line in lines) == 1
    table = (tmp_path / "results.md").read_text()
    assert all(f"## {part}" in table for part in ("finetune", "wall", "pretrain")), table
    assert json.loads((tmp_path / "machine.json").read_text())["smoke"] is True


def test_the_sd_part_is_not_built_and_says_so(tmp_path):
    proc = run("--out", tmp_path, "--part", "sd")
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: --part sd is not built"), proc.stderr
