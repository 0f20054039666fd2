"""Bayesian hyperparameters tuned through the posterior sampler (docs/bilevel.md): the conjugate model's closed
forms, the estimators and Algorithm 1 against them, the reference weights, the potentials' normalisers, the
plug-in route with w and θ in R^3, and one-line errors (experiments/bilevel_bayes.py)."""

import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import linalg, optimize, special, stats

from idiff_cli.langevin import bayes, importance, methods
from idiff_cli.langevin.conjugate import Conjugate

spec = importlib.util.spec_from_file_location(
    "bilevel_bayes", pathlib.Path(__file__).parents[1] / "experiments" / "bilevel_bayes.py")
experiment = importlib.util.module_from_spec(spec)
spec.loader.exec_module(experiment)

MODEL = bayes.synthetic_regression()  # the registered `linear-regression`
EXACT = Conjugate(MODEL)


@pytest.mark.parametrize("objective", bayes.OBJECTIVES)
def test_slopes_are_the_derivatives_of_the_closed_form_losses(objective):
    """ℓ'(θ) by Fisher's identity (evidence) or Gaussian moments (held-out) against central differences of ℓ
    itself; the evidence's ℓ comes from the marginal N(y; 0, e^{2θ}XXᵀ + σ²I), not from the posterior.
    h = 1e-4: truncation h²|ℓ'''|/6 ≲ 1e-7, float64 rounding ε|ℓ|/h ≲ 1e-10; rtol 1e-6."""
    h = 1e-4
    for theta in (-1.0, -0.3, 0.7):
        fd = (EXACT.loss(objective, theta + h) - EXACT.loss(objective, theta - h)) / (2 * h)
        assert abs(EXACT.slope(objective, theta) - fd) <= 1e-6 * max(1.0, abs(fd)), (theta, fd)


@pytest.mark.parametrize("objective", bayes.OBJECTIVES)
def test_theta_star_is_the_optimum_to_1e_8(objective):
    """θ* (brentq on ℓ') lies within 1e-8 of a sign change of ℓ' from − to +; Brent's minimiser of ℓ itself
    agrees within its own resolution on a flat minimum (√(ε|ℓ|/ℓ'') ≈ 1e-7; 1e-6)."""
    star = EXACT.optimum(objective)
    assert EXACT.slope(objective, star - 1e-8) < 0 < EXACT.slope(objective, star + 1e-8)
    found = optimize.minimize_scalar(lambda t: EXACT.loss(objective, t), bounds=(-3, 3), method="bounded",
                                     options={"xatol": 1e-10})
    assert abs(found.x - star) < 1e-6
    assert abs(EXACT.optimum("evidence") - EXACT.optimum("held-out")) > 0.1  # two different problems


def test_ula_stationary_covariance_solves_the_lyapunov_equation():
    """S_γ = (A − γA²/2)⁻¹ is the fixed point of ULA's covariance map S ↦ (I − γA) S (I − γA) + 2γI, as
    scipy's discrete Lyapunov solver finds it (float64; rtol 1e-9), and exceeds the posterior covariance."""
    theta, gamma = -0.5, 0.005
    _, cov = EXACT.law(theta)
    _, s = EXACT.law(theta, gamma)
    m = np.eye(MODEL.dim) - gamma * np.linalg.inv(cov)
    np.testing.assert_allclose(s, linalg.solve_discrete_lyapunov(m, 2 * gamma * np.eye(MODEL.dim)), rtol=1e-9)
    assert np.trace(s) > np.trace(cov)


@pytest.mark.parametrize("objective", bayes.OBJECTIVES)
def test_estimators_on_exact_posterior_draws_match_the_slopes(objective):
    """Γ_evidence = mean ∂θV and Γ_reward = Cov[R, ∂θV] on n exact posterior draws estimate ℓ'(θ).
    Tolerance: 5 standard errors of the per-draw terms (∂θV = d − ‖w‖²e^{−2θ}, from the same draws) plus 1e-4
    relative for float32; the test has power: |ℓ'| > 10 standard errors."""
    theta, n = 0.3, 30_000
    mu, cov = EXACT.law(theta)
    w = mu[:, None] + np.linalg.cholesky(cov) @ np.random.default_rng(1).standard_normal((MODEL.dim, n))
    gamma = methods.evidence(MODEL) if objective == "evidence" else methods.covariance(MODEL, MODEL.held_out)
    got = float(gamma(jnp.asarray(w, jnp.float32), jnp.array([theta], jnp.float32), None)[0][0])
    dv = MODEL.dim - np.sum(w**2, axis=0) * math.exp(-2 * theta)
    r = -0.5 * np.einsum("in,ij,jn->n", w, EXACT.p, w) + EXACT.b @ w + EXACT.c
    terms = dv if objective == "evidence" else (r - r.mean()) * (dv - dv.mean())
    se, exact = terms.std() / math.sqrt(n), EXACT.slope(objective, theta)
    assert abs(got - exact) <= 5 * se + 1e-4 * abs(exact), (got, exact, se)
    assert abs(exact) > 10 * se


