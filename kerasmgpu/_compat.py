"""Every private Keras and TensorFlow internal kerasmgpu relies on, in one place.

Each function below wraps one internal, says why no public way does the job, and was
tested with Keras 3.10-3.15 / TensorFlow 2.16-2.21 (the suite runs on Keras 3.15.1 and
TensorFlow 2.21). When an upgrade breaks one, this is the file to fix.

- `Trainer._compute_loss`: call a template's `compute_loss` override as Keras does (with or
  without `training`).
- `Layer._losses_override`: a template's `compute_loss` override reads `self.losses`, whose
  losses are collected by hand during a stateless step.
- `Layer._flatten_layers()`: every nested layer of a template (`model.layers` lists only the
  top level).
- `tensor._keras_logits`, `tensor._keras_mask`: the logits a Keras cross-entropy reads and
  an output's mask, attached to tensors by Keras.
- `Variable._initialize(value)`: move a variable's storage to another device in place, so
  the user's model keeps its variable objects.
- `BackupAndRestore._save_model`: workers other than the chief restore but never write
  (the callback has no read-only option).
- `Functional._nodes_by_depth`, `_outputs_struct`, `_standardize_inputs`: cutting a
  functional model into pipeline stages (Keras has no public graph walk).
- `BatchNormalization._moments`, `_reduction_axes`: synchronized BatchNorm statistics
  between the replicas of a process.
- `context.context()._context_handle`, `configure_coordination_service`: joining a cluster
  before TensorFlow starts (tf.distribute sets these up only inside its strategies).
- `tf.distribute.MultiWorkerMirroredStrategy` is built (public) only to start the worker's
  server and collectives; kerasmgpu then issues its own collectives.
- `Trainer._maybe_symbolic_build`: build a model's optimizer and metrics before tracing a
  step by hand (`measure_traffic`).
- the eager context's run-metadata switches: the partition graphs of one step, with every
  cross-device transfer (`measure_traffic`); TF2 has no public run-metadata API.
- `FuncGraph._functions`, `is_control_flow_graph`, `outer_graph`: the graphs nested in a
  step, and the step around a branch (collective keys that match across branches).
- `Trainer._maybe_symbolic_build`, `_compile_metrics`, `_compile_loss`, the epoch
  iterator's `_get_iterator`, `backend.compute_output_spec`: build compiled metrics
  before a step is traced (built in the trace, they make TensorFlow trace it twice).
- `keras.src.trainers.trainer.model_supports_jit`: resolve `jit_compile="auto"` for each
  replica's program as Keras resolves it for one device.
- `Dataset._as_serialized_graph`, `_AutoShardDataset`: which ops a tf.data pipeline runs,
  and tf.data's FILE auto-shard rewrite (`kerasmgpu.cluster.shard`).
- `Optimizer._exclude_from_weight_decay`, `_exclude_from_weight_decay_pattern`: whether an
  optimizer excludes variables from weight decay (sharded optimizer state cannot; Keras
  has a setter but no getter).
- `record.should_record_backprop`, Keras' `current_call_ctx`, `Trainer._loss_tracker` /
  `_compile_metrics` / `_compile_loss`, `BaseOptimizer._trainable_variables`: a template's
  own train_step (`kerasmgpu.custom_steps`): whether a tape differentiates a gradient, the
  training mode of the call being sliced, which metrics compile made, what `apply` updates.
"""

import contextlib


@contextlib.contextmanager
def losses_override(model, losses):
    """Make `model.losses` return `losses` (and nothing else) inside the block."""
    # private: Layer.losses returns `_losses_override` when it is set (Keras 3).
    previous = model._losses_override
    model._losses_override = list(losses)
    try:
        yield
    finally:
        model._losses_override = previous


def flatten_layers(model):
    """Every layer of `model`, nested ones included (the model itself first)."""
    # private: Layer._flatten_layers; model.layers lists only the top level.
    return list(model._flatten_layers())


def keras_logits(tensor):
    """The logits Keras attached to a softmax/sigmoid output, or None."""
    # private: Keras' activations attach `_keras_logits`; its cross-entropies read them.
    return getattr(tensor, "_keras_logits", None)


