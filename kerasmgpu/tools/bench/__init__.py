"""`kerasmgpu bench`: how much faster is training on N devices, and is it worth it?

One run measures, on the same model, initial weights, global batch, synthetic data,
optimizer and `jit_compile` setting:

- "keras": plain `model.fit` / `model.predict` on one device (no wrapper): the reference;
- "kerasmgpu": `kerasmgpu.ParallelModel` for each device count (1 device runs the same
  code path as N);
- "keras-xla", "kerasmgpu-xla": the same two with XLA (`jit_compile=True`; for kerasmgpu
  on N devices, each replica's program compiled for its own device), side by side with
  the runs without it;
- "mirrored": `tf.distribute.MirroredStrategy` for each device count >= 2;
- "keras-jax": Keras' own `keras.distribution.DataParallel` on the JAX backend for each
  device count, when jax is installed (`pip install 'kerasmgpu[bench]'`);
- the ceiling: N independent plain-Keras processes on 1 device each, at once.

Each contender runs in a process of its own (`worker`); they take turns, `repeats` times,
so that load from elsewhere on the machine falls on all of them alike. Reported per
contender: samples/s from the median step time, the slowest and fastest repeat, the time
to the first step (tracing and compiling), MFU; per run: the load average.

Without GPUs the CPU is split into simulated devices. With `cores_per_device=k` (the
default of `make bench`) each device stands for a GPU with k cores of its own, and the
1-device baselines run on k cores too: N devices can then show a real speed-up, bounded
by the ceiling. Without it the devices share all cores: the run measures the cost of the
multi-device machinery, not a speed-up.

Modules: `runner` (processes, turns, ceiling), `worker` (one contender), `report` (table
and plot), `command` (the `kerasmgpu bench` command line).

Example:

```python
from kerasmgpu.tools import bench

report = bench.run_benchmark("cifar10_convnet", [1, 2], cores_per_device=1)
print(bench.format_table(report))
bench.plot_results(report, "bench.png")
```
"""

import math
import os
import statistics

from kerasmgpu.tools.bench import runner, traffic
from kerasmgpu.tools.bench.command import (
    DEFAULT_JSON,
    DEFAULT_PLOT,
    add_parser,
    check_batch_size,
    default_device_counts,
    main,
    measure_step_time,
    parse_device_counts,
    run_command,
)
from kerasmgpu.tools.bench.report import format_table, plot_results
from kerasmgpu.tools.bench.runner import METHODS, PHASES, jax_available, machine_info
from kerasmgpu.tools.models import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MODEL,
    DEFAULT_REPEATS,
    DEFAULT_STEPS,
    DEFAULT_WARMUP_STEPS,
    load_model_builder,
)

DISTINCT_BATCHES = runner.DISTINCT_BATCHES
VARIABLES = ("auto", "central", "replicated")


