"""A corpus of bad input across the commands, each refused in one line (exit 2) before any work and
leaving nothing behind: damaged run files and --config files, outputs that cannot be written, and
start-up errors. In-process and cheap: no case trains, samples or compiles a network.

Classes (docs/reliability.md): (1) a run file or --config that is damaged; (2) an output path that
cannot be written, checked before the work; (3) a start-up value that cannot work (a seed beyond a C
long, a U-Net whose groups do not divide its channels)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
from helpers import error_line, invoke

SEED_COMMANDS = [("langevin-reward",), ("ebm-train",), ("pretrain", "mnist"), ("finetune",), ("sample", "RUN"),
                 ("evaluate-fid", "RUN")]


def fake_pretrain_run(root: pathlib.Path) -> pathlib.Path:
    """A pretrain run directory's two JSON files (no checkpoints: every case is refused before them)."""
    run = root / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"command": "pretrain", "dataset": "mnist", "ch": 8}))
    (run / "pretrained.json").write_text(json.dumps({"checkpoints": "checkpoints", "step": 0, "weights": "ema",
                                                     "final": True, "image_shape": [28, 28, 1], "num_classes": 10}))
    return run


def damaged(run: pathlib.Path, name: str, text: str | bytes) -> pathlib.Path:
    path = run / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize("name, text, says", [
    ("pretrained.json", '{"checkpoints": "checkpoints", "st', "is damaged (not JSON"),
    ("pretrained.json", b"\x89PNG\r\n\x1a\n\x00\x00", "is damaged (not JSON"),
    ("pretrained.json", "[1, 2]", "is damaged (a JSON list, not an object)"),
    ("pretrained.json", '{"step": 0}', "is damaged (no 'checkpoints')"),
    ("config.json", '{"command": "pretrain", "ch": "abc"}', "is damaged (--ch must be an integer, got 'abc')"),
    ("config.json", '{"command": "pretrain", "colour": 1}', "is damaged (unknown option(s) of pretrain: colour)"),
])
@pytest.mark.parametrize("command", ["sample", "finetune", "evaluate-fid"])
def test_a_damaged_run_file_is_one_line_naming_it(tmp_path, name, text, says, command):
    run = fake_pretrain_run(tmp_path)
    path = damaged(run, name, text)
    args = {"sample": ("sample", run, "--out", tmp_path / "out"),
            "finetune": ("finetune", "--from", run, "--out", tmp_path / "out"),
            "evaluate-fid": ("evaluate-fid", run)}[command]
    line = error_line(invoke(*args))
    assert f"'{path}' {says}" in line and "restore it, or start again in another --out" in line
    assert not (tmp_path / "out").exists()


def test_report_reads_a_damaged_config_in_one_line(tmp_path):
    run = fake_pretrain_run(tmp_path)
    damaged(run, "config.json", "{")
    assert "config.json' is damaged (not JSON" in error_line(invoke("report", run, "--out", tmp_path / "figs"))


