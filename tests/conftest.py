"""Test-suite set-up: two XLA host devices (so the sharded code paths run), float32 by default, one
compilation cache and one MNIST-classifier cache per session, and the session's tiny pretrained
model that the sample, FID and finetune tests share.

The suite runs in pytest-xdist workers (pyproject's addopts: most of its time is single-threaded
compilation, so two workers keep both cores busy). A session's workers share the caches and the
tiny pretrained model: they live beside the workers' own temporary directories, and the first
worker to need one makes it while the others wait (runs.taking_turns)."""

import os
import pathlib

import pytest

from idiff_cli.runs import taking_turns
from suite_env import xla_flags

# Before JAX starts: expose two CPU devices, as the `idiff` CLI does on a 2-core machine (suite_env.py:
# and compile at XLA's backend optimisation level 0).
os.environ.setdefault("XLA_FLAGS", xla_flags(2))

# The file with the suite's longest tests (float64 2-device trajectories, ~6 min in one worker) goes
# first: --dist loadfile hands out files in collection order, so the other worker runs the rest meanwhile.
FIRST = ("test_finetune_sharded.py",)


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name not in FIRST)  # stable: the rest keep their order


# A U-Net small enough to compile in seconds: 8 channels, two resolutions, attention at 14×14.
TINY_UNET = ["--ch", "8", "--ch-mult", "1,2", "--num-res-blocks", "1", "--attn-resolutions", "14"]


def shared_temp(tmp_path_factory) -> pathlib.Path:
    """The session's temporary directory, shared by its xdist workers (each has its own below it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if "PYTEST_XDIST_WORKER" in os.environ else base


@pytest.fixture(scope="session", autouse=True)
def session_caches(tmp_path_factory):
    """$IDIFF_JAX_CACHE and $IDIFF_CACHE_DIR (the MNIST classifier, trained once) under the session's
    shared temporary directory."""
    base = shared_temp(tmp_path_factory)
    saved = {k: os.environ.get(k) for k in ("IDIFF_JAX_CACHE", "IDIFF_CACHE_DIR")}
    os.environ["IDIFF_JAX_CACHE"] = str(base / "jax-cache")
    os.environ["IDIFF_CACHE_DIR"] = str(base / "idiff-cache")
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def tiny_pretrain(tmp_path_factory) -> pathlib.Path:
    """One tiny `idiff pretrain mnist` run (2 steps, batch 4, checkpoints at 1 and 2, the periodic FID
    of 6 samples at step 2), shared by every test that needs a pretrained model. Read it, never write
    into it: copy it first (shutil.copytree) to resume or extend it."""
    from typer.testing import CliRunner

    from idiff_cli.cli import app

    out = shared_temp(tmp_path_factory) / "shared" / "pretrain-mnist"
    args = ["pretrain", "mnist", "--steps", "2", "--batch", "4", *TINY_UNET, "--log-every", "1",
            "--ckpt-every", "1", "--sample-every", "2", "--sample-steps", "2", "--grid-n", "4",
            "--fid-every", "2", "--fid-n", "6", "--keep-checkpoints", "3", "--out", str(out)]
    with taking_turns(out.parent / "pretrain-mnist.lock"):
        if not (out / "pretrained.json").exists():
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 0, result.output
    return out
