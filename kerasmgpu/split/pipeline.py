"""Model parallelism: one model's layers split across devices, with micro-batch pipelining.

Data parallelism (`ParallelModel`) puts a whole copy of the model on every device, so a
model larger than one device's memory cannot run. `split_model` instead cuts the model's
layers into contiguous *stages*, one per device: stage s keeps its variables (and the
optimizer's slots for them) on device s and runs its forward and backward ops there.
Each device holds only its share of the parameters.

One training step with S stages and k micro-batches (GPipe):

1. The batch is cut into k contiguous micro-batches on the host.
2. Forward: stage s runs micro-batch m on device s with a gradient tape of its own,
   and hands its outputs to stage s+1. The stages run the model's layers statelessly,
   from values of the variables read once per step, so nothing orders stage s on
   micro-batch m+1 after stage s+1 on micro-batch m: TensorFlow's executor is free to
   run them at the same time.
3. The micro-batches' outputs are concatenated and the compiled loss is computed once,
   on the whole batch, as Keras computes it on one device (so any loss, sample weight or
   reduction gives the same value as without micro-batches).
4. Backward, stage by stage in reverse: each (stage, micro-batch) tape is given the
   gradient of its outputs and returns the gradients of its inputs (handed to the stage
   before) and of its variables, on its device.
5. Gradients are summed over micro-batches on each variable's device and applied once.
   BatchNormalization's moving statistics are set once, to the micro-batches' updates
   averaged with weights micro-batch size / batch size.

Training therefore equals training the unsplit model up to float rounding. The
exception is BatchNormalization with k > 1: each micro-batch is normalised with its own
statistics (as GPipe does), which changes the result; with k = 1 it is exact too.
Dropout draws an independent mask per micro-batch (random seeds are offset by the
micro-batch index), so it is random in a different way, not wrong. A batch with fewer
samples than micro-batches runs as one micro-batch.

Data parallelism combines: give each stage a list of R devices (a grid of S x R) and
each micro-batch is further cut into R slices, slice r running stage s on device r of
that stage's list. The stage's variables live on its first device; each other device
copies them once per step, and gradients are summed on the first.

This module is a little over 600 lines on purpose: it is one class's training step (the
pipeline forward, the loss, the stage-by-stage backward) and its helpers, read together.
"""

import contextlib
import warnings

import keras
import tensorflow as tf
from keras import tree

from kerasmgpu import _compat, custom_steps, options, slicing, trainer
from kerasmgpu import devices as devices_lib
from kerasmgpu.split.plan import Plan