def run_benchmark(model=DEFAULT_MODEL, device_counts=(1, 2), cores_per_device=None,
                  batch_size=DEFAULT_BATCH_SIZE, steps=DEFAULT_STEPS, repeats=DEFAULT_REPEATS,
                  warmup_steps=DEFAULT_WARMUP_STEPS, jit_compile=False, steps_per_execution=1,
                  seed=0, methods=METHODS, phases=PHASES, ceiling=True, progress=True,
                  variables="auto"):
    """Measure every method on every device count; return the report as a dict.

    Args:
        model: a registered model name or "module:function" (see `--model`).
        device_counts: device counts to compare (kerasmgpu and keras-jax run each,
            MirroredStrategy each >= 2; plain Keras runs on one device as the reference).
        cores_per_device: on a machine without GPUs, the cores each simulated device owns
            (`None`: all devices share all cores, which measures overhead, not speed-up).
        batch_size, steps, repeats, warmup_steps, jit_compile, steps_per_execution,
            seed: see `kerasmgpu bench --help`.
        methods: some of "keras", "keras-xla", "kerasmgpu", "kerasmgpu-xla", "mirrored",
            "keras-jax" (keras-jax is skipped, and said so in `report["skipped"]`, when
            jax is not installed).
        phases: "train" and/or "predict".
        ceiling: also measure N independent 1-device processes at once (needs "keras",
            "train" and a device count >= 2).
        progress: show a progress bar.
        variables: the layout of the timed kerasmgpu runs: "central", "replicated" or
            "auto" (`ParallelModel(variables=...)`). The traffic of both layouts is
            measured whatever this is.

    Returns:
        The report: `machine`, `model`, `settings`, `peak_flops`, `results`, `ceiling`,
        `skipped`, `traffic` (one step's bytes per layout for kerasmgpu on 2 or more
        devices; see `kerasmgpu.tools.bench.traffic`), ...

    Example:

    ```python
    report = run_benchmark("cifar10_convnet", [1, 2], cores_per_device=1)
    print(format_table(report))
    ```
    """
    import keras
    import tensorflow as tf

    device_counts = sorted(set(device_counts))
    runner.check_methods(methods)
    if variables not in VARIABLES:
        raise ValueError(
            f"variables must be one of {', '.join(VARIABLES)}. Received: variables={variables!r}"
        )
    check_batch_size(batch_size, device_counts, methods)
    skipped = {}
    if "keras-jax" in methods and not jax_available():
        methods = tuple(m for m in methods if m != "keras-jax")
        skipped["keras-jax"] = runner.JAX_MISSING
    simulated = not tf.config.list_physical_devices("GPU")
    machine = machine_info(simulated=simulated, cores_per_device=cores_per_device)
    # N processes on shared cores say nothing about what N devices could do: no ceiling.
    ceiling = ceiling and not (simulated and cores_per_device is None)
    plan = runner.plan_contenders(device_counts, methods)
    total = len(plan) * len(phases) * (1 + repeats)
    bar = keras.utils.Progbar(total, unit_name="run") if progress else None
    with runner.new_workdir() as directory:
        model_info, weights = runner.reference_of(model, seed, directory)
        if model_info["own_train_step"] and "keras-jax" in methods:
            # keras.io's custom steps take gradients with tf.GradientTape: TensorFlow only.
            methods = tuple(m for m in methods if m != "keras-jax")
            skipped["keras-jax"] = (
                "the model has its own train_step (TensorFlow's GradientTape), which the "
                "JAX backend cannot run"
            )
            plan = runner.plan_contenders(device_counts, methods)
        if model_info["own_train_step"] and "predict" in phases:
            # A GAN has no call(): what it predicts is its own business (its generator).
            phases = tuple(p for p in phases if p != "predict")
            skipped["predict"] = "the model has its own train_step; only training is timed"
        spec = {
            "model": model, "weights": weights, "batch_size": batch_size, "seed": seed,
            "jit_compile": bool(jit_compile), "steps_per_execution": steps_per_execution,
            "compile_config": model_info["compile_config"], "phases": list(phases),
            "cores_per_device": cores_per_device if simulated else None,
            "variables": variables,
        }
        records, peaks, ceiling_rounds, ready, loads, traffic_entries = runner.measure(
            model, device_counts, spec, methods, phases, steps, warmup_steps, repeats,
            ceiling, bar,
        )
    machine["load_average_end"] = list(os.getloadavg())
    machine["load_average_rounds"] = loads
    machine["visible_devices"] = max(
        (r["devices"] for r in ready.values()), key=len, default=[]
    )

    results = []
    for phase in phases:
        flops_per_sample = model_info["forward_flops_per_sample"] * (
            model_info["train_flops_per_sample"] / model_info["forward_flops_per_sample"]
            if phase == "train" else 1
        )
        for method, n in plan:
            record = records[(f"{method} x{n}", phase)]
            results.append(_result(
                method, n, ready[f"{method} x{n}"], phase, record, batch_size,
                flops_per_sample, peaks.get(n),
            ))
    ceiling_report = None
    if ceiling_rounds:
        one = next(r for r in results if r["method"] == "keras" and r["phase"] == "train")
        ceiling_report = {
            "devices": max(device_counts),
            "speedup": runner.ceiling_speedup(ceiling_rounds, one["samples_per_sec"]),
            # On a shared machine the free cores come and go: fastest against fastest too.
            "speedup_best": max(ceiling_rounds) / one["samples_per_sec_best"],
            "samples_per_sec_rounds": ceiling_rounds,
            "one_process_samples_per_sec": one["samples_per_sec"],
        }
    _add_comparisons(results, ceiling_report, cores_per_device is not None and simulated)
    meter = next(iter(peaks.values()), None)
    one_device_peak = peaks[min(peaks)]["peak_flops"] if peaks else None
    return {
        "machine": machine,
        "model": model_info,
        "settings": {
            "device_counts": device_counts,
            "cores_per_device": spec["cores_per_device"],
            "batch_size": batch_size,
            "steps": steps,
            "repeats": repeats,
            "warmup_steps": warmup_steps,
            "jit_compile_requested": bool(jit_compile),
            "steps_per_execution": steps_per_execution,
            "seed": seed,
            "methods": list(methods),
            "variables": variables,
            "data": f"synthetic, {DISTINCT_BATCHES} batches in memory, repeated (tf.data for "
            "the TensorFlow methods, a Python generator for keras-jax)",
            "timing": "median, min and max over repeats of the wall time from the first to "
            "the last step of a fit epoch / predict call, divided by steps; warm-up untimed "
            "(its first step is first_step_seconds); one process per method; methods take "
            "turns",
        },
        "cores_per_device": spec["cores_per_device"],
        "ceiling": ceiling_report,
        "skipped": skipped,
        "peak_flops": one_device_peak,
        "peak_flops_by_devices": {str(n): p["peak_flops"] for n, p in peaks.items()},
        "peak_flops_method": (
            f"best of {meter['runs']} runs (3 at the start, one after each round of timed "
            f"runs) of a {meter['size']}-square float32 matmul on every device of the set at "
            "once, in the process (threads) of that device count" if meter else None
        ),
        "results": results,
        "traffic": traffic.section(traffic_entries),
    }


