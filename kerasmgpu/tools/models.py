"""What `kerasmgpu bench` and `kerasmgpu predict-scaling` share: the model and how it is timed.

- The model comes from `--model`: a registered name or "module:function". Names are looked
  up in the entry-point group `kerasmgpu.models` (the zoo declares its builders there in
  `setup.cfg`), so the library finds example models without importing them.
- Every method is compiled from the same serialized compile configuration and trained on
  the same synthetic data, generated from the model's input and output shapes.
- `compute_time_from_tflops` turns a GPU's sustained TFLOP/s into a step time, once for
  both commands.
"""

import copy
import importlib
import json
import os
import sys
from importlib import metadata

import numpy as np

from kerasmgpu.options import UsageError

MODEL_ENTRY_POINTS = "kerasmgpu.models"
DEFAULT_MODEL = "cifar10_convnet"
DEFAULT_BATCH_SIZE = 128
DEFAULT_STEPS = 10
DEFAULT_REPEATS = 5
DEFAULT_WARMUP_STEPS = 3


def add_model_arguments(parser):
    """Options shared by `bench` and `predict-scaling`: the model and how it is timed."""
    parser.add_argument(
        "--model", default=DEFAULT_MODEL,
        help="a registered model name (entry points 'kerasmgpu.models', e.g. the zoo's) or "
        "module:function returning a Keras model (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
        help="global batch size, split over the devices (default: %(default)s)",
    )
    parser.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS,
        help="timed steps per repeat (default: %(default)s)",
    )
    parser.add_argument(
        "--repeats", type=int, default=DEFAULT_REPEATS,
        help="timed repeats per method; min, median and max reported (default: %(default)s)",
    )
    parser.add_argument(
        "--warmup-steps", type=int, default=DEFAULT_WARMUP_STEPS,
        help="untimed steps per method first (tracing) (default: %(default)s)",
    )
    parser.add_argument(
        "--steps-per-execution", type=int, default=1,
        help="steps per compiled call, as in Model.compile (default: %(default)s)",
    )
    parser.add_argument(
        "--jit-compile", action="store_true",
        help="compile every method's steps with XLA (kerasmgpu with more than 1 device: "
        "each replica's program, for its device; the -xla methods use XLA either way; "
        "the JSON reports what each method used)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and data")


def validate_model_arguments(args):
    """Check the timing options (raises `UsageError`)."""
    for flag in ("batch_size", "steps", "repeats", "warmup_steps", "steps_per_execution"):
        value = getattr(args, flag)
        if value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1. Received: {value}")
    for flag in ("steps", "warmup_steps"):
        value = getattr(args, flag)
        if value % args.steps_per_execution:
            raise UsageError(
                f"--{flag.replace('_', '-')} must be a multiple of --steps-per-execution "
                f"({args.steps_per_execution}). Received: {value}"
            )


def registered_models():
    """The model names of the entry-point group `kerasmgpu.models`: {name: entry point}."""
    return {point.name: point for point in metadata.entry_points(group=MODEL_ENTRY_POINTS)}


def load_model_builder(spec):
    """Resolve `--model`: a registered name or "module:function".

    Returns:
        `(name, builder)`: a display name and a function of no arguments returning a new
        Keras model each time it is called.

    Example:

    ```python
    name, builder = load_model_builder("cifar10_convnet")
    model = builder()
    ```
    """
    if ":" in spec:
        module_name, _, function_name = spec.partition(":")
        if not module_name or not function_name:
            raise UsageError(
                f"--model must be a registered model name or module:function. Received: {spec!r}"
            )
        # Like `python -m`, find modules in the current directory.
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise UsageError(
                f"--model {spec!r}: cannot import module {module_name!r} ({error})."
            ) from None
        builder = getattr(module, function_name, None)
        if not callable(builder):
            raise UsageError(
                f"--model {spec!r}: module {module_name!r} has no function {function_name!r}."
            )
        return spec, builder
    registry = registered_models()
    if spec not in registry:
        raise UsageError(
            f"Unknown model {spec!r}. Registered models: {', '.join(sorted(registry)) or 'none'} "
            f"(entry points '{MODEL_ENTRY_POINTS}'; install the package that declares them, "
            "e.g. `pip install -e .`); or give module:function returning a Keras model."
        )
    try:
        builder = registry[spec].load()
    except ImportError as error:
        raise UsageError(
            f"--model {spec!r}: cannot import {registry[spec].value} ({error})."
        ) from None
    return spec, builder