@pytest.mark.parametrize("make, says", [
    (lambda p: p.mkdir(), "is a directory; give a JSON or TOML file"),
    (lambda p: p.write_bytes(b"\xff\xfe\x00binary"), "cannot read config file"),
    (lambda p: p.write_text("steps = ["), "cannot parse config file"),
    (lambda p: p.write_text("[1]"), "must hold a table of name: value"),
])
def test_a_bad_config_file_is_one_line(tmp_path, make, says):
    path = tmp_path / "cfg.json"
    make(path)
    assert says in error_line(invoke("langevin-reward", "--config", path, "--out", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_checkpoints_without_config_json_are_refused(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "10").mkdir(parents=True)
    line = error_line(invoke("langevin-reward", "--steps", "20", "--out", run))
    assert "holds checkpoints but no config.json" in line
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints"]


@pytest.mark.parametrize("args", [
    ("sample", "RUN", "--out", "FILE"),
    ("evaluate-fid", "--samples", "FILE", "--out", "FILE"),
    ("evaluate-fid", "--samples", "FILE", "--save-stats", "DIR"),
    ("report", "RUN", "--out", "FILE"),
    ("import", "diffusers", "DIR", "--out", "FILE/sub"),
    ("langevin-reward", "--out", "FILE/sub"),
])
def test_an_output_that_cannot_be_written_is_refused_before_the_work(tmp_path, args):
    run = fake_pretrain_run(tmp_path)
    file = tmp_path / "file.txt"
    file.write_text("not a directory\n")
    names = {"RUN": run, "FILE": file, "DIR": tmp_path, "FILE/sub": file / "sub"}
    line = error_line(invoke(*[names.get(a, a) for a in args]))
    assert ("is not a directory" in line or "is a directory" in line or "exists and is not" in line), line
    assert file.read_text() == "not a directory\n"


@pytest.mark.parametrize("command", SEED_COMMANDS, ids=lambda c: c[0])
def test_a_seed_beyond_a_c_long_is_refused(tmp_path, command):
    run = fake_pretrain_run(tmp_path)
    args = [run if a == "RUN" else a for a in command]
    line = error_line(invoke(*args, "--seed", str(2**63), "--out", tmp_path / "out"))
    assert f"--seed must be < {2**63}, got {2**63}" in line
    assert not (tmp_path / "out").exists()


PLUGINS = """
import jax.numpy as jnp

def one_argument(x):
    return jnp.sum(x ** 2, axis=0)

def per_coordinate(x, theta):
    return x ** 2

def raises(x, theta):
    raise ValueError("no such well")
"""


@pytest.mark.parametrize("args, says", [
    (("langevin-reward", "--potential", "corpus_plugins:one_argument"),
     "potential 'corpus_plugins:one_argument' fails on x [2, 32] and the run's θ: TypeError"),
    (("langevin-reward", "--potential", "corpus_plugins:per_coordinate"),
     "potential 'corpus_plugins:per_coordinate' must map x [2, 32] and the run's θ to [32] values"),
    (("langevin-reward", "--reward", "corpus_plugins:per_coordinate"),
     "reward 'corpus_plugins:per_coordinate' fails on x [2, 32]: TypeError"),
    (("ebm-train", "--energy", "corpus_plugins:raises"),
     "energy 'corpus_plugins:raises' fails on x [2, 64] and the run's θ: ValueError: no such well"),
])
def test_a_plug_in_that_does_not_fit_is_probed_before_the_run(tmp_path, monkeypatch, args, says):
    (tmp_path / "corpus_plugins.py").write_text(PLUGINS)
    monkeypatch.syspath_prepend(str(tmp_path))
    line = error_line(invoke(*args, "--batch", "32" if args[0] == "langevin-reward" else "64", "--out",
                             tmp_path / "out"))
    assert says in line, line
    assert not (tmp_path / "out").exists()


def test_groups_that_do_not_divide_the_channels_are_one_line(tmp_path):
    line = error_line(invoke("pretrain", "mnist", "--groups", "3", "--steps", "2", "--out", tmp_path / "out"))
    assert "--groups 3" in line and "does not fit 28×28×1 images" in line
    assert not (tmp_path / "out").exists()


FULL_DISK = """mount -t tmpfs -o size=3m tmpfs "$0/disk" || exit 90
head -c 2900000 /dev/urandom > "$0/disk/ballast"
"$1" -c 'from idiff_cli.cli import main; main()' $2 --out "$0/disk/run" 2> "$0/first.err"; echo $? > "$0/first.rc"
ls "$0/disk/run/checkpoints" > "$0/left.txt"
rm "$0/disk/ballast"
"$1" -c 'from idiff_cli.cli import main; main()' $2 --out "$0/disk/run" 2> "$0/second.err"; echo $? > "$0/second.rc"
"""


@pytest.mark.slow  # two runs in child processes
def test_a_full_disk_is_one_line_frees_the_partial_step_and_the_re_run_resumes(tmp_path):
    """A 3 MiB tmpfs (a private mount namespace) nearly full: the run stops at a checkpoint write with
    one line and exit 2, nothing of orbax's logging, no partial step left; with the space freed, the
    same command finishes the run."""
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("no private mount namespace here (unshare -rm)")
    (tmp_path / "disk").mkdir()
    args = "langevin-reward --steps 40 --log-every 10 --ckpt-every 20 --batch 64 --seeds 2"
    subprocess.run(["unshare", "-rm", "sh", "-c", FULL_DISK, str(tmp_path), sys.executable, args], timeout=300,
                   check=True)
    first = (tmp_path / "first.err").read_text()
    errors = [line for line in first.splitlines() if line.startswith("error:")]
    assert (tmp_path / "first.rc").read_text().strip() == "2", first
    assert len(errors) == 1 and "no space left on the device" in errors[0], first
    assert "Traceback" not in first and "absl" not in first, first
    assert "tmp" not in (tmp_path / "left.txt").read_text()
    assert (tmp_path / "second.rc").read_text().strip() == "0", (tmp_path / "second.err").read_text()
