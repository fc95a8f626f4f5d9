"""16-bit gradients and sharded optimizer state on the digits MLP: accuracy against float32.

    python benchmarks/gradient_dtype.py [--devices 4] [--epochs 30] [--seeds 0 1 2]

The zoo MLP (`zoo.mlp(64, 2, "relu", ...)`, 784-64-64-10, no dropout) on the offline
digits set (1,437 training and 360 test images: one test image is 0.28 accuracy points),
trained through `ParallelModel(..., variables="replicated")` on simulated devices with
Adam (learning rate 0.002), batch 64, no shuffling, the same seed for every variant of a
repeat, for every `gradient_dtype` ("float32", "bfloat16", "float16") and for
`optimizer_state="sharded"` with float32 gradients. Reports each variant's test accuracy
per seed and its difference to float32, the load average before and after, as JSON.

It is a benchmark (minutes on a 2-core machine), not a test: the suite checks the
compression itself (`tests/comm/test_sharded.py`), this checks what it does to training.
"""

import argparse
import json
import os
import sys

VARIANTS = {
    "float32": {},
    "bfloat16": {"gradient_dtype": "bfloat16"},
    "float16": {"gradient_dtype": "float16"},
    "sharded": {"optimizer_state": "sharded"},
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args(argv)
    os.environ.setdefault("KERASMGPU_SIMULATED_DEVICES", str(args.devices))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import keras

    import kerasmgpu
    import zoo

    load_before = os.getloadavg()
    (x, y), (x_test, y_test) = zoo.datasets.load("digits", flatten=True)
    devices = kerasmgpu.visible_devices()[: args.devices]
    results = {name: [] for name in VARIANTS}
    for seed in args.seeds:
        for name, options in VARIANTS.items():
            keras.utils.set_random_seed(seed)
            template = zoo.mlp(64, 2, "relu", "adam", input_dim=x.shape[1], num_classes=10,
                               dropout=0.0)
            parallel = kerasmgpu.ParallelModel(template, devices, variables="replicated",
                                               **options)
            parallel.compile(keras.optimizers.Adam(0.002), "sparse_categorical_crossentropy",
                             metrics=["accuracy"])
            parallel.fit(x, y, batch_size=64, epochs=args.epochs, shuffle=False, verbose=0)
            results[name].append(float(parallel.evaluate(x_test, y_test, verbose=0)[1]))
    report = {
        "devices": len(devices),
        "epochs": args.epochs,
        "seeds": args.seeds,
        "accuracy": results,
        "points_from_float32": {
            name: [round(100 * (a - b), 2) for a, b in zip(values, results["float32"])]
            for name, values in results.items()
        },
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
