"""Many small models at once: cross-validation on a device pool against plain Keras, timed.

    python benchmarks/many_models.py [--epochs 20] [--folds 3] [--batch-size 8]

The job: 3-fold cross-validation of 4 MLP candidates (one hidden layer of 32, 64, 128 or
256 ReLU units) on scikit-learn's digits (1,797 8x8 images, 64 features), batch 8,
20 epochs. Two ways, one after the other in this run:

- sequential: the plain Keras loop, one model after another (clear the session, seed,
  build, fit, evaluate), in a child process pinned to one core with one TensorFlow thread,
  one batch per call (Keras' default);
- pool: `kerasmgpu.cross_validate` on 2 devices of one core each (two worker processes,
  one thread each), `steps_per_execution="auto"`; its wall time includes starting the
  workers.

Then, under a pool of the same 2 devices, the seconds of one epoch at batch 8 of the
narrowest and the widest MLP with one batch per call against `steps_per_execution="auto"`
(after a warm-up epoch; the two workers measure at the same time).

Prints, as JSON: both wall times and their ratio, the largest difference between the
per-fold scores of the two ways (the same seeds: they should be equal), the epoch times
and the load average before and after. Needs 2 cores to mean anything.
"""

import argparse
import functools
import json
import os
import subprocess
import sys
import time

WIDTHS = (32, 64, 128, 256)


def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.data / 16.0).astype("float32"), data.target.astype("int32")


def build_mlp(width):
    import keras

    model = keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(width, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def sequential(args):
    """The plain Keras loop, one model after another, in this (one-core) process."""
    import keras

    from kerasmgpu.pool import fold_indices, fold_seed

    x, y = digits()
    scores = []
    start = time.perf_counter()
    for width in WIDTHS:
        for fold, (train, test) in enumerate(fold_indices(len(x), args.folds, args.seed)):
            keras.backend.clear_session()
            keras.utils.set_random_seed(fold_seed(args.seed, fold))
            model = build_mlp(width)
            model.fit(x[train], y[train], batch_size=args.batch_size, epochs=args.epochs,
                      verbose=0)
            scores.append(model.evaluate(x[test], y[test], batch_size=args.batch_size,
                                         verbose=0, return_dict=True))
    return {"seconds": time.perf_counter() - start, "scores": scores}


def epoch_seconds(data, width, steps_per_execution, batch_size, epochs=2):
    """A pool task: seconds per epoch of one MLP at `steps_per_execution`, after a warm-up."""
    import keras

    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    model = build_mlp(width)
    model.steps_per_execution = steps_per_execution
    model.fit(data["x"], data["y"], batch_size=batch_size, epochs=1, verbose=0)
    start = time.perf_counter()
    model.fit(data["x"], data["y"], batch_size=batch_size, epochs=epochs, verbose=0)
    return (time.perf_counter() - start) / epochs


def pool(args):
    import kerasmgpu

    x, y = digits()
    builders = [functools.partial(build_mlp, width) for width in WIDTHS]
    start = time.perf_counter()
    results = kerasmgpu.cross_validate(builders, x, y, folds=args.folds, devices=2,
                                       seed=args.seed, batch_size=args.batch_size,
                                       epochs=args.epochs)
    seconds = time.perf_counter() - start
    auto = results[0]["steps_per_execution"]
    configurations = [(width, spe) for width in (WIDTHS[0], WIDTHS[-1]) for spe in (1, auto)]
    with kerasmgpu.DevicePool(devices=2, data={"x": x, "y": y}) as device_pool:
        epochs = device_pool.map(epoch_seconds, [(width, spe, args.batch_size)
                                                 for width, spe in configurations])
    return {
        "seconds": seconds,
        "scores": [scores for result in results for scores in result["scores"]],
        "steps_per_execution": results[0]["steps_per_execution"],
        "mean_accuracy": {width: result["mean"]["accuracy"]
                          for width, result in zip(WIDTHS, results)},
        "epoch_seconds": {f"width {width}, steps_per_execution {spe}": seconds
                          for (width, spe), seconds in zip(configurations, epochs)},
        "epoch_speedup": {f"width {width}": epochs[2 * index] / epochs[2 * index + 1]
                          for index, width in enumerate((WIDTHS[0], WIDTHS[-1]))},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", choices=("both", "sequential"), default="both")
    args = parser.parse_args()
    if args.mode == "sequential":
        print(json.dumps(sequential(args)))
        return 0
    load_before = os.getloadavg()
    # The plain Keras run: its own process, one core, one thread (set before TensorFlow).
    env = dict(os.environ, TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1",
               OMP_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("KERASMGPU_SIMULATED_DEVICES", None)
    one_core = ["taskset", "-c", "0"] if _has_taskset() else []
    child = subprocess.run(
        [*one_core, sys.executable, __file__, "--mode", "sequential",
         "--epochs", str(args.epochs), "--folds", str(args.folds),
         "--batch-size", str(args.batch_size), "--seed", str(args.seed)],
        env=env, capture_output=True, text=True, check=True,
    )
    plain = json.loads(child.stdout.strip().splitlines()[-1])
    import kerasmgpu

    kerasmgpu.simulate_devices(2)
    pooled = pool(args)
    differences = [abs(a[name] - b[name]) for a, b in zip(plain["scores"], pooled["scores"])
                   for name in a]
    print(json.dumps({
        "sequential_seconds": plain["seconds"],
        "pool_seconds": pooled["seconds"],
        "pool_over_sequential": pooled["seconds"] / plain["seconds"],
        "largest_score_difference": max(differences),
        "steps_per_execution_auto": pooled["steps_per_execution"],
        "epoch_seconds": pooled["epoch_seconds"],
        "epoch_speedup_auto_over_one_batch_per_call": pooled["epoch_speedup"],
        "mean_accuracy_by_width": pooled["mean_accuracy"],
        "cores": len(os.sched_getaffinity(0)),
        "load_average": {"before": load_before, "after": os.getloadavg()},
    }, indent=2))
    return 0


def _has_taskset():
    from shutil import which

    return which("taskset") is not None


if __name__ == "__main__":
    sys.exit(main())