class SplitModel(trainer.TemplateTrainer):
    """A Keras model whose layers run as a pipeline of stages, one stage per device.

    Built by `split_model`. It compiles, trains, evaluates and predicts as a Keras model;
    training updates the split model's own variables (which live on the stages'
    devices), and `save`, `save_weights`, `load_weights` and
    `keras.callbacks.ModelCheckpoint` read and write that model, so a saved file is an
    ordinary Keras model file.

    Attributes:
        template: the model that was split.
        stage_devices: the device (or the R data-parallel devices) of each stage.
        stages: the layer names of each stage.
        boundaries: the first layer of each stage after the first.
        microbatches: micro-batches per batch.

    Example:

    ```python
    split = split_model(model, devices=["/gpu:0", "/gpu:1"], microbatches=4)
    split.stages        # [["conv1", ..., "pool2"], ["flatten", ..., "softmax"]]
    split.summary()     # parameter and activation bytes per device
    split.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    split.fit(x, y, batch_size=128)
    model.predict(x)    # the original model holds the trained weights
    ```
    """

    def __init__(self, template, plan, cuts, stage_devices, microbatches, name=None):
        super().__init__(template, name=name or f"{template.name}_split")
        self._plan = plan
        self._stages = plan.stages(cuts)
        self._grid = tuple(tuple(row) for row in stage_devices)
        self._replicas = len(self._grid[0])
        self.microbatches = int(microbatches)
        for stage, row in zip(self._stages, self._grid):
            devices_lib.move_variables(stage.variables, row[0])

    # ----------------------------------------------------------------- properties
    @property
    def stage_devices(self):
        """Each stage's device, or list of devices when stages are replicated."""
        if self._replicas == 1:
            return [row[0] for row in self._grid]
        return [list(row) for row in self._grid]

    @property
    def stages(self):
        """The layer names of each stage, in order."""
        return [stage.layer_names for stage in self._stages]

    @property
    def boundaries(self):
        """The name of the first layer of each stage after the first."""
        return [stage.layer_names[0] for stage in self._stages[1:]]

    def stage_report(self):
        """Per-stage memory figures, one dict per stage.

        Keys: "stage", "devices", "layers" (names), "parameters" (count),
        "parameter_bytes" (variables held by the stage's first device; optimizer slots and
        gradients scale with it), "activation_bytes_per_sample" (estimate of what the
        stage's tapes keep per sample: its layers' outputs and the tensors it receives;
        training keeps this for the whole batch until the backward pass, as GPipe does
        without re-materialisation).
        """
        return [
            {
                "stage": stage.index,
                "devices": list(row),
                "layers": stage.layer_names,
                "parameters": stage.parameter_count,
                "parameter_bytes": stage.parameter_bytes,
                "activation_bytes_per_sample": stage.activation_bytes,
            }
            for stage, row in zip(self._stages, self._grid)
        ]

    def summary(self, line_length=None, positions=None, print_fn=None, **kwargs):
        """Print the stages: devices, layers, parameter bytes and activation bytes per sample.

        `template.summary()` prints the layers themselves.

        Args:
            line_length, positions: ignored (kept so calls written for
                `keras.Model.summary` keep working).
            print_fn: called with each line (default `print`).
            **kwargs: ignored, as above.
        """
        print_fn = print_fn or print
        for line in format_report(self.stage_report(), self.microbatches):
            print_fn(line)

    def _device_count(self):
        return len({device for row in self._grid for device in row})

    # ------------------------------------------------------------------ the steps
    def call(self, inputs, training=False):
        if training:
            warnings.warn(
                "Calling a split model with training=True does not update "
                "BatchNormalization statistics or random seeds; use fit() or "
                "train_on_batch() for training steps.",
                stacklevel=2,
            )
        flat = self._standardize(inputs)
        return self._dispatch(flat, lambda n: self._predict_pipeline(flat, n, training))

    def predict_step(self, data):
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        flat = self._standardize(x)
        return self._dispatch(flat, lambda n: self._predict_pipeline(flat, n, False))

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        flat = self._standardize(x)

        def pipeline(num_slices):
            return self._test_pipeline(flat, num_slices, x, y, sample_weight)

        loss, y_pred = self._dispatch(flat, pipeline)
        self._loss_tracker.update_state(loss, sample_weight=slicing.batch_size_of(flat))
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        flat = self._standardize(x)
        trainable = [v for stage in self._stages for v in stage.trainable]
        non_trainable = [v for stage in self._stages for v in stage.non_trainable]
        optional = trainer.OptionalOutputs("micro-batch counts")

        def pipeline(num_slices):
            loss, y_pred, gradients, state = self._train_pipeline(
                flat, num_slices, x, y, sample_weight
            )
            # Both branches of a switch must return tensors: the gradients that are None
            # and the state nothing changed are left out, and put back after.
            return (loss, y_pred, *optional.pack(gradients, state))

        loss, y_pred, packed_gradients, packed_state = self._dispatch(flat, pipeline)
        gradients, state = optional.unpack(packed_gradients, packed_state)
        self._apply_updates(gradients, trainable, state, non_trainable)
        self._loss_tracker.update_state(loss, sample_weight=slicing.batch_size_of(flat))
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    # ------------------------------------------------------------ the pipelines
    def _dispatch(self, flat_inputs, pipeline):
        """Run `pipeline(n)` with n = microbatches x replicas slices, or 1 for small batches.

        A batch with fewer samples than slices (the short last batch of an epoch, say)
        runs as one slice, so no slice is ever empty. With a batch size unknown at trace
        time a conditional picks the case at run time.
        """
        slices = self.microbatches * self._replicas
        static = slicing.static_batch_size(flat_inputs)
        if slices == 1:
            return pipeline(1)
        if static is not None:
            return pipeline(slices if static >= slices else 1)
        batch_size = slicing.batch_size_of(flat_inputs)
        return tf.cond(batch_size >= slices, lambda: pipeline(slices), lambda: pipeline(1))

    def _forward(self, flat_inputs, num_slices, training, record):
        """Run every stage on every slice; returns the per-(stage, slice) runs."""
        batch_size = slicing.batch_size_of(flat_inputs)
        with tf.device(devices_lib.host_device()), tf.name_scope("slice_batch"):
            if num_slices == 1:
                parts = [flat_inputs]
            else:
                parts = slicing.split_structure(flat_inputs, num_slices, batch_size)
        weights, states = self._read_variables(num_slices)
        model_inputs = self._plan.graph.inputs
        runs = []
        for i, part in enumerate(parts):
            available = {id(t): value for t, value in zip(model_inputs, part)}
            row = []
            for stage in self._stages:
                run = self._run_stage(
                    stage, i, available, weights[stage.index][self._replica_of(i)],
                    trainer.offset_seeds(stage.non_trainable, states[stage.index], i),
                    training, record,
                )
                available.update(run.exports)
                row.append(run)
            runs.append(row)
        sizes = [slicing.batch_size_of(part) for part in parts]
        return runs, sizes, batch_size

    def _replica_of(self, slice_index):
        return slice_index % self._replicas

    def _device(self, stage_index, slice_index):
        return self._grid[stage_index][self._replica_of(slice_index)]

    def _read_variables(self, num_slices):
        """Each stage's trainable values (one copy per replica device in use) and state."""
        weights, states = [], []
        replicas = min(self._replicas, num_slices)
        for stage, row in zip(self._stages, self._grid):
            with tf.device(row[0]), tf.name_scope(f"stage_{stage.index}/read"):
                base = [tf.convert_to_tensor(v.value) for v in stage.trainable]
                states.append([tf.convert_to_tensor(v.value) for v in stage.non_trainable])
            copies = [base]
            for replica in range(1, replicas):
                with tf.device(row[replica]), tf.name_scope(f"stage_{stage.index}/copy"):
                    copies.append([tf.identity(t) for t in base])
            weights.append(copies)
        return weights, states

    def _run_stage(self, stage, slice_index, available, weights, state, training, record):
        device = self._device(stage.index, slice_index)
        scope = f"stage_{stage.index}/slice_{slice_index}/forward"
        with tf.device(device), tf.name_scope(scope):
            run = _StageRun(stage, weights, state)
            tensors = {}
            for tensor in stage.imports + stage.model_inputs:
                tensors[id(tensor)] = _receive(available[id(tensor)])
            run.received = [
                (id(t), tensors[id(t)]) for t in stage.imports
                if tensors[id(t)].dtype.is_floating
            ]
            tape = tf.GradientTape(watch_accessed_variables=False) if record else None
            with tape if record else contextlib.nullcontext():
                if record:
                    tape.watch([value for _, value in run.received])
                    tape.watch(weights)
                mapping = list(zip(stage.trainable, weights)) + list(
                    zip(stage.non_trainable, state)
                )
                with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as sc:
                    collected = set()
                    for node in stage.nodes:
                        args, kwargs = node.arguments.fill_in(tensors)
                        outputs = _call(node.operation, args, kwargs, training)
                        for symbolic, value in zip(node.outputs, tree.flatten(outputs)):
                            tensors[id(symbolic)] = value
                        # A layer clears its own earlier losses when called again, so
                        # collect them after each call.
                        for loss in sc.losses:
                            if id(loss) not in collected:
                                collected.add(id(loss))
                                run.activity_losses.append(loss)
                run.new_state = [sc.get_current_value(v) for v in stage.non_trainable]
                if slice_index == 0:
                    # Weight regularisation is counted once per step, by the first slice.
                    run.regularization_losses = [
                        v.regularizer(w)
                        for v, w in zip(stage.trainable, weights)
                        if getattr(v, "regularizer", None)
                    ]
            run.tape = tape
            run.exports = {id(t): tensors[id(t)] for t in stage.exports}
            run.outputs = [(position, tensors[id(t)]) for position, t in stage.outputs]
        return run

    def _outputs_of(self, row):
        """The model's output structure for one slice, from its stages' runs."""
        flat = [None] * len(tree.flatten(self._plan.graph.outputs))
        for run in row:
            for position, value in run.outputs:
                flat[position] = value
        structure = _compat.outputs_structure(self._plan.graph)
        return _unpack_singleton(tree.pack_sequence_as(structure, flat))

    def _extra_losses(self, runs):
        """The activity losses of each slice, and the weight regularisation losses."""
        activity = [[loss for run in row for loss in run.activity_losses] for row in runs]
        regularization = [loss for row in runs for run in row for loss in run.regularization_losses]
        return activity, regularization

    @staticmethod
    def _weigh_activity(activity, sizes, batch_size):
        return trainer.weigh_by_share(activity, trainer.batch_shares(sizes, batch_size))

    def _predict_pipeline(self, flat_inputs, num_slices, training):
        runs, _, _ = self._forward(flat_inputs, num_slices, training, record=False)
        with tf.device(self._merge_device):
            return slicing.merge_structures([self._outputs_of(row) for row in runs])

    def _test_pipeline(self, flat_inputs, num_slices, x, y, sample_weight):
        runs, sizes, batch_size = self._forward(flat_inputs, num_slices, False, record=False)
        with tf.device(self._merge_device):
            y_pred = slicing.merge_structures([self._outputs_of(row) for row in runs])
            activity, regularization = self._extra_losses(runs)
            weighted = self._weigh_activity(activity, sizes, batch_size)
            loss = self._loss_with(weighted + regularization, x, y, y_pred, sample_weight,
                                   training=False)
        return loss, y_pred

    def _train_pipeline(self, flat_inputs, num_slices, x, y, sample_weight):
        runs, sizes, batch_size = self._forward(flat_inputs, num_slices, True, record=True)

        # The loss once, on the merged batch; its gradients with respect to every slice's
        # outputs (and their logits, which cross-entropies read) and extra losses are what
        # the stages back-propagate.
        output_sources = []
        for row in runs:
            for run in row:
                for _, value in run.outputs:
                    output_sources.append(value)
                    logits = slicing.logits_of(value)
                    if logits is not None:
                        output_sources.append(logits)
        activity_by_slice, regularization = self._extra_losses(runs)
        activity = [loss for losses in activity_by_slice for loss in losses]
        with tf.device(self._merge_device), tf.name_scope("loss"):
            merged = {}

            def merged_loss():
                # Merged under the loss tape: the gradients flow back to every slice.
                weighted = self._weigh_activity(activity_by_slice, sizes, batch_size)
                merged["y_pred"] = slicing.merge_structures(
                    [self._outputs_of(row) for row in runs]
                )
                return self._loss_with(weighted + regularization, x, y, merged["y_pred"],
                                       sample_weight, training=True)

            loss, upstream, _ = self._loss_and_gradients(
                output_sources + activity + regularization, merged_loss
            )
            y_pred = merged["y_pred"]
        seed = {}
        for tensor, grad in zip(output_sources + activity + regularization, upstream):
            if grad is not None:
                seed[id(tensor)] = (tensor, grad)

        # Backward: stage by stage in reverse, each (stage, slice) through its own tape
        # on its own device. Gradients of a stage's inputs seed the stage before.
        weight_grads = [[[] for _ in stage.trainable] for stage in self._stages]
        for i, row in enumerate(runs):
            handed_back = {}
            for run in reversed(row):
                stage = run.stage
                device = self._device(stage.index, i)
                scope = f"stage_{stage.index}/slice_{i}/backward"
                with tf.device(device), tf.name_scope(scope):
                    targets, seeds = [], []
                    for tensor_id, value in run.exports.items():
                        if handed_back.get(tensor_id) is not None:
                            targets.append(value)
                            seeds.append(handed_back[tensor_id])
                    candidates = [value for _, value in run.outputs]
                    candidates += [
                        slicing.logits_of(v) for v in candidates if slicing.logits_of(v) is not None
                    ]
                    candidates += run.activity_losses + run.regularization_losses
                    for tensor in candidates:
                        if id(tensor) in seed:
                            targets.append(tensor)
                            seeds.append(tf.cast(seed[id(tensor)][1], tensor.dtype))
                    sources = [value for _, value in run.received] + list(run.weights)
                    if targets:
                        grads = run.tape.gradient(targets, sources, output_gradients=seeds)
                    else:
                        grads = [None] * len(sources)
                count = len(run.received)
                handed_back = {
                    tensor_id: grad for (tensor_id, _), grad in zip(run.received, grads[:count])
                }
                for j, grad in enumerate(grads[count:]):
                    weight_grads[stage.index][j].append(grad)

        gradients, new_state = [], []
        for stage, row in zip(self._stages, self._grid):
            with tf.device(row[0]), tf.name_scope(f"stage_{stage.index}/accumulate"):
                gradients.extend(
                    trainer.sum_gradients(parts) for parts in weight_grads[stage.index]
                )
                stage_runs = [r[stage.index] for r in runs]
                new_state.extend(
                    trainer.combine_state(
                        stage.non_trainable,
                        [run.state_in for run in stage_runs],
                        [run.new_state for run in stage_runs],
                        trainer.batch_shares(sizes, batch_size),
                    )
                )
        return loss, y_pred, gradients, new_state

    # ------------------------------------------------------------------- helpers
    @property
    def _merge_device(self):
        # The loss is computed next to the last stage, where the outputs usually are.
        return self._grid[-1][0]

    def _standardize(self, inputs):
        return _compat.standardize_inputs(self._plan.graph, inputs)


