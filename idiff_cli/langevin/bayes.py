"""Bayesian linear models as Langevin potentials: a prior's scale tuned through the posterior (docs/bilevel.md).

The weights w ∈ R^d have the prior N(0, e^{2θ} I) (θ [1]: the log of the prior scale α); given
training data (X [n, d], y [n]) their posterior is the Gibbs measure π*(θ) ∝ exp(−V(·, θ)) of paper
eq. 4 with

    V(w, θ) = −Σ_i log p(y_i | x_iᵀw) + ‖w‖² e^{−2θ}/2 + d θ + (d/2) log 2π = −log p(y, w | X, θ).

Every normaliser is kept, so Z_θ = ∫ exp(−V(w, θ)) dw = p(y | X, θ) is the marginal likelihood (the
`evidence` objective, Γ_evidence), and ∂θV = d − ‖w‖² e^{−2θ}. The reward of the `held-out` objective
(Γ_reward) is `held_out(w)` = (1/m) Σ_j log p(y'_j | x'_jᵀw) on m held-out points. Likelihoods: `Gaussian`
(known noise σ: the conjugate model, closed forms in `conjugate`) and `Logistic` (labels ±1).
Points w have shape [d, ...] (package docstring); energies and rewards [...].
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from mlxtend.data import iris_data

from idiff_cli.registry import register

OBJECTIVES = ("evidence", "held-out")


@dataclasses.dataclass(frozen=True)
class Gaussian:
    """log N(y; η, σ²), σ = noise."""

    noise: float

    def log_prob(self, y: jax.Array, eta: jax.Array) -> jax.Array:
        return -0.5 * ((y - eta) / self.noise) ** 2 - 0.5 * math.log(2 * math.pi * self.noise**2)


@dataclasses.dataclass(frozen=True)
class Logistic:
    """log sigmoid(y η) for labels y = ±1."""

    def log_prob(self, y: jax.Array, eta: jax.Array) -> jax.Array:
        return -jax.nn.softplus(-y * eta)


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashed by identity (arrays are not hashable)
class LinearModel:
    """The potential V(w, θ) of the module docstring and the held-out reward, for one data set."""

    features: np.ndarray  # X [n, d]
    targets: np.ndarray  # y [n]
    val_features: np.ndarray  # X' [m, d]
    val_targets: np.ndarray  # y' [m]
    likelihood: Gaussian | Logistic

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    @property
    def n_params(self) -> int:
        return 1

    def _log_likelihoods(self, x: np.ndarray, y: np.ndarray, w: jax.Array) -> jax.Array:
        """log p(y_i | x_iᵀw) per data point, shape [n, ...]."""
        eta = jnp.tensordot(jnp.asarray(x, w.dtype), w, axes=(1, 0))
        return self.likelihood.log_prob(jnp.asarray(y, w.dtype).reshape((-1,) + (1,) * (w.ndim - 1)), eta)

    def __call__(self, w: jax.Array, theta: jax.Array) -> jax.Array:
        log_prior = (-0.5 * jnp.sum(w**2, axis=0) * jnp.exp(-2 * theta[0]) - self.dim * theta[0]
                     - 0.5 * self.dim * math.log(2 * math.pi))
        return -(jnp.sum(self._log_likelihoods(self.features, self.targets, w), axis=0) + log_prior)

    def held_out(self, w: jax.Array) -> jax.Array:
        return jnp.mean(self._log_likelihoods(self.val_features, self.val_targets, w), axis=0)


def synthetic_regression(seed: int = 0, dim: int = 8, n: int = 24, n_val: int = 200, scale: float = 0.5,
                         noise: float = 1.0) -> LinearModel:
    """y = Xw + ε with X, X' ~ N(0, I), w ~ N(0, scale² I), ε ~ N(0, noise² I), from numpy's generator `seed`.

    Few training points for d weights, so the prior's scale matters."""
    rng = np.random.default_rng(seed)
    x, x_val = rng.standard_normal((n, dim)), rng.standard_normal((n_val, dim))
    w = scale * rng.standard_normal(dim)
    y, y_val = x @ w + noise * rng.standard_normal(n), x_val @ w + noise * rng.standard_normal(n_val)
    return LinearModel(x, y, x_val, y_val, Gaussian(noise))


def iris_logistic(columns: tuple[int, ...] = (2, 3), seed: int = 0) -> LinearModel:
    """Fisher's iris (the copy mlxtend ships): versicolor (−1) against virginica (+1), which overlap.

    Features: an intercept and the measurements `columns` (0-3: sepal length, sepal width, petal length,
    petal width) standardised with the training half's moments; 50 training and 50 held-out flowers,
    split by numpy's permutation `seed`."""
    x, label = iris_data()
    x, y = x[label > 0][:, list(columns)], np.where(label[label > 0] == 2, 1.0, -1.0)
    order = np.random.default_rng(seed).permutation(len(y))
    train, val = order[: len(y) // 2], order[len(y) // 2:]
    z = np.c_[np.ones(len(y)), (x - x[train].mean(0)) / x[train].std(0)]
    return LinearModel(z[train], y[train], z[val], y[val], Logistic())


register("bayes-model", "linear-regression", synthetic_regression())
register("bayes-model", "logistic-iris", iris_logistic())
