"""First-epoch cost: MobileNetV2 through kerasmgpu on 4 devices against plain Keras.

    python benchmarks/first_epoch.py [--devices 4] [--samples 680] [--cores-per-device K]
                                     [--methods keras,keras-built,kerasmgpu,mirrored]
                                     [--metrics accuracy]

The first epoch of a `fit` pays for tracing the training step. With arrays (not a dataset
of fixed batches) the batch size is unknown when the step is traced, and the last batch is
short; a multi-device step that handles any batch size can trace more than plain Keras does.
This script measures it: MobileNetV2 (alpha 0.35, 32x32 inputs, 10 classes, no pretrained
weights), batch 64, `--samples` samples (default 680: 10 full batches and a short one of 40),
Adam and sparse categorical cross-entropy, one fresh process per method. The peer is
`tf.distribute.MirroredStrategy` on the same devices (it runs its step once per replica,
so its tracing grows with the devices too). Prints the first and the second epoch's wall
time of each and the ratios to plain Keras.

Plain Keras on TensorFlow builds the optimizer (and compiled metrics) while it traces the
first step, and TensorFlow traces a function that created variables a second time: its
step is traced twice. kerasmgpu builds them before tracing (its step is traced once);
`keras-built` is plain Keras with `model.optimizer.build(...)` called before `fit`, the
same single trace, for reference.
Runs itself as the measured process with --run METHOD.
"""

import argparse
import json
import os
import subprocess
import sys
import time

BATCH_SIZE = 64
METHODS = ("keras", "keras-built", "kerasmgpu", "mirrored")
LABELS = {"keras": "plain Keras, 1 device", "keras-built": "plain Keras, built first",
          "kerasmgpu": "kerasmgpu, {n} devices",
          "mirrored": "MirroredStrategy, {n} dev."}


def run(args):
    import kerasmgpu

    if args.run in ("kerasmgpu", "mirrored"):
        kerasmgpu.simulate_devices(args.devices, cores_per_device=args.cores_per_device)
    import contextlib

    import keras
    import numpy as np
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    scope = contextlib.nullcontext()
    if args.run == "mirrored":
        devices = kerasmgpu.visible_devices()[: args.devices]
        scope = tf.distribute.MirroredStrategy(devices=devices).scope()
    with scope:
        model = keras.applications.MobileNetV2(
            input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10
        )
        if args.run == "kerasmgpu":
            model = kerasmgpu.multi_gpu_model(model, gpus=args.devices)
        metrics = [m for m in args.metrics.split(",") if m] or None
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy",
                      metrics=metrics)
        if args.run == "keras-built":
            model.optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.samples, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, args.samples).astype("int32")
    epochs = []
    for _ in range(2):
        start = time.perf_counter()
        model.fit(x, y, batch_size=BATCH_SIZE, epochs=1, shuffle=False, verbose=0)
        epochs.append(time.perf_counter() - start)
    print(json.dumps({"method": args.run, "epochs": epochs}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--samples", type=int, default=680)
    parser.add_argument("--cores-per-device", type=int, default=None,
                        help="cores each simulated device owns (default: devices share them)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="methods to run, comma-separated (default: %(default)s)")
    parser.add_argument("--metrics", default="",
                        help="compiled metrics, comma-separated (default: none)")
    parser.add_argument("--run", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        return run(args)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERASMGPU_")}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "keras" not in methods or any(m not in METHODS for m in methods):
        parser.error(f"--methods must include keras and be some of {', '.join(METHODS)}. "
                     f"Received: {args.methods!r}")
    results = {}
    for method in methods:
        command = [sys.executable, __file__, "--run", method, "--devices", str(args.devices),
                   "--samples", str(args.samples), "--metrics", args.metrics]
        if args.cores_per_device:
            command += ["--cores-per-device", str(args.cores_per_device)]
        output = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        results[method] = json.loads(output.stdout.strip().splitlines()[-1])["epochs"]
    keras_first = results["keras"][0]
    print(f"MobileNetV2 alpha 0.35, 32x32, batch {BATCH_SIZE}, {args.samples} samples "
          f"(last batch {args.samples % BATCH_SIZE or BATCH_SIZE}), load average "
          f"{os.getloadavg()[0]:.2f}, metrics: {args.metrics or 'none'}")
    print(f"{'method':<28} {'1st epoch s':>11} {'2nd epoch s':>11} {'1st / Keras':>11}")
    for method, (first, second) in results.items():
        label = LABELS[method].format(n=args.devices)
        print(f"{label:<28} {first:>11.1f} {second:>11.1f} {first / keras_first:>10.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
