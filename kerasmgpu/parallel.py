"""`ParallelModel` and `multi_gpu_model`: data parallelism on one machine (or many).

One training step with N devices and a batch of B samples (`train_step`):

1. Slice: the batch is cut into N contiguous slices on the host (one slice when B < N,
   so no replica is ever empty); replica i gets slice i.
2. Forward towers: replica i runs the template on device i under a gradient tape of its
   own, statelessly (BatchNormalization statistics and RNG seeds are returned, not
   written; replica i draws from seeds offset by i).
3. Loss once: the replicas' outputs are concatenated on the merge device (the CPU when
   `cpu_merge=True`) and the loss is computed once on the merged batch, exactly as Keras
   computes it on one device (any loss, reduction, sample or class weight, mask, or the
   template's own `compute_loss`). Its gradient with respect to the merged outputs is
   cut back into each replica's rows.
4. Backward towers: each replica back-propagates its rows through its own tape, on its
   own device.
5. Agree and apply: the replicas' gradients are combined by the communication strategy
   (`kerasmgpu.comm`; today summed on each variable's device) and applied once; the
   BatchNormalization statistics are set once to the replicas' updates weighted by
   slice_size / B. Compiled metrics are updated once, on the merged outputs.

Since the loss of the merged batch is the single-device loss and the chain rule splits
its gradient exactly over the slices, training equals single-device training up to
float rounding. BatchNormalization: a synchronized layer (`synchronized=True`, or any
with `sync_batchnorm=True`) sums its statistics over the replicas in the forward pass
(`kerasmgpu.batchnorm`) and equals one device too; a plain one normalises each replica's
slice with that slice's statistics, as it did with the Keras 2 wrapper.

On a TF_CONFIG cluster the same step runs on every worker: its worker's rows of the
global batch (or, with sharded input, the local batch its dataset yields, the targets of
all workers gathered), outputs gathered from every worker before the loss, gradients
summed over workers before the update, synchronized BatchNormalization statistics summed
over every replica of every worker. The step reaches the other workers only through
`kerasmgpu.cluster.workers()`, which is the identity on one machine.

One module on purpose (about 800 lines): it is `ParallelModel`, one class whose steps
(standard, or the template's own through `custom_steps`) and options belong together;
the pieces shared with other layouts live in `trainer`, `tower`, `comm` and `cluster`.
"""

import warnings

import keras
import tensorflow as tf
from keras import tree

from kerasmgpu import _compat, batchnorm, comm, custom_steps, distill, options, slicing, trainer
from kerasmgpu import cluster as cluster_lib
from kerasmgpu import devices as devices_lib
from kerasmgpu import tower as tower_lib
from kerasmgpu.cluster import backup


