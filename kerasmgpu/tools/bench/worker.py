"""One benchmark contender in a process of its own: `python -m kerasmgpu.tools.bench.worker SPEC`.

Every method runs in a fresh process so that it gets exactly the devices and threads it is
measured on (TensorFlow fixes them when it initialises, once per process), and so that
plain Keras on 1 device of k cores is not handed the threads of N devices. The parent
(`kerasmgpu.tools.bench.runner`) starts the workers, then drives them one at a time (the
methods take turns) or, for the ceiling, several at once.

SPEC is a JSON object: method, devices, cores_per_device, model, weights, batch_size,
seed, jit_compile, steps_per_execution, compile_config, phases, variables (kerasmgpu's
layout, default "auto"). Commands arrive on stdin
as JSON lines; every answer is one stdout line starting with `ANSWER_PREFIX` (anything
else a library prints is ignored by the parent):

- `{"run": phase, "steps": s, "warmup": bool}` -> `{"seconds", "first_step_seconds", "loss"}`
- `{"peak": repeats}` -> `{"peak_flops", "runs", "size"}`
- `{"traffic": [N, ...]}` (kerasmgpu) -> `{"traffic": [entries]}`: one step's bytes on the
  first N devices for both layouts (`kerasmgpu.tools.bench.traffic`), untimed
- `{"exit": true}` ends the worker.
"""

import json
import os
import sys
import time

from kerasmgpu.tools.bench.runner import ANSWER_PREFIX, DISTINCT_BATCHES, TF_METHODS


def answer(payload):
    sys.stdout.write(ANSWER_PREFIX + json.dumps(payload) + "\n")
    sys.stdout.flush()


class _Timer:
    """Keras callback: wall time from the first step to the end, and of the first step."""

    def __init__(self, keras):
        outer = self

        class Callback(keras.callbacks.Callback):
            def _begin(self, *args, **kwargs):
                outer.start = outer.first_step = outer.end = None

            def _batch_begin(self, *args, **kwargs):
                if outer.start is None:
                    outer.start = time.perf_counter()

            def _batch_end(self, *args, **kwargs):
                if outer.first_step is None:
                    outer.first_step = time.perf_counter() - outer.start

            def _end(self, *args, **kwargs):
                outer.end = time.perf_counter()

            on_epoch_begin = on_predict_begin = _begin
            on_train_batch_begin = on_predict_batch_begin = _batch_begin
            on_train_batch_end = on_predict_batch_end = _batch_end
            on_epoch_end = on_predict_end = _end

        self.callback = Callback()
        self.start = self.first_step = self.end = None

    @property
    def seconds(self):
        return self.end - self.start


def _tf_contender(spec, keras, model_builder):
    import tensorflow as tf

    import kerasmgpu
    from kerasmgpu.tools import models

    n = spec["devices"]
    devices = kerasmgpu.visible_devices()[:n]
    method = spec["method"].removesuffix("-xla")
    jit_compile = spec["jit_compile"] or spec["method"].endswith("-xla")

    def arguments():
        # The optimizer is made here, inside the strategy's scope for MirroredStrategy.
        return models.fresh_compile_arguments(
            spec["compile_config"], jit_compile, spec["steps_per_execution"]
        )

    own_compile = spec["compile_config"] == models.OWN_COMPILE

    def compiled(model):
        # A model with its own train_step comes compiled by its builder (its own compile
        # arguments); only XLA is set, the same for every method.
        if own_compile:
            model.jit_compile = bool(jit_compile) and model.jit_compile
        else:
            model.compile(**arguments())
        return model

    if len(devices) < n:
        raise SystemExit(
            f"{spec['method']} on {n} devices: only {len(devices)} are visible "
            f"({', '.join(devices) or 'none'})."
        )
    if method == "mirrored":
        strategy = tf.distribute.MirroredStrategy(devices=devices)
        with strategy.scope():
            model = template = compiled(model_builder())
    elif method == "kerasmgpu":
        template = model_builder()
        if own_compile:
            # Compiled, then wrapped: the wrapper takes the template's compile.
            template = compiled(template)
        model = kerasmgpu.ParallelModel(
            template, devices=devices, variables=spec.get("variables", "auto")
        )
        if not own_compile:
            # With more than 1 device, XLA compiles each replica's program for its device.
            model.compile(**arguments())
    else:
        model = template = compiled(model_builder())
    return model, template, devices


def _tf_data(x, y, phase):
    import tensorflow as tf

    # Without targets (a model with its own train_step), batches of x alone, as keras.io
    # feeds a GAN its images.
    slices = x if y is None else (x, y) if phase == "train" else (x,)
    return tf.data.Dataset.from_tensor_slices(slices).repeat().prefetch(tf.data.AUTOTUNE)


