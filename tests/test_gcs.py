"""gs:// run directories against a real GCS-compatible server (fake-gcs-server, the `gcs_emulator`
fixture; no client is mocked): pretrain -> finetune -> sample -> report with every directory on it,
SIGTERM and resume, the run lock's lease (a second writer refused, a stale lock taken over, a lost
lease), metrics as chunk objects, a damaged checkpoint set aside by copy + delete. `pytest -k gcs`."""

import io
import json
import pathlib
import time

import jax.numpy as jnp
import numpy as np
import pytest
from google.api_core import exceptions as gexc
from google.cloud import storage as gcs
from safetensors.numpy import load as safetensors_load
from safetensors.numpy import load_file

from conftest import TINY_UNET
from helpers import CLOCK, cli, error_line, invoke
from idiff_cli import storage
from idiff_cli.checkpoint import Checkpointer
from idiff_cli.diffusion import pipeline_io
from idiff_cli.diffusion.model import load
from idiff_cli.errors import UserError
from idiff_cli.runs import RunDir

PRETRAIN = ["pretrain", "mnist", "--steps", "4", "--batch", "4", *TINY_UNET, "--log-every", "1", "--ckpt-every", "2",
            "--sample-every", "4", "--sample-steps", "2", "--grid-n", "4"]
MODEL = pathlib.Path(__file__).parent / "fixtures" / "diffusers_tiny" / "model"  # a UNet2DModel directory
SD_PIPELINE = pathlib.Path(__file__).parent / "fixtures" / "sd_tiny" / "sd1"  # a Stable Diffusion pipeline
FID = ["--n", "6", "--batch", "4", "--sample-steps", "2"]  # test_fid_run.py's evaluation
LANGEVIN = ["--steps", "20", "--batch", "64", "--seeds", "2", "--log-every", "10", "--baseline", "implicit",
            "--ckpt-every", "10"]
EBM = ["--steps", "20", "--batch", "256", "--seeds", "2", "--log-every", "10", "--ckpt-every", "20", "--n-test", "2000",
       "--no-samplers"]
FINETUNE = ["--T", "2", "--M", "2", "--batch", "4", "--steps", "2", "--log-every", "1", "--ckpt-every", "2",
            "--sample-every", "2", "--grid-n", "4", "--kl-n", "4", "--lr", "0.01"]


def names(prefix: str) -> set[str]:
    return set(storage.objects(storage.path(prefix)))


def rows(run: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in CLOCK} for r in RunDir(run).read_metrics()]


def test_gcs_the_emulator_refuses_a_second_create_with_412(bucket):
    """What the run lock relies on: ifGenerationMatch=0 on an existing object is 412, and so is an
    update with another generation than the stored one."""
    blob = gcs.Client().bucket(bucket[5:]).blob("lock")
    blob.upload_from_string(b"a", if_generation_match=0)
    with pytest.raises(gexc.PreconditionFailed):
        blob.upload_from_string(b"b", if_generation_match=0)
    with pytest.raises(gexc.PreconditionFailed):
        blob.upload_from_string(b"b", if_generation_match=blob.generation + 1)


