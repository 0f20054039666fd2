"""An imported diffusers model through the real CLI, as a pretrain run: import -> sample -> finetune
(--sampler ddpm, its last step inside the KL penalty: --final-step noisy) -> export and import again ->
evaluate-fid of the finetuned run with Inception features (random weights standing in for the converted
pytorch-fid file)."""

import json
import pathlib

import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from helpers import invoke, rows
from test_export import assert_same_params

from idiff_cli.diffusion.model import load
from idiff_cli.fid import convert, inception, stats

MODEL = pathlib.Path(__file__).parent / "fixtures" / "diffusers_tiny" / "model"


@pytest.mark.slow
def test_import_sample_finetune_evaluate_fid(tmp_path):
    run = tmp_path / "imported"
    invoke("import", "diffusers", MODEL, "--out", run, "--sample-steps", "8", "--dataset", "cifar10", check=True)
    assert json.loads((run / "config.json").read_text())["command"] == "import"

    invoke("sample", run, "--n", "4", "--out", tmp_path / "samples", check=True)
    images = np.load(tmp_path / "samples" / "sample-step0-imported-ddpm8-seed0-n4.npz")["images"]
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8 and images.std() > 0
    invoke("sample", run, "--n", "4", "--sampler", "ddim", "--out", tmp_path / "ddim", check=True)
    ddim = np.load(tmp_path / "ddim" / "sample-step0-imported-ddim8-seed0-n4.npz")["images"]
    assert ddim.shape == images.shape and not np.array_equal(ddim, images)  # same x_T, no noise after it

    finetuned = tmp_path / "finetuned"
    common = ("--from", run, "--steps", "3", "--T", "4", "--M", "2", "--batch", "2", "--log-every", "1",
              "--sample-every", "3", "--ckpt-every", "3", "--grid-n", "2", "--lr", "1e-2")
    for flags, message in ((("--sampler", "euler-maruyama"), "samples with ddpm or ddim, not 'euler-maruyama'"),
                           (("--sampler", "probability-flow", "--beta", "0", "--adjoint", "continuous"),
                            "this model is a discrete DDPM chain"),
                           (("--sampler", "ddim"), "--sampler ddim is deterministic"),
                           (("--sampler", "ddim", "--beta", "0", "--final-step", "noisy"),
                            "this run samples with ddim on a discrete chain: use --sampler ddpm")):
        refused = invoke("finetune", *common, *flags, "--out", tmp_path / "no")
        assert refused.exit_code == 2 and message in refused.output, refused.output
        assert not (tmp_path / "no").exists()
    invoke("finetune", *common, "--sampler", "ddpm", "--beta", "0.5", "--kl-n", "8", "--final-step", "noisy",
           "--out", finetuned, check=True)
    logged = rows(finetuned)
    assert [r["step"] for r in logged] == [0, 1, 2, 3] and all(np.isfinite(r["reward_mean"]) for r in logged[1:])
    # θ = θ0 at step 0: the two networks' transitions coincide, up to the float32 rounding of the same
    # network in two programs, which the last step's variance of 1e-4 magnifies (measured 3e-9); after
    # updates the Girsanov KL, the step into x_0 included (--final-step noisy), is positive
    assert logged[0]["kl"] < 1e-7 and all(np.isfinite(r["kl"]) and r["kl"] > 1e-3 for r in logged[1:])
    config = json.loads((finetuned / "config.json").read_text())
    assert (config["sampler"], config["final_step"]) == ("ddpm", "noisy")
    assert json.loads((finetuned / "finetuned.json").read_text())["from"] == str(run)

    # export of the finetuned θ, imported again: the same network weights, bit for bit
    invoke("export", finetuned, "--out", tmp_path / "exported", check=True)
    invoke("import", "diffusers", tmp_path / "exported", "--out", tmp_path / "reimported", check=True)
    assert_same_params(load(tmp_path / "reimported").params, load(finetuned).params)

    # evaluate-fid of the finetuned run: its base model is the imported one, θ the finetuned weights;
    # the reference statistics are a file (N(0, I) in the 2048-d feature space)
    weights = tmp_path / "inception.npz"
    flat = {"/".join(k): np.asarray(v) for k, v in flatten_dict(inception.random_variables(0)).items()}
    np.savez(weights, **flat, **{"meta/source_sha256": np.array(convert.PINNED_SHA256)})
    dim = inception.FEATURE_DIM
    ref = stats.save_stats(tmp_path / "ref.npz", np.zeros(dim), np.eye(dim), features="inception", n=0)
    invoke("evaluate-fid", finetuned, "--features", "inception", "--inception-weights", weights, "--ref-stats", ref,
           "--n", "8", "--batch", "8", "--sample-steps", "4", check=True)
    result = json.loads((finetuned / "fid.json").read_text())
    assert result["features"] == "inception" and result["n"] == 8 and result["sample_steps"] == 4
    assert np.isfinite(result["value"]) and result["value"] > 0 and result["weights"] == "finetuned"
