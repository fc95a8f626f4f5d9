"""The CIFAR-10 tutorial's input pipeline on tf.data.

Training images are distorted as in the TensorFlow tutorial: a random 24x24 crop, a
random left-right flip, a random brightness change (max delta 63 on the 0-255 scale),
a random contrast factor in [0.2, 1.8], then per-image standardization. Evaluation
images are the central 24x24 crop, standardized. Images are prepared by parallel
`map` calls and batches are prefetched, so that the input does not keep the model's
replicas waiting.

The functions take the arrays `zoo.datasets.load("cifar10")` returns (float32 in
[0, 1], `(N, 32, 32, 3)`, int labels). The distortions are drawn with stateless random
ops seeded by the example's position in the stream (see
`zoo.datasets.shuffled_batches`), so a training run is reproducible and resumable.

Example:

```python
(x, y), (x_test, y_test) = zoo.datasets.load("cifar10")
train = zoo.cifar10_input.train_dataset(x, y, batch_size=128, seed=0)
test = zoo.cifar10_input.eval_dataset(x_test, y_test)
model = zoo.cifar10_convnet()
model.fit(train, epochs=10, steps_per_epoch=len(x) // 128, validation_data=test)
```
"""

import tensorflow as tf

from zoo import datasets

IMAGE_SIZE = 24  # the crop the ConvNet sees
MAX_BRIGHTNESS_DELTA = 63.0  # on the 0-255 scale
CONTRAST_RANGE = (0.2, 1.8)


def _tutorial_scale(image):
    # The tutorial distorts float images on the 0-255 scale (max brightness delta 63).
    return tf.cast(image, tf.float32) * 255.0


def distort(image, seed):
    """One training image: random crop, flip, brightness and contrast, standardization.

    Args:
        image: a float32 `(height, width, 3)` image in [0, 1], at least 24x24.
        seed: an int `[2]` tensor; the same seed gives the same distortion.

    Returns:
        A float32 `(24, 24, 3)` image with zero mean and unit variance.

    Example:

    ```python
    out = zoo.cifar10_input.distort(x[0], seed=tf.constant([0, 1]))
    ```
    """
    crop_seed, flip_seed, brightness_seed, contrast_seed = tf.unstack(
        tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=4)
    )
    image = _tutorial_scale(image)
    image = tf.image.stateless_random_crop(image, [IMAGE_SIZE, IMAGE_SIZE, 3], crop_seed)
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    image = tf.image.stateless_random_brightness(image, MAX_BRIGHTNESS_DELTA, brightness_seed)
    image = tf.image.stateless_random_contrast(image, *CONTRAST_RANGE, contrast_seed)
    return tf.image.per_image_standardization(image)


def center(image):
    """One evaluation image: the central 24x24 crop, standardized.

    Args:
        image: a float32 `(height, width, 3)` image in [0, 1], at least 24x24.

    Returns:
        A float32 `(24, 24, 3)` image with zero mean and unit variance.

    Example:

    ```python
    out = zoo.cifar10_input.center(x_test[0])
    ```
    """
    image = tf.image.resize_with_crop_or_pad(_tutorial_scale(image), IMAGE_SIZE, IMAGE_SIZE)
    return tf.image.per_image_standardization(image)


def _check_images(images, labels):
    shape = getattr(images, "shape", None)
    if shape is None or len(shape) != 4 or shape[-1] != 3 or min(shape[1:3]) < IMAGE_SIZE:
        raise ValueError(
            "images must be an array of shape (N, height, width, 3) with height and width "
            f">= {IMAGE_SIZE}, as zoo.datasets.load('cifar10') returns. Received: shape={shape}"
        )
    if len(labels) != len(images):
        raise ValueError(
            f"images and labels must have the same length. Received: {len(images)} images "
            f"and {len(labels)} labels"
        )


def train_dataset(images, labels, batch_size=128, seed=0, start_batch=0, repeat=True):
    """Shuffled, distorted training batches (the tutorial's `distorted_inputs`).

    Args:
        images: float32 `(N, 32, 32, 3)` in [0, 1].
        labels: int `(N,)`.
        batch_size: examples per batch (the tutorial's 128).
        seed: seeds the shuffle and the distortions.
        start_batch: first batch of the stream (int or scalar int `tf.Variable`), for
            resuming; see `zoo.datasets.shuffled_batches`.
        repeat: endless stream (True; pass `steps_per_epoch` to `fit`) or one pass.

    Returns:
        A prefetched `tf.data.Dataset` of `(images (B, 24, 24, 3) float32, labels (B,))`.

    Example:

    ```python
    train = zoo.cifar10_input.train_dataset(x, y, batch_size=128, seed=0)
    model.fit(train, epochs=10, steps_per_epoch=len(x) // 128)
    ```
    """
    _check_images(images, labels)

    def prepare(image, label, example_seed):
        return distort(image, example_seed), label

    return datasets.shuffled_batches(
        images, labels, batch_size, seed=seed, start_batch=start_batch, map_fn=prepare,
        repeat=repeat,
    )


def eval_dataset(images, labels, batch_size=128):
    """Centrally cropped, standardized evaluation batches, in order (`inputs(eval_data)`).

    Args:
        images: float32 `(N, 32, 32, 3)` in [0, 1].
        labels: int `(N,)`.
        batch_size: examples per batch.

    Returns:
        A prefetched `tf.data.Dataset` of `(images (B, 24, 24, 3) float32, labels (B,))`.

    Example:

    ```python
    model.evaluate(zoo.cifar10_input.eval_dataset(x_test, y_test),
                   callbacks=zoo.cifar10_recipe().callbacks())
    ```
    """
    _check_images(images, labels)
    return (
        tf.data.Dataset.from_tensor_slices((images, labels))
        .map(lambda image, label: (center(image), label), num_parallel_calls=tf.data.AUTOTUNE)
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
