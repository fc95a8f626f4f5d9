"""Distillation: a frozen teacher's forward pass on a device of its own, beside the replicas.

A `keras.distillation.Distiller` (or any model whose `compute_loss` calls a second, frozen
model, its teacher) is wrapped like any other model; `teacher_device=` says where the
teacher's forward pass runs:

- `None`: where the loss is computed (the merge device), as Keras would run it;
- a device name or id ("/cpu:0", "GPU:3", 3): that device, which holds the teacher's
  weights (they are moved there on wrap, in place);
- `"replicas"`: split like the batch, each slice on its replica's device.

The step computes the loss once, on the merged batch, by calling the template's own
`compute_loss`, so the teacher is called where the Distiller calls it, on the merged inputs.
While the loss is computed, the teacher (and any model made of its layers only, such as the
Distiller's feature extractor) is called in inference mode, on `teacher_device`, outside the
loss's gradient tape, and its outputs are constants for the gradient: nothing of the
teacher's forward pass is kept for a backward pass, and its variables never receive a
gradient. The teacher reads only the input batch, so nothing in the step orders it after the
replicas' forward and backward passes: TensorFlow runs them at the same time, each on its
device, and the loss waits for both.
"""

import contextlib
import inspect

import keras
import tensorflow as tf
from keras import tree

from kerasmgpu import _compat, options, slicing
from kerasmgpu import devices as devices_lib

REPLICAS = "replicas"


def prepare(model):
    """Build a `keras.distillation.Distiller` whose teacher and student are built.

    A Distiller has no variables of its own (they are its teacher's and its student's), but
    Keras marks it built only once it is called; wrapping it should not need that call.
    Other models are left as they are.
    """
    if not isinstance(model, keras.distillation.Distiller) or model.built:
        return
    for role in ("teacher", "student"):
        part = getattr(model, role)
        if not part.built:
            raise ValueError(
                f"The {role} {part.name!r} of the Distiller {model.name!r} is not built: its "
                "variables do not exist yet. Build it first (give it a keras.Input, call "
                f"{role}.build(input_shape), or call it on a batch). Received: {role}="
                f"{part.name!r} with built=False"
            )
    inputs = getattr(model.student, "inputs", None)
    if inputs:
        shapes = tree.map_structure(lambda tensor: tuple(tensor.shape), inputs)
        model.build(shapes[0] if isinstance(shapes, list) and len(shapes) == 1 else shapes)
    else:
        # A subclassed student has no symbolic inputs: nothing is left to create.
        model.built = True


def find_teacher(model, teacher_device):
    """The `Teacher` of `model`, or None when the step need not treat any model as one.

    A Distiller always has its teacher treated as such; another model only when
    `teacher_device` is given, and then its teacher is its `teacher` attribute or else its
    one sub-model whose variables are all frozen.
    """
    if teacher_device is None and not isinstance(model, keras.distillation.Distiller):
        return None
    teacher = getattr(model, "teacher", None)
    if not isinstance(teacher, keras.Model):
        frozen = [
            layer for layer in _compat.flatten_layers(model)[1:]
            if isinstance(layer, keras.Model) and layer.weights and not layer.trainable_weights
        ]
        frozen = _outermost(frozen)
        if len(frozen) != 1:
            found = ", ".join(repr(m.name) for m in frozen) or "none"
            raise ValueError(
                "teacher_device= places the forward pass of a model's teacher: a "
                "keras.distillation.Distiller, or a model whose compute_loss calls a frozen "
                "model kept as its `teacher` attribute (or as its only frozen sub-model). "
                f"The model {model.name!r} has no `teacher` attribute and its frozen sub-models "
                f"are: {found}. Received: teacher_device={teacher_device!r}"
            )
        teacher = frozen[0]
    return Teacher(model, teacher, teacher_device)


def resolve_teacher_device(teacher_device):
    """A device name for `teacher_device` (see the module's docstring), or it unchanged."""
    if teacher_device is None or teacher_device == REPLICAS:
        return teacher_device
    if not (options.is_whole_number(teacher_device) or isinstance(teacher_device, str)):
        raise ValueError(
            "teacher_device must be a device name or id, 'replicas' or None. "
            f"Received: teacher_device={teacher_device!r}"
        )
    try:
        (device,) = devices_lib.resolve_devices(
            [teacher_device], minimum=1, argument="teacher_device"
        )
    except ValueError:
        cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
        shown = ", ".join(devices_lib.visible_devices() + cpus[:1])
        raise ValueError(
            f"teacher_device={teacher_device!r} is not a visible device. Visible devices: "
            f"{shown} (or 'replicas', or None for the merge device). "
            f"Received: teacher_device={teacher_device!r}"
        ) from None
    return device