def _result(method, n, ready, phase, record, batch_size, flops_per_sample, peak):
    step_times = record["step_times"]
    median = statistics.median(step_times)
    samples_per_sec = batch_size / median
    peak_flops = peak["peak_flops"] if peak else None
    return {
        "method": method,
        "devices": n,
        "device_names": ready["devices"],
        "threads": ready["threads"],
        "phase": phase,
        "samples_per_sec": samples_per_sec,
        "samples_per_sec_best": batch_size / min(step_times),
        "samples_per_sec_worst": batch_size / max(step_times),
        "step_time_median": median,
        "step_time_min": min(step_times),
        "step_time_max": max(step_times),
        "step_times": step_times,
        "first_step_seconds": record["first_step_seconds"],
        "mfu": samples_per_sec * flops_per_sample / peak_flops if peak_flops else None,
        "peak_flops": peak_flops,
        "jit_compile": ready["jit_compile"],
        "variables": ready.get("variables"),  # kerasmgpu's layout in the timed runs
        "final_loss": record["loss"],
    }


def _add_comparisons(results, ceiling, owns_cores):
    """Speed-up vs plain Keras on 1 device, share of the ceiling, ratio vs MirroredStrategy.

    Scaling efficiency (speed-up / devices) only means something when every device has
    cores of its own; with shared cores it is left out (None).
    """
    for result in results:
        same_phase = [r for r in results if r["phase"] == result["phase"]]
        baseline = next((r for r in same_phase if r["method"] == "keras"), None) or next(
            (r for r in same_phase if r["method"] == "kerasmgpu" and r["devices"] == 1), None
        )
        mirrored = next(
            (r for r in same_phase
             if r["method"] == "mirrored" and r["devices"] == result["devices"]), None,
        )
        speedup = result["samples_per_sec"] / baseline["samples_per_sec"] if baseline else None
        result["speedup"] = speedup
        result["scaling_efficiency"] = (
            speedup / result["devices"] if speedup and owns_cores else None
        )
        result["ratio_vs_mirrored"] = (
            result["samples_per_sec"] / mirrored["samples_per_sec"]
            if mirrored and result["method"] != "mirrored" else None
        )
        result["of_ceiling"] = (
            speedup / ceiling["speedup"]
            if ceiling and speedup and result["phase"] == "train"
            and result["devices"] == ceiling["devices"] and not math.isclose(
                ceiling["speedup"], 0.0)
            else None
        )


__all__ = [
    "DEFAULT_BATCH_SIZE", "DEFAULT_JSON", "DEFAULT_MODEL", "DEFAULT_PLOT", "DEFAULT_REPEATS",
    "DEFAULT_STEPS", "DEFAULT_WARMUP_STEPS", "METHODS", "PHASES", "add_parser",
    "check_batch_size", "default_device_counts", "format_table", "jax_available",
    "load_model_builder", "machine_info", "main", "measure_step_time", "parse_device_counts",
    "plot_results", "run_benchmark", "run_command",
]
