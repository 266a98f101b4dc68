"""The training layer's parts and the edges of ``fit``: the mesh in one process, the logging window,
the best evaluation, argument checks, and what survives an error raised inside the loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlstm import training
from jaxlstm._train import evaluation, parallel, records
from tests.test_training import new_state, stream_batch_fn, stream_loss, zero_carry

pytestmark = pytest.mark.usefixtures("peer_promotion")


def fit(num_steps=6, batch_fn=stream_batch_fn, **kw):
    kw.setdefault("log_every", 1)
    return training.fit(
        new_state(),
        training.make_train_step(stream_loss, donate=kw.pop("donate", True)),
        batch_fn,
        num_steps=num_steps,
        rng=jax.random.key(7),
        carry=zero_carry(),
        progress=False,
        **kw,
    )


def leaves_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------ the mesh, in one process


def test_a_one_device_mesh_trains_exactly_as_no_mesh():
    plain = fit()
    mesh = training.data_mesh(jax.devices()[:1])
    meshed = fit(mesh=mesh)
    leaves_equal(meshed.state.params, plain.state.params)
    leaves_equal(meshed.carry, plain.carry)
    assert [h["loss"] for h in meshed.history] == [h["loss"] for h in plain.history]
    # the state lives on the mesh
    leaf = jax.tree.leaves(meshed.state.params)[0]
    assert leaf.sharding.device_set == set(mesh.devices.flat)


def test_process_local_batches_in_one_process_are_the_whole_batch():
    mesh = training.data_mesh(jax.devices()[:1])
    a = fit(mesh=mesh)
    b = fit(mesh=mesh, process_local_batches=True)
    leaves_equal(a.state.params, b.state.params)


def test_a_mesh_without_a_data_axis_is_refused_with_the_fix():
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("batch",))
    with pytest.raises(ValueError, match=r"'data' axis.*data_mesh\(\).*\('batch',\)"):
        fit(mesh=mesh)


def test_replicate_and_shard_batch_place_leaves_and_keep_values():
    mesh = training.data_mesh(jax.devices()[:1])
    key = jax.random.key(3)
    tree = {"w": np.arange(6.0).reshape(2, 3), "k": key}
    placed = parallel.replicate(tree, mesh)
    np.testing.assert_array_equal(np.asarray(placed["w"]), tree["w"])
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(placed["k"])), np.asarray(jax.random.key_data(key)))
    assert placed["w"].sharding.is_fully_replicated
    batch = parallel.shard_batch(np.ones((4, 2)), mesh)
    assert batch.sharding.spec == jax.sharding.PartitionSpec("data")
    with pytest.raises(ValueError, match="cannot be split"):
        parallel.shard_batch(np.ones(()), mesh)
    assert parallel.largest_over_processes(3) == 3
    assert parallel.same_on_every_process([4, 5]) == [4, 5]


# ------------------------------------------------------------------ the parts


def test_window_means_and_restarts():
    w = records.Window()
    for v in (1.0, 2.0, 6.0):
        w.add({"loss": v, "n": 2 * v})
    assert w.mean("loss") == 3.0 and w.mean("absent") is None
    saved = w.state()
    assert records.Window(saved).close() == {"loss": 3.0, "n": 6.0}
    assert w.close() == {"loss": 3.0, "n": 6.0}
    assert w.close() == {} and w.count == 0


def test_best_counts_evaluations_without_improvement():
    best = evaluation.Best("eval_loss", patience=2)
    seen = [best.observe(s, {"eval_loss": v}) for s, v in ((1, 3.0), (2, 2.0), (3, 2.5), (4, 2.0))]
    assert seen == [(True, False), (True, False), (False, False), (False, True)]
    assert best.summary() == {"step": 2, "value": 2.0}
    again = evaluation.Best("eval_loss", patience=2, saved=best.state())
    assert again.observe(5, {"eval_loss": 1.0}) == (True, False)


def test_a_best_metric_the_evaluation_never_returns_is_an_error_naming_the_keys():
    """It used to switch best_dir and patience off without a word."""
    with pytest.raises(ValueError, match=r"'eval_accuracy'.*\['eval_loss'\]"):
        fit(eval_fn=lambda s: {"loss": 1.0}, eval_every=2, patience=2, best_metric="eval_accuracy")


def test_write_text_atomic_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "a.json"
    records.write_text_atomic(path, "one")
    records.write_text_atomic(path, "two")
    assert path.read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


# ------------------------------------------------------------------ argument checks


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"log_every": 0}, "log_every must be a positive int"),
        ({"save_every": -1}, "save_every must be an int >= 0"),
        ({"eval_every": -2, "eval_fn": lambda s: {}}, "eval_every must be an int >= 0"),
        ({"patience": 0, "eval_fn": lambda s: {}}, "patience must be a positive int"),
    ],
)
def test_bad_loop_arguments_are_named(kw, words):
    with pytest.raises(ValueError, match=words):
        fit(**kw)


def test_keep_zero_is_refused(tmp_path):
    """It used to leave an empty checkpoint folder without a word."""
    with pytest.raises(ValueError, match="keep must be a positive int"):
        fit(checkpoint_dir=tmp_path / "ck", keep=0, save_every=2)


@pytest.mark.parametrize("where", ["same", "inside"])
def test_best_dir_must_be_apart_from_checkpoint_dir(tmp_path, where):
    """best_dir == checkpoint_dir: the best checkpoint's manager (keep 1) deleted the latest checkpoints."""
    best = tmp_path / "ck" if where == "same" else tmp_path / "ck" / "best"
    with pytest.raises(ValueError, match="separate folders"):
        fit(checkpoint_dir=tmp_path / "ck", best_dir=best, eval_fn=lambda s: {"loss": 1.0}, eval_every=2)


