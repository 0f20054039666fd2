"""orbax checkpoints: round trip of a training state (optax state, typed PRNG key), keep-last-k."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from idiff_cli.checkpoint import Checkpointer


def test_round_trip_keeps_structure_values_and_keys(tmp_path):
    params = {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.zeros(4)}
    opt_state = optax.adam(1e-3).init(params)
    state = {"params": params, "opt": opt_state, "key": jax.random.key(3), "step": jnp.asarray(5)}
    with Checkpointer(tmp_path / "ckpt", keep=2) as ckpt:
        for step in (10, 20, 30):
            ckpt.save(step, jax.tree.map(lambda x: x, state), meta={"data_position": step * 7})
    ckpt = Checkpointer(tmp_path / "ckpt", keep=2)
    assert ckpt.all_steps() == [20, 30] and ckpt.latest_step() == 30
    restored, meta = ckpt.restore(state)
    assert meta == {"data_position": 210, "step": 30}
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    np.testing.assert_array_equal(restored["params"]["w"], params["w"])
    np.testing.assert_array_equal(jax.random.key_data(restored["key"]), jax.random.key_data(state["key"]))
    np.testing.assert_array_equal(jax.random.normal(restored["key"], (3,)), jax.random.normal(state["key"], (3,)))
    _, meta20 = ckpt.restore(state, step=20)
    assert meta20["data_position"] == 140
    ckpt.close()


def test_restore_without_checkpoint_is_an_error(tmp_path):
    with Checkpointer(tmp_path / "empty") as ckpt:
        assert ckpt.latest_step() is None
        with pytest.raises(FileNotFoundError):
            ckpt.restore({"x": jnp.zeros(2)})
