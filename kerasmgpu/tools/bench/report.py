"""The benchmark's report, for people: a table and a throughput plot."""

import numpy as np

PHASE_TITLES = {"train": "Training (fit)", "predict": "Inference (predict)"}
METHOD_NAMES = {
    "keras": "plain Keras", "keras-xla": "plain Keras, XLA", "kerasmgpu": "kerasmgpu",
    "kerasmgpu-xla": "kerasmgpu, XLA per replica", "mirrored": "MirroredStrategy",
    "keras-jax": "Keras DataParallel (JAX)",
}
STYLES = {
    "keras": dict(marker="s", color="black", linestyle="none", markersize=8),
    "keras-xla": dict(marker="s", color="tab:gray", linestyle="none", markersize=8),
    "kerasmgpu": dict(marker="o", color="tab:blue"),
    "kerasmgpu-xla": dict(marker="o", color="tab:purple", linestyle="--"),
    "mirrored": dict(marker="^", color="tab:orange"),
    "keras-jax": dict(marker="D", color="tab:green"),
}


def devices_line(report):
    """One sentence: what a device is in this run."""
    machine = report["machine"]
    cores = report.get("cores_per_device")
    if not machine["simulated_devices"]:
        return f"GPUs: {', '.join(machine['gpus'])}"
    if cores:
        return (f"simulated devices of {cores} core{'s' if cores > 1 else ''} each (the "
                "1-device baselines run on as many)")
    return ("simulated devices sharing all cores: this measures the multi-device machinery's "
            "overhead (a speed-up near 1.0 is the best possible), not a speed-up")


def ceiling_line(report):
    """"kerasmgpu x2: 1.74x of a possible 1.80x (97%)", or None without a ceiling."""
    ceiling = report.get("ceiling")
    if not ceiling:
        return None
    n = ceiling["devices"]
    lines = [
        f"Ceiling: {n} independent plain-Keras processes on 1 device each, at once, reach "
        f"{ceiling['speedup']:.2f}x one process (what this machine allows {n} devices now)."
    ]
    best_one = next(r["samples_per_sec_best"] for r in report["results"]
                    if r["method"] == "keras" and r["phase"] == "train")
    for r in report["results"]:
        if r.get("of_ceiling") is not None:
            best = r["samples_per_sec_best"] / best_one
            lines.append(
                f"  {r['method']} x{n}: {r['speedup']:.2f}x of a possible "
                f"{ceiling['speedup']:.2f}x ({r['of_ceiling']:.0%}); fastest repeats: "
                f"{best:.2f}x of a possible {ceiling['speedup_best']:.2f}x "
                f"({best / ceiling['speedup_best']:.0%})"
            )
    return "\n".join(lines)


def _range(r):
    return f"{r['samples_per_sec_worst']:.0f}-{r['samples_per_sec_best']:.0f}"


