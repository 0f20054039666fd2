"""Γ estimators and potentials against exact quadrature on a grid (paper §3.2, Appendix A.1)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idiff_cli import registry
from idiff_cli.langevin import quadrature
from idiff_cli.langevin.estimators import reward_gradient
from idiff_cli.langevin.potentials import GaussianMixture, grad_x, hexagon


@pytest.mark.parametrize("name", ["hexagon", "hexagon-paper"])
def test_mixture_normaliser_is_exact(name):
    """∫ exp(−V) = 2π s² for every θ; the grid (spacing 0.05, box ±12) resolves it to ~1e-6."""
    potential = registry.get("potential", name)
    for theta in (jnp.zeros(6), jnp.array([1.5, 0.0, 1.5, 0.0, 1.5, 0.0]), jnp.array([3.0, -2, 0, 1, -1, 0.5])):
        got = quadrature.log_partition(potential, theta)
        assert abs(float(got) - math.log(2 * math.pi * potential.scale**2)) < 1e-5
        x = jnp.array([[0.3, -1.0], [2.0, 0.5]])
        np.testing.assert_allclose(potential.log_density(x, theta), quadrature.log_density_fn(potential)(x, theta),
                                   atol=1e-5)


def test_hexagon_vertices_match_the_reference_constants():
    expected = [(4, 0), (2, 2 * math.sqrt(3)), (-2, 2 * math.sqrt(3)), (-4, 0), (-2, -2 * math.sqrt(3)), (2, -2 * math.sqrt(3))]
    np.testing.assert_allclose(hexagon(4.0), expected, atol=1e-12)


def test_grad_x_matches_the_mixture_formula():
    """∇_x V = Σ_i w_i(x) (x − c_i)/s² with posterior weights w_i(x) ∝ σ(θ)_i exp(−‖x−c_i‖²/2s²)."""
    potential = GaussianMixture(hexagon(4.0), 1.3)
    theta = jnp.array([0.2, -1.0, 0.5, 0.0, 1.0, -0.3])
    x = jax.random.normal(jax.random.key(0), (2, 50)) * 3
    c = jnp.asarray(potential.centres)
    logits = jax.nn.log_softmax(theta)[:, None] - jnp.sum((x[None] - c[:, :, None]) ** 2, 1) / (2 * 1.3**2)
    w = jax.nn.softmax(logits, axis=0)  # [K, B]
    expected = jnp.einsum("kb,kdb->db", w, x[None] - c[:, :, None]) / 1.3**2
    np.testing.assert_allclose(grad_x(potential, x, theta), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", [("hexagon", "corner"), ("hexagon-paper", "corner-paper")])
def test_reward_gradient_matches_quadrature(preset):
    """Γ_reward from N exact samples of π*(θ) estimates ∇ℓ(θ) = −∇_θ E_{π*(θ)}[R].

    Oracle: jax.grad of E[R] computed by quadrature (midpoint rule, spacing 0.02; the indicator's
    jump costs O(h) ≈ 1e-4 relative, far below the tolerance). Tolerance: 5 standard errors of the
    sample covariance (estimated from the same samples) plus 2e-4 for the quadrature.
    """
    potential, reward = registry.get("potential", preset[0]), registry.get("reward", preset[1])
    theta = jnp.array([1.5, 0.0, 1.5, 0.0, 1.5, 0.0]) + jnp.array([0.3, -0.2, 0.1, 0.4, -0.5, 0.0])
    grid = quadrature.Grid(-12.0, 12.0, 1201)
    exact = -jax.grad(lambda th: quadrature.expectation(potential, reward, th, grid))(theta)

    n = 400_000
    x = potential.sample(jax.random.key(1), theta, n)
    estimate = reward_gradient(potential, reward, x, theta)
    # Standard error of mean((R − R̄)(∇θV − mean ∇θV)), per coordinate.
    dv = jax.vmap(jax.grad(lambda xi, th: potential(xi, th), argnums=1), in_axes=(1, None))(x, theta)  # [n, p]
    r = reward(x)
    terms = (r - r.mean())[:, None] * (dv - dv.mean(0))
    stderr = jnp.std(terms, axis=0) / math.sqrt(n)
    assert jnp.all(jnp.abs(estimate - exact) <= 5 * stderr + 2e-4), (estimate, exact, stderr)
    assert float(jnp.linalg.norm(exact)) > 10 * float(jnp.linalg.norm(stderr))  # the test has power
