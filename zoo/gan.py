"""keras.io's DCGAN: a GAN with its own train_step and compile, no call(), at small sizes.

The training loop is keras.io's "DCGAN to generate face images" (two optimizers, labels
with a little noise, noise drawn in the step from a SeedGenerator); the networks keep its
shape (strided convolutions with LeakyReLU in the discriminator, transposed convolutions
in the generator) at any image size. kerasmgpu wraps it as it is written: see
docs/custom_steps.md.

Example:

```python
import kerasmgpu
from zoo import gan

model = gan.dcgan(image_size=32, channels=3)
parallel = kerasmgpu.multi_gpu_model(model, gpus=2)
gan.compile_gan(parallel)  # the GAN's own compile(d_optimizer=..., g_optimizer=..., loss_fn=...)
parallel.fit(images, batch_size=64, epochs=1)
```
"""

import keras
import tensorflow as tf
from keras import layers, ops


class GAN(keras.Model):
    """keras.io's DCGAN training loop: compile(d_optimizer, g_optimizer, loss_fn), no call()."""

    def __init__(self, discriminator, generator, latent_dim, **kwargs):
        super().__init__(**kwargs)
        self.discriminator = discriminator
        self.generator = generator
        self.latent_dim = latent_dim
        self.seed_generator = keras.random.SeedGenerator(1337)

    def compile(self, d_optimizer, g_optimizer, loss_fn):
        super().compile()
        self.d_optimizer = d_optimizer
        self.g_optimizer = g_optimizer
        self.loss_fn = loss_fn
        self.d_loss_metric = keras.metrics.Mean(name="d_loss")
        self.g_loss_metric = keras.metrics.Mean(name="g_loss")
        # Not in keras.io: each optimizer creates its state now, for the models it updates.
        # Under tf.distribute.MirroredStrategy, state created inside the first traced step
        # fails ("You must feed a value for placeholder tensor"), so the benchmark's peer
        # needs this; it changes nothing else.
        d_optimizer.build(self.discriminator.trainable_variables)
        g_optimizer.build(self.generator.trainable_variables)

    @property
    def metrics(self):
        return [self.d_loss_metric, self.g_loss_metric]

    def train_step(self, real_images):
        if isinstance(real_images, tuple):  # (images,) from fit(x) or train_on_batch(x)
            real_images = real_images[0]
        batch_size = ops.shape(real_images)[0]
        random_latent_vectors = keras.random.normal(
            shape=(batch_size, self.latent_dim), seed=self.seed_generator
        )
        generated_images = self.generator(random_latent_vectors)
        combined_images = ops.concatenate([generated_images, real_images], axis=0)
        labels = ops.concatenate(
            [ops.ones((batch_size, 1)), ops.zeros((batch_size, 1))], axis=0
        )
        labels += 0.05 * keras.random.uniform(ops.shape(labels), seed=self.seed_generator)
        with tf.GradientTape() as tape:
            predictions = self.discriminator(combined_images)
            d_loss = self.loss_fn(labels, predictions)
        grads = tape.gradient(d_loss, self.discriminator.trainable_weights)
        self.d_optimizer.apply_gradients(zip(grads, self.discriminator.trainable_weights))

        random_latent_vectors = keras.random.normal(
            shape=(batch_size, self.latent_dim), seed=self.seed_generator
        )
        misleading_labels = ops.zeros((batch_size, 1))
        with tf.GradientTape() as tape:
            predictions = self.discriminator(self.generator(random_latent_vectors))
            g_loss = self.loss_fn(misleading_labels, predictions)
        grads = tape.gradient(g_loss, self.generator.trainable_weights)
        self.g_optimizer.apply_gradients(zip(grads, self.generator.trainable_weights))

        self.d_loss_metric.update_state(d_loss)
        self.g_loss_metric.update_state(g_loss)
        return {"d_loss": self.d_loss_metric.result(), "g_loss": self.g_loss_metric.result()}


def dcgan(image_size=8, latent_dim=8, channels=1, width=8, blocks=2, seed=1):
    """keras.io's DCGAN shape (strided convolutions, LeakyReLU), scaled to `image_size`.

    `blocks` strided convolutions in the discriminator and transposed ones in the
    generator (keras.io: 3 at 64x64); `image_size` must divide by 2**blocks.
    """
    keras.utils.set_random_seed(seed)
    discriminator = keras.Sequential(
        [keras.Input((image_size, image_size, channels))]
        + [layer for block in range(blocks) for layer in (
            layers.Conv2D(width * 2 ** block, 4, strides=2, padding="same"),
            layers.LeakyReLU(negative_slope=0.2))]
        + [layers.Flatten(), layers.Dense(1)],
        name="discriminator",
    )
    smallest = image_size // 2 ** blocks
    top = width * 2 ** (blocks - 1)
    generator = keras.Sequential(
        [keras.Input((latent_dim,)), layers.Dense(smallest * smallest * top),
         layers.Reshape((smallest, smallest, top))]
        + [layer for block in reversed(range(blocks)) for layer in (
            layers.Conv2DTranspose(width * 2 ** block, 4, strides=2, padding="same"),
            layers.LeakyReLU(negative_slope=0.2))]
        + [layers.Conv2D(channels, 3, padding="same", activation="sigmoid")],
        name="generator",
    )
    model = GAN(discriminator, generator, latent_dim)
    # What the step is fed (a batch of images): how `kerasmgpu bench` makes its data.
    model.input_spec = keras.InputSpec(shape=(None, image_size, image_size, channels))
    return model


def compile_gan(gan, learning_rate=1e-3):
    gan.compile(
        d_optimizer=keras.optimizers.Adam(learning_rate),
        g_optimizer=keras.optimizers.Adam(learning_rate),
        loss_fn=keras.losses.BinaryCrossentropy(from_logits=True),
    )


def dcgan_32():
    """The benchmark's DCGAN: 32x32 RGB images, keras.io's three blocks, compiled."""
    model = dcgan(image_size=32, latent_dim=64, channels=3, width=32, blocks=3)
    compile_gan(model, learning_rate=1e-4)
    return model
