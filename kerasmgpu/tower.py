"""What one replica runs: the template's forward pass as one program, traced once.

A step on N devices runs the template N times, once per replica, each on its own slice
and device. Traced inline, each of those calls is traced again in Python (and its
backward pass built again), so the first step costs N traces. A `ReplicaProgram` is the
replica's forward pass as one `tf.function`: traced once per distinct program (training
or inference, one input structure), then called once per device under that device's
scope, with what differs between replicas passed in as arguments:

- its slice of the batch (of a size unknown at trace time, in `fit`);
- the values of the trainable variables it reads (the template's, or its own copies with
  `variables="replicated"`);
- the values of the state (non-trainable) variables, with its random seeds already
  offset, since each replica draws its own dropout masks.

It returns what the step needs back: the outputs (with the Keras logits and masks the
loss reads), the state it would write (BatchNormalization moving statistics, seeds; not
written: the step combines the replicas' updates once), and the losses the layers added.
The replica's backward pass is `tape.gradient` through the call, taken by the caller
under the same device scope: TensorFlow builds the backward function once from the traced
forward function and runs it where the gradient is asked for.

With `jit_compile=True` the program is compiled by XLA for the device it is called on,
once per device kind and input shape: one XLA program per replica, never one program
across devices (the merge, the loss, the all-reduce and the update stay outside).

A template with its own train_step runs the same class for each sliced model call
(`kerasmgpu.custom_steps`): one program per model and call arguments, with the call's
Python arguments (`training=True`) traced in and the sliced-call context entered while it
is traced, so models called inside are part of the replica.

One case cannot share a program: synchronized BatchNormalization, whose replicas meet in
collectives keyed and placed per replica and whose replica 0 alone sums across workers.
There the step calls `run_inline` instead (traced per replica, as before; no XLA).

Example (what a step does for replica i, inside a traced step):

```python
program = ReplicaProgram(model, training=True, jit_compile=False)
with tf.device(devices[i]), tf.GradientTape(watch_accessed_variables=False) as tape:
    values = [tf.convert_to_tensor(v) for v in model.trainable_variables]
    tape.watch(values)
    state = [tf.convert_to_tensor(v) for v in model.non_trainable_variables]
    outputs, state_out, losses = program(x_slices[i], values, state)
    ...
with tf.device(devices[i]):
    gradients = tape.gradient(outputs, values, output_gradients=upstream_rows[i])
```
"""

import contextlib

import keras
import tensorflow as tf
from keras import tree

from kerasmgpu import _compat, slicing