def split_model(model, devices, boundaries=None, microbatches=1):
    """Split a model's layers across devices: model parallelism with micro-batch pipelining.

    Use it when a model does not fit on one device: each device holds only the variables
    (and optimizer slots) of its stage. The model's layers, in topological order (the
    order of `model.layers`), are cut into contiguous stages, one per device. With
    `microbatches=k`, each batch is cut into k micro-batches that flow through the stages
    so that the devices work at the same time (GPipe); gradients are accumulated over
    the micro-batches and applied once per batch, so the result equals k=1 (to float
    rounding; BatchNormalization aside, which normalises each micro-batch on its own).

    Where a model can be cut: every tensor a stage reads from another stage must come
    from the stage immediately before it. The model's inputs may be read by any stage and
    its outputs computed by any stage. A branch that would skip a stage (a residual
    connection spanning a whole stage) is an error; so is a shared layer whose calls fall
    in different stages, or a variable shared by layers of different stages.

    Args:
        model: a built Sequential or functional `keras.Model`. It is not copied: its
            variables are moved to the stages' devices (in place) and trained.
        devices: one device per stage: an int (the first n visible devices), a list of
            device ids or names, or None for all visible devices. A list of lists
            (S lists of R devices each) also replicates each stage on R devices (data
            parallelism inside each stage).
        boundaries: None to balance the stages by parameter bytes (among the cuts that
            minimise the largest stage, the one that best balances the per-sample
            activation estimate), or a list of S-1 layer names: the first layer of each
            stage after the first.
        microbatches: micro-batches per batch, >= 1. A batch with fewer samples than
            micro-batches x replicas runs as one micro-batch.

    Returns:
        A `SplitModel` (a `keras.Model`): compile, fit, evaluate, predict and save it like
        the original. `summary()` prints each stage's devices, layers, parameter bytes and
        activation bytes per sample; `stage_report()` returns them.

    Raises:
        ValueError: for a model without a layer graph (subclassed), more stages than
            layers, a boundary naming a missing layer or out of order, boundaries that
            cut a branch (see above), or microbatches < 1.

    Example:

    ```python
    import kerasmgpu
    from kerasmgpu.split import split_model

    kerasmgpu.simulate_devices(2)  # only on a machine without GPUs
    split = split_model(model, devices=2, microbatches=4)
    split.summary()
    split.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    split.fit(x, y, batch_size=256)
    split.save("model.keras")  # an ordinary Keras model file
    ```
    """
    _check_no_custom_steps(model)
    plan = Plan(model)
    microbatches = options.whole_number(microbatches, "microbatches", minimum=1)
    grid = _resolve_grid(devices)
    num_stages = len(grid)
    if num_stages > len(plan.units):
        raise ValueError(
            f"{num_stages} devices need {num_stages} stages of at least one layer each, but "
            f"the model {model.name!r} has only {len(plan.units)} layer(s) "
            f"({[u.name for u in plan.units]}). Use at most {len(plan.units)} device(s)."
        )
    if not model.built:
        raise ValueError(f"The model {model.name!r} is not built; build it before splitting.")
    if boundaries is None:
        cuts = plan.balanced_cuts(num_stages)
    else:
        cuts = plan.cuts_from_names(boundaries, num_stages)
    return SplitModel(model, plan, cuts, grid, microbatches)


