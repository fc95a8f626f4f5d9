"""Custom training steps: a template's own train_step, test_step or predict_step, wrapped.

Keras 2's `multi_gpu_model` never ran a training step per replica: it sliced the model's
forward pass across devices and merged the outputs, and the step ran once. kerasmgpu does
the same for a template whose class overrides `train_step`, `test_step` or
`predict_step` (a GAN, a VAE, a contrastive model, keras.io's "Customizing what happens
in fit()"): the user's step runs once, on the global batch, and every model call inside
it — `self(x)`, `self.generator(z)`, `self.discriminator(x)`, `self.encoder(x)` — is a
*sliced call*:

1. the call's inputs are cut into the replicas' contiguous slices on the host;
2. replica i runs the model's forward pass on its slice on device i, statelessly (state
   updates returned; random seeds offset by i, as in the standard step). That forward
   pass is one `tower.ReplicaProgram` per model and call arguments (`training=...`),
   traced once per input signature and called on every replica's device, as in the
   standard step: tracing does not grow with the number of devices;
3. the outputs are concatenated on the merge device, so the step sees the call's
   whole-batch result; non-trainable state (BatchNormalization moving statistics) gets one
   share-weighted update;
4. the backward pass of replica i runs on device i too: each replica's forward is a
   `tf.custom_gradient` whose gradient function runs the replica's backward under
   `tf.device`. It reuses the forward's own tape (no recomputation) unless a recording
   tape differentiates the gradient itself — WGAN-GP's gradient penalty, a gradient of a
   gradient — in which case it recomputes the forward under that tape, so second-order
   gradients flow through the forward pass as on one device.

Losses, noise the step draws (`keras.random.normal(seed=self.seed_generator)`), metric
updates and every `optimizer.apply` happen once, exactly as on one device: a GAN's
generator step reads the discriminator its discriminator step just updated, and training
equals one device up to float rounding. Only the outermost call is sliced: a model called
inside a sliced call (an encoder inside a VAE's `call`) runs as part of its replica's
forward pass.

With `variables="replicated"`, replica i's forward pass reads its own copy of the
weights, and every copy a step's `optimizer.apply` changed is refreshed from the template
right after that apply, so the copies stay identical to the template after each apply.
The gradients are still taken with respect to the template's weights (the user's tape
asks for those) and summed by TensorFlow's gradient aggregation.

One module (about 640 lines): the sliced call, its replicas' custom gradient, the
cross-worker crossings (`_AcrossWorkers`) and the synchronized-BatchNorm and added-loss
handling are one mechanism, each reading the others' state inside one call; split, every
piece would import the call's internals back.
"""

import contextlib
import inspect
import threading

import keras
import tensorflow as tf
from keras import tree

from kerasmgpu import _compat, slicing, trainer
from kerasmgpu import devices as devices_lib
from kerasmgpu import tower as tower_lib

STEPS = ("train_step", "test_step", "predict_step")


def overridden_steps(model):
    """The step methods among train_step/test_step/predict_step that `model`'s class overrides."""
    return [step for step in STEPS if getattr(type(model), step) is not getattr(keras.Model, step)]


def overrides_compile(model):
    """Whether `model`'s class has its own `compile` (a GAN's `compile(d_optimizer=...)`)."""
    return type(model).compile is not keras.Model.compile


def check_built(model):
    """Refuse a custom-step model whose variables do not all exist yet.

    Keras never marks a model built when it has no `call()` (a keras.io GAN or VAE is a
    container of sub-models its step calls); such a model is ready to wrap as soon as the
    sub-models are. Raises a ValueError naming the first unbuilt sub-model.
    """
    if model.built:
        return
    parts = [layer for layer in _compat.flatten_layers(model)[1:]]
    unbuilt = [layer for layer in parts if not layer.built]
    if unbuilt or not parts:
        what = (
            f"its sub-model or layer {unbuilt[0].name!r} is not built" if unbuilt
            else "it has no sub-models or layers yet"
        )
        raise ValueError(
            f"The model {model.name!r} is not built and {what}: its variables do not exist "
            "yet. A model with its own train_step is wrapped once the models its step calls "
            "are built (give each a keras.Input, call build(input_shape), or call it on a "
            f"batch). Received: a {type(model).__name__} with built=False"
        )