class ParallelModel(trainer.TemplateTrainer):
    """A Keras model that runs its template on several devices at once.

    `ParallelModel` is a `keras.Model`: compile, fit, evaluate, predict and the
    `*_on_batch` methods work as usual, on any number of devices N >= 1 (N = 1 runs the
    same code path on one device, which makes 1-vs-N comparisons fair). The variables
    are the template's own: training the parallel model trains `template`, and `save`,
    `save_weights`, `load_weights` and `keras.callbacks.ModelCheckpoint` read and write
    the template, so saved files load with plain Keras.

    A template whose class overrides `train_step`, `test_step` or `predict_step` (a GAN,
    a VAE) runs its own step, once, each model call inside it split across the devices
    (`kerasmgpu.custom_steps`, docs/custom_steps.md); compile the wrapper with the
    template's own compile arguments, or compile the template before wrapping.

    Args:
        template: a built `keras.Model` (Sequential, functional or subclassed; with its own
            train_step, a model whose sub-models are built).
        devices: device names or ids (see `multi_gpu_model`'s `gpus`), or None for all
            visible devices.
        cpu_merge: merge outputs and compute the loss on the CPU (True) or on the first
            device (False).
        name: the model's name; default "<template name>_parallel".
        variables: "central" (one copy of the weights, read by every replica; gradients
            summed on its device), "replicated" (a copy of the weights and optimizer
            state per device, gradients summed by collective all-reduces that overlap
            the backward pass), or "auto" (default): "replicated" on two or more GPUs,
            "central" on CPU devices. See docs/comm.md for when to use which.
        sync_period: with "replicated", average the replicas' weights every this many
            steps instead of all-reducing gradients every step (local SGD); 1 (default)
            is synchronous training.
        bucket_bytes: with "replicated", the largest all-reduce bucket (default 25 MB,
            as PyTorch DDP).
        optimizer_state: "full" (default: every copy of the weights has the whole
            optimizer state) or "sharded" (with "replicated": each device keeps the
            state of 1/N of the parameters and updates only those, ZeRO stage 1; the
            same traffic, 1/N of the state). See docs/comm.md.
        gradient_dtype: "float32" (default), "bfloat16" or "float16": what gradients
            travel as between devices ("replicated"; half the bytes); the update stays
            in float32.
        sync_batchnorm: synchronize every BatchNormalization layer of the template (see
            `multi_gpu_model`); layers built with `synchronized=True` always are.
        teacher_device: where the forward pass of the template's frozen teacher runs (a
            `keras.distillation.Distiller`'s, or the model its `compute_loss` calls): a
            device, "replicas", or None for the merge device. See `multi_gpu_model`.

    Example:

    ```python
    parallel = kerasmgpu.ParallelModel(model, devices=["/gpu:0", "/gpu:1"])
    parallel.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    parallel.fit(x, y, batch_size=256)
    model.predict(x)  # the template has trained
    ```
    """

    def __init__(self, template, devices=None, cpu_merge=True, name=None,
                 sync_batchnorm=False, variables="auto", sync_period=1, bucket_bytes=None,
                 teacher_device=None, optimizer_state="full", gradient_dtype="float32"):
        _check_template(template)
        variables, sync_period, bucket_bytes = comm.check_layout(
            variables, sync_period, bucket_bytes, optimizer_state, gradient_dtype
        )
        cpu_merge = options.boolean(cpu_merge, "cpu_merge")
        sync_batchnorm = options.boolean(sync_batchnorm, "sync_batchnorm")
        if devices is None:
            resolved = devices_lib.visible_devices()
        else:
            resolved = devices_lib.resolve_devices(devices, minimum=1, argument="devices")
        super().__init__(template, name=name or f"{template.name}_parallel")
        self._replica_devices = tuple(resolved)
        self.cpu_merge = bool(cpu_merge)
        self._workers = cluster_lib.workers()
        self._comm = comm.make_strategy(
            variables, self._replica_devices, self._workers, sync_period, bucket_bytes,
            optimizer_state, gradient_dtype,
        )
        self.sync_batchnorm = bool(sync_batchnorm)
        self._batchnorm = batchnorm.Synchronizer(
            batchnorm.synchronized_layers(template, sync_all=self.sync_batchnorm),
            self._workers,
        )
        self._teacher = distill.find_teacher(template, teacher_device)
        self._programs = {}  # (training, jit_compile) -> tower.ReplicaProgram
        # A template with its own train/test/predict step: the step runs once, its model
        # calls sliced (kerasmgpu.custom_steps).
        self._custom_steps = custom_steps.overridden_steps(template)
        self._sliced_calls = None
        if self._custom_steps:
            custom_steps.check_options(template, self._comm)
            self._sliced_calls = custom_steps.SlicedCalls(
                template, self._replica_devices, self.merge_device, self._comm,
                seed_offset=self._workers.worker_index * len(self._replica_devices),
                workers=self._workers, synchronizer=self._batchnorm,
            )
            if template.compiled:
                self._compile_like_template()

    # ----------------------------------------------------------------- properties
    @property
    def devices(self):
        """The devices replicas run on, in replica order."""
        return list(self._replica_devices)

    @property
    def comm(self):
        """How the replicas agree on updates: a `kerasmgpu.comm` strategy."""
        return self._comm

    @property
    def variables_layout(self):
        """"central" or "replicated"."""
        return self._comm.name

    @property
    def bucket_bytes(self):
        """The largest all-reduce bucket ("replicated"), or None."""
        return getattr(self._comm, "bucket_bytes", None)

    @property
    def merge_device(self):
        """Where outputs are concatenated and the loss is computed."""
        return devices_lib.host_device() if self.cpu_merge else self._replica_devices[0]

    @property
    def replica_jit_compile(self):
        """Whether XLA compiles each replica's program for its device (set by `compile`).

        With one device, `jit_compile` (the whole step, as in Keras) says it instead.
        """
        return self._per_device_jit

    def _device_count(self):
        return len(self._replica_devices)

    def _resolve_per_device_jit(self, jit_compile, run_eagerly):
        """XLA for each replica's program: True, False, or "auto" as Keras resolves it
        for one device of the replicas' kind (XLA on GPUs for a model whose layers
        support it; not on CPUs). The merge, loss, all-reduce and update stay outside."""
        if run_eagerly:
            if jit_compile is True:
                warnings.warn(
                    "If `run_eagerly` is True, then `jit_compile` cannot also be True. "
                    "Disabling `jit_compile`.", stacklevel=3,
                )
            return False
        synchronized = [layer.name for layer in self._batchnorm.layers]
        if jit_compile == "auto":
            kinds = {tf.DeviceSpec.from_string(d).device_type for d in self._replica_devices}
            return (
                kinds == {"GPU"} and not synchronized
                and _compat.model_supports_jit(self.template)
            )
        if jit_compile and synchronized:
            raise ValueError(
                "jit_compile=True cannot compile the replicas of a model with synchronized "
                "BatchNormalization: their statistics are summed by collectives between the "
                "replicas, which XLA does not compile on one device. Use jit_compile=False "
                f"(or 'auto'). Received: jit_compile=True with synchronized layers {synchronized}"
            )
        if jit_compile and not _compat.model_supports_jit(self.template):
            # As Keras does for one device.
            warnings.warn(
                "Model doesn't support `jit_compile=True`. Proceeding with "
                "`jit_compile=False`.", stacklevel=3,
            )
            return False
        return bool(jit_compile)

    def _loss_scope(self, tape=None):
        if self._teacher is None:
            return super()._loss_scope(tape)
        return self._teacher.placed(tape, self.merge_device, self._replica_devices)

    @property
    def metrics(self):
        # A custom step updates the template's own metrics (its trackers, its compiled
        # ones): fit's logs and History read those, as on one device.
        if getattr(self, "_custom_steps", None):
            return self.template.metrics
        return super().metrics

    # ---------------------------------------------------------- compile
    def compile(self, *args, **kwargs):
        """Configure training; see `TemplateTrainer.compile`.

        For a template with its own train/test/predict step, the arguments are the
        template's own (`compile(d_optimizer=..., g_optimizer=..., loss_fn=...)` for a
        keras.io GAN, or the usual optimizer/loss/metrics): they go to the template's
        `compile`, whose optimizers, losses and metrics its step uses; the wrapper then
        takes the template's optimizer, `run_eagerly` and `steps_per_execution`. A
        template compiled before wrapping needs no second compile.
        """
        if not self._custom_steps:
            super().compile(*args, **kwargs)
            self._comm.compiled(self.optimizer)  # e.g. sharded state: supported optimizers
            return None
        # `jit_compile` is the wrapper's: with several devices it compiles each sliced
        # call's replica program for its device, never the step. The template's own
        # compile gets it only when it takes it (a keras.io GAN's compile does not).
        jit_compile = kwargs.pop("jit_compile", "auto")
        trainer.check_jit_compile(jit_compile)
        if custom_steps.compile_takes(self.template, "jit_compile"):
            kwargs["jit_compile"] = jit_compile if self._device_count() == 1 else False
        self.template.compile(*args, **kwargs)
        self._compile_like_template(jit_compile)
        return None

    def _compile_like_template(self, jit_compile=None):
        """Compile the wrapper for fit/evaluate as the template was compiled.

        `jit_compile`: what the user asked of the wrapper's compile (None: a template
        compiled before wrapping, whose own resolved `jit_compile` is taken).
        """
        template = self.template
        run_eagerly = getattr(template, "run_eagerly", False)
        if jit_compile is None:
            jit_compile = getattr(template, "jit_compile", False)
        if self._device_count() > 1:
            self._per_device_jit = self._resolve_per_device_jit(
                "auto" if jit_compile is None else jit_compile, run_eagerly
            )
            self._sliced_calls.compile_programs(self._per_device_jit)
            jit_compile = False
        keras.Model.compile(
            self, optimizer=template.optimizer or "rmsprop", run_eagerly=run_eagerly,
            steps_per_execution=getattr(template, "steps_per_execution", 1),
            jit_compile=jit_compile,
        )

    def _run_custom_step(self, step, data):
        """The template's own `step` (overridden, or Keras' default), model calls sliced."""
        training = step == "train_step"
        optimizers = custom_steps.find_optimizers(
            self.template, getattr(self, "optimizer", None)) if training else ()
        if self._workers.num_workers > 1:
            # Every worker runs the step on the global batch (with sharded input, every
            # worker's batch, gathered in worker order); its calls split it again.
            _, data, _, _, _ = self._workers.global_batch(data, None, None, needs_x=True)
        with self._sliced_calls.active(optimizers, copies=training):
            return getattr(self.template, step)(data)

    # ----------------------------------------------------------------- the steps
    def train_step(self, data):
        if self._custom_steps:
            return self._run_custom_step("train_step", data)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        x_local, x, y, sample_weight, global_size = self._workers.global_batch(
            x, y, sample_weight, needs_x=trainer.overrides_compute_loss(self.template)
        )
        trainable = self.template.trainable_variables
        non_trainable = self.template.non_trainable_variables
        optional = trainer.OptionalOutputs("replica counts")

        def step(num_replicas, local_size):
            towers = self._forward_towers(x_local, num_replicas, local_size, training=True)
            loss, y_pred, shared_gradients = self._loss_once(
                towers, global_size, x, y, sample_weight
            )
            replica_gradients = self._backward_towers(towers)
            shares = trainer.batch_shares([t.size for t in towers], global_size)
            gradients = self._comm.combine(
                replica_gradients, shared_gradients, trainable, shares=shares
            )
            state = self._combine_state(towers, shares)
            # Branches of a switch must return tensors: the gradients that are None and
            # the state nothing changed are left out, and put back after.
            return (loss, y_pred, *optional.pack(gradients, state))

        loss, y_pred, *packed = self._dispatch(x_local, step)
        gradients, state = optional.unpack(*packed)
        gradients = self._comm.across_workers(gradients, self._workers)
        state = self._workers.combine_state(non_trainable, state)
        self._apply_updates(gradients, trainable, state, non_trainable)
        self._comm.after_apply()
        self._loss_tracker.update_state(loss, sample_weight=global_size)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def test_step(self, data):
        if self._custom_steps:
            return self._run_custom_step("test_step", data)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        x_local, x, y, sample_weight, global_size = self._workers.global_batch(
            x, y, sample_weight, needs_x=trainer.overrides_compute_loss(self.template)
        )

        def step(num_replicas, local_size):
            towers = self._forward_towers(x_local, num_replicas, local_size, training=False)
            with tf.device(self.merge_device), self._loss_scope():
                y_pred = self._merged_outputs(towers, global_size)
                loss = self._loss_with(
                    self._extra_losses(towers, global_size), x, y, y_pred, sample_weight,
                    training=False,
                )
            return loss, y_pred

        loss, y_pred = self._dispatch(x_local, step)
        self._loss_tracker.update_state(loss, sample_weight=global_size)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def predict_step(self, data):
        if self._custom_steps:
            return self._run_custom_step("predict_step", data)
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        return self._predict(x)

    def _predict(self, x):
        x_local, _, _, _, global_size = self._workers.global_batch(x, None, None)

        def step(num_replicas, local_size):
            towers = self._forward_towers(x_local, num_replicas, local_size, training=False)
            with tf.device(self.merge_device):
                return self._merged_outputs(towers, global_size)

        return self._dispatch(x_local, step)

    def call(self, inputs, training=False):
        if training:
            # A stateful forward pass per tower would apply N sequential state updates.
            warnings.warn(
                "Calling a ParallelModel with training=True runs the template in inference "
                "mode on each device (no state updates); use fit() or train_on_batch() for "
                "training steps.",
                stacklevel=2,
            )
        return self._predict(inputs)

    # ------------------------------------------------------------- step pieces
    def _dispatch(self, x, step):
        """Run `step(k, batch_size)` with k replicas for x's B samples: N, or 1 if B < N.

        With a batch size known at trace time, k = min(N, B). Otherwise (the usual case in
        `fit`, and the short last batch of an epoch) a conditional picks N replicas or,
        for a batch smaller than N, one replica with the whole batch: two branches to
        trace whatever N is, and no replica ever gets an empty slice.
        """
        num_devices = len(self._replica_devices)
        static = slicing.static_batch_size(x)
        batch_size = slicing.batch_size_of(x)
        if static is not None or num_devices == 1:
            k = num_devices if static is None else max(1, min(num_devices, static))
            return step(k, batch_size)
        branches = self._workers.same_keys_per_branch(
            [lambda: step(1, batch_size), lambda: step(num_devices, batch_size)]
        )
        # A worker whose share of a tiny last batch is empty runs one empty replica.
        return tf.switch_case(tf.cast(batch_size >= num_devices, tf.int32), branches)

    def _forward_towers(self, x, num_replicas, batch_size, training):
        """Slice x and run the template on each slice, on its device.

        With `training`, each replica runs under a gradient tape of its own and from its
        own seeds; the towers keep what the loss and the backward pass need.
        """
        with tf.device(devices_lib.host_device()), tf.name_scope("slice_batch"):
            bounds = [None] if num_replicas == 1 else slicing.slice_bounds(
                batch_size, num_replicas
            )
            parts = [x if rows is None else slicing.rows_of(x, *rows) for rows in bounds]
        first_replica = self._workers.worker_index * len(self._replica_devices)
        # Synchronized BatchNormalization: statistics summed over the replicas (and workers).
        group = self._batchnorm.step(self._replica_devices[:num_replicas], training)
        program = self.replica_program(training)
        # Collectives keyed and placed per replica cannot be shared: traced per replica.
        run = program.run_inline if group.synchronizes else program
        towers = []
        for i, (part, rows) in enumerate(zip(parts, bounds)):
            tower = _Tower(self._replica_devices[i], part, rows)
            with tf.device(tower.device), tf.name_scope(f"replica_{i}"), group.replica(i):
                variables = self._comm.replica_variables(
                    i, self.template.trainable_variables) if training else None
                tower.run(run, self.template, training, seed_offset=first_replica + i,
                          variables=variables)
            towers.append(tower)
        return towers

    def replica_program(self, training):
        """The program every replica runs (a `kerasmgpu.tower.ReplicaProgram`).

        One per mode (training or inference) and XLA setting, made on first use; a step
        calls it once per replica, under the replica's device. A custom step can call it
        the same way on its own slices.
        """
        jit_compile = self._per_device_jit
        key = (bool(training), jit_compile)
        if key not in self._programs:
            self._programs[key] = tower_lib.ReplicaProgram(
                self.template, training, jit_compile=jit_compile
            )
        return self._programs[key]

    def _merged_outputs(self, towers, global_size):
        """The replicas' outputs (and, on a cluster, every worker's) in batch order."""
        merged = slicing.merge_structures([tower.outputs for tower in towers])
        return self._workers.gather_structure(merged, global_size)

    def _extra_losses(self, towers, global_size):
        """Losses added during the call (weighted b_i / B, summed over workers) and the
        weight regularization (once)."""
        shares = trainer.batch_shares([t.size for t in towers], global_size)
        added = trainer.weigh_by_share([t.added_losses for t in towers], shares)
        added = [tf.cast(loss, keras.config.floatx()) for loss in added]
        local = tf.add_n(added) if added else tf.zeros((), keras.config.floatx())
        return [self._workers.total_over_workers(local)] + [
            v.regularizer(v) for v in self.template.trainable_weights
            if getattr(v, "regularizer", None)
        ]

    def _loss_once(self, towers, global_size, x, y, sample_weight):
        """The loss of the merged batch, and each tower's seeds for its backward pass.

        What the loss reads of the merged outputs (the outputs and, for softmax/sigmoid
        outputs, their logits) and the losses the replicas added are watched; the gradient
        with respect to them is handed back to the replicas, row by row. Returns the loss,
        the merged outputs and the gradients of terms computed once (weight
        regularization, counted by the chief alone on a cluster).
        """
        trainable = self.template.trainable_variables
        with tf.device(self.merge_device), tf.name_scope("loss"):
            y_pred = self._merged_outputs(towers, global_size)
            merged = [t for leaf in tree.flatten(y_pred) for t in _with_logits(leaf)]
            added = [loss for tower in towers for loss in tower.added_losses]
            loss, upstream, shared_gradients = self._loss_and_gradients(
                merged + added,
                lambda: self._loss_with(
                    self._extra_losses(towers, global_size), x, y, y_pred, sample_weight,
                    training=True,
                ),
                trainable,
            )
        if not self._workers.is_chief:
            shared_gradients = [None] * len(trainable)
        merged_gradients, added_gradients = upstream[: len(merged)], iter(upstream[len(merged):])

        with tf.device(self.merge_device), tf.name_scope("local_output_gradients"):
            local = [
                None if g is None else self._workers.local_rows_of_gathered(g, global_size)
                for g in merged_gradients
            ]
        for tower in towers:
            with tf.device(self.merge_device), tf.name_scope("split_output_gradients"):
                seeds = local if tower.rows is None else [
                    None if g is None else g[tower.rows[0]:tower.rows[1]] for g in local
                ]
            produced = [t for leaf in tree.flatten(tower.outputs) for t in _with_logits(leaf)]
            tower.seed(zip(produced, seeds))
            tower.seed((loss_i, next(added_gradients)) for loss_i in tower.added_losses)
        return loss, y_pred, shared_gradients

    def _backward_towers(self, towers):
        """Each replica's gradients, through its own tape, on its own device."""
        gradients = []
        for i, tower in enumerate(towers):
            with tf.device(tower.device), tf.name_scope(f"replica_{i}_backward"):
                gradients.append(tower.gradients())
        return gradients

    def _combine_state(self, towers, shares):
        variables = self.template.non_trainable_variables
        combined = trainer.combine_state(
            variables, [t.state_in for t in towers], [t.state_out for t in towers], shares,
        )
        # On a cluster this worker's first replica drew from seeds offset by its index.
        return trainer.unoffset_seeds(
            variables, combined, self._workers.worker_index * len(self._replica_devices))

    def _writes_files(self):
        return self._workers.is_chief

    # ------------------------------------------------------- training calls

    def _optimizer_for_saving(self):
        return self._comm.gathered_optimizer(self.template)

    def _optimizer_for_loading(self):
        if getattr(self, "optimizer", None) is not None:
            # Before the first step too: a sharded state needs its shards to load into.
            self._comm.prepare(self.template, self.optimizer)
        return self._comm.loading_optimizer(self.template)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras' hook before fit, evaluate and *_on_batch trace a step (see _compat).
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        if not self._custom_steps:
            _compat.build_metrics_before_tracing(self, self.template, iterator, data_batch)

    def make_train_function(self, force=False):
        self._comm.prepare(self.template, self.optimizer)  # eager: replica copies
        self._batchnorm.prepare(self._replica_devices)
        if not self._custom_steps and self.optimizer is not None and not self.optimizer.built:
            # Built now, eagerly, as Keras builds it under a distribution strategy. Left
            # to the first step, the optimizer would create its variables while the step
            # is traced, and TensorFlow traces a function that created variables a second
            # time: the whole step traced twice (docs/replica_program.md, first epoch).
            self.optimizer.build(self.template.trainable_variables)
        return super().make_train_function(force=force)

    def train_on_batch(self, *args, **kwargs):
        _check_input(self.template, "train_on_batch", args, kwargs)
        with self._comm.training_call():
            return super().train_on_batch(*args, **kwargs)

    def test_on_batch(self, *args, **kwargs):
        _check_input(self.template, "test_on_batch", args, kwargs)
        return super().test_on_batch(*args, **kwargs)

    def predict_on_batch(self, *args, **kwargs):
        _check_input(self.template, "predict_on_batch", args, kwargs)
        return super().predict_on_batch(*args, **kwargs)

    def fit(self, *args, callbacks=None, **kwargs):
        _check_input(self.template, "fit", args, kwargs)
        # `kerasmgpu launch --backup-dir`: a BackupAndRestore for scripts without one.
        callbacks = backup.with_backup(callbacks)
        callbacks = self._comm.fit_callbacks(callbacks)
        if not self._workers.is_chief:
            callbacks = [_read_only_backup(c, self) for c in (callbacks or [])]
        with self._workers.translate_errors("fit"):
            args, kwargs = self._workers.agree_on_input("fit", args, kwargs)
            return super().fit(*args, callbacks=callbacks, **kwargs)

    def evaluate(self, *args, **kwargs):
        _check_input(self.template, "evaluate", args, kwargs)
        with self._workers.translate_errors("evaluate"):
            args, kwargs = self._workers.agree_on_input("evaluate", args, kwargs)
            return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        _check_input(self.template, "predict", args, kwargs)
        with self._workers.translate_errors("predict"):
            args, kwargs = self._workers.agree_on_input("predict", args, kwargs)
            return super().predict(*args, **kwargs)


