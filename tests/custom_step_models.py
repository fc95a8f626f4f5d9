"""Tiny versions of the keras.io models whose class has its own train/test/predict step.

Each follows its keras.io example ("Customizing what happens in fit()", DCGAN, WGAN-GP,
VAE, SimSiam) in structure and idiom, at toy size, so tests and the benchmark train them
in seconds. The randomness the exactness tests rely on is drawn in the step from a
`keras.random.SeedGenerator` (or passed in the data), as the examples do.
"""

import keras
import tensorflow as tf
from keras import layers, ops

from zoo.gan import GAN, compile_gan, dcgan  # noqa: F401 (the keras.io DCGAN, shared)


# ------------------------------------------------ "Customizing what happens in fit()"
class BasicTrainStep(keras.Model):
    """keras.io's first example: compiled loss and metrics, the step written out."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = layers.Dense(8, activation="tanh")
        self.out = layers.Dense(1)

    def call(self, x):
        return self.out(self.hidden(x))

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(y=y, y_pred=y_pred)
        gradients = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply(gradients, self.trainable_variables)
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss)
            else:
                metric.update_state(y, y_pred)
        return {m.name: m.result() for m in self.metrics}


class Penalised(layers.Layer):
    """The identity, adding the mean square of its input as a loss (`add_loss`)."""

    def call(self, x):
        self.add_loss(0.1 * ops.mean(ops.square(x)))
        return x


class AddedLosses(BasicTrainStep):
    """The basic step on a model whose layers add losses: an activity regularizer (which
    Keras divides by the call's batch size) and an `add_loss` of a mean."""

    def __init__(self, **kwargs):
        keras.Model.__init__(self, **kwargs)  # its own layers, not BasicTrainStep's
        self.hidden = layers.Dense(
            8, activation="tanh", activity_regularizer=keras.regularizers.L1(0.05))
        self.penalised = Penalised()
        self.out = layers.Dense(1)

    def call(self, x):
        return self.out(self.penalised(self.hidden(x)))


class OwnTrackers(BasicTrainStep):
    """keras.io's second example: no compiled loss; its own loss tracker and MAE metric."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.mae_metric = keras.metrics.MeanAbsoluteError(name="mae")

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = keras.losses.mean_squared_error(y, y_pred)
        gradients = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply(gradients, self.trainable_variables)
        self.loss_tracker.update_state(loss)
        self.mae_metric.update_state(y, y_pred)
        return {"loss": self.loss_tracker.result(), "mae": self.mae_metric.result()}

    @property
    def metrics(self):
        return [self.loss_tracker, self.mae_metric]


class OwnTestStep(BasicTrainStep):
    """keras.io's custom test_step (with the basic train_step)."""

    def test_step(self, data):
        x, y = data
        y_pred = self(x, training=False)
        loss = self.compute_loss(y=y, y_pred=y_pred)
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss)
            else:
                metric.update_state(y, y_pred)
        return {m.name: m.result() for m in self.metrics}


class OwnPredictStep(BasicTrainStep):
    """A predict_step that post-processes: the output and its rank among the batch."""

    def predict_step(self, data):
        x = data[0] if isinstance(data, (list, tuple)) else data
        y_pred = self(x, training=False)
        return {"score": y_pred, "centred": y_pred - ops.mean(y_pred)}


