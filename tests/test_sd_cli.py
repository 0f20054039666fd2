"""A Stable Diffusion pipeline through the real CLI: import (fp32 and --variant fp16) -> sample with a
prompt and guidance -> evaluate-fid from a prompts file with plug-in features; finetune with LoRA from a
prompts file (the micro pipeline of micro_pipeline.py), resumed, exported in diffusers' formats; and the
one-line refusals of bad input, each before anything is written."""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
from helpers import error_line, invoke, rows
from micro_pipeline import MICRO_TARGETS, write_micro_pipeline
from safetensors.numpy import load_file

from idiff_cli.diffusion import diffusers_io, lora
from idiff_cli.diffusion.model import load, load_adapters, unet_params

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "sd_tiny"
DDPM = pathlib.Path(__file__).parent / "fixtures" / "diffusers_tiny" / "model"

# Mean-colour features of a 16×16 RGB image: a plug-in extractor (`package.module:function`).
PLUGIN = '''
from idiff_cli.fid.features import Features

def colour(weights=None):
    return Features("colour", "FID (mean colour)", 3, lambda x: x.mean(axis=(1, 2)), "test plug-in")
'''


@pytest.fixture(scope="module")
def sd_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("sd") / "run"
    invoke("import", "diffusers", FIXTURE / "sd1", "--out", run, "--sample-steps", "4", check=True)
    return run


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    """The micro pipeline (tests/micro_pipeline.py) imported: a finetune run of it takes about a third of the SD fixture's time."""
    base = tmp_path_factory.mktemp("micro")
    invoke("import", "diffusers", write_micro_pipeline(base / "pipeline"), "--out", base / "run", check=True)
    return base / "run"


def test_import_writes_a_text_to_image_run(sd_run):
    config = json.loads((sd_run / "config.json").read_text())
    assert config["command"] == "import" and config["sampler"] == "ddim" and config["sample_steps"] == 4
    record = json.loads((sd_run / "pretrained.json").read_text())
    assert record["image_shape"] == [16, 16, 3] and record["dtype"] == "float32"
    copies = sorted(p.relative_to(sd_run / "diffusers").as_posix() for p in (sd_run / "diffusers").rglob("*.*"))
    assert copies == ["model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
                      "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
                      "tokenizer/vocab.json", "unet/config.json", "vae/config.json"]