def set_keras_logits(tensor, logits):
    tensor._keras_logits = logits


def keras_mask(tensor):
    """The mask Keras attached to a tensor, or None."""
    # private: Keras attaches masks to tensors as `_keras_mask`.
    return getattr(tensor, "_keras_mask", None)


def set_keras_mask(tensor, mask):
    tensor._keras_mask = mask


def move_variable_storage(variable, new_value):
    """Back the Keras `variable` with `new_value` (a tf.Variable), keeping the object."""
    # private: KerasVariable._initialize swaps the backing tf.Variable.
    variable._initialize(new_value)


def make_backup_read_only(callback, instead_of_saving=None):
    """A `BackupAndRestore` that restores but never writes or deletes its backup.

    `instead_of_saving`: called where the callback would save (e.g. to take part in a
    collective the saving worker runs), or nothing.
    """
    # private: BackupAndRestore has no read-only mode; _save_model is what writes.
    callback._save_model = instead_of_saving or (lambda: None)
    callback.on_train_end = lambda logs=None: None
    return callback


def functional_graph(model):
    """The layer graph of a Sequential model (a Functional model), or None before it is built."""
    # private: Sequential keeps its graph as `_functional`.
    return getattr(model, "_functional", None)


def is_functional_graph(model):
    return hasattr(model, "_nodes_by_depth") and hasattr(model, "operations")


def nodes_by_depth(graph):
    """{depth: [nodes]} of a functional model (depth 0 at the outputs)."""
    # private: Functional._nodes_by_depth is how Keras itself walks the graph.
    return graph._nodes_by_depth


def outputs_structure(graph):
    """The nesting of a functional model's outputs."""
    # private: Functional._outputs_struct.
    return graph._outputs_struct


def standardize_inputs(graph, inputs):
    """Inputs as the flat list a functional model's graph reads, as its call does."""
    # private: Functional._standardize_inputs (dicts, lists and single tensors).
    return graph._standardize_inputs(inputs)


def build_for_batch(model, data_batch):
    """Build a compiled model's optimizer and metrics for `data_batch`, as fit does first."""
    # private: Trainer._maybe_symbolic_build is where Keras builds them before tracing.
    model._maybe_symbolic_build(data_batch=data_batch)


@contextlib.contextmanager
def run_metadata(collected):
    """Collect TensorFlow's run metadata (partition graphs) of what runs inside the block.

    `collected` (a list) receives the metadata when the block ends without error.
    """
    # private: TF2 has no public run-metadata API; tf.compat.v1 sessions do not run
    # tf.functions. The eager context's switches are what the profiler uses.
    from tensorflow.python.eager import context

    context.enable_run_metadata()
    context.enable_graph_collection()
    # The context keeps what ran since the last export even while collection was off
    # (seen: a second model's build and initialisers); start from nothing.
    context.export_run_metadata()
    try:
        yield
        collected.append(context.export_run_metadata())
    finally:
        context.disable_graph_collection()
        context.disable_run_metadata()


def nested_function_graphs(graph):
    """The graphs of the functions a FuncGraph calls (branches, loops, nested functions)."""
    # private: FuncGraph._functions.
    return [
        function.graph for function in getattr(graph, "_functions", {}).values()
        if getattr(function, "graph", None) is not None
    ]


def nested_functions(graph):
    """{function name: its FuncGraph} of the functions a FuncGraph calls directly."""
    # private: FuncGraph._functions (as nested_function_graphs).
    return {
        name: function.graph for name, function in getattr(graph, "_functions", {}).items()
        if getattr(function, "graph", None) is not None
    }


def enclosing_function_graph(graph):
    """The function graph around a control-flow branch graph (the graph itself if none)."""
    # private: FuncGraph.is_control_flow_graph / outer_graph (tf.distribute walks them).
    while getattr(graph, "is_control_flow_graph", False):
        graph = graph.outer_graph
    return graph