@pytest.mark.parametrize("model", [bayes.synthetic_regression(dim=3, n=5), bayes.iris_logistic()],
                         ids=["gaussian", "logistic"])
def test_potential_is_the_negative_log_joint(model):
    """V(w, θ) = −log p(y | X, w) − log N(w; 0, e^{2θ} I) with every normaliser, and held_out(w) the mean held-out
    log-likelihood, against scipy's densities in float64 (float32 arithmetic: rtol 1e-5)."""
    w, theta = np.random.default_rng(2).standard_normal((model.dim, 7)), 0.4

    def log_likelihood(x, y):
        eta = x @ w
        if isinstance(model.likelihood, bayes.Gaussian):
            return stats.norm.logpdf(y[:, None], eta, model.likelihood.noise)
        return np.log(special.expit(y[:, None] * eta))

    joint = log_likelihood(model.features, model.targets).sum(0) + stats.norm.logpdf(w, 0, math.exp(theta)).sum(0)
    np.testing.assert_allclose(model(jnp.asarray(w, jnp.float32), jnp.array([theta])), -joint, rtol=1e-5)
    np.testing.assert_allclose(model.held_out(jnp.asarray(w, jnp.float32)),
                               log_likelihood(model.val_features, model.val_targets).mean(0), rtol=1e-5)


def test_gibbs_normaliser_is_the_marginal_likelihood():
    """exp(−V(·, θ)) of the Gaussian model is Gaussian in w, so log Z_θ = −V(μ, θ) + (d/2) log 2π
    − ½ log det A exactly; it equals the closed-form log N(y; 0, e^{2θ}XXᵀ + σ²I) (float32 V ~ 30: atol 1e-4)."""
    for theta in (-0.8, 0.2):
        mu, cov = EXACT.law(theta)
        log_z = (-float(MODEL(jnp.asarray(mu[:, None], jnp.float32), jnp.array([theta]))[0])
                 + 0.5 * MODEL.dim * math.log(2 * math.pi) + 0.5 * np.linalg.slogdet(cov)[1])
        assert abs(log_z + EXACT.loss("evidence", theta)) < 1e-4


@pytest.mark.parametrize("objective", bayes.OBJECTIVES)
def test_algorithm_1_reaches_theta_star(objective):
    """Implicit Diffusion on the conjugate model with the documented γ and η (16 seeds × 64 particles, 1,200
    steps from θ0 = 0.5; it arrives within ~300) settles where ULA's stationary law puts it: θ averaged over the
    last half, mean over seeds, within 5 standard errors (over the 16 seeds) of θ*_γ; and within the documented
    TOLERANCE of θ*, which adds the ULA bias θ*_γ − θ*."""
    s = experiment.SETTINGS["linear-regression"]._replace(evals=1200, batch=64, seeds=16)
    mean, se = experiment.tail(experiment.run_method(MODEL, objective, s, 1, seed=0, points=100)["theta"])
    assert abs(mean[0] - EXACT.optimum(objective, s.gamma)) <= 5 * se[0], (mean, se)
    assert abs(mean[0] - EXACT.optimum(objective)) <= experiment.TOLERANCE
    assert 5 * se[0] < 0.03  # the test has power: it would see θ off θ*_γ by 1.5 × TOLERANCE


@pytest.mark.parametrize("objective", bayes.OBJECTIVES)
def test_reference_weights_recover_the_closed_form(objective, monkeypatch):
    """The Laplace-placed grid of `importance` on a 3-D Gaussian posterior (where it is exact up to the midpoint
    rule's e^{−2π²/h²} ≈ 1e-30 at spacing h = 0.53 standard deviations) gives θ* to brentq's 1e-6 plus float32
    rounding of the weighted sums: 1e-5."""
    monkeypatch.setattr(importance, "GRID_N", 31)
    monkeypatch.setattr(importance, "GRID_HALF_WIDTH", 8.0)
    model = bayes.synthetic_regression(dim=3, n=12)
    theta, _ = importance.optimum(model, None if objective == "evidence" else model.held_out, 3, (-3.0, 3.0))
    assert abs(theta - Conjugate(model).optimum(objective)) < 1e-5