def build_model(builder, name):
    """Call `builder` and check that it returned a built Keras model with known inputs."""
    import keras

    try:
        model = builder()
    except TypeError as error:
        raise UsageError(
            f"The model {name!r} cannot be built without arguments ({error}). "
            "Give module:function returning the model you want instead."
        ) from None
    if not isinstance(model, keras.Model):
        raise UsageError(
            f"--model {name!r} must return a keras.Model. "
            f"Received: {type(model).__name__}"
        )
    if has_own_train_step(model):
        _check_own_step_model(model, name)
        from kerasmgpu import custom_steps

        # A GAN has no call(): Keras marks it built only when called, which it never is.
        # Its variables are its (built) sub-models': mark it built so its weights save.
        custom_steps.check_built(model)
        model.built = True
        return model
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if not model.built or not inputs:
        raise UsageError(
            f"--model {name!r} returned a model without defined inputs; build it with "
            "keras.Input(shape=...) (a functional or Sequential model) so synthetic data "
            "and FLOPs can be derived from its input shapes."
        )
    return model


def has_own_train_step(model):
    """Whether `model`'s class overrides `train_step` (a GAN, a VAE: see docs/custom_steps.md)."""
    from kerasmgpu import custom_steps

    return "train_step" in custom_steps.overridden_steps(model)


def own_step_data_shape(model):
    """The shape of one sample a model with its own train_step is fed (its `input_spec`)."""
    spec = model.input_spec
    spec = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    shape = getattr(spec, "shape", None)
    return None if shape is None else tuple(shape[1:])


def _check_own_step_model(model, name):
    """A model with its own train_step: compiled by its builder, its data shape declared."""
    shape = own_step_data_shape(model)
    if shape is None or any(dim is None for dim in shape):
        raise UsageError(
            f"--model {name!r} has its own train_step, so the benchmark cannot derive its "
            "data from inputs and outputs: declare the batch its step is fed with "
            "model.input_spec = keras.InputSpec(shape=(None, ...)) (fully defined besides "
            f"the batch axis). Received: input_spec={model.input_spec!r}"
        )
    if not getattr(model, "compiled", False):
        raise UsageError(
            f"--model {name!r} has its own train_step and must come compiled with its own "
            "compile() arguments (its optimizers, its loss), which the benchmark cannot "
            "choose for it. Received: an uncompiled model"
        )


# The compile configuration of a model with its own train_step: its builder compiles it
# (its own compile() arguments), in every worker, within the worker's strategy scope.
OWN_COMPILE = {"own_compile": True}


def compile_config_of(model):
    """The serialized compile configuration every method is compiled with.

    A compiled model's own configuration (optimizer with its settings, loss, metrics);
    for a model that is not compiled, Adam (learning rate 0.001) and sparse categorical
    cross-entropy, on logits unless the model ends with a softmax.
    """
    import keras

    if has_own_train_step(model):
        return dict(OWN_COMPILE)
    if getattr(model, "compiled", False):
        try:
            config = model.get_compile_config()
            json.dumps(config)
        except (TypeError, ValueError, NotImplementedError) as error:
            raise UsageError(
                f"The compile configuration of model {model.name!r} cannot be serialized "
                f"({error}); register custom losses and metrics with "
                "keras.saving.register_keras_serializable, or return an uncompiled model."
            ) from None
        if config:
            return config
    last = model.layers[-1] if model.layers else None
    softmax_output = isinstance(last, keras.layers.Softmax) or (
        getattr(last, "activation", None) is keras.activations.softmax
    )
    return {
        "optimizer": keras.optimizers.serialize(keras.optimizers.Adam()),
        "loss": keras.losses.serialize(
            keras.losses.SparseCategoricalCrossentropy(from_logits=not softmax_output)
        ),
    }


