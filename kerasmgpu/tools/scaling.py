"""Predicting data-parallel speed on 2, 4 or 8 GPUs from one device's step time.

The model (every figure is printed with the prediction):

- **Compute.** A training step of global batch B takes `t1` seconds on one GPU (measured,
  or training FLOPs per step / the GPU's sustained FLOP/s). On N GPUs each replica gets
  B/N samples and computes for `t1 / N`: the split is taken as perfect, which is
  optimistic for small per-GPU batches (a GPU is less efficient on them).
- **Gradient bytes.** G = the bytes of the model's trainable parameters (4 per float32
  parameter): what every replica sends each step.
- **Links.** A transfer of b bytes takes `latency + b / bandwidth`, with the effective
  one-direction bandwidths of `LINKS` (about 75-80% of the nominal rates: PCIe 3.0 x16
  15.75 GB/s, 4.0 31.5 GB/s, 5.0 63 GB/s; NVLink 3 on an A100 300 GB/s).
- **Aggregation through the CPU** (variables on the host; Keras 2's `multi_gpu_model`,
  TensorFlow's CIFAR-10 multi-GPU tutorial): each step, each of the N GPUs pulls the G
  bytes of variables and pushes G bytes of gradients; the host serves `host_links` GPUs
  at a time (1: GPUs behind one PCIe switch or root port), so the transfers take
  `2 * ceil(N / host_links) * (latency + G / bandwidth)`. CPU-GPU traffic crosses PCIe
  even on NVLink machines (PCIe 4.0 is used there).
- **All-reduce on the GPUs** (ring, as NCCL does): `2 (N - 1)` steps, each moving G / N
  bytes per GPU: `2 (N - 1) * latency + 2 (N - 1) / N * G / bandwidth`.
- **Measured bytes.** When the bytes of kerasmgpu's layouts have been measured
  (`kerasmgpu.measure_traffic` on N simulated devices, through `kerasmgpu bench` or
  `predict-scaling --measure-traffic`), they replace the formulas for that N: through one
  device ("cpu", kerasmgpu's `variables="central"`) the busiest device's bytes sent plus
  received (weights go out before the forward pass, gradients come back after the
  backward pass: the two directions do not overlap) over the same link, with 2 (N - 1)
  transfers; all-reduce (`variables="replicated"`) the larger of its bytes sent and
  received (a ring sends and receives at once), with 2 (N - 1) transfers. Measured bytes
  include what the formulas leave out (batch slices, output gradients).
- **Overlap.** Communication can hide behind the fraction `overlap` of the backward pass
  (2/3 of the compute; gradients of late layers are ready before early ones are
  computed). The default, 0, assumes gradients move after the backward pass, as they do
  when they are summed once per step.
- Step time on N GPUs = `t1 / N + communication - hidden`; speed-up = `t1 / step time`;
  scaling efficiency = speed-up / N.

More GPUs do not pay off when the speed-up falls below 1 (slower than one GPU: the
small-model slowdowns reported with the old wrappers), when doubling the GPUs gains less
than 10%, or when efficiency falls below 50%. The predictor also gives the smallest
global batch that reaches 80% efficiency, taking compute time as proportional to batch.
"""

import dataclasses
import math

from kerasmgpu.options import UsageError, finite_float


@dataclasses.dataclass(frozen=True)
class Link:
    """A GPU interconnect: effective one-direction bandwidth and per-transfer latency.

    Args:
        name: a readable name, e.g. "PCIe 3.0 x16".
        bandwidth: bytes per second in one direction.
        latency: seconds added to every transfer.
    """

    name: str
    bandwidth: float
    latency: float