def _jax_contender(spec, keras, model_builder):
    from kerasmgpu.tools import models

    devices = keras.distribution.list_devices("cpu")[: spec["devices"]]
    if len(devices) > 1:
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    model = model_builder()
    # On JAX a step is always compiled with XLA (jit_compile=False runs it op by op, which
    # no JAX user would do), whatever the TensorFlow methods use.
    model.compile(**models.fresh_compile_arguments(
        spec["compile_config"], True, spec["steps_per_execution"]
    ))
    return model, model, [str(device) for device in devices]


def _unalias_optimizer_variables(keras, model):
    """Give every optimizer variable a buffer of its own again (Keras 3.15 on JAX).

    With `use_ema=True` (the zoo ConvNet's SGD), after one `fit` the moving-average
    variables share their buffers with the model's weights, and the next `fit` fails with
    "Attempt to donate the same buffer twice". A copy of each value breaks the aliasing; the
    values, and so training, are unchanged.
    """
    for variable in model.optimizer.variables:
        variable.assign(keras.ops.copy(variable.value))


def _python_batches(x, y, phase):
    def batches():
        while True:
            for index in range(DISTINCT_BATCHES):
                xs = tuple(a[index] for a in x) if isinstance(x, tuple) else x[index]
                ys = tuple(a[index] for a in y) if isinstance(y, tuple) else y[index]
                yield (xs, ys) if phase == "train" else (xs,)

    return batches


def main(spec):
    """Set up the devices and threads, build the contender, then serve commands."""
    method = spec["method"]
    if method in TF_METHODS:
        import kerasmgpu

        kerasmgpu.simulate_devices(spec["devices"], cores_per_device=spec["cores_per_device"])
    import keras

    from kerasmgpu.tools import models

    _, builder = models.load_model_builder(spec["model"])

    def model_builder():
        model = models.build_model(builder, spec["model"])
        model.load_weights(spec["weights"])
        return model

    keras.utils.set_random_seed(spec["seed"])
    if method in TF_METHODS:
        model, template, devices = _tf_contender(spec, keras, model_builder)
        feed = _tf_data
    elif method == "keras-jax":
        model, template, devices = _jax_contender(spec, keras, model_builder)
        feed = _python_batches
    else:
        raise ValueError(f"Unknown method {method!r}.")
    x, y = models.make_synthetic_data(
        template, spec["compile_config"].get("loss"), spec["batch_size"], DISTINCT_BATCHES,
        spec["seed"],
    )
    data = {phase: feed(x, y, phase) for phase in spec["phases"]}
    timer = _Timer(keras)
    meter = None
    ready = {"devices": devices, "jit_compile": bool(
        getattr(model, "jit_compile", False) or getattr(model, "replica_jit_compile", False)
    )}
    if method.startswith("kerasmgpu"):
        ready["variables"] = model.variables_layout  # what "auto" resolved to
    if method in TF_METHODS:
        import tensorflow as tf

        ready["threads"] = {
            "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
            "own_pool_per_device": os.environ.get("TF_OVERRIDE_GLOBAL_THREADPOOL") == "1",
        }
    else:
        ready["threads"] = {"xla_flags": os.environ.get("XLA_FLAGS", "")}
    answer(ready)
    for line in sys.stdin:
        command = json.loads(line)
        if command.get("exit"):
            break
        if "peak" in command:
            if meter is None:
                from kerasmgpu.tools import flops

                meter = flops.PeakMeter(devices)
            meter.measure(command["peak"])
            answer({"peak_flops": meter.best, "runs": meter.runs, "size": meter.size})
            continue
        if "traffic" in command:
            from kerasmgpu.tools.bench import traffic

            first = tuple(a[0] for a in x) if isinstance(x, tuple) else x[0]
            labels = None if y is None else tuple(a[0] for a in y) if isinstance(
                y, tuple) else y[0]
            answer({"traffic": traffic.measure_layouts(
                model_builder, None if spec["compile_config"] == models.OWN_COMPILE
                else lambda: models.fresh_compile_arguments(
                    spec["compile_config"], False, spec["steps_per_execution"]),
                devices, command["traffic"], first, labels,
            )})
            continue
        phase, steps = command["run"], command["steps"]
        dataset = data[phase]() if callable(data[phase]) else data[phase]
        loss = None
        if phase == "train":
            history = model.fit(
                dataset, epochs=1, steps_per_epoch=steps, shuffle=False, verbose=0,
                callbacks=[timer.callback],
            )
            loss = history.history.get("loss", [None])[-1]
            if method == "keras-jax":
                _unalias_optimizer_variables(keras, model)
        else:
            model.predict(dataset, steps=steps, verbose=0, callbacks=[timer.callback])
        answer({
            "seconds": timer.seconds, "first_step_seconds": timer.first_step,
            "loss": None if loss is None else float(loss),
        })


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    if spec["method"] == "keras-jax":
        os.environ["KERAS_BACKEND"] = "jax"
    main(spec)