def format_table(report):
    """The results as a printable table, one block per phase, then the ceiling."""
    settings, model, machine = report["settings"], report["model"], report["machine"]
    owns_cores = bool(report.get("cores_per_device")) or not machine["simulated_devices"]
    loads = machine.get("load_average_rounds") or []
    load_text = (
        f"; load average {machine['load_average_start'][0]:.2f} at start, "
        + (f"{min(loads):.2f}-{max(loads):.2f} during, " if loads else "")
        + f"{machine['load_average_end'][0]:.2f} at end"
    )
    lines = [
        f"Model {model['name']}: {model['parameters']:,} parameters, "
        f"{model['forward_flops_per_sample'] / 1e6:.1f} MFLOP forward per sample",
        f"Machine: {machine['processor']}, {machine['cpu_count']} cores{load_text}",
        f"Devices: {devices_line(report)}",
    ]
    if report.get("peak_flops"):
        lines.append(f"Peak: {report['peak_flops'] / 1e9:.1f} GFLOP/s on 1 device "
                     "(float32 matmul)")
    for method, reason in (report.get("skipped") or {}).items():
        lines.append(f"Skipped {method}: {reason}")
    for phase in ("train", "predict"):
        rows = [r for r in report["results"] if r["phase"] == phase]
        if not rows:
            continue
        header = (
            f"{'method':<13} {'devices':>7} {'samples/s':>10} {'min-max':>11} {'speed-up':>8} "
            + (f"{'efficiency':>10} " if owns_cores else "")
            + f"{'vs mirrored':>11} {'1st step s':>10} {'MFU':>6} {'jit':>4}"
            + (f" {'loss':>9}" if phase == "train" else "")
        )
        lines += [
            "",
            f"{PHASE_TITLES[phase]}: global batch {settings['batch_size']}, median of "
            f"{settings['repeats']} x {settings['steps']} steps",
            header,
        ]
        for r in rows:
            speedup = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
            efficiency = f"{r['scaling_efficiency']:.0%}" if r["scaling_efficiency"] else "-"
            versus = f"{r['ratio_vs_mirrored']:.2f}x" if r["ratio_vs_mirrored"] else "-"
            mfu = f"{r['mfu']:.2f}" if r["mfu"] is not None else "-"
            lines.append(
                f"{r['method']:<13} {r['devices']:>7} {r['samples_per_sec']:>10.1f} "
                f"{_range(r):>11} {speedup:>8} "
                + (f"{efficiency:>10} " if owns_cores else "")
                + f"{versus:>11} {r['first_step_seconds']:>10.2f} {mfu:>6} "
                f"{'on' if r['jit_compile'] else 'off':>4}"
                + (f" {r['final_loss']:>9.4f}" if r["final_loss"] is not None else "")
            )
    ceiling = ceiling_line(report)
    if ceiling:
        lines += ["", ceiling]
    lines += [
        "",
        "speed-up: vs plain Keras on 1 device" + (
            "; efficiency: speed-up / devices" if owns_cores else "") + "; min-max: samples/s "
        "of the slowest and fastest repeat; vs mirrored: vs MirroredStrategy on the same "
        "devices; 1st step: time to the first step (tracing, compiling; with XLA, the "
        "compilation for every device) of the warm-up; -xla: the same method with XLA "
        "(kerasmgpu: each replica's program compiled for its device); "
        "loss: the last repeat's mean training loss (same weights and data: it should agree "
        "across the TensorFlow methods).",
        f"MFU = model FLOP/s / peak FLOP/s of the same devices. FLOPs: {model['flops_method']}.",
    ]
    return "\n".join(lines)


def plot_results(report, path):
    """Write a PNG of throughput against device count (one line per method, per phase).

    With devices that own their cores, the ceiling measured in the run is drawn too.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    phases = [p for p in ("train", "predict") if any(r["phase"] == p for r in report["results"])]
    figure = Figure(figsize=(5.5 * len(phases), 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    counts = report["settings"]["device_counts"]
    machine = report["machine"]
    owns_cores = bool(report.get("cores_per_device")) or not machine["simulated_devices"]
    ceiling = report.get("ceiling")
    for index, phase in enumerate(phases):
        axes = figure.add_subplot(1, len(phases), index + 1)
        rows = [r for r in report["results"] if r["phase"] == phase]
        for method in STYLES:
            points = sorted(
                (r["devices"], r["samples_per_sec"], r["samples_per_sec_worst"],
                 r["samples_per_sec_best"])
                for r in rows if r["method"] == method
            )
            if not points:
                continue
            devices, medians, worst, best = (np.array(column) for column in zip(*points))
            # Bars span the slowest to the fastest repeat: how noisy the figure is.
            axes.errorbar(devices, medians, yerr=[medians - worst, best - medians], capsize=3,
                          label=METHOD_NAMES[method], **STYLES[method])
        baseline = next((r for r in rows if r["method"] == "keras"), None)
        if baseline and owns_cores:
            ideal = [baseline["samples_per_sec"] * n for n in counts]
            axes.plot(counts, ideal, color="grey", linestyle=":", label="linear scaling")
            if ceiling and phase == "train":
                axes.plot([1, ceiling["devices"]],
                          [baseline["samples_per_sec"],
                           baseline["samples_per_sec"] * ceiling["speedup"]],
                          color="tab:red", linestyle="--",
                          label=f"ceiling ({ceiling['devices']} processes at once)")
        axes.set_title(PHASE_TITLES[phase])
        axes.set_xlabel("devices")
        axes.set_ylabel("samples/s (median; bars: slowest to fastest repeat)")
        axes.set_xticks(counts)
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    cores = report.get("cores_per_device")
    if not machine["simulated_devices"]:
        kind = ", ".join(machine["gpus"])
    elif cores:
        kind = f"simulated devices of {cores} core{'s' if cores > 1 else ''} each"
    else:
        kind = "simulated devices sharing all cores (overhead, not speed-up)"
    figure.suptitle(
        f"{report['model']['name']}, global batch {report['settings']['batch_size']}: "
        f"{kind}, {machine['cpu_count']} cores",
        fontsize="medium",
    )
    figure.savefig(path, dpi=110)
    return path
