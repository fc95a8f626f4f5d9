"""The zoo's models: built, compiled Keras models with their training recipe.

Every builder returns a built `keras.Model` compiled with its own optimizer, loss and
metrics, so that the recipe travels with the model: wrap it with
`kerasmgpu.multi_gpu_model` and compile the wrapper with `model.optimizer` and
`model.loss` (`zoo.train.wrap` does exactly that).

Labels are integers everywhere in the zoo (class ids, shape `(N,)`), so every model is
compiled with sparse categorical cross-entropy.

Example:

```python
import zoo

model = zoo.get("mnist_mlp")
model.count_params()  # 669706
```
"""

import keras

LABELS_LOSS = "sparse_categorical_crossentropy"


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer. Received: {name}={value!r}")


def _resolve_optimizer(optimizer):
    """A fresh Keras optimizer from a name (e.g. "adam") or an optimizer instance."""
    if isinstance(optimizer, keras.optimizers.Optimizer):
        return optimizer
    try:
        return keras.optimizers.get(optimizer)
    except ValueError:
        raise ValueError(
            "optimizer must be a Keras optimizer name (e.g. 'rmsprop', 'adam', 'sgd', "
            f"'adagrad', 'adadelta', 'adamax', 'nadam') or a keras.optimizers.Optimizer. "
            f"Received: optimizer={optimizer!r}"
        ) from None


def mlp(nb_neurons, nb_layers, activation, optimizer, input_dim, num_classes, dropout=0.2,
        name="mlp"):
    """A multilayer perceptron from the MLP genetic-search family.

    `nb_layers` blocks of `Dense(nb_neurons, activation)` followed by `Dropout(dropout)`,
    then a softmax `Dense(num_classes)`. The four hyperparameters the genetic search
    explores (neurons, layers, activation, optimizer) are the first four arguments.

    Args:
        nb_neurons: units in every hidden layer.
        nb_layers: number of hidden Dense + Dropout blocks (>= 1).
        activation: a Keras activation name, e.g. "relu", "elu", "tanh", "sigmoid".
        optimizer: a Keras optimizer name (e.g. "rmsprop", "adam") or instance.
        input_dim: length of the flat input vector (784 for MNIST, 3072 for CIFAR-10).
        num_classes: number of classes of the softmax output.
        dropout: dropout rate after each hidden layer, in [0, 1).
        name: the model's name.

    Returns:
        A built `keras.Model` taking `(batch, input_dim)` floats, compiled with the
        optimizer, sparse categorical cross-entropy (integer labels) and accuracy.

    Example:

    ```python
    model = zoo.mlp(512, 2, "relu", "rmsprop", input_dim=784, num_classes=10)
    model.fit(x_train.reshape(-1, 784), y_train, batch_size=128, epochs=20)
    ```
    """
    _check_positive_int("nb_neurons", nb_neurons)
    _check_positive_int("nb_layers", nb_layers)
    _check_positive_int("input_dim", input_dim)
    _check_positive_int("num_classes", num_classes)
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1). Received: dropout={dropout!r}")
    try:
        keras.activations.get(activation)
    except ValueError:
        raise ValueError(
            "activation must be a Keras activation name such as 'relu', 'elu', 'tanh' or "
            f"'sigmoid'. Received: activation={activation!r}"
        ) from None
    resolved_optimizer = _resolve_optimizer(optimizer)

    inputs = keras.Input(shape=(input_dim,), name="features")
    x = inputs
    for index in range(1, nb_layers + 1):
        x = keras.layers.Dense(nb_neurons, activation=activation, name=f"dense_{index}")(x)
        x = keras.layers.Dropout(dropout, name=f"dropout_{index}")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, outputs, name=name)
    model.compile(optimizer=resolved_optimizer, loss=LABELS_LOSS, metrics=["accuracy"])
    return model


def mnist_mlp(num_classes=10):
    """The Keras `mnist_mlp` example: 784-512-512-10, ReLU, dropout 0.2, RMSprop.

    669,706 parameters; the reference result is 98.40% test accuracy on MNIST after 20
    epochs at batch size 128. Takes flat 784-vectors (`zoo.datasets.load(..., flatten=True)`).

    Example:

    ```python
    (x, y), (x_test, y_test) = zoo.datasets.load("mnist", flatten=True)
    model = zoo.mnist_mlp()
    model.fit(x, y, batch_size=128, epochs=20, validation_data=(x_test, y_test))
    ```
    """
    return mlp(512, 2, "relu", "rmsprop", input_dim=784, num_classes=num_classes,
               dropout=0.2, name="mnist_mlp")


def cifar10_mlp(num_classes=10):
    """The `mnist_mlp` architecture on CIFAR-10's flat 3072-vectors (512-512, ReLU, RMSprop).

    A fast baseline for CIFAR-10 (an MLP reaches roughly 50% there; the genetic search
    reported 56%). Takes `zoo.datasets.load("cifar10", flatten=True)` inputs.

    Example:

    ```python
    model = zoo.cifar10_mlp()
    model.count_params()  # 1841162
    ```
    """
    return mlp(512, 2, "relu", "rmsprop", input_dim=32 * 32 * 3, num_classes=num_classes,
               dropout=0.2, name="cifar10_mlp")