@pytest.mark.slow  # compiles the guided SD sampler
def test_sample_with_a_prompt_and_guidance(sd_run, tmp_path):
    """--n images per prompt, the prompts recorded per image; the same seed gives the same images."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n\n  \na red boat\n")
    result = invoke("sample", sd_run, "--prompts", prompts, "--n", "2", "--guidance", "7.5", "--negative-prompt",
                    "blurry", "--seed", "3", "--out", tmp_path / "a", check=True)
    assert "wrote" in result.output
    data = np.load(tmp_path / "a" / "sample-step0-imported-ddim4-seed3-n2.npz")
    assert data["images"].shape == (4, 16, 16, 3) and data["images"].dtype == np.uint8
    assert list(data["prompts"]) == ["a photo of a cat"] * 2 + ["a red boat"] * 2
    assert str(data["negative_prompt"]) == "blurry" and float(data["guidance"]) == 7.5
    assert not np.array_equal(data["images"][0], data["images"][1])  # two draws of one prompt differ
    assert (tmp_path / "a" / "sample-step0-imported-ddim4-seed3-n2.png").is_file()


@pytest.mark.slow  # compiles the guided SD sampler
def test_long_prompt_is_truncated_and_said_once(sd_run, tmp_path):
    long = " ".join(["a quiet mountain village at sunset"] * 20)
    result = invoke("sample", sd_run, "--prompt", long, "--n", "1", "--sample-steps", "2", "--out", tmp_path,
                    check=True)
    assert result.output.count("longer than 77 tokens") == 1


@pytest.mark.slow  # compiles the guided SD sampler
def test_evaluate_fid_from_a_prompts_file(sd_run, tmp_path, monkeypatch):
    (tmp_path / "sd_features.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na red boat\na green field\n")
    stats = tmp_path / "ref.npz"
    np.savez(stats, mu=np.full(3, 0.5), sigma=np.eye(3) * 0.01)
    invoke("evaluate-fid", sd_run, "--prompts", prompts, "--features", "sd_features:colour", "--ref-stats", stats,
           "--n", "4", "--batch", "2", "--sample-steps", "2", check=True)
    result = json.loads((sd_run / "fid.json").read_text())
    assert result["n"] == 4 and result["prompts"] == 3 and result["guidance"] == 7.5
    assert np.isfinite(result["value"]) and result["value"] > 0


def test_fp16_variant_imports_half_weights(tmp_path):
    run = tmp_path / "half"
    invoke("import", "diffusers", FIXTURE / "sd1", "--variant", "fp16", "--out", run, check=True)
    assert json.loads((run / "pretrained.json").read_text())["dtype"] == "float16"


@pytest.fixture(scope="module")
def ddpm_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ddpm") / "run"
    invoke("import", "diffusers", DDPM, "--out", run, check=True)
    return run


@pytest.mark.slow  # 14 commands, each loading a run (12 s)
def test_refusals_are_one_line_and_write_nothing(sd_run, ddpm_run, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    cases = [
        (("sample", sd_run, "--out", tmp_path / "s"), "is a text-to-image model: give --prompt TEXT or --prompts FILE"),
        (("sample", sd_run, "--prompts", empty, "--out", tmp_path / "s"), "holds no prompt (one per line)"),
        (("sample", ddpm_run, "--prompt", "a cat", "--out", tmp_path / "s"),
         "--prompt applies to sampling a text-to-image run"),
        (("sample", ddpm_run, "--guidance", "3", "--out", tmp_path / "s"),
         "--guidance applies to sampling a text-to-image run"),
        (("sample", sd_run, "--prompt", "a cat", "--sampler", "ddpm", "--ddim-eta", "1", "--out", tmp_path / "s"),
         "--ddim-eta 1 applies to the ddim sampler, not 'ddpm'"),
        (("finetune", "--from", sd_run, "--fid-every", "10", "--out", tmp_path / "s"),
         "--fid-every: the periodic FID compares with a dataset's images"),
        (("finetune", "--from", sd_run, "--lora-targets", "to_qq", "--out", tmp_path / "s"), "'to_qq'"),
        (("finetune", "--from", sd_run, "--lora-rank", "0", "--out", tmp_path / "s"), "--lora-rank"),
        (("finetune", "--from", sd_run, "--prompts", empty, "--out", tmp_path / "s"), "holds no prompt"),
        (("finetune", "--from", ddpm_run, "--prompts", empty, "--out", tmp_path / "s"),
         "--prompts: text-to-image option(s)"),
        (("finetune", "--from", sd_run, "--lora", FIXTURE / "lora" / "oracle.npz", "--out", tmp_path / "s"),
         "oracle.npz"),
        (("evaluate-fid", "--samples", empty, "--prompts", empty, "--out", tmp_path / "s"),
         "--prompts applies to sampling a text-to-image run"),
        (("import", "diffusers", DDPM, "--variant", "fp16", "--out", tmp_path / "i"),
         "--variant fp16 applies to Stable Diffusion pipeline directories"),
        (("import", "diffusers", FIXTURE / "sd2", "--variant", "fp16", "--out", tmp_path / "i"),
         "--variant fp16: '"),
    ]
    for args, message in cases:
        assert message in error_line(invoke(*args))
    assert not (tmp_path / "s").exists() and not (tmp_path / "i").exists()


PROMPTS = '{"prompt": "a red cube", "negative": "blurry"}\n{"prompt": "a blue ball"}\n'
# LoRA of the fixture file's rank and alpha, 2 DDPM steps (M = 1: no warm-up), a checkpoint every step
FINETUNE = ["--reward", "brightness", "--lora-rank", "2", "--lora-alpha", "4", "--T", "2", "--M", "1", "--batch", "2",
            "--devices", "1", "--log-every", "1", "--ckpt-every", "1", "--sample-every", "2", "--kl-n", "2",
            "--grid-n", "2", "--lr", "0.01"]


@pytest.mark.slow  # two finetune runs of the micro pipeline (~20 s)
def test_lora_finetune_resumes_bit_for_bit_and_exports(micro_run, tmp_path):
    """`finetune --prompts FILE.jsonl --lora-rank 2` on the micro pipeline: 2 steps straight, and the run
    as it was at checkpoint 1 resumed to 2 — the same rows and the same adapters, bit for bit (float32).
    `export` writes the adapters as diffusers' LoRA file: every key `unet.`-prefixed, a down and an up
    matrix per adapted module, read back as the run's adapters with α/r folded into the up matrix (the
    names and shapes against a diffusers-made file: test_lora.py); `export --merged` the U-Net with them
    merged, equal to the run's merged model (`load`, which `sample` and `evaluate-fid` read)."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(PROMPTS)
    straight, resumed = tmp_path / "a", tmp_path / "b"
    invoke("finetune", "--from", micro_run, "--prompts", prompts, *FINETUNE, "--steps", "2", "--out", straight,
           check=True)
    shutil.copytree(straight, resumed)  # the run as it was at checkpoint 1: checkpoint 2 and θ of step 2 gone
    shutil.rmtree(resumed / "checkpoints" / "2")
    shutil.rmtree(resumed / "weights" / "2")
    invoke("finetune", "--from", micro_run, "--prompts", prompts, *FINETUNE, "--steps", "2", "--out", resumed,
           check=True)
    assert rows(straight, drop=("wall_s",)) == rows(resumed, drop=("wall_s",))
    last = rows(straight)[-1]
    assert last["step"] == 2 and last["kl"] > 0 and last["grad_norm"] > 0
    base, theta, spec, step, final = load_adapters(straight)
    _, again, _, _, _ = load_adapters(resumed)
    assert step == 2 and final and (spec.rank, spec.alpha) == (2, 4.0) and len(spec.targets) == MICRO_TARGETS
    for a, b in zip(jax.tree.leaves(theta), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)

    invoke("export", straight, "--out", tmp_path / "lora", check=True)
    exported = load_file(tmp_path / "lora" / lora.LORA_WEIGHTS)
    assert len(exported) == 2 * MICRO_TARGETS and all(key.startswith("unet.") for key in exported)
    read, _ = lora.read(tmp_path / "lora" / lora.LORA_WEIGHTS, unet_params(base))
    assert [path for path, _ in lora._adapted(read)] == [path for path, _ in lora._adapted(theta)]
    for (_, ours), (_, theirs) in zip(lora._adapted(theta), lora._adapted(read)):
        np.testing.assert_array_equal(theirs["down"], ours["down"])
        np.testing.assert_allclose(theirs["up"], spec.scale * np.asarray(ours["up"]), rtol=1e-6)
    invoke("export", straight, "--merged", "--out", tmp_path / "merged", check=True)
    merged = load_file(tmp_path / "merged" / "unet" / diffusers_io.WEIGHTS)
    expected = diffusers_io.tensors_from_params(load(straight).params["unet"])
    assert merged.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(merged[key], expected[key])