def compile_takes(model, argument):
    """Whether `model.compile` takes `argument` (Keras' does; a GAN's own may not)."""
    parameters = inspect.signature(model.compile).parameters.values()
    return any(p.name == argument or p.kind is p.VAR_KEYWORD for p in parameters)


def find_optimizers(model, *others):
    """`others` and every distinct optimizer `model` holds (a GAN's d_ and g_optimizer)."""
    found = []
    candidates = list(others) + [getattr(model, "optimizer", None)] + list(vars(model).values())
    for candidate in candidates:
        if isinstance(candidate, keras.optimizers.Optimizer) and all(
            candidate is not seen for seen in found
        ):
            found.append(candidate)
    return found


class SlicedCalls:
    """While active, every outermost call of the template's models runs sliced across devices.

    Args:
        template: the wrapped model, whose step runs.
        devices: the replica devices, in replica order.
        merge_device: where the slices' outputs are concatenated.
        comm: the communication strategy (its `replica_variables` gives replica i's copy).
        seed_offset: the first replica's offset of random seed states (0 on one machine).
        workers: the cluster (`kerasmgpu.cluster.worker.Cluster`) when the step runs on
            several workers: each call is then split over every worker's devices
            (`_AcrossWorkers`); None or one worker: this machine's devices.
        synchronizer: the wrapper's `batchnorm.Synchronizer`: a training call of a model
            holding synchronized BatchNormalization layers normalises with the statistics
            of the call's whole batch, its replicas traced one by one (no shared program).

    Example (inside `ParallelModel.train_step`):

    ```python
    with SlicedCalls(template, devices, "/cpu:0", comm).active(optimizers):
        logs = template.train_step(data)
    ```
    """

    def __init__(self, template, devices, merge_device, comm, seed_offset=0, workers=None,
                 synchronizer=None):
        self.template = template
        self.synchronizer = synchronizer
        self.across = (
            _AcrossWorkers(workers) if workers is not None and workers.num_workers > 1
            else None
        )
        self.devices = list(devices)
        self.merge_device = merge_device
        self.comm = comm
        self.seed_offset = seed_offset
        self._local = threading.local()
        # (id(model), the call's extra arguments) -> the tower.ReplicaProgram every
        # replica of such a call runs.
        self._programs = {}
        self.jit_compile = False
        self._training_step = False  # set by `active`

    def compile_programs(self, jit_compile):
        """Compile (or not) every sliced call's replica program with XLA for its device,
        from the next step traced on (set by the wrapper's compile)."""
        if bool(jit_compile) != self.jit_compile:
            self.jit_compile = bool(jit_compile)
            self._programs = {}

    @property
    def programs(self):
        """The replica programs of the sliced calls so far, one per model and call
        arguments (each `traces` once per input signature, whatever the number of
        devices)."""
        return list(self._programs.values())

    def program(self, model, args, kwargs):
        """The program replicas run for `model(inputs, *args, **kwargs)`, made on first use.

        None when the extra arguments are not all Python values (a tensor passed beside
        the inputs): such a call is traced per replica, inline, as before.
        """
        leaves = tree.flatten([list(args), dict(kwargs)])
        if not all(leaf is None or isinstance(leaf, (bool, int, float, str)) for leaf in leaves):
            return None
        key = (id(model), repr((tuple(args), sorted(kwargs.items()))))
        if key not in self._programs:
            self._programs[key] = tower_lib.ReplicaProgram(
                model, bool(kwargs.get("training", False)), jit_compile=self.jit_compile,
                call_args=args, call_kwargs=kwargs, scope=self._inside_replica,
            )
        return self._programs[key]

    # ------------------------------------------------------------ interception
    @property
    def _depth(self):
        return getattr(self._local, "depth", 0)

    @contextlib.contextmanager
    def _inside_replica(self):
        """Model calls made in here are part of a replica's forward pass: not sliced."""
        self._local.depth = self._depth + 1
        try:
            yield
        finally:
            self._local.depth -= 1

    @contextlib.contextmanager
    def active(self, optimizers=(), copies=True):
        """Slice the template's model calls (and refresh replica copies after each apply).

        Args:
            optimizers: the optimizers the step may apply (replicated layout: each apply
                is followed by a refresh of the copies it changed).
            copies: whether replicas read their own copies of the weights (a training
                step, replicated layout); otherwise every replica reads the template's.
        """
        patched, wrapped_optimizers = [], []
        self._use_copies = copies
        self._training_step = copies
        try:
            for model in _callable_models(self.template):
                if "call" in vars(model):
                    continue  # someone else (a distillation teacher) already places it
                model.call = self._intercept(model, model.call)
                patched.append(model)
            if self._copies() is not None:
                for optimizer in optimizers:
                    optimizer.apply = self._refreshing_apply(optimizer, optimizer.apply)
                    wrapped_optimizers.append(optimizer)
            yield
        finally:
            for model in patched:
                del model.call
            for optimizer in wrapped_optimizers:
                del optimizer.apply

    def _intercept(self, model, original):
        def sliced_call(*args, **kwargs):
            if self._depth or not args:
                return original(*args, **kwargs)
            return self.call(model, args[0], args[1:], kwargs)

        return sliced_call

    # --------------------------------------------------------------- the call
    def call(self, model, inputs, args, kwargs):
        """`model(inputs, *args, **kwargs)` on the global batch, run slice by slice."""
        if "training" not in kwargs and not args:
            # The mode Keras resolved for this call, so that its slices (and their
            # recomputation for a second derivative, outside this call) run in it too.
            training = _compat.call_context_training()
            if training is not None:
                kwargs = {**kwargs, "training": training}
        training = bool(kwargs.get("training", False))
        static = slicing.static_batch_size(inputs)
        count = len(self.devices) if static is None else max(1, min(len(self.devices), static))
        across = self.across
        with tf.device(devices_lib.host_device()), tf.name_scope("slice_call"):
            size = slicing.batch_size_of(inputs)
            mine = inputs if across is None else across.rows(inputs, size)
            bounds = [None] if count == 1 else slicing.slice_bounds(
                slicing.batch_size_of(mine), count)
            parts = [mine if rows is None else slicing.rows_of(mine, *rows)
                     for rows in bounds]
        trainable = list(model.trainable_variables)
        state = list(model.non_trainable_variables)
        values = [tf.convert_to_tensor(v.value) for v in trainable]
        if across is not None:
            values = across.summing_gradients(values)
        copies = self._copies()
        group = self._batchnorm_group(model, count)
        # Synchronized statistics meet in collectives keyed and placed per replica: those
        # replicas are traced one by one, not as one shared program.
        program = None if group is not None else self.program(model, args, kwargs)
        replicas = []
        for i, part in enumerate(parts):
            synchronized = contextlib.nullcontext() if group is None else group.replica(i)
            with tf.device(self.devices[i]), tf.name_scope(f"replica_{i}"), synchronized:
                state_in = [tf.convert_to_tensor(v.value) for v in state]
                if training or self._training_step:
                    # Own seeds per replica (a layer may train whatever the call says:
                    # `Dropout(...)(x, training=True)` in a functional model).
                    state_in = trainer.offset_seeds(state, state_in, self.seed_offset + i)
                local = None
                if copies is not None and i > 0:
                    local = [
                        tf.convert_to_tensor(copies[i].get(id(v), v).value) for v in trainable
                    ]
                replica = _Replica(self, model, i, args, kwargs, trainable, state, program)
                replica.synchronized = group is not None
                replica.run(part, values, local, state_in)
            replicas.append(replica)
        with tf.device(self.merge_device), tf.name_scope("merge_call"):
            outputs = slicing.merge_structures([r.outputs for r in replicas])
            if across is not None:
                outputs = across.gather(outputs, size)
        if state:
            # What the replicas wrote, whatever the call's `training` (a layer built with
            # `training=True` updates its moving statistics in any call); nothing when
            # they wrote nothing.
            self._update_state(state, replicas, size)
        self._add_losses(model, replicas, size)
        return outputs

    def _add_losses(self, model, replicas, size):
        """The losses the replicas' layers added, as one loss of the call, on `model`.

        Each slice's loss weighted by its share of the call's batch (Keras divides an
        activity regularization by the batch size of its call), summed: the whole
        batch's loss, added where a call on one device adds it, so `model.losses` (and
        `compute_loss`) reads it after the call, as on one device.
        """
        if not any(r.losses for r in replicas):
            return
        shares = trainer.batch_shares([r.size for r in replicas], size)
        with tf.device(self.merge_device), tf.name_scope("merge_losses"):
            total = tf.add_n(trainer.weigh_by_share([r.losses for r in replicas], shares))
            if self.across is not None:
                total = self.across.summed(total)
        model.add_loss(total)

    def _batchnorm_group(self, model, count):
        """The synchronized-BatchNormalization group of this call's replicas, or None
        (the model has no synchronized layer, or the step is not a training step).

        In a training step, whatever the call's own `training` argument: a layer may run
        in training mode regardless (a functional model built with
        `BatchNormalization(...)(x, training=True)`), and one in inference mode computes
        no batch statistics, so the group costs it nothing but a traced-per-replica call.
        """
        layers = set(map(id, self.synchronizer.layers)) if self.synchronizer else set()
        if not any(id(layer) in layers for layer in _compat.flatten_layers(model)):
            return None
        group = self.synchronizer.step(self.devices[:count], self._training_step)
        return group if group.synchronizes else None

    def _update_state(self, state, replicas, size):
        shares = trainer.batch_shares([r.size for r in replicas], size)
        combined = trainer.combine_state(
            state, [r.state_in for r in replicas], [r.state_out for r in replicas], shares
        )
        if self.across is not None:
            # Every worker's share-weighted statistics summed; seed states as the first
            # replica of the cluster leaves them (this worker's first is offset).
            combined = self.across.workers.combine_state(state, combined)
            combined = trainer.unoffset_seeds(state, combined, self.seed_offset)
        for variable, value in zip(state, combined):
            if value is not None:
                variable.assign(value)

    # ------------------------------------------------------ replicated copies
    def _copies(self):
        """Per replica, {id(template variable): that replica's copy}, or None (one copy)."""
        if (not getattr(self, "_use_copies", False)
                or getattr(self.comm, "name", "central") != "replicated"
                or not self.comm.built):
            return None
        trainable = self.template.trainable_variables
        return [
            {id(v): c for v, c in zip(trainable, self.comm.replica_variables(i, trainable))}
            for i in range(len(self.devices))
        ]

    def _refreshing_apply(self, optimizer, original):
        def apply(grads, trainable_variables=None):
            result = original(grads, trainable_variables)
            applied = trainable_variables
            if applied is None:
                applied = _compat.optimizer_variables(optimizer)
            self._refresh(list(applied))
            return result

        return apply

    def _refresh(self, variables):
        """Copy the just-updated template variables to every other replica's copy."""
        copies = self._copies()
        for i in range(1, len(self.devices)):
            with tf.device(self.devices[i]), tf.name_scope(f"replica_{i}_refresh"):
                for variable in variables:
                    copy = copies[i].get(id(variable))
                    if copy is not None and copy is not variable:
                        copy.assign(variable.value)


