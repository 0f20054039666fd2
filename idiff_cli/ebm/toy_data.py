"""2-D data sets for `idiff ebm-train --data`: draws `sample(key, n) -> [2, n]`, some with exact log-densities.

    wells            the target of Appendix A.1: the seven-well mixture at θ* = (1.5, 0, 1.5, 0, 1.5, 0, 0)
    eight-gaussians  eight N(c_k, 0.35² I), c_k on the circle of radius 2√2 (exact density)
    two-moons        two interleaved noisy half circles
    checkerboard     uniform on the eight black squares of a 4×4 board on [−4, 4]²
    rings            four noisy concentric circles of radii 0.75, 1.5, 2.25, 3
    FILE.npy         any [N, 2] float array, standardised (one shift, one scale); held-out 10 %

The generated sets follow the toy densities of the FFJORD/EBM literature, written here in JAX so
fresh draws come inside the jitted training step. All live in [−4.5, 4.5]² like the wells.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from idiff_cli import registry, storage
from idiff_cli.errors import UserError
from idiff_cli.langevin.potentials import GaussianMixture
from idiff_cli.registry import register

THETA_TARGET = (1.5, 0.0, 1.5, 0.0, 1.5, 0.0, 0.0)  # θ* of Appendix A.1


@dataclasses.dataclass(frozen=True)
class MixtureData:
    """Exact draws of the Gibbs measure π*(θ) of a Gaussian mixture potential, with its exact density."""

    potential: GaussianMixture
    theta: tuple[float, ...]

    def sample(self, key: jax.Array, n: int) -> jax.Array:
        return self.potential.sample(key, jnp.asarray(self.theta, jnp.float32), n)

    def log_density(self, x: jax.Array) -> jax.Array:
        return self.potential.log_density(x, jnp.asarray(self.theta, x.dtype))


@dataclasses.dataclass(frozen=True)
class GeneratedData:
    """Draws from a generator key, n -> [2, n]; the density is known only through samples."""

    generate: Callable[[jax.Array, int], jax.Array]

    def sample(self, key: jax.Array, n: int) -> jax.Array:
        return self.generate(key, n)


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayData:
    """A fixed training set [2, N]: `sample` draws a minibatch with replacement."""

    points: jax.Array  # [2, N], standardised
    shift: tuple[float, float]  # data = shift + scale * points
    scale: float

    def sample(self, key: jax.Array, n: int) -> jax.Array:
        return self.points[:, jax.random.randint(key, (n,), 0, self.points.shape[1])]


def two_moons(key: jax.Array, n: int) -> jax.Array:
    """sklearn's make_moons(noise=0.1), scaled by 2 and shifted by (−1, −0.2) (FFJORD)."""
    k_t, k_side, k_noise = jax.random.split(key, 3)
    t = jax.random.uniform(k_t, (n,), maxval=math.pi)
    side = jax.random.bernoulli(k_side, 0.5, (n,))
    outer = jnp.stack([jnp.cos(t), jnp.sin(t)])
    inner = jnp.stack([1.0 - jnp.cos(t), 0.5 - jnp.sin(t)])
    x = jnp.where(side, outer, inner) + 0.1 * jax.random.normal(k_noise, (2, n))
    return 2.0 * x + jnp.array([[-1.0], [-0.2]])


def checkerboard(key: jax.Array, n: int) -> jax.Array:
    """Uniform on the squares [i, i+1] × [j, j+1] (in units of 2) with i + j even, on [−4, 4]²."""
    k1, k2, k3 = jax.random.split(key, 3)
    x1 = jax.random.uniform(k1, (n,), minval=-2.0, maxval=2.0)
    x2 = jax.random.uniform(k2, (n,)) - 2.0 * jax.random.randint(k3, (n,), 0, 2) + jnp.floor(x1) % 2
    return 2.0 * jnp.stack([x1, x2])


def rings(key: jax.Array, n: int) -> jax.Array:
    """Four circles of radii 0.75, 1.5, 2.25, 3 (equal mass), radial noise N(0, 0.08²)."""
    k_ring, k_angle, k_noise = jax.random.split(key, 3)
    radius = 0.75 * (1 + jax.random.randint(k_ring, (n,), 0, 4)) + 0.08 * jax.random.normal(k_noise, (n,))
    angle = jax.random.uniform(k_angle, (n,), maxval=2 * math.pi)
    return radius * jnp.stack([jnp.cos(angle), jnp.sin(angle)])


def eight_gaussians() -> MixtureData:
    angles = np.arange(8) * np.pi / 4
    r = 2.0 * math.sqrt(2.0)
    centres = tuple((float(r * np.cos(a)), float(r * np.sin(a))) for a in angles)
    return MixtureData(GaussianMixture(centres, 0.35), (0.0,) * 8)


def load_file(path: str) -> ArrayData:
    """A user's [N, 2] .npy file, standardised to zero mean and unit overall scale."""
    if storage.is_remote(path):
        raise UserError(f"--data names a local file; gs:// paths are for run directories: copy '{path}' here")
    file = pathlib.Path(path)
    if not file.is_file():
        raise UserError(f"--data file '{path}' does not exist")
    try:
        array = np.load(file, allow_pickle=False)
    except Exception as e:
        raise UserError(f"--data file '{path}' is not a readable .npy array: {e}") from None
    if array.ndim != 2 or array.shape[1] != 2 or array.shape[0] < 10:
        raise UserError(f"--data file '{path}' holds an array of shape {array.shape}; expected [N, 2] with N >= 10")
    if not np.issubdtype(array.dtype, np.number) or not np.all(np.isfinite(array)):
        raise UserError(f"--data file '{path}' must hold finite numbers, got dtype {array.dtype} or non-finite values")
    array = array.astype(np.float64)
    shift = array.mean(0)
    scale = float(np.sqrt(((array - shift) ** 2).sum(1).mean() / 2)) or 1.0
    points = jnp.asarray(((array - shift) / scale).T, jnp.float32)
    return ArrayData(points, (float(shift[0]), float(shift[1])), scale)


def held_out(data, key: jax.Array, n: int):
    """(training data, held-out points [2, n']): n fresh draws, or 10 % of a file's points (seeded split)."""
    if not isinstance(data, ArrayData):
        return data, data.sample(key, n)
    total = data.points.shape[1]
    order = jax.random.permutation(key, total)
    n_test = max(1, total // 10)
    train = dataclasses.replace(data, points=data.points[:, order[n_test:]])
    return train, data.points[:, order[:n_test]]


def get(name: str):
    """The data set named `name`: a registered name, package.module:attribute, or a path ending .npy."""
    if name.endswith(".npy"):
        return load_file(name)
    if ":" in name or name in registry.names("toy-data"):
        return registry.get("toy-data", name)
    raise UserError(f"unknown --data '{name}'; valid choices: {', '.join(registry.names('toy-data'))}, "
                    "FILE.npy, or package.module:attribute")


register("toy-data", "wells", MixtureData(registry.get("potential", "seven-wells"), THETA_TARGET))
register("toy-data", "eight-gaussians", eight_gaussians())
register("toy-data", "two-moons", GeneratedData(two_moons))
register("toy-data", "checkerboard", GeneratedData(checkerboard))
register("toy-data", "rings", GeneratedData(rings))