# ------------------------------------------------------------------ what an error inside the loop leaves


@pytest.mark.slow  # real orbax checkpoints
def test_resume_false_into_a_folder_with_checkpoints_is_refused(tmp_path):
    """It used to skip the saves whose step numbers existed: the newest checkpoint held the old run."""
    fit(4, checkpoint_dir=tmp_path, save_every=2)
    with pytest.raises(ValueError, match=r"resume=False.*\[2, 4\]"):
        fit(4, checkpoint_dir=tmp_path, save_every=2, resume=False)


@pytest.mark.slow  # real orbax checkpoints
def test_an_error_from_batch_fn_saves_the_state_reached_and_hands_it_back(tmp_path):
    """batch_fn raising at step 7 with save_every=5: the state after step 7 is saved (it used not to be)."""

    def failing(step):
        if step == 7:
            raise OSError("the data disk went away")
        return stream_batch_fn(step)

    with pytest.raises(OSError, match="data disk") as info:
        fit(12, failing, checkpoint_dir=tmp_path, save_every=5)
    result = info.value.fit_result
    assert int(result.state.step) == 7
    ck = training.Checkpointer(tmp_path)
    assert ck.all_steps() == [5, 7]
    step, snap = ck.restore(None, training.snapshot(result.state, jax.random.key(7), result.carry))
    ck.close()
    state, _, _ = training.from_snapshot(result.state, snap, result.carry)
    leaves_equal(state.params, result.state.params)
    # the state handed back is usable (not donated), and equals a straight run's after 7 steps
    leaves_equal(result.state.params, fit(7).state.params)


def test_an_error_from_eval_fn_without_checkpoints_hands_the_trained_state_back():
    calls = []

    def eval_fn(state):
        calls.append(int(state.step))
        if len(calls) == 2:
            raise RuntimeError("evaluation data missing")
        return {"loss": 1.0}

    with pytest.raises(RuntimeError, match="evaluation data") as info:
        fit(10, eval_fn=eval_fn, eval_every=3)
    result = info.value.fit_result
    assert int(result.state.step) == 6
    np.testing.assert_array_equal(
        np.asarray(jax.tree.leaves(result.state.params)[0]), np.asarray(jax.tree.leaves(fit(6).state.params)[0])
    )
    assert jnp.isfinite(result.history[-1]["loss"])


@pytest.mark.slow  # real orbax checkpoints
@pytest.mark.parametrize(
    "template, words",
    [
        (
            {"a": np.zeros((2, 3), jnp.bfloat16), "b": np.zeros((3, 2), np.float32)},
            "a as float32; this model holds it as bfloat16",
        ),
        (
            {"a": np.zeros((3, 2), np.float32), "b": np.zeros((2, 3), np.float32)},
            r"a of shape \(2, 3\); this model's is \(3, 2\)",
        ),
        (
            {"a": np.zeros((2, 3), np.float32), "renamed": np.zeros((3, 2), np.float32)},
            "only there: b; only here: renamed",
        ),
    ],
    ids=["narrower-dtype", "swapped-shapes", "renamed-key"],
)
def test_a_checkpoint_of_another_model_is_called_so_not_damaged(tmp_path, template, words):
    """bfloat16 parameters, swapped shapes or a renamed key used to be reported as a damaged checkpoint."""
    ck = training.Checkpointer(tmp_path, keep=2)
    ck.save(1, {"a": np.ones((2, 3), np.float32), "b": np.ones((3, 2), np.float32)}, force=True)
    with pytest.raises(training.CheckpointError, match=f"{words}.*written by another model"):
        ck.restore(None, template)
    # and the model it was written by restores it (float64 included: a wider dtype restores exactly)
    step, tree = ck.restore(None, {"a": np.zeros((2, 3), np.float64), "b": np.zeros((3, 2), np.float32)})
    ck.close()
    assert step == 1 and np.all(np.asarray(tree["a"]) == 1)


def test_a_class_as_batch_fn_is_named():
    """fit(batch_fn=dict) used to fail inside the loop with a KeyError or a TypeError about ints."""
    with pytest.raises(TypeError, match="received the class dict itself"):
        fit(batch_fn=dict)