class _Tower:
    """One replica's part of a step: its slice, device, tape, outputs and state."""

    def __init__(self, device, inputs, rows):
        self.device = device
        self.inputs = inputs
        self.rows = rows  # (start, stop) in the worker's batch; None for a single replica
        self.size = slicing.batch_size_of(inputs)
        self.tape = None
        self.targets, self.output_gradients = [], []

    def run(self, program, template, training, seed_offset, variables=None):
        """The template's forward pass on this slice, statelessly, as `fit` calls it.

        `program`: the replica program (`kerasmgpu.tower.ReplicaProgram`, or its
        `run_inline`). `variables`: the trainable variables this replica reads instead
        of the template's (its copy, with replicated variables).
        """
        non_trainable = template.non_trainable_variables
        values = [tf.convert_to_tensor(v) for v in non_trainable]
        self.state_in = trainer.offset_seeds(non_trainable, values, seed_offset) if (
            training) else values
        variables = template.trainable_variables if variables is None else variables
        # Read here (on this device, or where a variable lives) and passed in: the
        # program is the same for every replica, and so is its backward pass.
        self.trainable_values = [tf.convert_to_tensor(v) for v in variables]
        if training:
            self.tape = tf.GradientTape(watch_accessed_variables=False)
            self.tape.__enter__()
            self.tape.watch(self.trainable_values)
        try:
            self.outputs, self.state_out, self.added_losses = program(
                self.inputs, self.trainable_values, self.state_in
            )
        finally:
            if self.tape is not None:
                self.tape.__exit__(None, None, None)

    def seed(self, pairs):
        """Tensors of this tower and the loss's gradient with respect to them."""
        for tensor, gradient in pairs:
            if tensor is not None and gradient is not None:
                self.targets.append(tensor)
                self.output_gradients.append(gradient)

    def gradients(self):
        """The gradients of this replica's trainable variables (its copies), or None each."""
        if not self.targets:
            return [None] * len(self.trainable_values)
        return self.tape.gradient(
            self.targets, self.trainable_values, output_gradients=self.output_gradients
        )