class _Replica:
    """One replica's part of a sliced call: its forward pass and its backward function."""

    def __init__(self, calls, model, index, args, kwargs, trainable, state, program=None):
        self.calls = calls
        self.model = model
        self.index = index
        self.device = calls.devices[index]
        self.args, self.kwargs = args, kwargs
        self.trainable, self.state = trainable, state
        self.program = program

    def forward(self, inputs, values, state_in):
        """The model on this slice, with `values` for its weights.

        Through the call's replica program (traced once for all replicas, called here on
        this replica's device), or traced inline when the call has none. Returns
        `(outputs, state after, losses the layers added)`.
        """
        if self.program is not None:
            return self.program(inputs, values, state_in)
        mapping = list(zip(self.trainable, values)) + list(zip(self.state, state_in))
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as scope, \
                self.calls._inside_replica():
            outputs = self.model(inputs, *self.args, **self.kwargs)
            losses = list(scope.losses)
        state_out = [
            given if scope.get_current_value(v) is None else scope.get_current_value(v)
            for v, given in zip(self.state, state_in)
        ]
        return outputs, state_out, losses

    def run(self, part, values, local_values, state_in):
        """Run the forward pass (on this device) as one differentiable operation.

        `values` are the template's weights (what the step differentiates); `local_values`
        this replica's copy of them, read instead when given (replicated layout).
        """
        self.size = slicing.batch_size_of(part)
        self.state_in = state_in
        flat_inputs = tree.flatten(part)
        structure = part
        counts = (len(flat_inputs), len(values), len(local_values or []))
        replica = self

        @tf.custom_gradient
        def tower(*tensors):
            inputs = list(tensors[: counts[0]])
            weights = list(tensors[counts[0]: counts[0] + counts[1]])
            local = list(tensors[counts[0] + counts[1]: sum(counts)]) or weights
            given_state = list(tensors[sum(counts):])
            sources = inputs + local
            differentiable = [_floating(t) for t in sources]
            with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
                tape.watch([t for t, d in zip(sources, differentiable) if d])
                outputs, state_out, losses = replica.forward(
                    tree.pack_sequence_as(structure, inputs), local, given_state
                )
            leaves, logits = _outputs_with_logits(outputs)
            replica.structure = outputs
            replica.state_out = state_out
            replica.has_logits = [t is not None for t in logits]
            # The losses the layers added (activity regularization, add_loss) are
            # outputs too: the step's loss may read them, and differentiate them.
            produced = leaves + [t for t in logits if t is not None] + list(losses)

            def backward(*upstream):
                with tf.device(replica.device), tf.name_scope(f"replica_{replica.index}_backward"):
                    pairs = [(t, g) for t, g in zip(produced, upstream) if g is not None]
                    if not pairs:
                        return [None] * len(tensors)
                    if _compat.recorded_by_outer_tape(list(tensors) + list(upstream)):
                        if replica.synchronized:
                            raise ValueError(
                                "A gradient of a gradient (e.g. a gradient penalty) through "
                                f"the model {replica.model.name!r}, whose synchronized "
                                "BatchNormalization statistics are summed across replicas, "
                                "is not supported in a custom step: its forward pass would "
                                "have to be recomputed with the replicas meeting again. "
                                "Use BatchNormalization(synchronized=False) in that model "
                                "(each replica normalises its slice) or no gradient "
                                "penalty. Received: a second-order gradient through "
                                f"{replica.model.name!r}"
                            )
                        # Something differentiates this gradient (a gradient penalty):
                        # recompute the forward pass under the recording tapes, reading
                        # the template's weights, so the second derivative is exact.
                        grads = replica.recomputed_gradients(
                            structure, inputs, weights, given_state, upstream
                        )
                    else:
                        grads = tape.gradient(
                            [t for t, _ in pairs], sources,
                            output_gradients=[g for _, g in pairs],
                        )
                    grads = [g if d else None for g, d in zip(grads, differentiable)]
                input_grads = grads[: counts[0]]
                weight_grads = grads[counts[0]:]
                # The local copy's gradient is the template weights' (they are equal).
                return (input_grads + weight_grads + [None] * counts[2]
                        + [None] * len(given_state))

            return produced, backward

        tensors = flat_inputs + list(values) + list(local_values or []) + list(state_in)
        try:
            produced = tower(*tensors)
        except TypeError as error:
            if "keyword argument 'variables'" not in str(error):
                raise
            # The call read a variable that the called model does not track (passed in,
            # it would be differentiated; read directly inside the replica, it cannot be).
            raise ValueError(
                f"The model {self.model.name!r}, called inside a custom step, reads "
                "variables it does not track (e.g. another model's weight reached through "
                "a closure), which kerasmgpu cannot differentiate per replica. Hold the "
                "shared layer or weight as an attribute of a layer of this model, so that "
                "it is among its variables, or call the models separately. TensorFlow "
                f"said: {str(error).splitlines()[0][:300]}"
            ) from None
        leaves_count = len(tree.flatten(self.structure))
        leaves, extra = list(produced[:leaves_count]), iter(produced[leaves_count:])
        for leaf, has in zip(leaves, self.has_logits):
            if has:
                _compat.set_keras_logits(leaf, next(extra))
        self.outputs = tree.pack_sequence_as(self.structure, leaves)
        self.losses = list(extra)

    def recomputed_gradients(self, structure, inputs, weights, state_in, upstream):
        sources = inputs + weights
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch([t for t in sources if _floating(t)])
            outputs, _, losses = self.forward(
                tree.pack_sequence_as(structure, inputs), weights, state_in)
        leaves, logits = _outputs_with_logits(outputs)
        produced = leaves + [t for t in logits if t is not None] + list(losses)
        pairs = [(t, g) for t, g in zip(produced, upstream) if g is not None]
        return tape.gradient(
            [t for t, _ in pairs], sources, output_gradients=[g for _, g in pairs]
        )