def test_reference_draws_recover_the_closed_form_within_their_error(monkeypatch):
    """Above GRID_MAX_DIM the points are normal draws (importance sampling). On a 3-D Gaussian posterior forced
    onto that path, θ_ref is within 5 of its standard errors of θ*: the self-normalised estimate of ℓ'(θ*) has
    standard error √(Σ ω_i² (g_i − ḡ)²) (delta method, g_i = ∂θV at the points), divided by ℓ''(θ*)."""
    monkeypatch.setattr(importance, "GRID_MAX_DIM", 0)
    monkeypatch.setattr(importance, "DRAWS", 2**14)
    model = bayes.synthetic_regression(dim=3, n=12)
    exact = Conjugate(model)
    star = exact.optimum("evidence")
    theta, _ = importance.optimum(model, None, 3, (-3.0, 3.0))
    pts = importance.points(3)
    draws = jax.jit(lambda t: importance.weighted(model, t, pts))(jnp.array([star], jnp.float32))
    omega, w = np.asarray(draws.weights, float), np.asarray(draws.w, float)
    g = 3 - np.sum(w**2, axis=0) * math.exp(-2 * star)
    curvature = (exact.slope("evidence", star + 1e-4) - exact.slope("evidence", star - 1e-4)) / 2e-4
    error = math.sqrt(np.sum(omega**2 * (g - omega @ g) ** 2)) / curvature
    assert abs(theta - star) <= 5 * error, (theta, star, error)
    assert error < 0.05  # the test has power


PLUGIN = '''
import jax.numpy as jnp

C = jnp.array([1.0, -0.5, 2.0])


def potential(w, theta):
    """V(w, θ) = ‖w − θ‖²/2, w [3, ...], θ [3]: π*(θ) = N(θ, I)."""
    return 0.5 * jnp.sum((w - theta.reshape((-1,) + (1,) * (w.ndim - 1))) ** 2, axis=0)


potential.dim = 3


def reward(w):
    """R(w) = −‖w − C‖²/2: E_{π*(θ)}[R] = −‖θ − C‖²/2 − 3/2, maximal at θ = C."""
    return -0.5 * jnp.sum((w - C.reshape((-1,) + (1,) * (w.ndim - 1))) ** 2, axis=0)
'''


def test_plugin_model_and_objective_with_w_and_theta_in_3d(tmp_path, monkeypatch):
    """The documented plug-in route, w and θ in R^3: ULA keeps the mean of N(θ, I), so both methods settle at θ = C.
    Tolerance: 5 standard errors over seeds plus 0.01 for the O(η) fluctuation of the tail average. The figure has
    one row per θ coordinate; a scalar-only reference is not attempted."""
    (tmp_path / "bilevel_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    drawn = []
    monkeypatch.setattr(experiment, "save_figure", lambda fig, path: drawn.append(fig) or path)
    summary = experiment.main(["--model", "bilevel_plugin:potential", "--objective", "bilevel_plugin:reward",
                               "--theta0", "0,0,0", "--evals", "1000", "--T", "4", "--batch", "64", "--seeds", "4",
                               "--gamma", "0.1", "--lr", "0.1", "--out", str(tmp_path / "out")])
    result = summary["bilevel_plugin:potential"]["objectives"]["bilevel_plugin:reward"]
    assert result["targets"] == {}
    for method in ("implicit", "nested-T4"):
        got = result["methods"][method]
        np.testing.assert_allclose(got["theta"], [1.0, -0.5, 2.0], atol=5 * max(got["se"]) + 0.01)
    assert len(drawn) == 1 and drawn[0].axes[2].get_ylabel() == "θ[2]"
    assert (tmp_path / "out" / "summary.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--model", "nope"], "error: unknown bayes-model 'nope'; valid choices: linear-regression, logistic-iris, or "
                          "package.module:function"),
    (["--model", "linear-regression", "--objective", "nope"], "error: unknown objective 'nope'; valid choices: "
                                                              "evidence, held-out, or package.module:function"),
    (["--model", "linear-regression", "--theta0", "0,0"], "error: --theta0 has 2 entries; model "
                                                          "'linear-regression' takes 1"),
    (["--model", "no_such_module:model"], "error: cannot import bayes-model plug-in module 'no_such_module'"),
    (["--evals", "0"], "error: --evals must be positive, got 0"),
    (["--theta0", "zero"], "error: --theta0 takes float values separated by commas, got 'zero'"),
    (["--model", "linear-regression", "--evals", "50"], "error: --evals 50 is less than one update of the nested "
                                                         "loop (--T 100)"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        experiment.main([*argv, "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and lines[0].startswith(message), lines
    assert not (tmp_path / "out").exists()
