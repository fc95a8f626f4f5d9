"""What data and model parallelism share: a Keras model that trains a template it wraps.

`ParallelModel` (replicas) and `SplitModel` (pipeline stages) are both `keras.Model`s
whose variables are their template's: they compile like Keras models (with `jit_compile`
resolved so that XLA never spans devices), compute the loss once on the merged outputs (the
template's own `compute_loss` when it overrides it) with the losses they collected by
hand, apply one update per step, and save, load and export through the template, so
files are ordinary Keras files. The helpers below are the step pieces both use: the loss
and its gradient with respect to the slices' outputs, batch shares, the combination of
the slices' state updates, gradient sums, seed offsets, and the packing of a switch's
optional outputs.
"""

import contextlib
import warnings

import keras
import tensorflow as tf

from kerasmgpu import _compat


class TemplateTrainer(keras.Model):
    """Base class: a model that runs `template` on several devices and trains its variables."""

    def __init__(self, template, name):
        super().__init__(name=name)
        self.template = template
        self._step_losses = None
        self._per_device_jit = False
        if hasattr(template, "output_names"):
            self.output_names = template.output_names
        self.built = True

    def _device_count(self):
        """How many distinct devices the steps use (XLA is refused beyond one)."""
        raise NotImplementedError  # each subclass knows its devices

    def _writes_files(self):
        """Whether save/save_weights write (on a cluster, only the chief does)."""
        return True

    def _resolve_per_device_jit(self, jit_compile, run_eagerly):
        """Whether XLA compiles each device's part of the step, for `jit_compile`
        (True, False or "auto") with more than one device.

        By default nothing is compiled per device: True is an error and "auto" False.
        A subclass that runs one program per device (`ParallelModel`) resolves it.
        """
        if jit_compile is True:
            raise ValueError(
                f"jit_compile=True is not supported by {type(self).__name__} with more than "
                f"one device: XLA would compile the work of all {self._device_count()} "
                "devices into one program for one device. Use jit_compile=False (or 'auto', "
                f"which resolves to False here). Received: jit_compile={jit_compile!r}"
            )
        return False

    @property
    def metrics(self):
        # Keras leaves out the metrics of a nested model (the template is one); those the
        # template tracks itself (a Distiller's student_loss and distillation_loss, which
        # its compute_loss updates) belong in fit's logs, as on one device. Its compiled
        # metrics are left out: the wrapper's own are the ones updated.
        own = super().metrics
        template = getattr(self, "template", None)
        if template is None:
            return own
        compiled = {id(m) for m in _compat.compiled_metrics(template)}
        return own + [m for m in template.metrics if id(m) not in compiled]

    @property
    def losses(self):
        # During a step the template runs statelessly and its losses are collected by
        # hand; `compute_loss` reads them here.
        if self._step_losses is not None:
            return list(self._step_losses)
        return super().losses

    def compile(self, optimizer="rmsprop", loss=None, loss_weights=None, metrics=None,
                weighted_metrics=None, run_eagerly=False, steps_per_execution=1,
                jit_compile="auto", auto_scale_loss=True):
        """Configure training as `keras.Model.compile` does.

        `jit_compile`: XLA compiles a whole step into one program for one device, which
        would undo the per-device placement. With one device it is passed to Keras
        unchanged. With more than one, the step itself is never one XLA program:
        `_resolve_per_device_jit` decides what XLA compiles instead (a program per device,
        for the replicas), and `jit_compile` of the step is False.

        The template is compiled with the same optimizer object, loss and metrics, so
        that a saved template carries the training configuration and optimizer state.
        """
        check_jit_compile(jit_compile)
        devices = self._device_count()
        if devices > 1:
            self._per_device_jit = self._resolve_per_device_jit(
                "auto" if jit_compile is None else jit_compile, run_eagerly
            )
            jit_compile = False
        else:
            self._per_device_jit = False
        super().compile(
            optimizer=optimizer, loss=loss, loss_weights=loss_weights, metrics=metrics,
            weighted_metrics=weighted_metrics, run_eagerly=run_eagerly,
            steps_per_execution=steps_per_execution, jit_compile=jit_compile,
            auto_scale_loss=auto_scale_loss,
        )
        self.template.compile(
            optimizer=self.optimizer, loss=loss, loss_weights=loss_weights, metrics=metrics,
            weighted_metrics=weighted_metrics, jit_compile=False,
        )

    def compute_output_spec(self, inputs, training=False, mask=None):
        return self.template.compute_output_spec(inputs)

    def _loss_with(self, extra_losses, x, y, y_pred, sample_weight, training):
        """The loss of the merged batch, as Keras computes it on one device.

        `extra_losses` are the losses the template added during the step (weighted by
        slice share) and its weight regularization; `model.losses` returns them while the
        loss is computed. A template that overrides `compute_loss` (a custom loss, a
        `keras.distillation.Distiller`) has its override called, with itself as `self`;
        otherwise the compiled loss is used.
        """
        self._step_losses = extra_losses
        try:
            if overrides_compute_loss(self.template):
                with _compat.losses_override(self.template, extra_losses):
                    return _compat.call_compute_loss(
                        self.template, x, y, y_pred, sample_weight, training
                    )
            return self._compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
            )
        finally:
            self._step_losses = None

    def _loss_scope(self, tape=None):
        """The context the loss is computed in (`tape`: the loss's tape, if training).

        A subclass places there what the template's `compute_loss` calls besides the loss
        (a distillation teacher); by default, nothing.
        """
        return contextlib.nullcontext()

    def _loss_and_gradients(self, watched, compute_loss, variables=()):
        """The step's loss and its gradients with respect to `watched` and `variables`.

        `watched` are tensors the loss reads (the slices' outputs, their logits, the
        losses they added; None entries get None); the gradients with respect to them are
        what each slice back-propagates through its own tape. Gradients with respect to
        `variables` are those of terms computed here, once (weight regularization).

        Returns:
            `(loss, gradients of watched, gradients of variables)`.
        """
        present = [t for t in watched if t is not None]
        with tf.GradientTape() as tape:
            tape.watch(present)
            with self._loss_scope(tape):
                loss = compute_loss()
            scaled_loss = self.optimizer.scale_loss(loss)
        upstream = iter(tape.gradient(scaled_loss, present + list(variables)))
        watched_gradients = [None if t is None else next(upstream) for t in watched]
        return loss, watched_gradients, list(upstream)

    def _apply_updates(self, gradients, trainable, state, non_trainable):
        """Apply one optimizer update and one state update (the end of every step)."""
        if trainable:
            pairs = [(g, v) for g, v in zip(gradients, trainable) if g is not None]
            if pairs:  # none: the communication strategy applied the update itself
                self.optimizer.apply_gradients(pairs)
        else:
            warnings.warn("The model does not have any trainable weights.", stacklevel=3)
        for variable, value in zip(non_trainable, state):
            if value is not None:
                variable.assign(value)

    # ------------------------------------------------------- saving: the template
    def _optimizer_for_saving(self):
        """A context in which the template's optimizer holds the whole state to save."""
        return contextlib.nullcontext()

    def _optimizer_for_loading(self):
        """A context in which the template's optimizer can load a whole saved state."""
        return contextlib.nullcontext()

    def save(self, filepath, overwrite=True, **kwargs):
        """Save the template (not the wrapper): the file loads with plain Keras."""
        with self._optimizer_for_saving():
            if self._writes_files():
                return self.template.save(filepath, overwrite=overwrite, **kwargs)
        return None

    def save_weights(self, filepath, overwrite=True, **kwargs):
        """Save the template's weights."""
        with self._optimizer_for_saving():
            if self._writes_files():
                return self.template.save_weights(filepath, overwrite=overwrite, **kwargs)
        return None

    def load_weights(self, filepath, skip_mismatch=False, **kwargs):
        """Load weights saved from the template (or from a wrapper of it) into the template."""
        with self._optimizer_for_loading():
            return self.template.load_weights(filepath, skip_mismatch=skip_mismatch, **kwargs)

    def export(self, filepath, format="tf_saved_model", **kwargs):
        """Export the template for inference."""
        return self.template.export(filepath, format=format, **kwargs)

    def get_config(self):
        raise NotImplementedError(
            f"A {type(self).__name__} is not serialized itself: save() and ModelCheckpoint "
            "write its template, which loads with keras.saving.load_model(); wrap it again "
            "after loading."
        )