def _check_no_custom_steps(model):
    """Refuse a model whose class overrides a step: the pipeline runs its own steps.

    A pipeline step is the layer graph's forward pass cut into stages; a user's own
    train_step (a GAN's two optimizers, a VAE's losses) is not a layer graph, and running
    the pipeline's step instead would silently train something else.
    """
    steps = custom_steps.overridden_steps(model)
    if steps:
        raise ValueError(
            f"The model {model.name!r} overrides {', '.join(f'{s}()' for s in steps)}, which "
            "split_model cannot run: a pipeline runs its own steps over the stages of the "
            "model's layer graph, so yours would be ignored. Wrap it with "
            "kerasmgpu.multi_gpu_model instead (data parallelism runs your own step, each "
            "model call split across the devices), or override compute_loss instead of "
            f"train_step. Received: a model of type {type(model).__name__} whose class "
            f"defines {', '.join(steps)}"
        )


def format_report(report, microbatches=1):
    """Lines of a table of `SplitModel.stage_report()`."""
    header = (
        f"{'stage':<6}{'device(s)':<28}{'layers':<32}{'parameters':>12}"
        f"{'param bytes':>14}{'act bytes/sample':>18}"
    )
    lines = [header, "-" * len(header)]
    for entry in report:
        layers = entry["layers"]
        span = layers[0] if len(layers) == 1 else f"{layers[0]} .. {layers[-1]} ({len(layers)})"
        devices = ", ".join(d.split("device:")[-1] for d in entry["devices"])
        lines.append(
            f"{entry['stage']:<6}{devices:<28}{span[:31]:<32}{entry['parameters']:>12,}"
            f"{entry['parameter_bytes']:>14,}{entry['activation_bytes_per_sample']:>18,}"
        )
    total = sum(e["parameter_bytes"] for e in report)
    largest = max(e["parameter_bytes"] for e in report)
    lines.append("-" * len(header))
    lines.append(
        f"parameter bytes: {total:,} in total, {largest:,} on the largest stage "
        f"({largest / max(total, 1):.0%}); micro-batches per batch: {microbatches}"
    )
    return lines