@pytest.mark.slow  # one SD-fixture ddpo run (~25 s)
def test_ddpo_on_text_to_image_as_its_authors_run_it(sd_run, tmp_path):
    """`finetune --method ddpo --reward jpeg-compressibility --lora-rank 4` on the SD fixture: DDPO's sampler
    by default (DDIM with η = 1, the KL and log-probabilities of its Gaussian steps), a round of 2 paths cut
    into 2 minibatch updates (the second sees ratios ≠ 1: approx_kl > 0), per-prompt advantage statistics
    over the prompts file's 2 prompts, LoRA adapters trained."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(PROMPTS)
    run = tmp_path / "ddpo"
    invoke("finetune", "--from", sd_run, "--prompts", prompts, "--method", "ddpo", "--reward", "jpeg-compressibility",
           "--lora-rank", "4", "--T", "2", "--M", "1", "--batch", "2", "--steps", "2", "--devices", "1",
           "--log-every", "1", "--ckpt-every", "2", "--sample-every", "2", "--kl-n", "2", "--grid-n", "2",
           "--lr", "0.01", "--out", run, check=True)
    config = json.loads((run / "config.json").read_text())
    assert (config["sampler"], config["ddim_eta"], config["train"], config["lora_rank"]) == ("ddim", 1.0, "lora", 4)
    train = [r for r in rows(run) if "reward_mean" in r]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        assert r["reward_mean"] < 0 and r["approx_kl"] > 0 and 0 <= r["clipfrac"] <= 1 and r["kl"] >= 0, r
    _, theta, spec, step, _ = load_adapters(run)
    assert step == 2 and spec.rank == 4 and any(np.abs(np.asarray(a["up"])).max() > 0 for _, a in lora._adapted(theta))