def _read_only_backup(callback, parallel):
    """On a worker other than the chief, a BackupAndRestore restores but never writes.

    Every worker restores the same backup when a cluster restarts; only the chief keeps
    it up to date and deletes it at the end, so workers never race on its files. With
    sharded optimizer state the worker still takes part in gathering the state when the
    chief saves (a collective every worker must join).
    """
    if isinstance(callback, keras.callbacks.BackupAndRestore):
        def take_part_in_gathering():
            with parallel._optimizer_for_saving():
                pass

        gathers = parallel.comm.optimizer_state == "sharded"
        return _compat.make_backup_read_only(
            callback, take_part_in_gathering if gathers else None
        )
    return callback


def _check_input(template, call, args, kwargs):
    """No input, or a dataset of single samples, is an error before anything runs.

    Why: the wrapper slices the batch before the template sees it, so what Keras reports
    on one device (x=None; an unbatched dataset's element shape) would otherwise come out
    as an empty history, a bare StopIteration, or a slice of the feature axis reported
    as the input's shape.
    """
    x = args[0] if args else kwargs.get("x")
    if x is None:
        raise ValueError(
            f"{call}() needs input data x (arrays, tensors, a tf.data.Dataset, a "
            "keras.utils.PyDataset or a generator), as on one device. Received: x=None"
        )
    if not isinstance(x, tf.data.Dataset):
        return
    try:
        inputs = tree.flatten(template.inputs)
    except (AttributeError, ValueError):
        return  # a subclassed model: no declared input rank to compare with
    element = x.element_spec
    features = element[0] if isinstance(element, tuple) else element
    specs = [spec for spec in tree.flatten(features) if hasattr(spec, "shape")]
    # Every input one rank short: unbatched. (All of them, so that inputs paired in
    # another order than the model's, e.g. a dict's, can never look unbatched: the ranks'
    # sums would differ by the number of inputs.)
    if len(specs) == len(inputs) and all(
        spec.shape.rank is not None and spec.shape.rank == len(tensor.shape) - 1
        for spec, tensor in zip(specs, inputs)
    ):
        shapes = ", ".join(str(tuple(spec.shape)) for spec in specs)
        expected = ", ".join(str(tuple(tensor.shape)) for tensor in inputs)
        raise ValueError(
            f"{call}() received a tf.data.Dataset of single samples: its x element shape "
            f"is {shapes}, and the model {template.name!r} takes batches of shape "
            f"{expected}. Batch the dataset first, e.g. dataset.batch(64). "
            f"Received: x with element_spec {element}"
        )


