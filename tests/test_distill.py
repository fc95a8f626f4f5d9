"""Distillation: a Distiller's frozen teacher on its own device, the student's replicas on others.

Training equals one-device `keras.distillation.Distiller` training; the teacher never changes;
its forward pass is placed on `teacher_device` and shares no path in the step's graph with the
student's forward pass (so TensorFlow runs them concurrently); bad set-ups fail on wrap.
"""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasmgpu
from tests.helpers import placed_ops

# KERASMGPU_SIMULATED_DEVICES=4 in the test environment: CPU:0..3.


def _mlp(width, name, seed, inputs=8, classes=3):
    keras.utils.set_random_seed(seed)
    x = keras.Input((inputs,))
    hidden = keras.layers.Dense(width, activation="relu", name=f"{name}_hidden")(x)
    return keras.Model(x, keras.layers.Dense(classes, name=f"{name}_logits")(hidden), name=name)


def _distiller(losses=None, teacher_width=32):
    teacher, student = _mlp(teacher_width, "teacher_net", 1), _mlp(6, "student_net", 2)
    losses = losses or keras.distillation.LogitsDistillation(temperature=2.0)
    return keras.distillation.Distiller(teacher, student, losses, student_loss_weight=0.3)


def _compile(model):
    model.compile(
        keras.optimizers.Adam(0.01),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )


def _data(rows=37):
    rng = np.random.default_rng(0)
    return rng.normal(size=(rows, 8)).astype("float32"), rng.integers(0, 3, rows)


def _largest_difference(a, b):
    return max(float(np.abs(u.numpy() - v.numpy()).max()) for u, v in zip(a.weights, b.weights))


@pytest.mark.parametrize(
    "gpus, teacher_device, make_losses",
    [
        (2, "CPU:3", None),
        (3, "/cpu:0", None),
        (3, "replicas", None),
        (
            2, None,
            lambda: [
                keras.distillation.LogitsDistillation(temperature=3.0),
                keras.distillation.FeatureDistillation(
                    teacher_layer_name="teacher_net_hidden",
                    student_layer_name="student_net_hidden",
                ),
            ],
        ),
    ],
    ids=["2-dedicated", "3-host", "3-split-over-replicas", "2-logits-and-features"],
)
def test_distillation_equals_one_device_distiller(gpus, teacher_device, make_losses):
    x, y = _data()
    # FeatureDistillation compares hidden layers of equal widths.
    width = 6 if make_losses else 32
    reference = _distiller(make_losses and make_losses(), width)
    distiller = _distiller(make_losses and make_losses(), width)
    _compile(reference)
    reference.fit(x, y, batch_size=12, epochs=2, shuffle=False, verbose=0)

    teacher_before = [v.numpy().copy() for v in distiller.teacher.weights]
    # Wrapped as written: the Distiller was never called, so it is built on wrap.
    parallel = kerasmgpu.multi_gpu_model(distiller, gpus=gpus, teacher_device=teacher_device)
    _compile(parallel)
    history = parallel.fit(x, y, batch_size=12, epochs=2, shuffle=False, verbose=0)

    assert _largest_difference(reference.student, distiller.student) <= 1e-5
    for before, variable in zip(teacher_before, distiller.teacher.weights):
        np.testing.assert_array_equal(before, variable.numpy())
    assert np.isfinite(history.history["loss"]).all()
    # Outside the loss the teacher is the model it was (its call is its class's again).
    assert "call" not in vars(distiller.teacher)


def test_distiller_metrics_show_in_fit_logs_as_on_one_device():
    # student_loss, distillation_loss and total_loss are the Distiller's own trackers
    # (its compute_loss updates them); "accuracy" is compiled.
    x, y = _data()
    histories = []
    for wrap in (False, True):
        distiller = _distiller()
        model = kerasmgpu.multi_gpu_model(distiller, gpus=3) if wrap else distiller
        model.compile(keras.optimizers.Adam(0.01),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        histories.append(model.fit(x, y, batch_size=12, epochs=2, shuffle=False,
                                   verbose=0).history)
    expected, got = histories
    assert {"student_loss", "distillation_loss", "total_loss", "accuracy"} <= set(expected)
    assert set(got) == set(expected)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], atol=1e-5, err_msg=key)