@pytest.mark.slow  # five commands on the emulator
def test_gcs_pretrain_evaluate_fid_finetune_sample_report_and_sigterm_resume_on_the_emulator(bucket, tmp_path,
                                                                                               monkeypatch):
    """Every directory on the emulator, nothing on the local disk; evaluate-fid's per-batch features kept
    on the bucket (a missing batch computed again, the same FID); a pretrain stopped by SIGTERM (a child
    process given only STORAGE_EMULATOR_HOST) and re-run logs the uninterrupted run's rows."""
    monkeypatch.chdir(tmp_path)
    pre, ft = f"{bucket}/runs/pre", f"{bucket}/runs/ft"
    invoke(*PRETRAIN, "--out", pre, check=True)
    evaluated = invoke("evaluate-fid", pre, *FID, check=True)
    invoke("finetune", "--from", pre, *FINETUNE, "--out", ft, check=True)
    sampled = invoke("sample", ft, "--n", "4", "--batch", "4", "--sample-steps", "2", check=True)
    reported = invoke("report", ft, check=True)

    assert {"config.json", "pretrained.json", "checkpoints/4/idiff_manifest.json", "checkpoints/4/commit_success.txt",
            "figures/samples.png", "figures/loss.png"} <= names(pre)
    assert sorted(n for n in names(pre) if n.startswith("metrics/")) == [f"metrics/{i:09d}.jsonl" for i in range(4)]
    assert [r["step"] for r in rows(pre)] == [1, 2, 3, 4]
    batches = sorted(n for n in names(pre) if n.startswith("fid/"))
    assert [n.rsplit("/", 1)[1] for n in batches] == ["batch-00000.npy", "batch-00001.npy"]
    fid = json.loads(storage.path(f"{pre}/fid.json").read_text())
    assert fid["n"] == 6 and fid["run"] == pre and "(n = 6, reference: dataset mnist)" in evaluated.output

    def generation(name: str) -> int:
        return gcs.Client().bucket(bucket[5:]).get_blob(f"runs/pre/{name}").generation

    kept = generation(batches[0])
    storage.path(f"{pre}/{batches[1]}").unlink()  # the kept batch is reused, the missing one computed again
    invoke("evaluate-fid", pre, *FID, check=True)
    assert sorted(n for n in names(pre) if n.startswith("fid/")) == batches and generation(batches[0]) == kept
    assert json.loads(storage.path(f"{pre}/fid.json").read_text())["value"] == fid["value"]
    ft_files = names(ft)
    assert {"config.json", "finetuned.json", "weights/2/idiff_manifest.json", "samples/step_000002.png",
            "samples/step_000002.npy", "figures/reward_kl.png", "figures/evolution.png", "figures/report.md"} <= ft_files
    assert json.loads(storage.path(f"{ft}/finetuned.json").read_text())["from"] == pre
    npz = next(n for n in ft_files if n.startswith("samples/sample-") and n.endswith(".npz"))
    with np.load(io.BytesIO(storage.path(f"{ft}/{npz}").read_bytes())) as arrays:
        assert arrays["images"].shape == (4, 28, 28, 1)
    assert f"wrote {ft}/samples/" in sampled.output and f"wrote {ft}/figures/report.md" in reported.output
    assert list(tmp_path.iterdir()) == []  # nothing written locally

    stopped = f"{bucket}/runs/stopped"
    first = cli(*PRETRAIN, "--out", stopped, env={"IDIFF_TEST_SIGNAL_AT_STEP": "3"})
    output = first.communicate(timeout=300)[0]
    assert first.returncode == 143, output
    assert f"stopped by SIGTERM at step 3; checkpoint saved in {stopped}" in output
    assert "TENSORSTORE" not in output and "Traceback" not in output
    assert [r["step"] for r in rows(stopped)] == [1, 2, 3]
    invoke(*PRETRAIN, "--out", stopped, check=True)
    assert rows(stopped) == rows(pre)


@pytest.mark.slow  # three commands on the emulator
def test_gcs_langevin_ebm_and_import_write_their_run_directories_on_the_emulator(bucket, tmp_path, monkeypatch,
                                                                                   tmp_path_factory):
    """langevin-reward (the log-likelihood columns written into its metrics chunks; `report --out gs://`
    redraws its figures from arrays.npz on the bucket), ebm-train with a local --data file, and import
    --out from a local model directory: every file an object, no lock left, nothing on the local disk.
    The langevin-reward and ebm-train runs are the shapes of tests in test_cli_langevin.py and
    test_ebm_cli.py, so a session compiles their programs once."""
    monkeypatch.chdir(tmp_path)
    lr, ebm, imported = f"{bucket}/lr", f"{bucket}/ebm", f"{bucket}/imported"
    invoke("langevin-reward", *LANGEVIN, "--out", lr, check=True)
    assert {"config.json", "arrays.npz", "methods/implicit.npz", "checkpoints/implicit/20/commit_success.txt",
            "figures/fig5_reward_loglik.png", "figures/fig10_dynamics.png"} <= names(lr)
    assert [(r["step"], "loglik_mean" in r) for r in rows(lr)] == [(0, True), (10, True), (20, True)]
    reported = invoke("report", lr, "--out", f"{bucket}/lr-figures", check=True)
    assert f"wrote {bucket}/lr-figures/fig4_samples_contours.png" in reported.output

    data = tmp_path_factory.mktemp("data") / "pts.npy"
    np.save(data, np.random.default_rng(0).normal(size=(2000, 2)) * 10.0 + 50.0)  # test_ebm_cli's file
    invoke("ebm-train", *EBM, "--data", data, "--out", ebm, check=True)
    assert {"config.json", "summary.json", "methods/implicit.npz", "checkpoints/implicit/20/commit_success.txt",
            "figures/fig11_samples_contours.png", "figures/fig12_metrics.png"} <= names(ebm)
    assert [r["step"] for r in rows(ebm)] == [0, 10, 20]

    invoke("import", "diffusers", MODEL, "--out", imported, "--sample-steps", "8", "--dataset", "cifar10", check=True)
    assert {"config.json", "pretrained.json", "diffusers/config.json", "diffusers/scheduler_config.json",
            "checkpoints/0/idiff_manifest.json", "checkpoints/0/commit_success.txt"} <= names(imported)
    assert load(storage.path(imported)).image_shape == (16, 16, 3)
    assert "exists and is not an empty directory" in error_line(
        invoke("import", "diffusers", MODEL, "--out", imported))
    assert not any(n.endswith("run.lock") for n in names(bucket))
    assert list(tmp_path.iterdir()) == []  # nothing written locally


