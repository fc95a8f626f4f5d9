"""kerasmgpu.pool: the device pool (data loaded once per worker) and cross_validate."""

import keras
import numpy as np
import pytest

import kerasmgpu
from kerasmgpu.pool import DevicePool, TaskError, current_worker, fold_indices, train_fold

# ---- functions the workers run (top level: spawned workers import this module) ----------


def _rows_and_worker(data, task):
    worker = current_worker()
    return task, worker.pid, worker.device, worker.loads, float(data["x"].sum())


def _fail_on_three(data, task):
    if task == 3:
        raise ValueError(f"task {task} refuses")
    return task


def _mlp(width):
    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(width, activation="relu"),
        keras.layers.Dropout(0.1),
        keras.layers.Dense(3, activation="softmax"),
    ])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def build_narrow():
    return _mlp(4)


def build_wide():
    return _mlp(16)


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 8)).astype("float32")
    y = (np.argmax(x[:, :3], axis=1)).astype("int32")
    return x, y


# ---- the pool --------------------------------------------------------------------------


def test_each_worker_loads_the_data_once_and_a_failing_task_names_its_device():
    x, _ = _data()
    with DevicePool(devices=2, data={"x": x}) as pool:
        first = pool.map(_rows_and_worker, [(task,) for task in range(6)])
        again = pool.map(_rows_and_worker, [(task,) for task in range(4)])
        with pytest.raises(TaskError, match=r"Task 3 _fail_on_three\(3\) failed on "
                                            r"/device:CPU:[01]: ValueError: task 3 refuses"):
            pool.map(_fail_on_three, [(task,) for task in range(5)])
    results = first + again
    assert [task for task, *_ in first] == list(range(6))  # in the order of the arguments
    # Two workers served ten tasks and each read the data exactly once.
    assert len({pid for _, pid, *_ in results}) == 2
    assert {device for *_, device, _, _ in results} == {"/device:CPU:0", "/device:CPU:1"}
    assert {loads for *_, loads, _ in results} == {1}
    assert all(total == pytest.approx(float(x.sum())) for *_, total in results)


def test_bad_arguments_raise_before_any_worker_starts():
    x, y = _data()
    with pytest.raises(ValueError, match="sets validation_data itself"):
        kerasmgpu.cross_validate(build_narrow, x, y, validation_data=(x, y))
    with pytest.raises(ValueError, match="folds must be a whole number >= 2. Received: folds=1"):
        kerasmgpu.cross_validate(build_narrow, x, y, folds=1)
    with pytest.raises(ValueError, match="folds must be at most the number of rows"):
        kerasmgpu.cross_validate(build_narrow, x[:3], y[:3], folds=4)
    with pytest.raises(ValueError, match="same number of rows"):
        kerasmgpu.cross_validate(build_narrow, x, y[:10])
    with pytest.raises(ValueError, match='steps_per_execution must be "auto"'):
        kerasmgpu.cross_validate(build_narrow, x, y, steps_per_execution=0)
    with pytest.raises(ValueError, match="devices=9 asks for more devices"):
        DevicePool(devices=9)


def test_folds_cover_every_row_once_and_follow_the_seed():
    folds = fold_indices(10, 3, seed=0)
    assert [(len(train), len(test)) for train, test in folds] == [(6, 4), (7, 3), (7, 3)]
    assert sorted(np.concatenate([test for _, test in folds]).tolist()) == list(range(10))
    for train, test in folds:
        assert not set(train) & set(test)
    assert all((a[1] == b[1]).all() for a, b in zip(folds, fold_indices(10, 3, seed=0)))
    assert any((a[1] != b[1]).any() for a, b in zip(folds, fold_indices(10, 3, seed=1)))


def test_cross_validation_on_two_devices_equals_plain_keras_one_fold_after_another():
    x, y = _data()
    concurrent = kerasmgpu.cross_validate([build_narrow, build_wide], x, y, folds=2,
                                          devices=2, seed=4, batch_size=8, epochs=2)
    # The sequential reference: the plain Keras loop in this process, one batch per call.
    for builder, result in zip((build_narrow, build_wide), concurrent):
        assert result["steps_per_execution"] > 1  # "auto" ran several batches per call
        assert set(result["devices"]) <= {"/device:CPU:0", "/device:CPU:1"}
        for fold, (train, test) in enumerate(fold_indices(len(x), 2, seed=4)):
            seed = kerasmgpu.pool.fold_seed(4, fold)
            plain = train_fold(builder, x, y, train, test, seed, batch_size=8, epochs=2,
                               steps_per_execution=1)
            for name, value in plain["scores"].items():
                assert abs(result["scores"][fold][name] - value) <= 1e-6, (fold, name)
            np.testing.assert_allclose(result["histories"][fold]["loss"],
                                       plain["history"]["loss"], atol=1e-6)
        losses = [scores["loss"] for scores in result["scores"]]
        assert result["mean"]["loss"] == pytest.approx(np.mean(losses))
        assert result["std"]["loss"] == pytest.approx(np.std(losses))
    # The candidates differ: the scores are not one model's copied twice.
    assert concurrent[0]["scores"] != concurrent[1]["scores"]