# ------------------------------------------------------------------------- GANs
class WGANGP(keras.Model):
    """keras.io's WGAN-GP: d_steps discriminator updates a step, with a gradient penalty."""

    def __init__(self, discriminator, generator, latent_dim, d_steps=2, gp_weight=10.0):
        super().__init__()
        self.discriminator = discriminator
        self.generator = generator
        self.latent_dim = latent_dim
        self.d_steps = d_steps
        self.gp_weight = gp_weight
        self.seed_generator = keras.random.SeedGenerator(7)

    def compile(self, d_optimizer, g_optimizer):
        super().compile()
        self.d_optimizer = d_optimizer
        self.g_optimizer = g_optimizer

    def gradient_penalty(self, batch_size, real_images, fake_images):
        alpha = keras.random.uniform((batch_size, 1), seed=self.seed_generator)
        interpolated = real_images + alpha * (fake_images - real_images)
        with tf.GradientTape() as gp_tape:
            gp_tape.watch(interpolated)
            pred = self.discriminator(interpolated, training=True)
        grads = gp_tape.gradient(pred, [interpolated])[0]
        norm = tf.sqrt(tf.reduce_sum(tf.square(grads), axis=1) + 1e-12)
        return tf.reduce_mean((norm - 1.0) ** 2)

    def train_step(self, real_images):
        if isinstance(real_images, tuple):
            real_images = real_images[0]
        batch_size = tf.shape(real_images)[0]
        for _ in range(self.d_steps):
            z = keras.random.normal((batch_size, self.latent_dim), seed=self.seed_generator)
            with tf.GradientTape() as tape:
                fake_images = self.generator(z, training=True)
                fake_logits = self.discriminator(fake_images, training=True)
                real_logits = self.discriminator(real_images, training=True)
                d_cost = tf.reduce_mean(fake_logits) - tf.reduce_mean(real_logits)
                gp = self.gradient_penalty(batch_size, real_images, fake_images)
                d_loss = d_cost + gp * self.gp_weight
            d_gradient = tape.gradient(d_loss, self.discriminator.trainable_variables)
            self.d_optimizer.apply_gradients(
                zip(d_gradient, self.discriminator.trainable_variables)
            )
        z = keras.random.normal((batch_size, self.latent_dim), seed=self.seed_generator)
        with tf.GradientTape() as tape:
            generated_images = self.generator(z, training=True)
            gen_img_logits = self.discriminator(generated_images, training=True)
            g_loss = -tf.reduce_mean(gen_img_logits)
        gen_gradient = tape.gradient(g_loss, self.generator.trainable_variables)
        self.g_optimizer.apply_gradients(zip(gen_gradient, self.generator.trainable_variables))
        return {"d_loss": d_loss, "g_loss": g_loss}


def gan_with_batchnorm(synchronized, features=6, latent_dim=4, seed=5):
    """keras.io's GAN loop on two small models with BatchNormalization in training mode.

    keras.io's GAN calls its models without `training`: the layers are built with
    `training=True`, so that they compute batch statistics (and update their moving
    ones) in every call, as a DCGAN's generator does.
    """
    def block(inputs_dim, outputs, name):
        inputs = keras.Input((inputs_dim,))
        hidden = layers.Dense(8, use_bias=False)(inputs)  # BatchNorm's beta is the bias
        hidden = layers.BatchNormalization(
            momentum=0.5, synchronized=synchronized)(hidden, training=True)
        hidden = layers.LeakyReLU(0.2)(hidden)
        return keras.Model(inputs, layers.Dense(outputs)(hidden), name=name)

    keras.utils.set_random_seed(seed)
    return GAN(block(features, 1, "discriminator"), block(latent_dim, features, "generator"),
               latent_dim=latent_dim)


def compile_gan_sgd(gan):
    """compile_gan with SGD: Adam would turn the float noise of gradients BatchNorm makes
    ~0 (the generator's output bias, removed by the discriminator's mean) into steps."""
    gan.compile(d_optimizer=keras.optimizers.SGD(0.05),
                g_optimizer=keras.optimizers.SGD(0.05),
                loss_fn=keras.losses.BinaryCrossentropy(from_logits=True))


def wgan_gp(features=6, latent_dim=4, seed=2):
    keras.utils.set_random_seed(seed)
    discriminator = keras.Sequential([
        keras.Input((features,)), layers.Dense(16, activation="tanh"), layers.Dense(1),
    ], name="critic")
    generator = keras.Sequential([
        keras.Input((latent_dim,)), layers.Dense(16), layers.LeakyReLU(0.2),
        layers.Dense(features),
    ], name="generator")
    return WGANGP(discriminator, generator, latent_dim)


