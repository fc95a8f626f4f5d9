"""The bytes a kerasmgpu training step moves, per layout, for the benchmark and the predictor.

Timing on simulated devices cannot show what the links of a GPU machine would carry, but
the bytes can be read off the step itself (`kerasmgpu.measure_traffic`: the partitioned
graph's transfers and collective payloads). The benchmark's kerasmgpu worker for N >= 2
devices measures one step for both layouts, "central" and "replicated", once and untimed;
the report's "traffic" section and table give the busiest device's bytes each way beside
the gradient bytes G and the ideal ring all-reduce's 2 (N - 1) / N x G. The scaling
predictor takes these bytes instead of its formulas (`measured_bytes`).

Each entry of the "traffic" section:

- method, devices, variables ("central" or "replicated"), batch_size;
- busiest_device, sent, received (its bytes each way per step), busiest_bytes (the larger);
- gradient_bytes (G), ring_bytes (2 (N - 1) / N x G), ratio_to_ring, ratio_to_gradients;
- per_device: `{device: {"sent": bytes, "received": bytes}}`.
"""

import json

LAYOUTS = ("central", "replicated")
HOW = (
    "kerasmgpu.measure_traffic: one training step at the benchmark's global batch, traced "
    "and run once (not timed; weights restored), bytes read from the partitioned graph "
    "(cross-device transfers; ring all-reduce payloads 2 (N-1)/N x bytes per device)"
)


def measure_layouts(build_model, compile_arguments, devices, counts, x, y):
    """Traffic entries for every device count in `counts` (>= 2) and both layouts.

    Args:
        build_model: returns a fresh template with the benchmark's initial weights.
        compile_arguments: returns fresh `compile()` keyword arguments, or None for a
            model with its own train_step that `build_model` returns compiled.
        devices: the devices of this process; N uses the first N.
        counts: device counts to measure.
        x, y: one global batch.

    Returns:
        A list of entries (see the module docstring), by count, then layout.
    """
    import kerasmgpu
    from kerasmgpu.comm import traffic

    entries = []
    for n in sorted(counts):
        if n < 2:
            continue
        if n > len(devices):
            raise ValueError(
                f"Traffic on {n} devices needs {n} devices; this process has {len(devices)}. "
                f"Received: counts={list(counts)}"
            )
        for layout in LAYOUTS:
            parallel = kerasmgpu.ParallelModel(build_model(), devices[:n], variables=layout)
            if compile_arguments is None:
                # A compiled model with its own train_step: the wrapper took its compile;
                # one step first builds its optimizers (their set-up is not step traffic).
                parallel.train_on_batch(x)
            else:
                parallel.compile(**dict(compile_arguments(), jit_compile=False))
            summary = traffic.summary(parallel, x, y)
            busiest = summary["devices"][summary["busiest_device"]]
            g, ring = summary["gradient_bytes"], summary["ring_bytes"]
            entries.append({
                "method": "kerasmgpu",
                "devices": n,
                "variables": layout,
                "batch_size": int(_batch_size(x)),
                "busiest_device": summary["busiest_device"],
                "sent": int(busiest["sent"]),
                "received": int(busiest["received"]),
                "busiest_bytes": int(summary["busiest_bytes"]),
                "gradient_bytes": int(g),
                "ring_bytes": float(ring),
                "ratio_to_ring": summary["busiest_bytes"] / ring if ring else None,
                "ratio_to_gradients": summary["busiest_bytes"] / g if g else None,
                "per_device": {
                    device: {"sent": int(b["sent"]), "received": int(b["received"])}
                    for device, b in summary["devices"].items()
                },
            })
    return entries


def _batch_size(x):
    first = x[0] if isinstance(x, (tuple, list)) else x
    return first.shape[0]


def section(entries):
    """The report's "traffic" section from the workers' entries (None without any)."""
    if not entries:
        return None
    return {"how": HOW, "results": sorted(
        entries, key=lambda e: (e["method"], e["devices"], LAYOUTS.index(e["variables"]))
    )}


def format_table(report):
    """The traffic table printed after the speed table ('' when nothing was measured)."""
    traffic = report.get("traffic")
    if not traffic:
        return ""
    lines = [
        "Traffic per training step, busiest device (measured on the step's graph; "
        "G = gradient bytes, ring = 2(N-1)/N x G):",
        f"{'method':<10} {'devices':>7}  {'variables':<10} {'busiest':<8} "
        f"{'sent MB':>8} {'recv MB':>8} {'G MB':>7} {'ring MB':>8} {'x ring':>7} {'x G':>6}",
    ]
    for e in traffic["results"]:
        ratio = f"{e['ratio_to_ring']:.2f}" if e["ratio_to_ring"] else "-"
        lines.append(
            f"{e['method']:<10} {e['devices']:>7}  {e['variables']:<10} "
            f"{_short(e['busiest_device']):<8} {e['sent'] / 1e6:>8.3f} {e['received'] / 1e6:>8.3f} "
            f"{e['gradient_bytes'] / 1e6:>7.3f} {e['ring_bytes'] / 1e6:>8.3f} {ratio:>7} "
            f"{e['ratio_to_gradients']:>6.2f}"
        )
    return "\n".join(lines)


def _short(device):
    """"/job:localhost/replica:0/task:0/device:CPU:0" -> "CPU:0"."""
    return device.rsplit("device:", 1)[-1]


def measured_bytes(traffic):
    """What the predictor needs from a "traffic" section: the busiest device's bytes.

    Returns:
        `{"central" | "replicated": {N: {"sent": bytes, "received": bytes, "device": name,
        "batch_size": B}}}` (kerasmgpu entries only).
    """
    measured = {}
    for e in (traffic or {}).get("results", []):
        if e.get("method", "kerasmgpu") != "kerasmgpu":
            continue
        measured.setdefault(e["variables"], {})[int(e["devices"])] = {
            "sent": e["sent"], "received": e["received"], "device": e["busiest_device"],
            "batch_size": e.get("batch_size"),
        }
    return measured


def load_measured_bytes(path):
    """`measured_bytes` from a JSON file: a `kerasmgpu bench` report or a prediction report.

    Raises:
        ValueError: the file holds no measured traffic.
    """
    with open(path) as handle:
        report = json.load(handle)
    traffic = report.get("traffic") or report.get("measured_traffic")
    measured = measured_bytes(traffic)
    if not measured:
        raise ValueError(
            f"{path} holds no measured traffic (a 'traffic' section with kerasmgpu entries, "
            "written by `kerasmgpu bench` with kerasmgpu on 2 or more devices). "
            f"Received: keys {sorted(report)}"
        )
    return measured
