"""Tracking through the run loop (the toy unit of test_loop.py): TensorBoard event files, read back
with tensorboardX's event protocol, hold the scalars of metrics.jsonl — also after a resume, where
the events past the restored checkpoint are hidden as TensorBoard hides them — and Weights & Biases
offline, where the optional extra is installed."""

import json
import os
import re
import shutil
import struct

import pytest
from tensorboardX.proto import event_pb2
from test_loop import run

from idiff_cli.runs import RunDir


def read_events(directory):
    """Scalar values {(tag, step): value} as TensorBoard shows them: event files in order, and a
    session start at step s hides the earlier events of steps >= s (its purge of a restarted run)."""
    shown = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12: offset + 12 + length])
            offset += 12 + length + 4  # length, its crc, the record, its crc
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                shown = {key: v for key, v in shown.items() if key[1] < event.step}
            for value in event.summary.value:
                shown[(value.tag, event.step)] = value.simple_value
    return shown


def scalars_of_metrics(out):
    """metrics.jsonl as {(field, step): value}, to float32 precision (what event files hold)."""
    return {(name, r["step"]): pytest.approx(v, rel=1e-6) for r in RunDir(out).read_metrics()
            for name, v in r.items() if name != "step"}


def test_event_files_hold_the_metrics_scalars(tmp_path):
    out = tmp_path / "run"
    run(out, tensorboard=True)
    events = read_events(out / "tb")
    assert events == scalars_of_metrics(out)
    assert {tag for tag, _ in events} == {"x", "x_squared", "wall_s"}


def test_a_resumed_run_continues_the_same_curves(tmp_path):
    """A run to step 6 whose checkpoint 6 is lost resumes from 4: its events past step 4 are hidden and
    written again, so TensorBoard shows exactly the uninterrupted run's scalars (wall time aside)."""
    out = tmp_path / "run"
    run(out, steps=6, tensorboard=True)
    shutil.rmtree(out / "checkpoints" / "6")
    run(out, steps=12, tensorboard=True)
    run(tmp_path / "whole", steps=12, tensorboard=True)
    without_wall = lambda events: {k: v for k, v in events.items() if k[0] != "wall_s"}  # noqa: E731
    assert without_wall(read_events(out / "tb")) == pytest.approx(without_wall(read_events(tmp_path / "whole" / "tb")))
    assert read_events(out / "tb") == scalars_of_metrics(out)


def test_weights_and_biases_offline_resumes_the_same_wandb_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the optional extra: pip install -e '.[wandb]'")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    run(out, steps=6, wandb="idiff-test")
    first = json.loads((out / "wandb.json").read_text())
    run(out, steps=12, wandb="idiff-test")
    assert json.loads((out / "wandb.json").read_text()) == first
    # offline-run-<start time>-<run id>, with -1, -2… when two sessions start in the same second
    runs = [re.fullmatch(r"offline-run-\d{8}_\d{6}-(\w+?)(-\d+)?", p.name)
            for p in (out / "wandb").iterdir() if p.name.startswith("offline-run-")]
    assert len(runs) == 2 and all(m and m.group(1) == first["id"] for m in runs), runs
    history = [p for p in (out / "wandb").rglob("*.wandb")]
    assert history and all(os.path.getsize(p) > 0 for p in history)