class _AcrossWorkers:
    """A sliced call split over the workers of a cluster, with gradients kept whole.

    Every worker runs the template's step identically, on the global batch (gathered
    first with sharded input): the same noise, losses, metrics and updates. A model call
    inside it runs this worker's rows of the call's batch (an even split over the
    workers, `Cluster.call_rows`) on this worker's devices, and the outputs are gathered
    from every worker, so the step sees the whole call's result everywhere.

    What crosses between the global step and this worker's rows is differentiable, and
    keeps every gradient the step can see whole and equal on every worker:

    - taking this worker's rows: the gradient is every worker's rows' gradient,
      gathered (a gradient with respect to a call's inputs, a gradient penalty's);
    - gathering the outputs: the gradient is this worker's rows of the (whole) upstream;
    - the weights a call reads: their gradient, this worker's replicas' share, is summed
      over the workers (one all-reduce per call's backward pass), so the step's
      `optimizer.apply` gets the whole gradient, as on one machine.

    Each gradient is itself differentiable the same way (a gradient of a gradient, as in
    WGAN-GP, crosses back), and the collectives are keyed in the order they are traced,
    which is the same on every worker since every worker traces the same step.
    """

    def __init__(self, workers):
        self.workers = workers

    def rows(self, structure, size):
        start, stop = self.workers.call_rows(size)
        return tree.map_structure(
            lambda t: self._rows(t, size) if _floating(t) else t[start:stop], structure
        )

    def _rows(self, tensor, size):
        start, stop = self.workers.call_rows(size)

        @tf.custom_gradient
        def rows(whole):
            return tf.identity(whole[start:stop]), lambda upstream: self._gather(upstream, size)

        return rows(tensor)

    def _gather(self, tensor, size):
        @tf.custom_gradient
        def gather(mine):
            return (self.workers.gather_call(mine, size),
                    lambda upstream: self._rows(upstream, size))

        return gather(tensor)

    def gather(self, structure, size):
        """The call's outputs (with their Keras logits and masks) from every worker."""
        def join(parts):
            part = parts[0]
            return self._gather(part, size) if _floating(part) else (
                self.workers.gather_call(part, size))

        return tree.map_structure(lambda leaf: slicing.join_leaf([leaf], join), structure)

    def summing_gradients(self, values):
        """`values` unchanged; their gradient summed over the workers."""
        @tf.custom_gradient
        def read(*tensors):
            def backward(*upstream):
                return self._summed(list(upstream))

            return [tf.identity(t) for t in tensors], backward

        return list(read(*values))

    def summed(self, tensor):
        """`tensor` summed over the workers; each worker's part gets the whole gradient."""
        return self._summed([tensor])[0]

    def _summed(self, tensors):
        present = [t for t in tensors if t is not None]
        if not present:
            return list(tensors)

        @tf.custom_gradient
        def total(*parts):
            # The sum is the same on every worker, and so is the gradient that reaches
            # it: each worker's part gets it as it is.
            return self.workers.all_reduce_sum(list(parts)), lambda *upstream: list(upstream)

        summed = iter(total(*[tf.convert_to_tensor(t) for t in present]))
        return [None if t is None else next(summed) for t in tensors]