def overrides_compute_loss(model):
    """Whether `model`'s class overrides `keras.Model.compute_loss`."""
    return type(model).compute_loss is not keras.Model.compute_loss


def batch_shares(sizes, batch_size):
    """Each slice's share of the batch, b_i / B, as float32 scalars.

    Computed even for a single slice: on a cluster, one replica's slice is its worker's
    share of the global batch, not all of it.
    """
    total = tf.cast(batch_size, tf.float32)
    return [tf.cast(size, tf.float32) / total for size in sizes]


def weigh_by_share(losses_by_slice, shares):
    """The losses each slice added during its call, weighted by the slice's share.

    Keras divides an activity-regularization loss by the batch size of its call; each
    slice's loss weighted by b_i / B adds up to the whole batch's.
    """
    # multiply_no_nan: an empty slice (a worker's share of a tiny last batch) has a NaN
    # mean and weight 0; it must count 0.
    return [
        tf.math.multiply_no_nan(loss, tf.cast(share, loss.dtype))
        for losses, share in zip(losses_by_slice, shares)
        for loss in losses
    ]


def combine_state(variables, states_in, states_out, shares):
    """One update per state variable from the slices' updates.

    Floats (BatchNormalization moving statistics) get the share-weighted mean, integers
    (random seed states) slice 0's update, and a variable no slice changed gets None
    (nothing to assign). A single slice is weighted too: on a cluster its share of the
    global batch is below 1 and the workers' updates are summed after.
    """
    combined = []
    for j, variable in enumerate(variables):
        if all(out[j] is given[j] for out, given in zip(states_out, states_in)):
            combined.append(None)
            continue
        values = [out[j] for out in states_out]
        if not variable.dtype.startswith(("float", "bfloat")):
            combined.append(values[0])
            continue
        with tf.device(variable.value.device):
            # An empty slice's statistics are NaN and weigh 0: they must count 0.
            combined.append(tf.add_n(
                [tf.math.multiply_no_nan(v, tf.cast(s, variable.dtype))
                 for v, s in zip(values, shares)]
            ))
    return combined


