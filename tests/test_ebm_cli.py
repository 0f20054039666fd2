"""`idiff ebm-train` (and `langevin-reward --beta`) end to end through the real CLI on tiny configs."""

import json
import shutil

import numpy as np
import pytest
from helpers import CLOCK, assert_same_arrays, error_line, invoke, rows

TINY = ["--steps", "300", "--batch", "256", "--seeds", "2", "--log-every", "50", "--ckpt-every", "100",
        "--n-test", "2000", "--no-samplers"]
WELLS_FAST = [*TINY, "--lr", "1.0"]  # SGD with η = 1 leaves the plateau of θ0 within ~150 steps


@pytest.fixture(scope="module")
def wells_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ebm") / "wells"
    invoke("ebm-train", *WELLS_FAST, "--out", str(out), check=True)
    return out


def test_a_few_hundred_steps_cut_the_exact_kl(wells_run):
    """Appendix A.1 at batch 256: 300 implicit steps (SGD, η = 1) cut KL(π_target ‖ π*(θ)) from
    5.96 (θ0) by a factor > 50 for every seed (measured: ~0.016, factor ~370), and σ(θ) moves
    towards σ(θ*)."""
    logged = rows(wells_run, "implicit")
    assert [r["step"] for r in logged] == [0, 50, 100, 150, 200, 250, 300]
    first, last = logged[0], logged[-1]
    assert abs(first["kl_fwd_mean"] - 5.956) < 0.01  # θ0: the KL of an almost standard Gaussian
    assert last["kl_fwd_max"] < first["kl_fwd_min"] / 50
    assert last["kl_rev_max"] < first["kl_rev_min"] / 50
    assert last["sigma_err_max"] < 0.25 < first["sigma_err_min"]
    for r in logged:
        for m in ("kl_fwd", "kl_rev", "sigma_err", "hist_kl", "hist_kl_exact", "nll", "loglik"):
            assert np.isfinite(r[f"{m}_mean"])
    arrays = np.load(wells_run / "methods" / "implicit.npz")
    assert arrays["theta"].shape == (7, 2, 7) and arrays["final_x"].shape == (2, 2, 256)
    np.testing.assert_array_equal(arrays["theta"][-1], arrays["final_theta"])
    summary = json.loads((wells_run / "summary.json").read_text())
    assert summary["implicit"]["kl_fwd"][0] == pytest.approx(last["kl_fwd_mean"])
    figures = sorted(p.name for p in (wells_run / "figures").iterdir())
    assert figures == ["density_steps.png", "fig11_samples_contours.png", "fig12_metrics.png", "grad_evals.png",
                       "sigma_theta.png"]


def test_resume_from_a_checkpoint_equals_the_whole_run(wells_run, tmp_path):
    """The run with its step-300 checkpoint and outputs lost resumes from step 200 (rows after it
    dropped) and ends equal to the uninterrupted run: every metric row and array, bit for bit."""
    cut = tmp_path / "cut"
    shutil.copytree(wells_run, cut)
    shutil.rmtree(cut / "checkpoints" / "implicit" / "300")
    shutil.rmtree(cut / "methods")
    result = invoke("ebm-train", *WELLS_FAST, "--out", str(cut), check=True)
    assert "resuming implicit from checkpoint step 200" in result.output
    assert rows(cut, drop=CLOCK, sort=True) == rows(wells_run, drop=CLOCK, sort=True)
    assert_same_arrays(wells_run, cut)


def test_another_defining_option_is_refused_in_one_line(wells_run):
    result = invoke("ebm-train", *WELLS_FAST, "--gamma", "0.1", "--out", str(wells_run))
    assert "other defining options (--gamma 0.2 -> 0.1)" in error_line(result)