def fresh_compile_arguments(config, jit_compile, steps_per_execution):
    """`Model.compile` keyword arguments from a serialized compile configuration (new objects)."""
    import keras

    arguments = keras.saving.deserialize_keras_object(copy.deepcopy(config))
    arguments.update(
        jit_compile=jit_compile, steps_per_execution=steps_per_execution, run_eagerly=False
    )
    return arguments


def _loss_names(loss_config, num_outputs):
    """One lower-case loss name per output, from a serialized loss."""

    def name_of(entry):
        if isinstance(entry, str):
            return entry.lower()
        if isinstance(entry, dict):
            inner = entry.get("config")
            if isinstance(inner, dict) and isinstance(inner.get("name"), str):
                return inner["name"].lower()
            if isinstance(inner, str):
                return inner.lower()
            return str(entry.get("class_name", "")).lower()
        return ""

    if isinstance(loss_config, (list, tuple)) and len(loss_config) == num_outputs:
        return [name_of(entry) for entry in loss_config]
    return [name_of(loss_config)] * num_outputs


def make_synthetic_data(model, loss_config, batch_size, num_batches, seed):
    """Random inputs and targets shaped for `model` and its loss, generated once.

    Inputs are standard-normal floats (integer inputs: 0 or 1). Targets follow the loss:
    class ids for sparse categorical losses, one-hot rows for categorical ones, 0/1 for
    binary ones, standard-normal floats otherwise.

    A model with its own train_step gets uniform [0, 1) samples of its `input_spec`'s
    shape and no targets (y is None).

    Returns:
        `(x, y)` with a leading axis of `num_batches` whole batches: arrays, or tuples
        of arrays for several inputs or outputs.
    """
    rng = np.random.default_rng(seed)

    def batches(shape):
        return (num_batches, batch_size) + tuple(shape)

    if has_own_train_step(model):
        # Unlabelled samples in [0, 1) (a GAN's images): what such a step is fed.
        return rng.random(batches(own_step_data_shape(model))).astype("float32"), None

    xs = []
    for tensor in model.inputs:
        shape = batches(tensor.shape[1:])
        if "int" in str(tensor.dtype):
            xs.append(rng.integers(0, 2, shape).astype(str(tensor.dtype)))
        else:
            xs.append(rng.standard_normal(shape).astype(str(tensor.dtype)))
    ys = []
    for tensor, loss in zip(model.outputs, _loss_names(loss_config, len(model.outputs))):
        shape = tuple(tensor.shape[1:])
        if any(dim is None for dim in shape):
            raise UsageError(
                f"The model's output {tensor.name!r} has shape {tuple(tensor.shape)}; the "
                "benchmark needs outputs of known shape to make synthetic targets."
            )
        classes = shape[-1] if shape else 1
        if "sparse" in loss:
            ys.append(rng.integers(0, classes, batches(shape[:-1])).astype("int32"))
        elif "categorical" in loss:
            ids = rng.integers(0, classes, batches(shape[:-1]))
            ys.append(np.eye(classes, dtype="float32")[ids])
        elif "binary" in loss:
            ys.append(rng.integers(0, 2, batches(shape)).astype("float32"))
        else:
            ys.append(rng.standard_normal(batches(shape)).astype("float32"))
    x = xs[0] if len(xs) == 1 else tuple(xs)
    y = ys[0] if len(ys) == 1 else tuple(ys)
    return x, y


def compute_time_from_tflops(train_flops_per_sample, batch_size, gpu_tflops):
    """A training step's compute time on a GPU sustaining `gpu_tflops`, and how it was found.

    Returns:
        `(seconds, source)`: the step time and a sentence saying where it came from.

    Example:

    >>> compute_time_from_tflops(3e9, 100, 10.0)[0]
    0.03
    """
    flops = train_flops_per_sample * batch_size
    seconds = flops / (gpu_tflops * 1e12)
    return seconds, f"{flops / 1e9:.2f} GFLOP per step at {gpu_tflops:g} TFLOP/s"
