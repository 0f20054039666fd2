"""The run directory's writers on a full disk (ENOSPC injected at the system calls they use): one-line
UserError, the previous files and metrics rows intact, no temporary file left."""

import errno
import fcntl
import os

import pytest

from idiff_cli import runs
from idiff_cli.errors import UserError
from idiff_cli.runs import RunDir


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_metrics_append_is_cut_back_to_the_rows_before(tmp_path, monkeypatch):
    run_dir = RunDir(tmp_path / "run")
    run_dir.append_metrics([{"step": 1, "loss": 0.5}])
    before = run_dir.metrics_path.read_bytes()
    real_write = os.write

    def half_then_full(fd, data):  # the first write lands half a row, the next finds the disk full
        monkeypatch.setattr(runs.os, "write", full_disk)
        return real_write(fd, bytes(data)[: len(data) // 2])

    monkeypatch.setattr(runs.os, "write", half_then_full)
    with pytest.raises(UserError, match="no space left on the device writing .*metrics.jsonl"):
        run_dir.append_metrics([{"step": 2, "loss": 0.25}, {"step": 3, "loss": 0.125}])
    assert run_dir.metrics_path.read_bytes() == before


def test_a_failed_file_write_keeps_the_previous_file(tmp_path, monkeypatch):
    run_dir = RunDir(tmp_path / "run").create()
    run_dir.write_json("config.json", {"lr": 0.1})
    monkeypatch.setattr(runs.os, "replace", full_disk)
    with pytest.raises(UserError, match="no space left on the device writing .*config.json"):
        run_dir.write_json("config.json", {"lr": 0.2})
    assert run_dir.read_json("config.json") == {"lr": 0.1}
    assert sorted(p.name for p in run_dir.path.iterdir()) == ["config.json"]


def test_other_os_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    run_dir = RunDir(tmp_path / "run").create()
    monkeypatch.setattr(runs.os, "replace", denied)
    with pytest.raises(OSError, match="Input/output error"):
        run_dir.write_json("config.json", {})


def test_taking_turns_holds_the_lock_for_its_block_and_gives_it_back(tmp_path):
    path = tmp_path / "cache" / "x.lock"

    def try_lock():
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)

    with runs.taking_turns(path):
        assert not try_lock()  # another open file (as another process has) must wait
    assert try_lock()