def _with_logits(tensor):
    """A merged or replica output and what a Keras loss may read instead (its logits)."""
    return (tensor, slicing.logits_of(tensor))


def _check_template(template):
    if not isinstance(template, keras.Model):
        raise ValueError(
            "multi_gpu_model expects a keras.Model (Sequential, functional or subclassed). "
            f"Received: model={template!r} of type {type(template).__name__}"
        )
    distill.prepare(template)
    if isinstance(template, ParallelModel):
        raise ValueError(
            f"The model {template.name!r} is already a ParallelModel; wrap its template "
            "(model.template) instead."
        )
    if custom_steps.overridden_steps(template):
        custom_steps.check_built(template)  # a keras.io GAN is never marked built
    elif not template.built:
        raise ValueError(
            f"The model {template.name!r} is not built: its variables do not exist yet. "
            "Build it first (give it a keras.Input, call model.build(input_shape), or call "
            "it on a batch) and then wrap it."
        )
    try:
        inputs = tree.flatten(template.inputs) if isinstance(template, keras.Model) else []
    except (AttributeError, ValueError):
        inputs = []  # a subclassed model has no symbolic inputs
    for tensor in inputs:
        shape = getattr(tensor, "shape", None)
        if shape is not None and len(shape) and shape[0] is not None:
            raise ValueError(
                f"The model {template.name!r} has an input with a fixed batch size "
                f"(input {getattr(tensor, 'name', '?')!r} has shape {tuple(shape)}), which "
                "cannot be sliced across devices. Build it with keras.Input(shape=...) "
                "instead of batch_shape=/batch_size=."
            )
    for layer in _compat.flatten_layers(template):
        if getattr(layer, "stateful", False):
            raise ValueError(
                f"The model {template.name!r} contains the stateful layer {layer.name!r}, "
                "which keeps a state per batch position and needs whole batches of a fixed "
                "size; it cannot be sliced across devices. Use stateful=False."
            )


