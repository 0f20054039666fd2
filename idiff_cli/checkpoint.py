"""Checkpoints of long runs with orbax: save every N steps, keep the last k, restore the latest.

    ckpt = Checkpointer(run_dir.path / "checkpoints", keep=3)
    ckpt.save(step, state, meta={"data_position": 1234})   # state: any pytree of arrays (keys included)
    template = restore_template(jax.eval_shape(make_state))  # zeros shaped like the state, not computed
    state, meta = ckpt.restore(template)                    # latest step; template gives structure/shardings
    ckpt.close()

orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoints intact. Typed JAX PRNG keys are stored as their key data
and re-wrapped on restore, so a state may carry `jax.random.key(...)` leaves.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp


def _is_key(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _to_storable(tree: Any) -> Any:
    """Typed PRNG keys -> their uint32 key data (orbax stores plain arrays)."""
    return jax.tree.map(lambda leaf: jax.random.key_data(leaf) if _is_key(leaf) else leaf, tree)


def _from_storable(tree: Any, template: Any) -> Any:
    return jax.tree.map(lambda leaf, like: jax.random.wrap_key_data(leaf, impl=jax.random.key_impl(like))
                        if _is_key(like) else leaf, tree, template)


def _abstract(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings when the leaves have them) of the storable form of `tree`."""

    def leaf_spec(x):
        x = np.asarray(x) if not isinstance(x, (jax.Array, np.ndarray)) else x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(leaf_spec, _to_storable(tree))


def restore_template(abstract: Any) -> Any:
    """A concrete restore template for an abstract state (`jax.eval_shape`'s output): zeros, and PRNG
    keys of the default implementation, so that restoring costs no computation of the state."""

    def leaf(spec):
        if jax.dtypes.issubdtype(spec.dtype, jax.dtypes.prng_key):
            data = jax.eval_shape(jax.random.key_data, spec)
            return jax.random.wrap_key_data(jnp.zeros(data.shape, data.dtype))
        return jnp.zeros(spec.shape, spec.dtype)

    return jax.tree.map(leaf, abstract)


class Checkpointer:
    """Orbax CheckpointManager over `directory`: a pytree `state` plus a JSON `meta` per step."""

    def __init__(self, directory: str | pathlib.Path, keep: int = 3):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any] | None = None) -> None:
        """Saves `state` (and `meta`) as step `step`; returns once the save is started (async)."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(_to_storable(state)),
                                  meta=ocp.args.JsonSave(dict(meta or {}, step=int(step))))
        self._manager.save(int(step), args=args, force=True)

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """The state and meta of `step` (default: the latest), shaped and placed like `template`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        args = ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(template)), meta=ocp.args.JsonRestore())
        restored = self._manager.restore(int(step), args=args)
        return _from_storable(restored["state"], template), dict(restored["meta"])

    def wait(self) -> None:
        """Blocks until pending saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
