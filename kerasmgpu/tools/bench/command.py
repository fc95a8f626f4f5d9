"""The `kerasmgpu bench` command line (and `python -m kerasmgpu.bench`)."""

import json
import logging
import math
import os
import sys

from kerasmgpu import options
from kerasmgpu.options import ENV_SIMULATED_DEVICES, UsageError
from kerasmgpu.tools import models, scaling

DEFAULT_JSON = "kerasmgpu_bench.json"
DEFAULT_PLOT = "kerasmgpu_bench.png"
SHARED = "shared"


def parse_device_counts(text):
    """Parse `--devices`: a comma-separated list of device counts, e.g. "1,2,4".

    Returns:
        The counts, sorted, without duplicates.

    Example:

    >>> parse_device_counts("4,1,2")
    [1, 2, 4]
    """
    try:
        counts = [int(item) for item in str(text).split(",")]
    except ValueError:
        counts = None
    if not counts or any(count < 1 for count in counts):
        raise UsageError(
            "--devices must be a comma-separated list of device counts >= 1, e.g. 1,2,4. "
            f"Received: {text!r}"
        )
    return sorted(set(counts))


def default_device_counts():
    """1, 2, 4, ... up to the GPUs present; without GPUs, up to 2 simulated devices
    (or up to KERASMGPU_SIMULATED_DEVICES when it is set)."""
    import tensorflow as tf

    available = len(tf.config.list_physical_devices("GPU"))
    if not available:
        try:
            available = int(os.environ.get(ENV_SIMULATED_DEVICES) or 2)
        except ValueError:
            available = 2
    counts, count = [], 1
    while count <= available:
        counts.append(count)
        count *= 2
    if counts[-1] != available:
        counts.append(available)
    return counts


def parse_cores_per_device(text, device_counts, cpu_count=None):
    """Parse `--cores-per-device`: a whole number, "shared", or "auto".

    "auto" gives every device an equal share of the cores (cores // largest device count)
    when that is at least 1, else "shared".

    Returns:
        The cores per device (int), or `None` for shared cores.

    Example:

    >>> parse_cores_per_device("auto", [1, 2], cpu_count=2)
    1
    """
    if text == SHARED:
        return None
    if text == "auto":
        cores = (cpu_count or os.cpu_count() or 1) // max(device_counts)
        return cores if cores >= 1 else None
    try:
        cores = int(text)
    except ValueError:
        cores = 0
    if cores < 1:
        raise UsageError(
            f"--cores-per-device must be a whole number >= 1, 'auto' or '{SHARED}'. "
            f"Received: {text!r}"
        )
    return cores


def parse_methods(text):
    """Parse `--methods`: a comma-separated subset of keras, kerasmgpu, mirrored, keras-jax."""
    from kerasmgpu.tools.bench.runner import METHODS

    methods = [item.strip() for item in str(text).split(",") if item.strip()]
    if not methods or any(m not in METHODS for m in methods):
        raise UsageError(
            f"--methods must be a comma-separated list from {', '.join(METHODS)}. "
            f"Received: {text!r}"
        )
    return tuple(dict.fromkeys(methods))


def add_parser(subparsers):
    """Add the `bench` subcommand to a `kerasmgpu` argument parser."""
    from kerasmgpu.tools.bench.runner import METHODS

    parser = subparsers.add_parser(
        "bench",
        help="compare training and inference speed on 1..N devices with plain Keras, "
        "MirroredStrategy and Keras' DataParallel on JAX",
        description="kerasmgpu bench: how much faster is training on N devices?",
    )
    models.add_model_arguments(parser)
    parser.add_argument(
        "--devices", default=None,
        help="device counts to compare, comma-separated, e.g. 1,2,4 (default: 1, 2, 4, ... "
        "up to the GPUs present; without GPUs up to 2, or up to "
        "KERASMGPU_SIMULATED_DEVICES when it is set)",
    )
    parser.add_argument(
        "--cores-per-device", default="auto", metavar="K",
        help="without GPUs: cores each simulated device owns; the 1-device baselines get K "
        f"cores too. '{SHARED}': all devices share all cores (measures the machinery's "
        "overhead, not a speed-up). Default 'auto': cores // largest device count, or "
        f"'{SHARED}' when that is 0",
    )
    parser.add_argument(
        "--methods", default=",".join(METHODS),
        help="methods to run, comma-separated (default: %(default)s; keras-jax is skipped "
        "when jax is not installed)",
    )
    parser.add_argument(
        "--variables", default="auto", choices=("auto", "central", "replicated"),
        help="where kerasmgpu keeps the weights in the timed runs (ParallelModel(variables=...); "
        "default: %(default)s). The traffic of both layouts is measured either way",
    )
    parser.add_argument(
        "--no-ceiling", action="store_true",
        help="do not measure the ceiling (N independent 1-device processes at once)",
    )
    parser.add_argument(
        "--json", default=DEFAULT_JSON, metavar="PATH",
        help="write the results here (default: %(default)s; '' to skip)",
    )
    parser.add_argument(
        "--plot", default=DEFAULT_PLOT, metavar="PATH",
        help="write the throughput plot (PNG) here (default: %(default)s; '' to skip)",
    )
    parser.add_argument(
        "--predict", action="store_true",
        help="also predict step time and efficiency on 2/4/8 GPUs over PCIe 3/4/5 and NVLink",
    )
    scaling.add_prediction_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run_command, command_parser=parser, uses_tensorflow=True)
    return parser