# ------------------------------------------------------------------------- VAE
class Sampling(layers.Layer):
    """keras.io's Sampling layer: z = mean + exp(log_var / 2) * epsilon, epsilon drawn here."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seed_generator = keras.random.SeedGenerator(1337)

    def call(self, inputs):
        z_mean, z_log_var = inputs
        epsilon = keras.random.normal(ops.shape(z_mean), seed=self.seed_generator)
        return z_mean + ops.exp(0.5 * z_log_var) * epsilon


class VAE(keras.Model):
    """keras.io's VAE training loop (reconstruction + KL trackers, no call()).

    With `noise_in_step`, the encoder returns (z_mean, z_log_var) and epsilon is drawn in
    the step from the model's SeedGenerator (exact to one device); otherwise the encoder's
    Sampling layer draws it, per replica (see docs/custom_steps.md).
    """

    def __init__(self, encoder, decoder, noise_in_step, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder
        self.decoder = decoder
        self.noise_in_step = noise_in_step
        self.seed_generator = keras.random.SeedGenerator(3)
        self.total_loss_tracker = keras.metrics.Mean(name="total_loss")
        self.reconstruction_loss_tracker = keras.metrics.Mean(name="reconstruction_loss")
        self.kl_loss_tracker = keras.metrics.Mean(name="kl_loss")

    @property
    def metrics(self):
        return [self.total_loss_tracker, self.reconstruction_loss_tracker, self.kl_loss_tracker]

    def train_step(self, data):
        with tf.GradientTape() as tape:
            if self.noise_in_step:
                z_mean, z_log_var = self.encoder(data)
                epsilon = keras.random.normal(ops.shape(z_mean), seed=self.seed_generator)
                z = z_mean + ops.exp(0.5 * z_log_var) * epsilon
            else:
                z_mean, z_log_var, z = self.encoder(data)
            reconstruction = self.decoder(z)
            reconstruction_loss = ops.mean(
                ops.sum(keras.losses.binary_crossentropy(data, reconstruction), axis=-1)
            )
            kl_loss = -0.5 * (1 + z_log_var - ops.square(z_mean) - ops.exp(z_log_var))
            kl_loss = ops.mean(ops.sum(kl_loss, axis=1))
            total_loss = reconstruction_loss + kl_loss
        grads = tape.gradient(total_loss, self.trainable_weights)
        self.optimizer.apply_gradients(zip(grads, self.trainable_weights))
        self.total_loss_tracker.update_state(total_loss)
        self.reconstruction_loss_tracker.update_state(reconstruction_loss)
        self.kl_loss_tracker.update_state(kl_loss)
        return {m.name: m.result() for m in self.metrics}


def vae(features=8, latent_dim=2, noise_in_step=True, seed=3):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((features, 1))
    hidden = layers.Conv1D(4, 3, activation="relu", padding="same")(inputs)
    hidden = layers.Flatten()(hidden)
    hidden = layers.Dense(8, activation="relu")(hidden)
    z_mean = layers.Dense(latent_dim, name="z_mean")(hidden)
    z_log_var = layers.Dense(latent_dim, name="z_log_var")(hidden)
    outputs = [z_mean, z_log_var]
    if not noise_in_step:
        outputs.append(Sampling()([z_mean, z_log_var]))
    encoder = keras.Model(inputs, outputs, name="encoder")
    latent = keras.Input((latent_dim,))
    hidden = layers.Dense(features * 2, activation="relu")(latent)
    hidden = layers.Reshape((features, 2))(hidden)
    decoded = layers.Conv1D(1, 3, activation="sigmoid", padding="same")(hidden)
    decoder = keras.Model(latent, decoded, name="decoder")
    return VAE(encoder, decoder, noise_in_step)


# ---------------------------------------------------------------- contrastive
class SimSiam(keras.Model):
    """keras.io's SimSiam loop: two augmented views, encoder + predictor, stop-gradient."""

    def __init__(self, encoder, predictor, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder
        self.predictor = predictor
        self.seed_generator = keras.random.SeedGenerator(5)
        self.loss_tracker = keras.metrics.Mean(name="loss")

    @property
    def metrics(self):
        return [self.loss_tracker]

    def augment(self, x):
        noise = keras.random.normal(ops.shape(x), stddev=0.1, seed=self.seed_generator)
        return x + noise

    def compute_loss(self, p, z):
        z = ops.stop_gradient(z)
        p = tf.math.l2_normalize(p, axis=1)
        z = tf.math.l2_normalize(z, axis=1)
        return -ops.mean(ops.sum(p * z, axis=1))

    def train_step(self, data):
        ds_one, ds_two = self.augment(data), self.augment(data)
        with tf.GradientTape() as tape:
            z1, z2 = self.encoder(ds_one), self.encoder(ds_two)
            p1, p2 = self.predictor(z1), self.predictor(z2)
            loss = self.compute_loss(p1, z2) / 2 + self.compute_loss(p2, z1) / 2
        learnable_params = self.encoder.trainable_variables + self.predictor.trainable_variables
        gradients = tape.gradient(loss, learnable_params)
        self.optimizer.apply_gradients(zip(gradients, learnable_params))
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}


def simsiam(features=6, projection=4, seed=4):
    keras.utils.set_random_seed(seed)
    encoder = keras.Sequential([
        keras.Input((features,)), layers.Dense(8, activation="relu"), layers.Dense(projection),
    ], name="encoder")
    predictor = keras.Sequential([
        keras.Input((projection,)), layers.Dense(4, activation="relu"),
        layers.Dense(projection, use_bias=False),
    ], name="predictor")
    return SimSiam(encoder, predictor)