@pytest.mark.slow  # an SD import on the emulator
def test_gcs_a_stable_diffusion_pipeline_imports_into_and_exports_from_the_bucket(bucket, tmp_path, monkeypatch):
    """import --out gs:// of the fixture SD pipeline: its configs, tokenizer files and checkpoint are
    objects; the run loads from the bucket (its tokenizer fetched from the copies: the same token ids as
    the source's); `export` of it from the bucket into the bucket writes unet/ with the source's U-Net
    weights, name by name and bit for bit. Nothing is written locally."""
    monkeypatch.chdir(tmp_path)
    run, out = f"{bucket}/sd", f"{bucket}/sd-export"
    invoke("import", "diffusers", SD_PIPELINE, "--out", run, "--sample-steps", "4", check=True)
    assert {"pretrained.json", "diffusers/model_index.json", "diffusers/unet/config.json", "diffusers/tokenizer/vocab.json",
            "diffusers/tokenizer/merges.txt", "checkpoints/0/commit_success.txt"} <= names(run)
    prompts = ["a photo of a cat", "an astronaut riding a horse"]
    ids, _ = load(storage.path(run)).model.tokenizer.encode(prompts)
    np.testing.assert_array_equal(ids, pipeline_io.read_pipeline(SD_PIPELINE).model.tokenizer.encode(prompts)[0])

    invoke("export", run, "--format", "diffusers", "--out", out, check=True)
    assert names(out) == {"unet/config.json", "unet/diffusion_pytorch_model.safetensors"}
    exported = safetensors_load(storage.path(f"{out}/unet/diffusion_pytorch_model.safetensors").read_bytes())
    source = load_file(SD_PIPELINE / "unet" / "diffusion_pytorch_model.safetensors")
    assert exported.keys() == source.keys()
    for name, tensor in source.items():
        np.testing.assert_array_equal(exported[name], tensor, err_msg=name)
    assert list(tmp_path.iterdir()) == []


def test_gcs_a_second_writer_is_refused_and_a_stale_lock_is_taken_over(bucket, tmp_path, monkeypatch):
    """A run's lease held: a second run on the directory is refused in one line naming the holder. A
    lock whose lease ended (its run killed, its VM preempted) is taken over, said in one line."""
    monkeypatch.chdir(tmp_path)
    run = f"{bucket}/run"
    held = storage.Lease(storage.path(f"{run}/run.lock"))
    try:
        line = error_line(invoke(*PRETRAIN, "--steps", "2", "--out", run))
    finally:
        held.release()
    assert f"'{run}' is in use by another run ({held.owner};" in line
    assert names(run) == set()  # the refused run left nothing, and the holder's release removed its lock

    stale = {"owner": "tpu-vm-7 pid 4242", "lease_s": 60, "expires": time.time() - 5}
    storage.write_bytes(f"{run}/run.lock", json.dumps(stale).encode())
    result = invoke(*PRETRAIN, "--steps", "2", "--out", run, check=True)
    taken = [line for line in result.output.splitlines() if "took over" in line]
    assert len(taken) == 1 and taken[0].startswith(f"took over the run lock of {run} from tpu-vm-7 pid 4242, whose "
                                                   "lease ended"), result.output
    assert "run.lock" not in names(run)  # released at the end of the run


def test_gcs_a_lease_is_renewed_and_a_lost_one_stops_its_run(bucket):
    """Two leases on one lock: the second is refused while the first is renewed past its first term;
    a lock rewritten by another run (this one stalled past its lease) is `lost`, and `check` refuses."""
    lock = storage.path(f"{bucket}/run/run.lock")
    first = storage.Lease(lock, lease_s=0.6)
    time.sleep(1.0)  # past the first term: renewed by the heartbeat
    with pytest.raises(UserError, match="is in use by another run"):
        storage.Lease(lock, lease_s=0.6)
    first.check()
    blob = gcs.Client().bucket(bucket[5:]).blob("run/run.lock")
    blob.upload_from_string(b'{"owner": "x", "lease_s": 60, "expires": 0}')  # another run took it over
    time.sleep(0.5)  # the next heartbeat finds another generation
    with pytest.raises(UserError, match="lost the run lock"):
        first.check()
    first.release()
    assert blob.exists()  # a lost lock is not deleted: it is the other run's now