def check_batch_size(batch_size, device_counts, methods=("keras", "kerasmgpu", "mirrored")):
    """Check that every method can run `batch_size` on every device count (`UsageError`)."""
    if batch_size < max(device_counts):
        raise UsageError(
            f"--batch-size {batch_size} is smaller than the largest device count "
            f"{max(device_counts)}: every device needs at least one sample per step."
        )
    even = [n for n in device_counts if n >= 2] if (
        "mirrored" in methods or "keras-jax" in methods
    ) else []
    uneven = [n for n in even if batch_size % n]
    if uneven:
        raise UsageError(
            f"--batch-size {batch_size} does not divide evenly over {uneven[0]} devices: "
            "MirroredStrategy and Keras' DataParallel need equal per-device batches "
            "(kerasmgpu does not), and every method must run the same global batch. "
            f"Use a multiple of {math.lcm(*even)}."
        )


def measure_step_time(model, args):
    """Median training step time of plain Keras on one device, and that device's name."""
    from kerasmgpu.tools.bench import run_benchmark

    report = run_benchmark(
        model, [1], batch_size=args.batch_size, steps=args.steps, repeats=args.repeats,
        warmup_steps=args.warmup_steps, jit_compile=args.jit_compile,
        steps_per_execution=args.steps_per_execution, seed=args.seed, methods=("keras",),
        phases=("train",), ceiling=False, progress=False,
    )
    result = report["results"][0]
    return result["step_time_median"], result["device_names"][0]


def run_command(args):
    """Run `kerasmgpu bench` with parsed arguments."""
    from kerasmgpu.tools.bench import run_benchmark
    from kerasmgpu.tools.bench.report import format_table, plot_results
    from kerasmgpu.tools.bench.traffic import format_table as format_traffic

    models.validate_model_arguments(args)
    # Where the results go is checked before minutes of measurement, not after.
    options.writable_file(args.json, "--json")
    options.writable_file(args.plot, "--plot")
    counts = (
        default_device_counts() if args.devices is None else parse_device_counts(args.devices)
    )
    cores = parse_cores_per_device(args.cores_per_device, counts)
    methods = parse_methods(args.methods)
    check_batch_size(args.batch_size, counts, methods)
    prediction_options = scaling.parse_prediction_options(args)
    models.load_model_builder(args.model)  # a bad --model fails here, before any process

    tf_logger = logging.getLogger("tensorflow")
    level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)
    try:
        report = run_benchmark(
            args.model, counts, cores_per_device=cores, batch_size=args.batch_size,
            steps=args.steps, repeats=args.repeats, warmup_steps=args.warmup_steps,
            jit_compile=args.jit_compile, steps_per_execution=args.steps_per_execution,
            seed=args.seed, methods=methods, ceiling=not args.no_ceiling,
            progress=not args.quiet, variables=args.variables,
        )
    finally:
        tf_logger.setLevel(level)
    print()
    print(format_table(report))
    if report.get("traffic"):
        print()
        print(format_traffic(report))
    if args.predict:
        report["prediction"] = prediction_for(report, args.gpu_tflops, prediction_options)
        print()
        print(scaling.format_report(report["prediction"]))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
        print(f"\nWrote {args.json}")
    if args.plot:
        plot_results(report, args.plot)
        print(f"Wrote {args.plot}")
    return 0


def prediction_for(report, gpu_tflops, options):
    """The scaling prediction for a bench report (compute time from --gpu-tflops or measured)."""
    batch_size = report["settings"]["batch_size"]
    model = report["model"]
    if gpu_tflops:
        compute_time, source = models.compute_time_from_tflops(
            model["train_flops_per_sample"], batch_size, gpu_tflops
        )
    else:
        keras_train = next(
            r for r in report["results"] if r["method"] == "keras" and r["phase"] == "train"
        )
        compute_time = keras_train["step_time_median"]
        source = f"measured: plain Keras on {keras_train['device_names'][0]}"
        if report["machine"]["simulated_devices"]:
            source += " (a CPU; pass --gpu-tflops to model a GPU's compute)"
    from kerasmgpu.tools.bench.traffic import measured_bytes

    measured = measured_bytes(report.get("traffic"))
    return scaling.prediction_report(
        compute_time, source, model["gradient_bytes"], batch_size,
        measured=measured or None,
        measured_source="this run's traffic section" if measured else None, **options
    )


def main(argv=None):
    """`python -m kerasmgpu.bench [options]`: the same as `kerasmgpu bench [options]`."""
    from kerasmgpu.tools import cli

    return cli.main(["bench", *(sys.argv[1:] if argv is None else argv)])