class Teacher:
    """A model's frozen teacher and where its forward pass runs during the loss."""

    def __init__(self, model, teacher, teacher_device):
        if not teacher.built:
            raise ValueError(
                f"The teacher {teacher.name!r} of {model.name!r} is not built: its variables "
                "do not exist yet. Build it (and load its trained weights) before wrapping. "
                f"Received: teacher={teacher.name!r} with built=False"
            )
        own = {id(v) for v in teacher.variables}
        trained = [v.path for v in model.trainable_variables if id(v) in own]
        if trained:
            shown = ", ".join(trained[:3]) + (", ..." if len(trained) > 3 else "")
            raise ValueError(
                f"The teacher {teacher.name!r} of {model.name!r} would be trained along with "
                f"the student: {len(trained)} of its variables are trainable ({shown}). A "
                "teacher is frozen: set teacher.trainable = False before wrapping (the "
                "Distiller does so when it is created; something set it back). Received: "
                f"teacher={teacher.name!r} with trainable={teacher.trainable}"
            )
        self.model = teacher
        self.device = resolve_teacher_device(teacher_device)
        # The teacher and the models made of its layers only (a Distiller's feature
        # extractor): whichever the loss calls runs as the teacher.
        self.callables = _outermost([
            layer for layer in _compat.flatten_layers(model)[1:]
            if isinstance(layer, keras.Model) and layer.variables
            and {id(v) for v in layer.variables} <= own
        ] or [teacher])
        if self.device not in (None, REPLICAS):
            # Frozen weights are read every step: they live where they are read.
            devices_lib.move_variables(teacher.variables, self.device)

    @contextlib.contextmanager
    def placed(self, tape, merge_device, replica_devices):
        """Inside the block, calling the teacher runs it on its device, off `tape`."""
        if self.device == REPLICAS:
            devices = list(replica_devices)
        else:
            devices = [merge_device if self.device is None else self.device]
        patched = []
        try:
            for model in self.callables:
                # An instance attribute shadows the class's `call`, which Keras' __call__
                # reaches through `self.call`; removed again on the way out.
                model.call = _teacher_call(model.call, tape, devices, merge_device)
                patched.append(model)
            yield
        finally:
            for model in patched:
                del model.call


def _teacher_call(call, tape, devices, merge_device):
    def teacher_call(inputs, *args, **kwargs):
        if "training" in kwargs or _takes_training(call):
            kwargs["training"] = False
        paused = tape.stop_recording() if tape is not None else contextlib.nullcontext()
        with paused, tf.name_scope("teacher"):
            if len(devices) == 1:
                with tf.device(devices[0]):
                    outputs = call(inputs, *args, **kwargs)
            else:
                with tf.device(devices_lib.host_device()):
                    bounds = slicing.slice_bounds(slicing.batch_size_of(inputs), len(devices))
                    parts = [slicing.rows_of(inputs, *rows) for rows in bounds]
                results = []
                for i, (device, part) in enumerate(zip(devices, parts)):
                    with tf.device(device), tf.name_scope(f"slice_{i}"):
                        results.append(call(part, *args, **kwargs))
                with tf.device(merge_device):
                    outputs = slicing.merge_structures(results)
        return tree.map_structure(_constant, outputs)

    return teacher_call


def _constant(tensor):
    if tensor is None:
        return None
    constant = tf.stop_gradient(tensor)
    logits = slicing.logits_of(tensor)
    if logits is not None:
        _compat.set_keras_logits(constant, tf.stop_gradient(logits))
    return constant


def _takes_training(call):
    try:
        return "training" in inspect.signature(call).parameters
    except (TypeError, ValueError):
        return False


def _outermost(models):
    """The models of `models` that are not nested inside another of them."""
    inner = {
        id(layer) for model in models for layer in _compat.flatten_layers(model)[1:]
    }
    return [model for model in models if id(model) not in inner]