LINKS = {
    "pcie3": Link("PCIe 3.0 x16", 12e9, 10e-6),
    "pcie4": Link("PCIe 4.0 x16", 24e9, 10e-6),
    "pcie5": Link("PCIe 5.0 x16", 48e9, 10e-6),
    "nvlink": Link("NVLink 3 (A100)", 240e9, 5e-6),
}
# What GPU <-> host transfers travel over on a machine with this GPU link.
HOST_LINK = {"pcie3": "pcie3", "pcie4": "pcie4", "pcie5": "pcie5", "nvlink": "pcie4"}
AGGREGATIONS = ("cpu", "allreduce")
AGGREGATION_NAMES = {"cpu": "through CPU", "allreduce": "all-reduce"}
# The kerasmgpu layout whose measured bytes stand for each aggregation.
LAYOUT_OF = {"cpu": "central", "allreduce": "replicated"}
BACKWARD_FRACTION = 2.0 / 3.0
EFFICIENCY_TARGET = 0.8
MIN_GAIN = 1.1
POOR_EFFICIENCY = 0.5
DEFAULT_GPUS = (2, 4, 8)


@dataclasses.dataclass(frozen=True)
class Prediction:
    """The predicted training step of one configuration (times in seconds)."""

    gpus: int
    link: str
    aggregation: str
    compute_time: float
    communication_time: float
    exposed_communication: float
    step_time: float
    samples_per_sec: float
    speedup: float
    efficiency: float
    batch_for_target: int
    verdict: str
    bytes_source: str = "formula"