@pytest.mark.slow  # a learning run
def test_mlp_energy_learns_eight_gaussians(tmp_path):
    """`--energy mlp` brings its defaults (Adam, γ = 0.05, eight-gaussians) under the flags given: a Flax
    MLP energy (32-32) on eight-gaussians, 300 Adam steps (η = 1e-3, γ = 0.05): the
    held-out NLL by quadrature falls below the initial model's (N(0, 9 I): 4.49 nats) by more than
    0.3 nats for every seed (measured: ~0.7; the data's entropy, the floor, is 2.84)."""
    out = tmp_path / "mlp"
    invoke("ebm-train", "--energy", "mlp", "--hidden", "32,32",
           "--steps", "300", "--batch", "256", "--seeds", "2", "--log-every", "100",
           "--ckpt-every", "300", "--lr", "1e-3", "--n-test", "2000", "--out", str(out), check=True)
    trained = rows(out, "implicit")
    assert trained[-1]["nll_max"] < trained[0]["nll_min"] - 0.3, [(r["step"], r["nll_mean"]) for r in trained]
    config = json.loads((out / "config.json").read_text())  # the energy's row, under the flags given
    assert (config["optimizer"], config["gamma"], config["data"], config["lr"]) == ("adam", 0.05, "eight-gaussians", 1e-3)
    sampled = rows(out, "langevin-theta-opt")  # the trained model, sampled from N(0, I)
    assert sampled[-1]["nll_mean"] == pytest.approx(trained[-1]["nll_mean"], abs=1e-5)
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert figures == ["density_steps.png", "fig11_samples_contours.png", "fig12_metrics.png", "grad_evals.png"]
    final = np.load(out / "methods" / "implicit.npz")
    assert final["final_theta/params/Dense_1/kernel"].shape == (2, 32, 32)


def test_data_from_a_npy_file(tmp_path):
    """FILE.npy: standardised points; the NLL is reported in the file's units (+ 2 log scale)."""
    rng = np.random.default_rng(0)
    points = rng.normal(size=(2000, 2)) * 10.0 + 50.0  # scale 10: NLL ≈ log(2π·100) + 1 ≈ 7.4 nats
    np.save(tmp_path / "pts.npy", points)
    out = tmp_path / "run"
    invoke("ebm-train", *TINY, "--steps", "20", "--log-every", "10", "--ckpt-every", "20",
           "--data", str(tmp_path / "pts.npy"), "--out", str(out), check=True)
    first = rows(out, "implicit")[0]
    # θ0 is almost N(0, I) in standardised units, the data's own law: NLL ≈ entropy of N(0, 100 I).
    # Tolerance 0.3: 4 standard errors of a mean of 200 held-out values of ‖z‖²/2 (variance 1).
    assert abs(first["nll_mean"] - (np.log(2 * np.pi * 100) + 1)) < 0.3


def test_langevin_reward_with_a_kl_penalty(tmp_path):
    out = tmp_path / "kl"
    invoke("langevin-reward", "--steps", "30", "--batch", "64", "--seeds", "2", "--baseline", "implicit",
           "--beta", "2", "--out", str(out), check=True)
    assert json.loads((out / "config.json").read_text())["beta"] == 2.0
    assert (out / "arrays.npz").exists()


@pytest.mark.parametrize("args, message", [
    (["--data", "spiral"], "unknown --data 'spiral'; valid choices: checkerboard, eight-gaussians, rings, two-moons, wells"),
    (["--data", "missing.npy"], "--data file 'missing.npy' does not exist"),
    (["--data", "BAD"], "holds an array of shape (5, 3); expected [N, 2]"),
    (["--steps", "-3"], "--steps must be > 0, got -3"),
    (["--method", "pcd"], "unknown --method 'pcd'; valid choices: all, implicit, nested, short-run"),
    (["--optimizer", "lbfgs"], "unknown --optimizer 'lbfgs'; valid choices: sgd, adam"),
    (["--energy", "nope"], "unknown energy 'nope'; valid choices: mlp, wells"),
    (["--preset", "nope"], "unknown --preset 'nope'; valid choices: paper"),
    (["--theta0", "1,2"], "--theta0 has 2 entries; energy 'wells' takes 7"),
    (["--ckpt-every", "75"], "--ckpt-every (75) must be a multiple of --log-every (50)"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    np.save(tmp_path / "bad.npy", np.zeros((5, 3)))
    names = {"BAD": str(tmp_path / "bad.npy"), "OUT": str(tmp_path / "run")}
    args = [names.get(a, a) for a in args]
    result = invoke("ebm-train", *TINY, *args, "--out", str(tmp_path / "run"))
    assert message in error_line(result)
    assert not (tmp_path / "run").exists()
