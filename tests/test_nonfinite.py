"""A NaN/Inf loss or gradient skips the update (parameters and optimizer state untouched),
is counted, and too many in a row stop the run with a clear error; checkpoints stay finite."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import Batches, initial_state, loss_fn

from glm_jax.sharding import make_mesh
from glm_jax.train.checkpoint import Checkpointer
from glm_jax.train.loop import make_train_step, train_loop
from glm_jax.train.state import make_optimizer


def test_nonfinite_step_leaves_the_state_unchanged():
    tx, schedule = make_optimizer(learning_rate=0.1, num_steps=10)
    step = make_train_step(loss_fn, tx, schedule, None, None)
    state = initial_state(tx)
    good = {"x": jnp.ones((2, 4))}
    state, metrics = step(state, good)
    assert int(metrics["skipped_nonfinite"]) == 0
    before = jax.device_get(state)
    for bad_value in (np.nan, np.inf):
        state, metrics = step(state, {"x": jnp.full((2, 4), bad_value)})
        assert int(metrics["skipped_nonfinite"]) == 1
        assert not np.isfinite(float(metrics["loss"]))
        after = jax.device_get(state)
        for a, b in zip(jax.tree.leaves(before.params) + jax.tree.leaves(before.opt_state),
                        jax.tree.leaves(after.params) + jax.tree.leaves(after.opt_state),
                        strict=True):
            np.testing.assert_array_equal(a, b)
    state, metrics = step(state, good)  # training goes on from where it was
    assert int(metrics["skipped_nonfinite"]) == 0
    assert not np.array_equal(jax.device_get(state.params["w"]), before.params["w"])


def test_too_many_nonfinite_steps_stop_the_run_and_checkpoints_stay_finite(tmp_path):
    tx, schedule = make_optimizer(learning_rate=0.1, num_steps=20)
    state = initial_state(tx)
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    with pytest.raises(FloatingPointError, match=r"NaN/Inf for 4 steps in a row \(up to "
                                                 r"step 7.*max_nonfinite_steps=3"):
        train_loop(state, lambda _: make_train_step(loss_fn, tx, schedule, None, None),
                   Batches(good=3), mesh=mesh, num_steps=20, checkpointer=checkpointer,
                   writer=None, desc="test", checkpoint_every=1, max_nonfinite_steps=3)
    checkpointer.wait()
    assert checkpointer.latest_step() == 6  # the failing step 7 is not saved
    restored, extra = checkpointer.restore(initial_state(tx))
    checkpointer.close()
    assert extra["data"] == {"position": 6}
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(jax.device_get(restored)))
    # Steps 4-6 were skipped: the parameters are those after the 3 good steps.
    good_only = initial_state(tx)
    step = make_train_step(loss_fn, tx, schedule, None, None)
    for _ in range(3):
        good_only, _ = step(good_only, {"x": jnp.ones((2, 4))})
    np.testing.assert_array_equal(restored.params["w"], good_only.params["w"])


def test_a_nan_learning_rate_is_refused_and_never_saved(tmp_path):
    tx, schedule = make_optimizer(learning_rate=float("nan"), num_steps=10)
    step = make_train_step(loss_fn, tx, schedule, None, None)
    state, metrics = step(initial_state(tx), {"x": jnp.ones((2, 4))})
    assert int(metrics["skipped_nonfinite"]) == 1  # the update is not applied
    np.testing.assert_array_equal(state.params["w"], np.full(4, 0.5))
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    with pytest.raises(FloatingPointError, match=r"test: the learning rate of step 1 is nan: "
                                                 r"its update was skipped and nothing of it "
                                                 r"saved; no checkpoint was written to .*Set a "
                                                 r"finite learning_rate"):
        train_loop(initial_state(tx), lambda _: step, Batches(good=100),
                   mesh=make_mesh((1, 1, 1), jax.devices()[:1]), num_steps=5,
                   checkpointer=checkpointer, writer=None, desc="test", checkpoint_every=1)
    assert checkpointer.latest_step() is None
    checkpointer.close()


def test_nan_parameters_stop_the_run_before_any_save(tmp_path):
    """Whatever a step checked, NaN in the state it returns is never checkpointed."""
    tx, schedule = make_optimizer(learning_rate=0.1, num_steps=10)
    good_step = make_train_step(loss_fn, tx, schedule, None, None)

    def step(state, batch):  # poisons the parameters from step 3 on, unflagged
        state, metrics = good_step(state, batch)
        bad = jnp.where(state.step >= 3, jnp.nan, state.params["w"])
        return state.replace(params={"w": bad}), metrics

    checkpointer = Checkpointer(tmp_path / "checkpoints")
    with pytest.raises(FloatingPointError, match=r"test: step 3 left NaN/Inf in the parameters "
                                                 r"or optimizer state.*nothing of it was saved; "
                                                 r"the last good checkpoint, step 2 in .*, is "
                                                 r"intact"):
        train_loop(initial_state(tx), lambda _: step, Batches(good=100),
                   mesh=make_mesh((1, 1, 1), jax.devices()[:1]), num_steps=5,
                   checkpointer=checkpointer, writer=None, desc="test", checkpoint_every=1)
    assert checkpointer.latest_step() == 2
    restored, _ = checkpointer.restore(initial_state(tx))
    checkpointer.close()
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(jax.device_get(restored)))