# ---------------------------------------------------------------------------------
class _StageRun:
    """What one (stage, slice) forward pass leaves for the backward pass."""

    def __init__(self, stage, weights, state):
        self.stage = stage
        self.weights = weights
        self.state_in = state
        self.received = []
        self.activity_losses = []
        self.regularization_losses = []
        self.new_state = []
        self.exports = {}
        self.outputs = []
        self.tape = None


def _resolve_grid(devices):
    if isinstance(devices, (list, tuple)) and devices and all(
        isinstance(row, (list, tuple)) for row in devices
    ):
        try:
            grid = [
                devices_lib.resolve_devices(list(row), minimum=1, argument="devices")
                for row in devices
            ]
        except ValueError as error:
            raise ValueError(f"Cannot use devices={devices!r}: {error}") from None
        widths = {len(row) for row in grid}
        if len(widths) != 1:
            raise ValueError(
                "With a list of device lists, every stage needs the same number of devices. "
                f"Received: devices={devices}"
            )
        flat = [d for row in grid for d in row]
        if len(set(flat)) != len(flat):
            raise ValueError(f"A device appears twice in devices={devices}.")
        return grid
    try:
        return [[d] for d in devices_lib.resolve_devices(devices, minimum=1, argument="devices")]
    except ValueError as error:
        raise ValueError(f"Cannot use devices={devices!r}: {error}") from None


def _receive(value):
    """A copy of `value` on the current device (with its Keras mask, if any)."""
    received = tf.identity(value)
    mask = _compat.keras_mask(value)
    if mask is not None:
        _compat.set_keras_mask(received, tf.identity(mask))
    return received


def _call(operation, args, kwargs, training):
    # As a functional model does: pass `training` to the layers whose call takes it.
    if training is not None and "training" in getattr(operation, "_call_context_args", ()):
        kwargs = dict(kwargs, training=training)
    return operation(*args, **kwargs)


def _unpack_singleton(structure):
    if isinstance(structure, (list, tuple)) and len(structure) == 1:
        return structure[0]
    return structure