def dataset_op_types(dataset):
    """The op types of a tf.data pipeline, including those inside its functions."""
    # private: no public API lists a dataset's ops; its serialized graph does.
    from tensorflow.core.framework import graph_pb2

    graph = graph_pb2.GraphDef()
    graph.ParseFromString(dataset._as_serialized_graph().numpy())
    ops = {node.op for node in graph.node}
    for function in graph.library.function:
        ops.update(node.op for node in function.node_def)
    return ops


def shard_by_files(dataset, num_workers, worker_index):
    """tf.data's FILE auto-shard rewrite: this worker's files of a file-reading pipeline."""
    # private: the rewrite tf.distribute applies has no public entry point outside a
    # strategy's iterators.
    import tensorflow as tf
    from tensorflow.python.data.experimental.ops import distribute

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.FILE
    return distribute._AutoShardDataset(dataset.with_options(options), num_workers, worker_index)


def replace_batchnorm_moments(layer, moments):
    """Make a BatchNormalization layer compute its batch statistics with `moments`.

    `moments(inputs, mask)` returns (mean, variance); `restore_batchnorm_moments` undoes it.
    """
    # private: BatchNormalization._moments computes the batch statistics (with or without
    # a mask); Keras has no public hook for cross-replica statistics outside tf.distribute.
    # The instance attribute shadows the method.
    object.__setattr__(layer, "_moments", moments)


def restore_batchnorm_moments(layer):
    object.__delattr__(layer, "_moments")


def batchnorm_reduction_axes(layer):
    """The axes a BatchNormalization layer reduces its statistics over."""
    # private: BatchNormalization._reduction_axes, set when the layer is built.
    return layer._reduction_axes


def tensorflow_started():
    """Whether TensorFlow's eager context exists already (devices and servers fixed)."""
    # private: context._context_handle is set when the context initialises.
    from tensorflow.python.eager import context

    return context.context()._context_handle is not None


def configure_coordination(num_workers, register_timeout_seconds, heartbeat_timeout_seconds):
    """TensorFlow's coordination service for a cluster of `num_workers` "worker" tasks.

    A peer that never registers, or stops sending heartbeats, then becomes an error within
    bounded time instead of a hang.
    """
    # private: tf.distribute configures the coordination service only inside its strategies.
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.eager import context

    context.context().configure_coordination_service(
        service_type="standalone",
        service_leader="/job:worker/replica:0/task:0",
        cluster_register_timeout_in_ms=int(register_timeout_seconds * 1000),
        heartbeat_timeout_in_ms=int(heartbeat_timeout_seconds * 1000),
        coordinated_jobs=[
            coordination_config_pb2.CoordinatedJob(name="worker", num_tasks=num_workers)
        ],
    )


def call_compute_loss(model, x, y, y_pred, sample_weight, training):
    """`model.compute_loss(...)`, with `training` only when the override accepts it."""
    # private: Trainer._compute_loss is Keras' own wrapper for overrides written before
    # `training` was added (Keras 3.3).
    return model._compute_loss(
        x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
    )


def weight_decay_exclusions(optimizer):
    """What `optimizer.exclude_from_weight_decay()` was given (empty list: nothing).

    Why private: Keras stores the exclusions (variable ids, a name pattern) in attributes
    set by `exclude_from_weight_decay` and offers no public way to read them back; the
    sharded optimizer state must refuse them, since it decays flat ranges of parameters.
    """
    found = []
    if getattr(optimizer, "_exclude_from_weight_decay", None):
        found.append(f"{len(optimizer._exclude_from_weight_decay)} variable(s)")
    pattern = getattr(optimizer, "_exclude_from_weight_decay_pattern", None)
    if pattern is not None:
        found.append(f"names matching {pattern.pattern!r}")
    return found


def recorded_by_outer_tape(tensors):
    """Whether a gradient tape that is recording right now watches any of `tensors`.

    A sliced model call's gradient reuses its forward tape when nothing differentiates the
    gradient itself (the usual first-order step), and recomputes the forward pass under the
    recording tapes when something does (WGAN-GP's gradient penalty), so that the second
    derivative flows through the forward pass too.
    """
    # private: record.should_record_backprop is how TensorFlow's own ops decide whether to
    # record; there is no public query of the active tapes.
    from tensorflow.python.eager import record

    return bool(record.should_record_backprop([t for t in tensors if t is not None]))


