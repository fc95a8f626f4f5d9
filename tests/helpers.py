"""Shared test helpers: twin models with identical weights, weight comparison, the CLI."""

import os

import keras
import numpy as np

# The repository root (the folder holding kerasmgpu/, zoo/ and tests/).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def twin(model):
    """A copy of `model` with the same architecture and the same weights."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def max_weight_difference(a, b):
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) if np.size(x) else 0.0
        for x, y in zip(a.get_weights(), b.get_weights())
    )


def dense_classifier(input_dim=8, classes=3, seed=1, regularizer=None):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((input_dim,), name="features")
    hidden = keras.layers.Dense(16, activation="relu", kernel_regularizer=regularizer)(inputs)
    outputs = keras.layers.Dense(classes, activation="softmax", name="probabilities")(hidden)
    return keras.Model(inputs, outputs)


def run_cli(args, capsys):
    """Run the `kerasmgpu` command in this process; return (exit status, stdout, stderr)."""
    from kerasmgpu.tools import cli

    try:
        status = cli.main(args)
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


class PlacedOp:
    """An op of a traced step: its op type, its name through the calls that reach it, the
    device it runs on and whether it belongs to a backward pass."""

    def __init__(self, op, name, device, backward):
        self.op, self.name, self.device, self.backward = op, name, device, backward


def placed_ops(graph_def):
    """Every op of a traced step (a GraphDef), with the device it is placed on.

    An op inside a function (a replica's program, a switch branch) without a device of its
    own runs on the device of the call that runs the function, as TensorFlow places it
    (called from N devices, the function's ops are listed N times). Backward ops are those
    a gradient tape traced into the step ("gradient_tape" scopes) and those of backward
    functions (a traced function's gradient).
    """
    functions = {f.signature.name: f for f in graph_def.library.function}

    def called(node):
        for value in node.attr.values():
            if value.HasField("func"):
                yield value.func.name
            yield from (f.name for f in value.list.func)

    def walk(nodes, prefix, device, backward):
        for node in nodes:
            name = f"{prefix}{node.name}"
            here = node.device or device
            in_backward = backward or "gradient_tape" in node.name
            yield PlacedOp(node.op, name, here, in_backward)
            for function in called(node):
                if function in functions:
                    yield from walk(
                        functions[function].node_def, f"{name}/", here,
                        in_backward or function.startswith("__inference___backward"),
                    )

    return list(walk(graph_def.node, "", "", False))
