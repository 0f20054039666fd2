"""experiments/final_step_ddpm.py for 60 steps: the DDPM chain's last step outside the KL penalty is
exploited without bound, and --final-step noisy stops it (the experiment's docstring; full run in
docs/results.md)."""

import importlib.util
import pathlib

import pytest

spec = importlib.util.spec_from_file_location(
    "final_step_ddpm", pathlib.Path(__file__).parents[1] / "experiments" / "final_step_ddpm.py")
experiment = importlib.util.module_from_spec(spec)
spec.loader.exec_module(experiment)


@pytest.mark.slow  # finetuning programs of a U-Net
def test_the_uncovered_last_step_grows_without_paying_and_the_noisy_one_is_held():
    """Uncovered (tweedie): θ_low, free of the penalty, grows steadily (Adam at lr 0.05 on a gradient that
    never vanishes: ~0.05 per step) and the KL of the final images exceeds the penalty; covered (noisy):
    θ_low stays near its optimum (λ σ_0 / (d β) ≈ 0.0025) and the penalty, the KL of the whole chains,
    bounds the KL of the final images (both exact here: every path has the same KL, SE 0)."""
    uncovered = experiment.run("tweedie", 60, 30)
    covered = experiment.run("noisy", 60, 30)
    low = [r["theta_low"] for r in uncovered]
    assert low[0] > 1.0 and low[1] > 1.8 * low[0], low
    assert uncovered[-1]["image_kl"] > 1.5 * uncovered[-1]["penalty"], uncovered[-1]
    assert all(abs(r["theta_low"]) < 0.05 for r in covered), covered
    assert all(r["penalty"] + 4 * r["penalty_se"] >= r["image_kl"] - 1e-7 for r in covered), covered