def communication_time(aggregation, num_gpus, gradient_bytes, link, host_links=1,
                       measured=None):
    """Seconds per step spent moving gradients (and, through the CPU, variables).

    Args:
        aggregation: "cpu" (variables on the host; pull variables, push gradients) or
            "allreduce" (ring all-reduce between the GPUs).
        num_gpus: N >= 1 (one GPU moves nothing).
        gradient_bytes: G, the bytes of the trainable parameters.
        link: the `Link` the transfers use (for "cpu", the GPU-host link).
        host_links: for "cpu", how many GPUs the host serves at the same time (formula
            only: measured bytes are one device's).
        measured: the busiest device's measured bytes per step, `{"sent": s, "received":
            r}`, instead of the formula's (see the module docstring).

    Returns:
        The communication time in seconds.

    Example:

    >>> communication_time("allreduce", 4, 4e6, Link("test", 1e10, 0.0))
    0.0006
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(
            f"aggregation must be one of {', '.join(AGGREGATIONS)}. Received: {aggregation!r}"
        )
    if num_gpus < 1 or host_links < 1:
        raise ValueError(
            "num_gpus and host_links must be >= 1. "
            f"Received: num_gpus={num_gpus}, host_links={host_links}"
        )
    if num_gpus == 1:
        return 0.0
    if measured is not None:
        sent, received = measured["sent"], measured["received"]
        moved = max(sent, received) if aggregation == "allreduce" else sent + received
        return 2 * (num_gpus - 1) * link.latency + moved / link.bandwidth
    if aggregation == "allreduce":
        steps = 2 * (num_gpus - 1)
        return steps * link.latency + steps / num_gpus * gradient_bytes / link.bandwidth
    rounds = math.ceil(num_gpus / host_links)
    return 2 * rounds * (link.latency + gradient_bytes / link.bandwidth)


def step_time(compute_time, num_gpus, communication, overlap=0.0):
    """Predicted seconds per step on `num_gpus` GPUs.

    Args:
        compute_time: t1, seconds of compute per step on one GPU (whole global batch).
        num_gpus: N.
        communication: seconds of communication per step (`communication_time`).
        overlap: fraction of the backward pass communication can hide behind, in [0, 1].

    Returns:
        `(per_gpu_compute, exposed_communication, step_time)`.

    Example:

    >>> step_time(0.1, 2, 0.02, overlap=0.0)
    (0.05, 0.02, 0.07)
    """
    per_gpu = compute_time / num_gpus
    hidden = min(communication, overlap * BACKWARD_FRACTION * per_gpu)
    exposed = communication - hidden
    return per_gpu, exposed, per_gpu + exposed


def min_compute_time(num_gpus, communication, overlap=0.0, target=EFFICIENCY_TARGET):
    """The one-GPU compute time per step at which N GPUs reach `target` efficiency.

    From efficiency = (t1/N) / (t1/N + exposed) >= target with
    exposed = communication - overlap * 2/3 * t1/N:
    t1 >= N * communication / ((1 - target) / target + overlap * 2/3).

    Example:

    >>> round(min_compute_time(4, 0.001), 6)
    0.016
    """
    if communication <= 0:
        return 0.0
    return num_gpus * communication / ((1 - target) / target + overlap * BACKWARD_FRACTION)


def _verdict(speedup, efficiency, previous_gpus, previous_speedup):
    if speedup < 1:
        return "slower than 1 GPU"
    if speedup < MIN_GAIN * previous_speedup:
        plural = "" if previous_gpus == 1 else "s"
        return f"no gain over {previous_gpus} GPU{plural}"
    if efficiency < POOR_EFFICIENCY:
        return "poor efficiency"
    return "pays off"


def predict(compute_time, gradient_bytes, batch_size, gpus=DEFAULT_GPUS, links=tuple(LINKS),
            aggregations=AGGREGATIONS, overlap=0.0, host_links=1, measured=None):
    """Predict step time, throughput and efficiency for each configuration.

    Args:
        compute_time: t1, seconds per training step on one GPU at `batch_size`.
        gradient_bytes: bytes of the trainable parameters.
        batch_size: the global batch size.
        gpus: GPU counts to predict.
        links: keys of `LINKS`.
        aggregations: "cpu" and/or "allreduce".
        overlap: fraction of the backward pass that hides communication, in [0, 1].
        host_links: GPUs the host serves at the same time (aggregation through the CPU).
        measured: measured bytes of the busiest device, `{"central" | "replicated":
            {N: {"sent": s, "received": r}}}`: used for the GPU counts they cover
            (`bytes_source` "measured"), the formulas elsewhere.

    Returns:
        A list of `Prediction`, by link, aggregation, then GPU count.

    Example:

    ```python
    for p in predict(0.05, 4.3e6, 128):
        print(p.gpus, p.link, p.aggregation, p.speedup, p.verdict)
    ```
    """
    if compute_time <= 0:
        raise ValueError(f"compute_time must be > 0 seconds. Received: {compute_time!r}")
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"overlap must be between 0 and 1. Received: {overlap!r}")
    unknown = [key for key in links if key not in LINKS]
    if unknown:
        raise ValueError(f"Unknown links {unknown}; known links: {', '.join(LINKS)}.")
    predictions = []
    for key in links:
        for aggregation in aggregations:
            link = LINKS[HOST_LINK[key]] if aggregation == "cpu" else LINKS[key]
            previous_gpus, previous_speedup = 1, 1.0
            for num_gpus in sorted(gpus):
                bytes_of = _measured_for(measured, aggregation, num_gpus)
                comm = communication_time(
                    aggregation, num_gpus, gradient_bytes, link, host_links=host_links,
                    measured=bytes_of,
                )
                per_gpu, exposed, total = step_time(compute_time, num_gpus, comm, overlap)
                speedup = compute_time / total
                efficiency = speedup / num_gpus
                needed = min_compute_time(num_gpus, comm, overlap)
                predictions.append(
                    Prediction(
                        gpus=num_gpus,
                        link=key,
                        aggregation=aggregation,
                        compute_time=per_gpu,
                        communication_time=comm,
                        exposed_communication=exposed,
                        step_time=total,
                        samples_per_sec=batch_size / total,
                        speedup=speedup,
                        efficiency=efficiency,
                        batch_for_target=max(1, math.ceil(batch_size * needed / compute_time)),
                        verdict=_verdict(speedup, efficiency, previous_gpus, previous_speedup),
                        bytes_source="measured" if bytes_of and num_gpus > 1 else "formula",
                    )
                )
                previous_gpus, previous_speedup = num_gpus, speedup
    return predictions


def _measured_for(measured, aggregation, num_gpus):
    by_count = (measured or {}).get(LAYOUT_OF[aggregation]) or {}
    return by_count.get(num_gpus) or by_count.get(str(num_gpus))


def measured_lines(measured, source=None):
    """Printable lines saying which bytes were measured, and what they were."""
    if not measured:
        return ["bytes per step: formulas (nothing measured)"]
    lines = []
    for aggregation, layout in LAYOUT_OF.items():
        by_count = measured.get(layout) or {}
        counts = sorted(by_count, key=int)
        if not counts:
            lines.append(f"{AGGREGATION_NAMES[aggregation]}: bytes from the formula")
            continue
        figures = ", ".join(
            f"N={n}: {int(by_count[n]['sent']):,} B sent, "
            f"{int(by_count[n]['received']):,} B received" for n in counts
        )
        batch = by_count[counts[0]].get("batch_size")
        how = (
            "sent + received over its link (weights out, gradients back, one after the "
            "other; --host-links not applied)" if aggregation == "cpu"
            else "the larger of sent and received (a ring does both at once)"
        )
        lines.append(
            f"{AGGREGATION_NAMES[aggregation]}: bytes MEASURED on kerasmgpu "
            f"variables=\"{layout}\"" + (f" at batch {batch}" if batch else "")
            + f", busiest device, {how}: {figures}; the formula for other GPU counts"
        )
    if source:
        lines.append(f"measured bytes from: {source}")
    return lines


def assumptions(overlap=0.0, host_links=1, measured=None, measured_source=None):
    """The predictor's assumptions as printable lines."""
    links = "; ".join(
        f"{link.name} {link.bandwidth / 1e9:g} GB/s, {link.latency * 1e6:g} us"
        for link in LINKS.values()
    )
    return [
        f"links (effective, one direction; latency per transfer): {links}",
        "compute splits perfectly over GPUs (optimistic for small per-GPU batches)",
        "through CPU: each GPU pulls the variables and pushes its gradients over PCIe, "
        f"host serving {host_links} GPU(s) at a time "
        f"(NVLink machines use {LINKS['pcie4'].name} to the host)",
        "all-reduce: ring, 2(N-1) steps moving 2(N-1)/N x gradient bytes per GPU",
        f"overlap: communication hides behind {overlap:.0%} of the backward pass "
        "(backward = 2/3 of compute)",
        f"verdicts: 'slower than 1 GPU' (speed-up < 1), 'no gain' (< {MIN_GAIN - 1:.0%} over "
        f"the previous GPU count), 'poor efficiency' (< {POOR_EFFICIENCY:.0%}); "
        f"'batch for {EFFICIENCY_TARGET:.0%}': smallest global batch reaching "
        f"{EFFICIENCY_TARGET:.0%} efficiency (compute proportional to batch)",
    ] + measured_lines(measured, measured_source)