def is_seed_state(variable):
    """Whether a non-trainable variable is the state of a Keras random seed generator."""
    return "seed_generator_state" in variable.path and not variable.dtype.startswith("float")


def offset_seeds(variables, values, index):
    """`values` of `variables`, with random seed states offset by `index`.

    Replica (or micro-batch) i starts from seeds offset by i, so no two draw the same
    dropout mask.
    """
    if not index:
        return list(values)
    shifted = []
    for variable, value in zip(variables, values):
        if is_seed_state(variable):
            offset = [index] + [0] * (variable.shape[0] - 1)
            value = value + tf.constant(offset, value.dtype)
        shifted.append(value)
    return shifted


def unoffset_seeds(variables, values, index):
    """`values` with the seed states offset by `index` taken back (None stays None).

    A combined update takes its seed states from the first replica of its worker, whose
    seeds were offset by that replica's index in the cluster; taken back, every worker
    keeps the seed states of the cluster's replica 0, as one machine does.
    """
    if not index:
        return list(values)
    return [value if value is None else offset_seeds([variable], [value], -index)[0]
            for variable, value in zip(variables, values)]


def sum_gradients(parts):
    """Sum the gradients of one variable (None when there are none), sparse kept sparse."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, tf.IndexedSlices) for p in parts):
        return tf.IndexedSlices(
            tf.concat([p.values for p in parts], axis=0),
            tf.concat([p.indices for p in parts], axis=0),
            parts[0].dense_shape,
        )
    return tf.add_n([tf.convert_to_tensor(p) for p in parts])


class OptionalOutputs:
    """Packs lists with None entries for the branches of a switch, which need tensors.

    Every branch must produce the same None pattern (it depends only on the model); the
    pattern seen first is kept and later branches are checked against it.
    """

    def __init__(self, what):
        self._what = what
        self.pattern = None

    def pack(self, *lists):
        pattern = tuple(tuple(item is not None for item in items) for items in lists)
        if self.pattern is None:
            self.pattern = pattern
        elif self.pattern != pattern:
            raise RuntimeError(
                f"The model's gradients or state updates differ between {self._what}; "
                "it cannot be run this way."
            )
        return [[item for item in items if item is not None] for items in lists]

    def unpack(self, *packed_lists):
        unpacked = []
        for packed, present in zip(packed_lists, self.pattern):
            items = iter(packed)
            unpacked.append([next(items) if flag else None for flag in present])
        return unpacked


def check_jit_compile(jit_compile):
    """Refuse a `jit_compile` that is not True, False, "auto" or None."""
    if not (jit_compile in ("auto", None) or isinstance(jit_compile, bool)):
        raise ValueError(
            "jit_compile must be True, False or 'auto'. "
            f"Received: jit_compile={jit_compile!r}"
        )