class ReplicaProgram:
    """The template's forward pass for one replica, traced once and called per device.

    Args:
        model: the model the replica runs (a built `keras.Model`): the template, or in a
            custom step the model a sliced call calls (a generator, a discriminator).
        training: run the layers in training mode (dropout, batch statistics).
        jit_compile: compile the program with XLA, for the device it is called on.
        noinline: keep the program a function call in the step's graph instead of
            letting TensorFlow inline its body once per replica. Off by default: measured
            on MobileNetV2 with 4 devices (docs/replica_program.md), a non-inlined
            program made the steady-state step about 2x slower and saved no clear time in
            the first one, and inlined bodies let all-reduces start while the backward
            pass still runs. XLA programs are never inlined.
        call_args, call_kwargs: the call's arguments after its inputs, Python values
            traced into the program (`model(inputs, *call_args, **call_kwargs)`); by
            default `training=training` alone, as `fit` calls a model. A different call
            is a different program.
        scope: a function returning a context manager entered around the model call while
            it is traced (a custom step's sliced calls: models called inside are part of
            the replica, not sliced again).

    Attributes:
        traces: how many times the program was traced in Python: once per input
            signature the step traces it with, whatever the number of devices
            (`run_inline` counts each call).

    Example:

    ```python
    program = ReplicaProgram(model, training=False)
    with tf.device("/gpu:1"):
        outputs, _, _ = program(x_slice, model.trainable_variables,
                                model.non_trainable_variables)
    ```
    """

    def __init__(self, model, training, jit_compile=False, noinline=False, call_args=(),
                 call_kwargs=None, scope=None):
        self.model = model
        self.training = bool(training)
        self.call_args = tuple(call_args)
        self.call_kwargs = (
            {"training": self.training} if call_kwargs is None else dict(call_kwargs)
        )
        self._scope = scope or contextlib.nullcontext
        self.jit_compile = bool(jit_compile)
        self.noinline = bool(noinline) and not self.jit_compile
        self.traces = 0
        self._functions = {}  # signature key -> tf.function with that input signature

    def __call__(self, inputs, trainable_values, state_values):
        """Run the program on the current device.

        Args:
            inputs: the replica's slice (a tensor or a nested structure of tensors).
            trainable_values: one tensor (or variable) per `model.trainable_variables`,
                read in their place.
            state_values: one tensor (or variable) per `model.non_trainable_variables`.

        Returns:
            `(outputs, state_out, losses)`: the model's outputs (carrying the Keras logits
            and masks the loss reads), the state values after the call (the given tensor
            itself where the call wrote nothing), and the losses layers added.
        """
        trainable_values = [tf.convert_to_tensor(v) for v in trainable_values]
        state_values = [tf.convert_to_tensor(v) for v in state_values]
        key, signature = self._signature(inputs, trainable_values, state_values)
        function = self._functions.get(key)
        if function is None:
            attributes = {"_noinline": True} if self.noinline else None
            function = tf.function(
                self._traced, input_signature=signature,
                jit_compile=self.jit_compile, autograph=False,
                experimental_attributes=attributes,
            )
            self._functions[key] = function
        result = function(inputs, trainable_values, state_values)
        return _outputs_of(result), _state_of(result, state_values), list(result["losses"])

    def run_inline(self, inputs, trainable_values, state_values):
        """The same forward pass traced into the caller's graph (no function, no XLA).

        For what cannot be shared between replicas (synchronized BatchNormalization).
        Same arguments and results as calling the program.
        """
        self.traces += 1
        result = self._forward(inputs, trainable_values, state_values)
        return result["outputs"], _state_of(result, state_values), list(result["losses"])

    # ------------------------------------------------------------------ tracing
    def _signature(self, inputs, trainable_values, state_values):
        """The key of the program for these arguments and its input signature.

        The inputs' shapes are taken as the step knows them. In `fit` the batch size is
        unknown when the step is traced, so every replica's slice, and the whole batch of
        the one-replica branch, share one trace; with a batch size known at trace time
        (a dataset with `drop_remainder=True`, `train_on_batch`), each slice size is a
        program of its own (two at most: slices differ by one sample), and the shapes
        inside stay known (the traffic measurement sizes transfers from them).
        """
        input_specs = tree.map_structure(_spec, inputs)
        trainable_specs = [tf.TensorSpec(v.shape, v.dtype) for v in trainable_values]
        state_specs = [tf.TensorSpec(v.shape, v.dtype) for v in state_values]
        variables = self.model.trainable_variables + self.model.non_trainable_variables
        key = (
            repr(tree.flatten(input_specs)), str(tree.map_structure(lambda _: 0, inputs)),
            tuple(id(v) for v in variables),
            tuple((s.shape.as_list(), s.dtype) for s in trainable_specs + state_specs).__repr__(),
        )
        return key, [input_specs, trainable_specs, state_specs]

    def _traced(self, inputs, trainable_values, state_values):
        self.traces += 1
        return self._forward(inputs, trainable_values, state_values)

    def _forward(self, inputs, trainable_values, state_values):
        model = self.model
        mapping = list(zip(model.trainable_variables, trainable_values))
        mapping += list(zip(model.non_trainable_variables, state_values))
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as scope, \
                self._scope():
            # Through __call__, as fit calls a model: `training` goes to the layers
            # whose call takes it (and only there), masks propagate.
            outputs = model(inputs, *self.call_args, **self.call_kwargs)
            losses = list(scope.losses)
        # Function outputs are new tensors: state the call did not write is returned as
        # None, and the caller's own tensor stands for it, so "nothing changed" can still
        # be seen with `is` (no update to apply).
        state = []
        for variable, given in zip(model.non_trainable_variables, state_values):
            current = scope.get_current_value(variable)
            # Never differentiated (moving statistics, seeds): stopped here, so the
            # program's backward function has no paths for them (for MobileNetV2 it is
            # about half the size without them).
            state.append(
                None if current is None or current is given else tf.stop_gradient(current)
            )
        return {
            "outputs": outputs,
            # A function returns plain tensors: what Keras attaches to its outputs (the
            # logits of a softmax or sigmoid, which its cross-entropies read, and masks)
            # is returned beside them and attached again by the caller.
            "logits": tree.map_structure(slicing.logits_of, outputs),
            "masks": tree.map_structure(_compat.keras_mask, outputs),
            "losses": losses,
            "state": state,
        }


def _spec(value):
    if isinstance(value, tf.Tensor) or not hasattr(value, "_type_spec"):
        tensor = tf.convert_to_tensor(value)
        return tf.TensorSpec(tensor.shape, tensor.dtype)
    return tf.type_spec_from_value(value)  # ragged, sparse: as they are


def _outputs_of(result):
    """The program's outputs with their Keras logits and masks attached again."""

    def attach(output, logits, mask):
        if logits is not None:
            _compat.set_keras_logits(output, logits)
        if mask is not None:
            _compat.set_keras_mask(output, mask)
        return output

    return tree.map_structure(attach, result["outputs"], result["logits"], result["masks"])


def _state_of(result, state_values):
    return [
        given if written is None else written
        for written, given in zip(result["state"], state_values)
    ]