class _FrozenTeacherLoss(keras.Model):
    """A model whose compute_loss calls a second, frozen model (not a keras Distiller)."""

    def __init__(self, teacher, student):
        super().__init__(name="frozen_teacher_loss")
        self.teacher, self.student = teacher, student
        self.teacher.trainable = False

    def call(self, inputs, training=None):
        return self.student(inputs, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        target = keras.ops.softmax(self.teacher(x, training=False))
        losses = keras.losses.categorical_crossentropy(target, y_pred, from_logits=True)
        return keras.ops.mean(losses)


def _custom():
    model = _FrozenTeacherLoss(_mlp(32, "teacher_net", 1), _mlp(6, "student_net", 2))
    model(np.zeros((1, 8), "float32"))
    return model


def test_a_model_whose_compute_loss_calls_a_frozen_model_trains_as_on_one_device():
    x, y = _data(24)
    reference, model = _custom(), _custom()
    reference.compile(keras.optimizers.SGD(0.1))
    reference.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    teacher_before = [v.numpy().copy() for v in model.teacher.weights]
    parallel = kerasmgpu.multi_gpu_model(model, gpus=3, teacher_device="CPU:0")
    parallel.compile(keras.optimizers.SGD(0.1))
    parallel.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert _largest_difference(reference.student, model.student) <= 1e-5
    for before, variable in zip(teacher_before, model.teacher.weights):
        np.testing.assert_array_equal(before, variable.numpy())


# ------------------------------------------------------------------ the traced graph
COMPUTE_OPS = {"MatMul", "BiasAdd", "Relu"}


def _traced_step(teacher_device, batch, gpus=(0, 1, 2)):
    distiller = _distiller()
    parallel = kerasmgpu.multi_gpu_model(distiller, gpus=list(gpus), teacher_device=teacher_device)
    _compile(parallel)
    parallel.optimizer.build(parallel.trainable_variables)
    signature = (tf.TensorSpec((batch, 8), tf.float32), tf.TensorSpec((batch,), tf.int64))
    traced = tf.function(parallel.train_step).get_concrete_function(signature)
    return traced.graph.as_graph_def()


def _graphs(graph_def):
    """Each graph of the step (the main one, and the functions it calls) as a list of nodes."""
    return [list(graph_def.node)] + [list(f.node_def) for f in graph_def.library.function]


def _is_teacher(node):
    return "/teacher/" in f"/{node.name}"


def _is_student(node):
    """A replica's op: its forward pass ("replica_i/...") or its backward pass."""
    return node.name.startswith("replica_") or "/replica_" in node.name


def _is_student_forward(node):
    return re.match(r"replica_\d+/", node.name) is not None


def _ancestors(nodes, start):
    """The ops `start` depends on (data or control), the step's inputs and captures aside."""
    by_name = {node.name: node for node in nodes}
    seen, stack = set(), [n.name for n in start]
    while stack:
        for name in by_name[stack.pop()].input:
            name = name.lstrip("^").split(":")[0]
            if name in by_name and name not in seen:
                seen.add(name)
                stack.append(name)
    # A captured variable's handle is named after the scope that captured it first.
    return [by_name[name] for name in seen if by_name[name].op != "Placeholder"]


def _short(device):
    return device.split("device:")[-1] if device else "(unplaced)"


@pytest.mark.parametrize("batch", [12, None], ids=["static-batch", "dynamic-batch"])
def test_teacher_ops_run_on_teacher_device_students_backward_on_replicas(batch):
    nodes = placed_ops(_traced_step("CPU:3", batch))
    teacher = {_short(n.device) for n in nodes if _is_teacher(n) and n.op in COMPUTE_OPS}
    assert teacher == {"CPU:3"}
    backward = {
        _short(n.device) for n in nodes
        if n.backward and _is_student(n) and n.op in {"MatMul", "BiasAddGrad"}
    }
    assert backward == {"CPU:0", "CPU:1", "CPU:2"}
    # The teacher's forward pass is off the tape: no gradient op of it exists.
    assert not [n.name for n in nodes if _is_teacher(n) and "gradient" in n.name.lower()]


def test_teacher_and_student_replicas_share_no_path_before_the_loss():
    (nodes, *_) = _graphs(_traced_step("CPU:3", 12))
    teacher = [n for n in nodes if _is_teacher(n)]
    student_forward = [n for n in nodes if _is_student_forward(n)]
    assert teacher and student_forward
    # Nothing of any replica (forward or backward) comes before the teacher's forward pass,
    # and nothing of the teacher before the replicas' forward passes: the replicas'
    # backward passes wait for the loss, which waits for both.
    assert not [n.name for n in _ancestors(nodes, teacher) if _is_student(n)]
    assert not [n.name for n in _ancestors(nodes, student_forward) if _is_teacher(n)]


def test_split_teacher_runs_one_slice_on_each_replica_device():
    nodes = [node for graph in _graphs(_traced_step("replicas", 12)) for node in graph]
    teacher = {_short(n.device) for n in nodes if _is_teacher(n) and n.op in COMPUTE_OPS}
    assert teacher == {"CPU:0", "CPU:1", "CPU:2"}


# ------------------------------------------------------------------------ errors
def test_unbuilt_teacher_is_refused_on_wrap():
    teacher = keras.Sequential([keras.layers.Dense(3)], name="unbuilt_teacher")
    distiller = keras.distillation.Distiller(
        teacher, _mlp(4, "student_net", 2), keras.distillation.LogitsDistillation()
    )
    with pytest.raises(ValueError, match="teacher 'unbuilt_teacher'.*not built.*built=False"):
        kerasmgpu.multi_gpu_model(distiller, gpus=2)


def test_invisible_teacher_device_is_refused_on_wrap():
    with pytest.raises(ValueError, match=r"teacher_device='GPU:7' is not a visible device"):
        kerasmgpu.multi_gpu_model(_distiller(), gpus=2, teacher_device="GPU:7")
    with pytest.raises(ValueError, match=r"Received: teacher_device=\[3\]"):
        kerasmgpu.multi_gpu_model(_distiller(), gpus=2, teacher_device=[3])


def test_teacher_that_would_be_trained_is_refused_on_wrap():
    distiller = _distiller()
    distiller.teacher.trainable = True
    with pytest.raises(ValueError, match="would be trained.*Received: teacher='teacher_net'"):
        kerasmgpu.multi_gpu_model(distiller, gpus=2, teacher_device="CPU:3")


def test_teacher_device_needs_a_teacher():
    with pytest.raises(ValueError, match="has no `teacher` attribute.*teacher_device='CPU:3'"):
        kerasmgpu.multi_gpu_model(_mlp(4, "plain", 0), gpus=2, teacher_device="CPU:3")