def format_predictions(predictions, header=None):
    """A printable table of `predictions` (one block per link)."""
    lines = [header] if header else []
    columns = (
        f"{'GPUs':>4}  {'link':<16} {'aggregation':<12} {'step ms':>9} {'comm ms':>8} "
        f"{'samples/s':>10} {'speed-up':>8} {'efficiency':>10} {'batch for 80%':>13} "
        f"{'bytes':<8}  verdict"
    )
    current = None
    for p in predictions:
        if p.link != current:
            current = p.link
            lines += ["", columns]
        lines.append(
            f"{p.gpus:>4}  {LINKS[p.link].name:<16} {AGGREGATION_NAMES[p.aggregation]:<12} "
            f"{p.step_time * 1e3:>9.2f} {p.communication_time * 1e3:>8.2f} "
            f"{p.samples_per_sec:>10.0f} {p.speedup:>7.2f}x {p.efficiency:>10.0%} "
            f"{p.batch_for_target:>13} {p.bytes_source:<8}  {p.verdict}"
        )
    return "\n".join(lines)


def gradient_bytes_of(model):
    """Bytes of a model's trainable parameters: what each replica sends per step."""
    total = 0
    for variable in model.trainable_weights:
        size = math.prod(variable.shape)
        total += size * _dtype_bytes(variable.dtype)
    return total


def _dtype_bytes(dtype):
    import numpy as np

    return np.dtype(str(dtype).replace("bfloat16", "float16")).itemsize