def call_context_training():
    """The `training` value of the Keras layer call in progress (None when unset).

    A model call intercepted inside a custom step reads the mode Keras resolved for it (an
    explicit argument, or the enclosing call's), so its slices and their recomputation run
    in the same mode even when the model's `call` takes no `training` argument.
    """
    # private: Keras keeps the current CallContext as a global attribute; layers read it
    # through Layer._get_call_context().
    from keras.src.backend.common import global_state

    context = global_state.get_global_attribute("current_call_ctx")
    return None if context is None else getattr(context, "training", None)


def compiled_metrics(model):
    """The metric objects `compile` created for `model` (its loss tracker, compiled metrics)."""
    # private: Trainer._loss_tracker, _compile_metrics and _compile_loss are what compile()
    # sets; `model.metrics` mixes them with the model's own trackers.
    found = [getattr(model, "_loss_tracker", None), getattr(model, "_compile_metrics", None)]
    compile_loss = getattr(model, "_compile_loss", None)
    if compile_loss is not None:
        found += list(compile_loss.metrics)
    return [m for m in found if m is not None]


def optimizer_variables(optimizer):
    """The trainable variables `optimizer.apply(grads)` updates when given none."""
    # private: BaseOptimizer._trainable_variables is the list build() recorded; apply()
    # without variables updates those.
    return list(optimizer._trainable_variables)


def model_supports_jit(model):
    """Whether Keras would compile `model` with XLA (its layers' `supports_jit`, TF's
    op determinism, the platform)."""
    # private: keras.src.trainers.trainer.model_supports_jit is the test behind Keras'
    # own jit_compile="auto"; resolving "auto" per device must answer as Keras does.
    from keras.src.trainers.trainer import model_supports_jit as supports

    return supports(model)


def build_metrics_before_tracing(model, template, iterator=None, data_batch=None):
    """Build `model`'s compiled metrics and loss from the shapes of its input, eagerly.

    Keras calls `model._maybe_symbolic_build(iterator=..., data_batch=...)` before it
    traces a step. On TensorFlow without a distribution strategy it leaves the building
    to the first trace, where the metrics' new variables make TensorFlow trace the whole
    step a second time (for a wrapped model: every replica again). This builds them from
    the input's shapes instead: the dataset's element spec (nothing is read from it) or
    the batch given, and the template's output spec. Does nothing (Keras builds them in
    the trace, as before) when they are built or the input's spec is not plain tensors.
    """
    # private: Trainer._maybe_symbolic_build is that hook, _compile_metrics and
    # _compile_loss are where compile() keeps them, and the epoch iterator's
    # `_get_iterator()` is the dataset it will iterate; keras.src.backend's
    # compute_output_spec is the symbolic call Keras' own _symbolic_build makes.
    import keras
    import tensorflow as tf
    from keras import tree
    from keras.src import backend

    unbuilt = [
        c for c in (getattr(model, "_compile_metrics", None), getattr(model, "_compile_loss", None))
        if c is not None and not c.built
    ]
    if not unbuilt:
        return
    if data_batch is None:
        dataset = iterator._get_iterator() if iterator is not None else None
        spec = getattr(dataset, "element_spec", None)
    else:
        spec = tree.map_structure(
            lambda v: None if v is None else tf.TensorSpec(v.shape, tf.as_dtype(v.dtype)),
            data_batch,
        )
    leaves = tree.flatten(spec) if spec is not None else []
    if not leaves or not all(type(s) is tf.TensorSpec for s in leaves):
        return

    def symbolic(s):
        if s is None:
            return None
        return keras.KerasTensor((None,) + tuple(s.shape)[1:], s.dtype.name)

    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(
        tree.map_structure(symbolic, spec)
    )
    if y is None:
        return
    y_pred = backend.compute_output_spec(template, x, training=False)
    for compiled in unbuilt:
        compiled.build(y, y_pred)