def _floating(tensor):
    return tensor.dtype.is_floating or tensor.dtype.is_complex


def _outputs_with_logits(outputs):
    """The output leaves and, for each, the logits a Keras loss would read (or None)."""
    leaves = tree.flatten(outputs)
    return leaves, [slicing.logits_of(leaf) for leaf in leaves]


def _callable_models(template):
    """The template and every model nested in it: what a step may call."""
    return [
        layer for layer in _compat.flatten_layers(template)
        if isinstance(layer, keras.Model)
    ]


def check_options(template, strategy):
    """Refuse, at wrap time, the options a template's own step cannot run with exactly."""
    steps = ", ".join(overridden_steps(template))
    if strategy.sync_period != 1:
        raise ValueError(
            f"The model {template.name!r} overrides {steps}: its step runs once and applies "
            "every update once, as on one device, so there are no replicas' weights to "
            "average every few steps. Use sync_period=1 (synchronous training). "
            f"Received: sync_period={strategy.sync_period}"
        )
    sharded = getattr(strategy, "shards_optimizer_state", False)
    gradient_dtype = getattr(strategy, "gradient_dtype", "float32")
    if sharded or gradient_dtype != "float32":
        raise ValueError(
            f"The model {template.name!r} overrides {steps}: its step calls each optimizer "
            "itself, once, on whole gradients, so the optimizer state cannot be sharded nor "
            "the gradients sent in 16 bits. Use optimizer_state='full' and "
            "gradient_dtype='float32'. Received: optimizer_state="
            f"{'sharded' if sharded else 'full'!r}, gradient_dtype={gradient_dtype!r}"
        )