def prediction_report(compute_time, compute_source, gradient_bytes, batch_size,
                      measured=None, measured_source=None, **options):
    """Predictions plus everything needed to read them, as a JSON-ready dict.

    `measured` (see `predict`) replaces the formulas' bytes where it covers a GPU count;
    `measured_source` says where it came from.
    """
    predictions = predict(
        compute_time, gradient_bytes, batch_size, measured=measured, **options
    )
    overlap = options.get("overlap", 0.0)
    host_links = options.get("host_links", 1)
    return {
        "kind": "prediction (a model, not a measurement)",
        "compute_time": compute_time,
        "compute_source": compute_source,
        "gradient_bytes": gradient_bytes,
        "batch_size": batch_size,
        "overlap": overlap,
        "host_links": host_links,
        "links": {key: dataclasses.asdict(link) for key, link in LINKS.items()},
        "host_link": dict(HOST_LINK),
        "assumptions": assumptions(overlap, host_links, measured, measured_source),
        "measured_bytes": {
            layout: {str(n): dict(b) for n, b in by_count.items()}
            for layout, by_count in (measured or {}).items()
        },
        "measured_source": measured_source,
        "predictions": [dataclasses.asdict(p) for p in predictions],
    }


def format_report(report):
    """The printable form of `prediction_report`'s dict."""
    header = (
        "Predicted scaling on GPUs (a model, not a measurement): "
        f"compute {report['compute_time'] * 1e3:.2f} ms per step on 1 GPU at global batch "
        f"{report['batch_size']} ({report['compute_source']}); gradients "
        f"{report['gradient_bytes'] / 1e6:.2f} MB per replica per step"
    )
    lines = [header, "Assumptions:"] + [f"  - {line}" for line in report["assumptions"]]
    predictions = [Prediction(**p) for p in report["predictions"]]
    return "\n".join(lines) + "\n" + format_predictions(predictions)


# ------------------------------------------------------------ memory per device

# Optimizer state per parameter, in parameters' worth: the slots Keras creates.
def add_prediction_arguments(parser):
    """Options shared by `predict-scaling` and `bench --predict`."""
    parser.add_argument(
        "--gpu-tflops", type=finite_float, default=None, metavar="TFLOPS",
        help="compute time from the model's training FLOPs at this sustained TFLOP/s of the "
        "target GPU (e.g. 0.5 x its float32 peak) instead of the measured step time",
    )
    parser.add_argument(
        "--overlap", type=finite_float, default=0.0,
        help="fraction of the backward pass that communication hides behind (default: 0)",
    )


def _parse_list(text, flag, convert, allowed=None):
    items = [item.strip() for item in str(text).split(",")]
    try:
        values = [convert(item) for item in items]
    except ValueError:
        values = None
    if not values or (allowed is not None and any(v not in allowed for v in values)):
        expected = f"from {', '.join(allowed)}" if allowed else "of whole numbers"
        raise UsageError(f"{flag} must be a comma-separated list {expected}. Received: {text!r}")
    return list(dict.fromkeys(values))


def parse_prediction_options(args):
    """Validated predictor options from parsed arguments (raises `UsageError`)."""
    if args.gpu_tflops is not None and args.gpu_tflops <= 0:
        raise UsageError(f"--gpu-tflops must be > 0. Received: {args.gpu_tflops}")
    if not 0.0 <= args.overlap <= 1.0:
        raise UsageError(f"--overlap must be between 0 and 1. Received: {args.overlap}")
    options = {"overlap": args.overlap}
    if hasattr(args, "gpus"):
        gpus = _parse_list(args.gpus, "--gpus", int)
        if any(n < 1 for n in gpus):
            raise UsageError(f"--gpus must list counts >= 1. Received: {args.gpus!r}")
        if args.host_links < 1:
            raise UsageError(f"--host-links must be >= 1. Received: {args.host_links}")
        options.update(
            gpus=gpus,
            links=_parse_list(args.links, "--links", str, allowed=tuple(LINKS)),
            aggregations=_parse_list(
                args.aggregation, "--aggregation", str, allowed=AGGREGATIONS
            ),
            host_links=args.host_links,
        )
    return options