def test_gcs_metrics_are_chunk_objects_read_in_order_and_a_torn_chunk_is_dropped(bucket):
    """One chunk object per append (none rewritten), read back in order; a chunk ending in a torn line
    reads without it, and drop_torn_metrics rewrites it; keep_metrics filters chunk by chunk."""
    run = RunDir(f"{bucket}/m")
    run.append_metrics([{"step": 1}])
    first = gcs.Client().bucket(bucket[5:]).get_blob("m/metrics/000000000.jsonl").generation
    run.append_metrics([{"step": 2}, {"step": 3}])
    run.append_metrics([{"step": 4}])
    assert sorted(names(f"{bucket}/m")) == [f"metrics/{i:09d}.jsonl" for i in range(3)]
    assert gcs.Client().bucket(bucket[5:]).get_blob("m/metrics/000000000.jsonl").generation == first
    assert [r["step"] for r in RunDir(f"{bucket}/m").read_metrics()] == [1, 2, 3, 4]

    storage.write_bytes(f"{bucket}/m/metrics/000000001.jsonl", b'{"step": 2}\n{"step": 3')
    fresh = RunDir(f"{bucket}/m")
    assert [r["step"] for r in fresh.read_metrics()] == [1, 2, 4]
    assert fresh.drop_torn_metrics() == '{"step": 3'
    assert storage.path(f"{bucket}/m/metrics/000000001.jsonl").read_text() == '{"step": 2}\n'
    assert fresh.drop_torn_metrics() is None

    assert [r["step"] for r in fresh.keep_metrics(lambda r: r["step"] <= 2)] == [1, 2]
    assert sorted(names(f"{bucket}/m")) == [f"metrics/{i:09d}.jsonl" for i in range(2)]
    fresh.append_metrics([{"step": 3}])
    assert [r["step"] for r in RunDir(f"{bucket}/m").read_metrics()] == [1, 2, 3]


def test_gcs_a_damaged_checkpoint_is_found_by_its_crc32c_and_set_aside_by_copy_and_delete(bucket, capsys):
    """An object of the latest step overwritten with as many other bytes: its stored CRC32C differs
    from the manifest's (nothing is downloaded to see it); the step is copied into damaged/ and
    deleted, and the previous step is restored."""
    directory = f"{bucket}/ck"
    with Checkpointer(directory, keep=3) as ckpt:
        for step in (1, 2):
            ckpt.save(step, {"x": jnp.arange(64.0) * step})
            ckpt.wait()
    sizes = storage.objects(storage.path(f"{directory}/2"))
    name = max((n for n in sizes if "/d/" in n), key=lambda n: sizes[n][0])  # the largest array data object
    data = storage.path(f"{directory}/2/{name}").read_bytes()
    storage.write_bytes(f"{directory}/2/{name}", bytes([data[0] ^ 0xFF]) + data[1:])

    with Checkpointer(directory, keep=3) as ckpt:
        step, state, _ = ckpt.restore_latest(lambda: {"x": jnp.zeros(64)})
        assert ckpt.all_steps() == [1]
    assert step == 1 and np.array_equal(state["x"], np.arange(64.0))
    assert f"{name} does not match its CRC32C" in " ".join(capsys.readouterr().err.split())  # rich wraps lines
    assert not any(n.startswith("2/") for n in names(directory))
    assert {f"damaged/2/{n}" for n in sizes} <= names(directory)


def test_gcs_paths_where_they_are_not_supported_are_one_line(bucket, tmp_path, monkeypatch):
    """A gs:// path for an input file (--config, import's model directory, ebm-train's --data) or beside a
    tracker: one line, exit 2; a bucket that does not exist likewise, for a run directory to write or to
    read (nothing written)."""
    monkeypatch.chdir(tmp_path)
    assert "--config names a local path" in error_line(invoke(*PRETRAIN, "--config", f"{bucket}/c.json"))
    assert "DIR names a local path" in error_line(invoke("import", "diffusers", f"{bucket}/model", "--out", "m"))
    assert "--data names a local file" in error_line(invoke("ebm-train", "--data", f"{bucket}/pts.npy",
                                                            "--out", f"{bucket}/ebm"))
    assert "--tensorboard writes into a local run directory only" in error_line(
        invoke(*PRETRAIN, "--tensorboard", "--out", f"{bucket}/tb"))
    assert "bucket 'no-such-bucket-here' does not exist" in error_line(
        invoke(*PRETRAIN, "--out", "gs://no-such-bucket-here/run"))
    for read in (("export", "gs://no-such-bucket-here/run", "--out", "exported"),
                 ("finetune", "--from", "gs://no-such-bucket-here/run", "--out", f"{bucket}/ft")):
        assert "bucket 'no-such-bucket-here' does not exist" in error_line(invoke(*read))
    assert not pathlib.Path("exported").exists() and names(f"{bucket}/ft") == set()