def multi_gpu_model(model, gpus=None, cpu_merge=True, cpu_relocation=False,
                    sync_batchnorm=False, variables="auto", sync_period=1, bucket_bytes=None,
                    teacher_device=None, optimizer_state="full", gradient_dtype="float32"):
    """Replicate a model on several devices (the Keras 2 `multi_gpu_model` contract).

    Each batch is cut along axis 0 into one slice per device; every device runs the
    model's forward *and* backward pass on its slice; outputs are concatenated (on the
    CPU with `cpu_merge=True`) and gradients summed and applied once to the model's own
    variables. Training equals training on one device with the whole batch.

    Args:
        model: a built `keras.Model`: the template. It is not copied: the returned
            model trains it, and saving the returned model saves it.
        gpus: an int >= 2 (that many devices), a list of >= 2 device ids or names, or
            None (all visible devices). Without GPUs, simulated CPU devices count (see
            `simulate_devices`).
        cpu_merge: merge the replicas' outputs on the CPU (True) or on the first device.
        cpu_relocation: move the template's variables to the CPU first (in place: the
            model you keep is the one that trains), the layout of TensorFlow's
            multi-GPU tutorial. Useful when the template was built on a GPU.
        sync_batchnorm: compute the batch statistics of every BatchNormalization layer
            over the whole batch (all replicas, and all workers of a cluster), as if each
            were built with `synchronized=True`; the template itself is not changed.
            Without it, only layers built with `synchronized=True` are synchronized and
            the others normalise each replica's slice with that slice's statistics.
        variables, sync_period, bucket_bytes, optimizer_state, gradient_dtype: where the
            weights and the optimizer state live and how replicas agree ("central" or
            "replicated", local SGD, all-reduce buckets, sharded state, 16-bit
            gradients); see `ParallelModel`.
        teacher_device: for distillation (a `keras.distillation.Distiller`, or a model
            whose `compute_loss` calls a frozen `teacher`), where the teacher's forward
            pass runs: a device name or id ("/cpu:0", "GPU:3"; its weights move there),
            "replicas" (split like the batch) or None (the merge device). The teacher runs
            in inference mode, off the gradient tape, concurrently with the replicas.

    Returns:
        A `kerasmgpu.ParallelModel`.

    Example:

    ```python
    import numpy as np
    import keras
    import kerasmgpu

    kerasmgpu.simulate_devices(2)  # only on a machine without GPUs
    model = keras.applications.Xception(weights=None, input_shape=(71, 71, 3), classes=10)
    parallel_model = kerasmgpu.multi_gpu_model(model, gpus=2)
    parallel_model.compile(loss="categorical_crossentropy", optimizer="rmsprop")
    x = np.random.random((16, 71, 71, 3))
    y = np.random.random((16, 10))
    parallel_model.fit(x, y, epochs=1, batch_size=8)
    model.save("my_model.keras")  # the template holds the trained weights
    ```
    """
    _check_template(model)
    variables, sync_period, bucket_bytes = comm.check_layout(
        variables, sync_period, bucket_bytes, optimizer_state, gradient_dtype
    )
    cpu_merge = options.boolean(cpu_merge, "cpu_merge")
    cpu_relocation = options.boolean(cpu_relocation, "cpu_relocation")
    sync_batchnorm = options.boolean(sync_batchnorm, "sync_batchnorm")
    if cpu_relocation and variables == "auto" and (
        sync_period != 1 or bucket_bytes is not None or optimizer_state != "full"
        or gradient_dtype != "float32"
    ):
        # Relocation means one copy on the host ("central"), where these do nothing.
        raise ValueError(
            "cpu_relocation=True keeps one copy of the weights on the CPU (variables="
            "'central'), where sync_period, bucket_bytes, optimizer_state and gradient_dtype "
            "do nothing; pass "
            "variables='replicated' to relocate and still all-reduce. Received: "
            f"cpu_relocation=True, sync_period={sync_period!r}, bucket_bytes={bucket_bytes!r}, "
                f"optimizer_state={optimizer_state!r}, gradient_dtype={gradient_dtype!r}"
        )
    # On a cluster the devices are counted over all workers: one per worker is enough.
    minimum = 2 if cluster_lib.current() is None else 1
    devices = devices_lib.resolve_devices(gpus, minimum=minimum)
    if cpu_relocation:
        # The variables on the host is the central layout, unless asked otherwise.
        variables = "central" if variables == "auto" else variables
        devices_lib.move_variables(model.variables, devices_lib.host_device())
    return ParallelModel(
        model, devices, cpu_merge=cpu_merge, sync_batchnorm=sync_batchnorm,
        variables=variables, sync_period=sync_period, bucket_bytes=bucket_bytes,
        teacher_device=teacher_device, optimizer_state=optimizer_state,
        gradient_dtype=gradient_dtype,
    )
