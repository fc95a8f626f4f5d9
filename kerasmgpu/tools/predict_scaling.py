"""`kerasmgpu predict-scaling`: the scaling predictor (`kerasmgpu.tools.scaling`) on a model.

The step time on one GPU comes from `--step-time`, from the model's FLOPs at `--gpu-tflops`,
or is measured with plain Keras on this machine's first device (through the benchmark).
The bytes per step are the formulas' unless measured: `--measured-traffic bench.json`
reads a `kerasmgpu bench` report's traffic section; `--measure-traffic` measures them
here (`kerasmgpu.measure_traffic` in one worker process with max(--gpus) simulated
devices, which share this machine's cores: nothing is timed).
`--card-memory GB` adds the largest model that fits per device with the optimizer state
replicated and sharded (`optimizer_state="sharded"`) for each GPU count.
"""

import json

from kerasmgpu.options import UsageError, finite_float, writable_file
from kerasmgpu.tools import models
from kerasmgpu.tools.card_memory import STATE_SLOTS, format_memory, largest_models
from kerasmgpu.tools.scaling import (
    AGGREGATIONS,
    DEFAULT_GPUS,
    LINKS,
    add_prediction_arguments,
    format_report,
    gradient_bytes_of,
    parse_prediction_options,
    prediction_report,
)


def add_parser(subparsers):
    """Add the `predict-scaling` subcommand to a `kerasmgpu` argument parser."""
    parser = subparsers.add_parser(
        "predict-scaling",
        help="predict step time and efficiency on 2/4/8 GPUs over PCIe or NVLink",
        description=__doc__.split("\n\n")[0],
    )
    models.add_model_arguments(parser)
    add_prediction_arguments(parser)
    parser.add_argument(
        "--step-time", type=finite_float, default=None, metavar="SECONDS",
        help="training step time on one GPU at --batch-size (default: measure plain Keras "
        "on this machine's first device, unless --gpu-tflops is given)",
    )
    parser.add_argument(
        "--gpus", default=",".join(map(str, DEFAULT_GPUS)),
        help="GPU counts to predict, comma-separated (default: %(default)s)",
    )
    parser.add_argument(
        "--links", default=",".join(LINKS),
        help=f"links, comma-separated, from {', '.join(LINKS)} (default: all)",
    )
    parser.add_argument(
        "--aggregation", default=",".join(AGGREGATIONS),
        help="cpu (variables on the host) and/or allreduce (default: both)",
    )
    parser.add_argument(
        "--host-links", type=int, default=1,
        help="GPUs the host serves at once when aggregating through the CPU (default: 1)",
    )
    parser.add_argument(
        "--measured-traffic", default=None, metavar="BENCH_JSON",
        help="take the bytes per step of kerasmgpu's central and replicated layouts from "
        "this `kerasmgpu bench` report's traffic section instead of the formulas",
    )
    parser.add_argument(
        "--measure-traffic", action="store_true",
        help="measure those bytes now for every --gpus count (kerasmgpu.measure_traffic on "
        "simulated devices in a worker process; one traced step per count and layout)",
    )
    parser.add_argument(
        "--card-memory", type=finite_float, default=None, metavar="GB",
        help="also show the largest model (parameters) that fits per device of this many "
        "GB, with the optimizer state replicated and sharded",
    )
    parser.add_argument(
        "--optimizer", default="adam", choices=sorted(STATE_SLOTS),
        help="the optimizer whose state --card-memory counts (default: %(default)s)",
    )
    parser.add_argument(
        "--reserved", type=finite_float, default=0.0, metavar="FRACTION",
        help="share of the card kept for activations with --card-memory (default: 0)",
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="also write JSON here")
    parser.set_defaults(run=run_command, command_parser=parser, uses_tensorflow=True)
    return parser


def run_command(args):
    """Run `kerasmgpu predict-scaling` with parsed arguments."""
    writable_file(args.json, "--json")
    prediction_options = parse_prediction_options(args)
    if args.step_time is not None and args.step_time <= 0:
        raise UsageError(f"--step-time must be > 0 seconds. Received: {args.step_time}")
    if args.step_time is not None and args.gpu_tflops is not None:
        raise UsageError(
            "Give either --step-time or --gpu-tflops, not both. "
            f"Received: --step-time {args.step_time} --gpu-tflops {args.gpu_tflops}"
        )
    if args.measured_traffic and args.measure_traffic:
        raise UsageError(
            "Give either --measured-traffic or --measure-traffic, not both. "
            f"Received: --measured-traffic {args.measured_traffic} --measure-traffic"
        )
    if args.card_memory is not None and args.card_memory <= 0:
        raise UsageError(f"--card-memory must be > 0 GB. Received: {args.card_memory}")
    if not 0.0 <= args.reserved < 1.0:
        raise UsageError(f"--reserved must be in [0, 1). Received: {args.reserved}")
    models.validate_model_arguments(args)
    measured, measured_source = None, None
    if args.measured_traffic:
        from kerasmgpu.tools.bench.traffic import load_measured_bytes

        try:
            measured = load_measured_bytes(args.measured_traffic)
        except (OSError, ValueError) as error:
            raise UsageError(f"--measured-traffic: {error}") from None
        measured_source = args.measured_traffic
    name, builder = models.load_model_builder(args.model)
    model = models.build_model(builder, name)
    gradient_bytes = gradient_bytes_of(model)
    if args.gpu_tflops is not None:
        from kerasmgpu.tools import flops  # TensorFlow: only to run, never for --help

        forward, _ = flops.forward_flops_per_sample(model)
        compute_time, source = models.compute_time_from_tflops(
            flops.TRAINING_FLOPS_FACTOR * forward, args.batch_size, args.gpu_tflops
        )
    elif args.step_time is not None:
        compute_time, source = args.step_time, "given"
    else:
        from kerasmgpu.tools.bench.command import measure_step_time

        compute_time, device = measure_step_time(args.model, args)
        source = f"measured with plain Keras on {device}"
    if args.measure_traffic:
        from kerasmgpu.tools.bench import runner
        from kerasmgpu.tools.bench.traffic import measured_bytes, section

        entries = runner.measure_traffic_only(
            args.model, prediction_options["gpus"], args.batch_size, args.seed
        )
        measured = measured_bytes(section(entries))
        measured_source = (
            f"measured now: kerasmgpu.measure_traffic at batch {args.batch_size} on "
            f"{max(prediction_options['gpus'])} simulated devices"
        )
    report = prediction_report(
        compute_time, source, gradient_bytes, args.batch_size, measured=measured,
        measured_source=measured_source, **prediction_options
    )
    report["model"] = name
    print(format_report(report))
    if args.card_memory is not None:
        rows = largest_models(args.card_memory * 1e9, prediction_options["gpus"],
                              STATE_SLOTS[args.optimizer], args.reserved)
        report["memory"] = {"card_gb": args.card_memory, "optimizer": args.optimizer,
                            "reserved": args.reserved, "largest_models": rows}
        print()
        print(format_memory(rows, args.card_memory, args.optimizer, args.reserved,
                            model_parameters=gradient_bytes // 4))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
        print(f"\nWrote {args.json}")
    return 0
