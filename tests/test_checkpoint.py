"""orbax checkpoints: round trip of a training state (optax state, typed PRNG key), keep-last-k, and
the manifest: a step cut short or damaged is set aside and the previous intact one restored."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from idiff_cli.checkpoint import Checkpointer
from idiff_cli.errors import UserError


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


def _saved(tmp_path, steps=(1, 2, 3)):
    """A checkpoint directory with the given steps of a small state; returns (directory, state)."""
    state = {"w": jnp.arange(1000.0), "key": jax.random.key(0)}
    with Checkpointer(tmp_path / "ckpt", keep=5) as ckpt:
        for step in steps:
            ckpt.save(step, {"w": state["w"] * step, "key": state["key"]})
            ckpt.wait()
    return tmp_path / "ckpt", state


def _biggest_file(step_dir):
    return max((p for p in step_dir.rglob("*") if p.is_file() and p.name != "idiff_manifest.json"),
               key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["truncate", "garble", "no-manifest"])
def test_a_damaged_latest_step_is_set_aside_and_the_previous_one_restored(tmp_path, damage, capsys):
    directory, state = _saved(tmp_path)
    target = _biggest_file(directory / "3")
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif damage == "garble":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    else:
        (directory / "3" / "idiff_manifest.json").unlink()
    with Checkpointer(directory, keep=5) as ckpt:
        assert ckpt.damage(2) is None and ckpt.damage(3) is not None
        step, restored, meta = ckpt.restore_latest(lambda: state)
        assert step == 2 and meta["step"] == 2
        np.testing.assert_array_equal(restored["w"], state["w"] * 2)
        assert ckpt.all_steps() == [1, 2]
        ckpt.save(3, {"w": state["w"] * 30, "key": state["key"]})  # the run goes on from step 2
    warning = capsys.readouterr().err
    assert f"warning: checkpoint {directory / '3'} is not usable" in " ".join(warning.split()), warning
    assert (directory / "damaged" / "3").is_dir()
    with Checkpointer(directory, keep=5) as ckpt:
        np.testing.assert_array_equal(ckpt.restore(state)[0]["w"], state["w"] * 30)


def test_no_intact_step_is_a_one_line_error(tmp_path):
    directory, state = _saved(tmp_path, steps=(1, 2))
    for step in (1, 2):
        target = _biggest_file(directory / str(step))
        target.write_bytes(b"")
    with Checkpointer(directory, keep=5) as ckpt:
        with pytest.raises(UserError, match=r"no intact checkpoint in .* \(steps 2, 1 moved to"):
            ckpt.restore_latest(lambda: state)


def test_an_empty_directory_restores_nothing_and_builds_no_template(tmp_path):
    def template():
        raise AssertionError("a template was built without a checkpoint")

    with Checkpointer(tmp_path / "none") as ckpt:
        assert ckpt.restore_latest(template) is None


def test_a_step_cut_short_with_nothing_before_it_restores_nothing(tmp_path):
    directory, state = _saved(tmp_path, steps=(1,))
    (directory / "1" / "idiff_manifest.json").unlink()
    with Checkpointer(directory, keep=5) as ckpt:
        assert ckpt.restore_latest(lambda: state) is None
        assert ckpt.all_steps() == []
    assert (directory / "damaged" / "1").is_dir()
