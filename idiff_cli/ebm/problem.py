"""What an `idiff ebm-train` run shares across its methods, rebuilt from its config alone (the figures
of `idiff report` rebuild it too): energy, data, held-out points, initial state, keys, metrics.

θ is an array [p] (mixture energies) or a Flax parameter tree (the MLP energy); an npz stores either
(`langevin.runner.npz_entries`, read back by `npz_tree`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from idiff_cli import registry
from idiff_cli.ebm import metrics, toy_data
from idiff_cli.ebm.energies import MLPEnergy
from idiff_cli.errors import UserError
from idiff_cli.langevin.potentials import GaussianMixture, probe


def build_energy(cfg: Any):
    energy = registry.get("energy", cfg.energy)
    return dataclasses.replace(energy, hidden=tuple(cfg.hidden)) if isinstance(energy, MLPEnergy) else energy


class Problem:
    """Energy, data, held-out points, p0 = N(0, I) chains [S, 2, B], θ0 [S, ...], keys, evaluator."""

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.energy = build_energy(cfg)
        n_params = getattr(self.energy, "n_params", None)
        if not hasattr(self.energy, "init") and n_params is not None and len(cfg.theta0) != n_params:
            raise UserError(f"--theta0 has {len(cfg.theta0)} entries; energy '{cfg.energy}' takes {n_params}")
        k_init, k_run, k_test, k_metric, k_theta = jax.random.split(jax.random.key(cfg.seed), 5)
        self.train, self.x_test = toy_data.held_out(toy_data.get(cfg.data), k_test, cfg.n_test)
        # A file's points are standardised; its NLL is reported in the file's units (+ log det = 2 log scale).
        self.nll_offset = 2 * math.log(self.train.scale) if isinstance(self.train, toy_data.ArrayData) else 0.0
        self.x0 = jax.random.normal(k_init, (cfg.seeds, 2, cfg.batch))
        self.keys = jax.random.split(k_run, cfg.seeds)
        self.metric_keys = jax.random.split(k_metric, cfg.seeds)
        if hasattr(self.energy, "init"):
            self.theta0 = jax.vmap(self.energy.init)(jax.random.split(k_theta, cfg.seeds))
        else:
            self.theta0 = jnp.tile(jnp.asarray(cfg.theta0, jnp.float32), (cfg.seeds, 1))
        probe(self.energy, cfg.energy, "energy", self.x0[0], jax.tree.map(lambda t: t[0], self.theta0))
        target = getattr(self.train, "theta", None)
        same_family = (isinstance(self.energy, GaussianMixture) and isinstance(getattr(self.train, "potential", None),
                                                                                GaussianMixture)
                       and self.energy.centres == self.train.potential.centres)
        self.theta_target = target if same_family else None
        self.evaluate = metrics.make_evaluator(self.energy, self.train, self.x_test, self.theta_target)
        self.has_density = hasattr(self.train, "log_density")

    @property
    def headline(self) -> str:
        """The metric the progress bar and the gradient-evaluations figure show."""
        return "kl_fwd" if self.has_density else "nll"

    def metric_values(self, steps: np.ndarray, theta, x: np.ndarray) -> dict[str, np.ndarray]:
        """Metrics [c, S] of logged steps [c] with θ [c, S, ...] and chains x [c, S, 2, B]."""
        c, s = x.shape[:2]
        keys = jax.vmap(lambda step: jax.vmap(lambda k: jax.random.fold_in(k, step))(self.metric_keys))(
            jnp.asarray(steps))
        flat = lambda a: jnp.reshape(a, (c * s,) + a.shape[2:])  # noqa: E731
        values = self.evaluate(jax.tree.map(flat, theta), flat(jnp.asarray(x)), flat(keys))
        values = {k: np.asarray(v).reshape(c, s) for k, v in values.items()}
        values["nll"] = values["nll"] + self.nll_offset
        return values

