"""`kerasmgpu bench`: the measurement, its output files, FLOP counting and flag errors."""

import ast
import json
import math
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import kerasmgpu
from kerasmgpu.tools import bench, flops, models
from kerasmgpu.tools.bench import command, runner
from kerasmgpu.tools.bench import traffic as bench_traffic
from tests.helpers import REPO, run_cli

TINY = [
    "--steps", "2", "--repeats", "2", "--warmup-steps", "1", "--batch-size", "8", "--quiet",
]


def tiny_classifier():
    """A small compiled classifier (module:function target for the CLI)."""
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(5, activation="relu")(inputs)
    outputs = keras.layers.Dense(3, activation="softmax")(hidden)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="sparse_categorical_crossentropy")
    return model


def tiny_logits_uncompiled():
    inputs = keras.Input((4,))
    return keras.Model(inputs, keras.layers.Dense(2)(inputs))


def not_a_model():
    return "model"


# ------------------------------------------------------------- end to end

def test_bench_writes_json_with_every_method_the_ceiling_and_a_png(tmp_path, capsys):
    json_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    status, out, _ = run_cli(
        ["bench", "--model", "tests.tools.test_bench:tiny_classifier", "--devices", "1,2", *TINY,
         "--cores-per-device", "1", "--methods", "keras,kerasmgpu,mirrored",
         "--json", str(json_path), "--plot", str(plot_path), "--predict"],
        capsys,
    )
    assert status == 0
    report = json.loads(json_path.read_text())

    assert report["cores_per_device"] == 1 == report["settings"]["cores_per_device"]
    assert report["machine"]["visible_devices"] == ["/device:CPU:0", "/device:CPU:1"]
    assert isinstance(report["peak_flops"], float) and report["peak_flops"] > 1e8
    rows = {(r["method"], r["devices"], r["phase"]): r for r in report["results"]}
    expected = {
        (method, n, phase)
        for method, n in [("keras", 1), ("kerasmgpu", 1), ("kerasmgpu", 2), ("mirrored", 2)]
        for phase in ("train", "predict")
    }
    assert set(rows) == expected
    for row in rows.values():
        assert row["samples_per_sec"] > 0 and math.isfinite(row["samples_per_sec"])
        assert len(row["step_times"]) == 2
        assert row["step_time_min"] <= row["step_time_median"] <= row["step_time_max"]
        assert row["samples_per_sec_worst"] <= row["samples_per_sec"]
        assert row["first_step_seconds"] > 0
        assert 0 < row["mfu"] < 1.5
        assert row["jit_compile"] is False
        # Each device owns 1 core: 1 thread per op, one op per device at a time.
        assert row["threads"]["intra_op"] == 1
        assert row["threads"]["inter_op"] == row["devices"]
    assert rows[("keras", 1, "train")]["speedup"] == 1.0
    assert rows[("kerasmgpu", 2, "train")]["ratio_vs_mirrored"] == pytest.approx(
        rows[("kerasmgpu", 2, "train")]["samples_per_sec"]
        / rows[("mirrored", 2, "train")]["samples_per_sec"]
    )
    # Same initial weights, data and optimizer: every method trains to the same loss.
    losses = [rows[(m, n, "train")]["final_loss"] for m, n, p in expected if p == "train"]
    assert max(losses) - min(losses) < 1e-4 * max(1.0, abs(losses[0]))

    ceiling = report["ceiling"]
    assert ceiling["devices"] == 2 and len(ceiling["samples_per_sec_rounds"]) == 2
    assert ceiling["speedup"] == pytest.approx(
        np.median(ceiling["samples_per_sec_rounds"]) / rows[("keras", 1, "train")][
            "samples_per_sec"]
    )
    assert ceiling["speedup_best"] == pytest.approx(
        max(ceiling["samples_per_sec_rounds"]) / rows[("keras", 1, "train")][
            "samples_per_sec_best"]
    )
    ours = rows[("kerasmgpu", 2, "train")]
    assert ours["of_ceiling"] == pytest.approx(ours["speedup"] / ceiling["speedup"])
    assert f"of a possible {ceiling['speedup']:.2f}x" in out

    # By hand: matmuls 2*6*5 + 2*5*3, biases 5 + 3, softmax 5 per output (TF's count).
    assert report["model"]["forward_flops_per_sample"] == 60 + 30 + 5 + 3 + 5 * 3
    assert report["model"]["gradient_bytes"] == (6 * 5 + 5 + 5 * 3 + 3) * 4
    assert report["prediction"]["predictions"]
    # One step's bytes for both layouts on 2 devices, untimed, beside the speed table.
    traffic = {(e["method"], e["devices"], e["variables"]): e
               for e in report["traffic"]["results"]}
    assert set(traffic) == {("kerasmgpu", 2, "central"), ("kerasmgpu", 2, "replicated")}
    g = report["model"]["gradient_bytes"]
    for entry in traffic.values():
        assert set(entry) >= {
            "busiest_device", "sent", "received", "busiest_bytes", "gradient_bytes",
            "ring_bytes", "ratio_to_ring", "ratio_to_gradients", "per_device", "batch_size",
        }
        assert entry["gradient_bytes"] == g and entry["ring_bytes"] == g  # 2 (2-1)/2 x G
        assert entry["busiest_bytes"] == max(entry["sent"], entry["received"]) >= g
        assert entry["per_device"][entry["busiest_device"]] == {
            "sent": entry["sent"], "received": entry["received"]}
        assert entry["ratio_to_ring"] == pytest.approx(entry["busiest_bytes"] / g)
    assert "Traffic per training step" in out
    assert report["settings"]["variables"] == "auto"
    # "auto" on CPU devices: central (see docs/comm.md, "Central or replicated").
    assert rows[("kerasmgpu", 2, "train")]["variables"] == "central"
    assert rows[("keras", 1, "train")]["variables"] is None
    predicted = {(p["aggregation"], p["gpus"]): p["bytes_source"]
                 for p in report["prediction"]["predictions"]}
    assert predicted[("allreduce", 2)] == predicted[("cpu", 2)] == "measured"
    assert predicted[("allreduce", 4)] == "formula"
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mirrored" in out and "kerasmgpu" in out and "Predicted scaling" in out
    assert "efficiency" in out


def _dense_for_traffic():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,))
    hidden = keras.layers.Dense(256, activation="relu")(inputs)
    return keras.Model(inputs, keras.layers.Dense(10)(hidden))


def _compile_arguments():
    return {"optimizer": keras.optimizers.SGD(0.1, momentum=0.9),
            "loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True)}


def test_traffic_of_both_layouts_on_4_devices():
    x = np.random.default_rng(0).normal(size=(8, 64)).astype("float32")
    y = np.arange(8) % 10
    entries = bench_traffic.measure_layouts(
        _dense_for_traffic, _compile_arguments, kerasmgpu.visible_devices()[:4], [4], x, y
    )
    by_layout = {e["variables"]: e for e in entries}
    assert set(by_layout) == {"central", "replicated"}
    g = (64 * 256 + 256 + 256 * 10 + 10) * 4
    replicated, central = by_layout["replicated"], by_layout["central"]
    assert replicated["gradient_bytes"] == g and replicated["ring_bytes"] == 1.5 * g
    # The ring all-reduce plus the batch slices: within 10% of 2 (N-1)/N x G.
    assert 1.5 * g <= replicated["busiest_bytes"] <= 1.1 * 1.5 * g
    # Through one device: it sends the weights to 3 replicas and receives 3 gradients.
    assert central["sent"] >= 3 * g and central["received"] >= 3 * g
    table = bench_traffic.format_table({"traffic": bench_traffic.section(entries)})
    assert "replicated" in table and "central" in table


def test_jit_compile_is_reported_as_used_and_shared_cores_say_overhead():
    """XLA on 1 device (the whole step) and on 2 (each replica's program)."""
    report = bench.run_benchmark(
        "tests.tools.test_bench:tiny_classifier", [1, 2], batch_size=4, steps=1, repeats=1,
        warmup_steps=1, jit_compile=True, methods=("kerasmgpu",), phases=("train",),
        progress=False,
    )
    used = {(r["method"], r["devices"]): r["jit_compile"] for r in report["results"]}
    assert used == {("kerasmgpu", 1): True, ("kerasmgpu", 2): True}
    assert report["settings"]["jit_compile_requested"] is True
    # Shared cores: no ceiling, no efficiency; the table says what it measures.
    assert report["cores_per_device"] is None and report["ceiling"] is None
    assert all(r["scaling_efficiency"] is None for r in report["results"])
    table = bench.format_table(report)
    assert "overhead" in table and "efficiency" not in table.split("Training")[1].split("\n")[1]


@pytest.mark.skipif(not bench.jax_available(), reason="jax is not installed")
def test_keras_jax_runs_data_parallel_on_host_devices():
    report = bench.run_benchmark(
        "tests.tools.test_bench:tiny_classifier", [2], cores_per_device=1, batch_size=4, steps=1,
        repeats=1, warmup_steps=1, methods=("keras-jax",), phases=("train",), ceiling=False,
        progress=False,
    )
    (row,) = report["results"]
    assert (row["method"], row["devices"], row["jit_compile"]) == ("keras-jax", 2, True)
    assert len(row["device_names"]) == 2 and row["samples_per_sec"] > 0
    assert "--xla_force_host_platform_device_count=2" in row["threads"]["xla_flags"]
    assert report["skipped"] == {}


def test_keras_jax_is_skipped_and_said_so_without_jax(monkeypatch):
    monkeypatch.setattr(bench, "jax_available", lambda: False)
    report = bench.run_benchmark(
        "tests.tools.test_bench:tiny_classifier", [2], batch_size=4, steps=1, repeats=1,
        warmup_steps=1, methods=("keras-jax",), phases=("train",), progress=False,
    )
    assert report["results"] == [] and "jax is not installed" in report["skipped"]["keras-jax"]
    assert "Skipped keras-jax: jax is not installed" in bench.format_table(report)


# ----------------------------------------------------------------- errors

@pytest.mark.parametrize("devices", ["1,x", "0,2", "", "1;2", "-1"])
def test_malformed_devices_are_rejected(devices, capsys):
    status, _, err = run_cli(["bench", "--devices", devices, *TINY], capsys)
    assert status == 2
    assert "--devices must be a comma-separated list" in err and repr(devices) in err


def test_unknown_model_lists_the_registered_ones(capsys):
    status, _, err = run_cli(["bench", "--model", "resnet9000", "--devices", "1", *TINY], capsys)
    assert status == 2
    assert "Unknown model 'resnet9000'" in err and "cifar10_convnet" in err


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_module_xyz:build", "cannot import module 'no_such_module_xyz'"),
        ("tests.tools.test_bench:missing", "has no function 'missing'"),
        ("tests.tools.test_bench:not_a_model", "must return a keras.Model"),
        ("mlp", "cannot be built without arguments"),
    ],
)
def test_bad_model_specs(spec, message, capsys):
    status, _, err = run_cli(["bench", "--model", spec, "--devices", "1", *TINY], capsys)
    assert status == 2
    assert message in err


def test_batch_smaller_than_devices_is_rejected(capsys):
    status, _, err = run_cli(
        ["bench", "--model", "tests.tools.test_bench:tiny_classifier", "--devices", "1,4",
         "--batch-size", "3", "--steps", "1", "--quiet"],
        capsys,
    )
    assert status == 2
    assert "--batch-size 3 is smaller than the largest device count 4" in err


def test_batch_that_mirrored_strategy_cannot_split_is_rejected(capsys):
    status, _, err = run_cli(
        ["bench", "--model", "tests.tools.test_bench:tiny_classifier", "--devices", "1,2,3",
         "--batch-size", "8", "--steps", "1", "--quiet"],
        capsys,
    )
    assert status == 2
    assert "--batch-size 8 does not divide evenly over 3 devices" in err
    assert "multiple of 6" in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--steps", "0"], "--steps must be >= 1. Received: 0"),
        (["--steps-per-execution", "2", "--steps", "3"], "multiple of --steps-per-execution"),
        (["--overlap", "1.5"], "--overlap must be between 0 and 1"),
    ],
)
def test_bad_timing_flags(flags, message, capsys):
    status, _, err = run_cli(["bench", "--devices", "1", *TINY, *flags], capsys)
    assert status == 2
    assert message in err


def test_simulated_devices_own_their_cores(tmp_path):
    """simulate_devices(n, cores_per_device=k): k threads per op, n ops at once, own pools."""
    script = textwrap.dedent("""
        import os
        import kerasmgpu
        import tensorflow as tf
        kerasmgpu.simulate_devices(3, cores_per_device=2)
        threading = tf.config.threading
        print(len(tf.config.list_logical_devices("CPU")),
              threading.get_intra_op_parallelism_threads(),
              threading.get_inter_op_parallelism_threads(),
              os.environ["TF_OVERRIDE_GLOBAL_THREADPOOL"])
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERASMGPU_")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    by_call = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
    )
    assert by_call.returncode == 0, by_call.stderr[-3000:]
    assert by_call.stdout.split() == ["3", "2", "3", "1"]
    by_env = subprocess.run(
        [sys.executable, "-c", script.replace("kerasmgpu.simulate_devices(3, cores_per_device=2)",
                                              "")],
        env=dict(env, KERASMGPU_SIMULATED_DEVICES="3", KERASMGPU_CORES_PER_DEVICE="2"),
        capture_output=True, text=True, timeout=120,
    )
    assert by_env.returncode == 0, by_env.stderr[-3000:]
    assert by_env.stdout.split() == ["3", "2", "3", "1"]


def test_cores_per_device_is_checked():
    with pytest.raises(ValueError, match="Received: cores_per_device=0"):
        kerasmgpu.simulate_devices(2, cores_per_device=0)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--cores-per-device", "0"], "--cores-per-device must be a whole number >= 1"),
        (["--cores-per-device", "many"], "Received: 'many'"),
        (["--methods", "keras,pytorch"], "--methods must be a comma-separated list"),
        (["--devices", "1,2", "--batch-size", "6", "--methods", "keras-jax", "--devices", "4"],
         "does not divide evenly over 4 devices"),
        (["--variables", "sideways"], "invalid choice: 'sideways'"),
    ],
)
def test_bad_bench_flags(flags, message, capsys):
    status, _, err = run_cli(["bench", *TINY, *flags], capsys)
    assert status == 2
    assert message in err


def test_auto_cores_per_device_splits_the_cores_or_shares_them():
    assert command.parse_cores_per_device("auto", [1, 2], cpu_count=2) == 1
    assert command.parse_cores_per_device("auto", [1, 2], cpu_count=8) == 4
    assert command.parse_cores_per_device("auto", [1, 4], cpu_count=2) is None
    assert command.parse_cores_per_device("shared", [1, 2]) is None
    assert command.parse_cores_per_device("3", [1, 2]) == 3


def test_ceiling_and_the_share_of_it():
    assert runner.ceiling_speedup([500.0, 560.0, 540.0], 300.0) == pytest.approx(1.8)
    results = [
        {"method": "keras", "devices": 1, "phase": "train", "samples_per_sec": 300.0},
        {"method": "kerasmgpu", "devices": 2, "phase": "train", "samples_per_sec": 522.0},
        {"method": "mirrored", "devices": 2, "phase": "train", "samples_per_sec": 200.0},
    ]
    bench._add_comparisons(results, {"devices": 2, "speedup": 1.8}, owns_cores=True)
    ours = results[1]
    assert ours["speedup"] == pytest.approx(1.74)
    assert ours["of_ceiling"] == pytest.approx(1.74 / 1.8)
    assert ours["scaling_efficiency"] == pytest.approx(0.87)
    assert ours["ratio_vs_mirrored"] == pytest.approx(2.61)
    assert results[0]["of_ceiling"] is None
    bench._add_comparisons(results, None, owns_cores=False)
    assert ours["scaling_efficiency"] is None and ours["of_ceiling"] is None


def test_nothing_in_kerasmgpu_imports_zoo_and_the_tools_have_no_cycle():
    """The library does not depend on its examples; bench and scaling do not import each other."""
    package = os.path.join(REPO, "kerasmgpu")
    imports = {}
    for folder, _, files in os.walk(package):
        for file in files:
            if not file.endswith(".py"):
                continue
            path = os.path.join(folder, file)
            module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
            names = set()
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.Import):
                    names.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names.add(node.module)
                    names.update(f"{node.module}.{alias.name}" for alias in node.names)
            imports[module] = names
    assert imports, "no modules found"
    for module, names in imports.items():
        assert not any(n == "zoo" or n.startswith("zoo.") for n in names), module
    assert not any("kerasmgpu.tools.bench" in n for n in imports["kerasmgpu.tools.scaling"])
    assert not any("kerasmgpu.tools.bench" in n for n in imports["kerasmgpu.tools.models"])
    assert not any("scaling" in n for n in imports["kerasmgpu.tools.models"])


def test_no_tools_module_is_over_500_lines():
    for folder, _, files in os.walk(os.path.join(REPO, "kerasmgpu", "tools")):
        for file in files:
            if file.endswith(".py"):
                with open(os.path.join(folder, file)) as handle:
                    assert sum(1 for _ in handle) <= 500, file


# ------------------------------------------------------------ pieces

def test_parse_device_counts_sorts_and_deduplicates():
    assert bench.parse_device_counts("4,1,2,2") == [1, 2, 4]


def test_forward_flops_of_a_convolution_by_hand():
    inputs = keras.Input((6, 6, 2))
    outputs = keras.layers.Conv2D(3, 3, use_bias=False)(inputs)
    total, by_op = flops.forward_flops_per_sample(keras.Model(inputs, outputs))
    # 4x4x3 outputs, each 3x3x2 multiply-adds.
    assert total == 2 * (4 * 4 * 3) * (3 * 3 * 2)
    assert by_op == {"Conv2D": total}


def test_measure_peak_flops_is_positive_and_needs_devices():
    assert flops.measure_peak_flops(["/device:CPU:0"], size=256, repeats=2) > 1e8
    with pytest.raises(ValueError, match="at least one device"):
        flops.measure_peak_flops([])


def test_uncompiled_model_gets_adam_and_cross_entropy_on_logits():
    config = models.compile_config_of(tiny_logits_uncompiled())
    assert config["optimizer"]["class_name"] == "Adam"
    assert config["loss"]["config"]["from_logits"] is True
    softmax = models.compile_config_of(keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(2, activation="softmax")]
    ))
    assert softmax["loss"]["config"]["from_logits"] is False


@pytest.mark.parametrize(
    "loss, check",
    [
        ("sparse_categorical_crossentropy",
         lambda y: y.dtype == np.int32 and y.shape == (2, 5) and set(np.unique(y)) <= {0, 1, 2}),
        ("categorical_crossentropy",
         lambda y: y.shape == (2, 5, 3) and np.all(y.sum(-1) == 1) and set(np.unique(y)) == {0, 1}),
        ("binary_crossentropy", lambda y: y.shape == (2, 5, 3) and set(np.unique(y)) <= {0, 1}),
        ("mse", lambda y: y.shape == (2, 5, 3) and y.dtype == np.float32 and y.std() > 0.5),
    ],
)
def test_synthetic_targets_follow_the_loss(loss, check):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    x, y = models.make_synthetic_data(model, loss, batch_size=5, num_batches=2, seed=0)
    assert x.shape == (2, 5, 4) and x.dtype == np.float32
    assert check(y)


def test_kerasmgpu_command_lists_its_subcommands(capsys):
    status, _, err = run_cli([], capsys)
    assert status == 2
    assert "bench" in err and "predict-scaling" in err


def test_a_model_with_its_own_train_step_is_fed_unlabelled_samples_of_its_input_spec():
    from kerasmgpu.tools.cli import UsageError
    from zoo import gan

    name, builder = models.load_model_builder("zoo.gan:dcgan_32")
    model = models.build_model(builder, name)
    assert models.compile_config_of(model) == models.OWN_COMPILE
    x, y = models.make_synthetic_data(model, None, batch_size=4, num_batches=2, seed=0)
    assert x.shape == (2, 4, 32, 32, 3) and y is None and 0 <= x.min() and x.max() < 1
    total, by_op = runner._sub_model_flops(model, flops)
    assert by_op.pop("_models") == ["discriminator", "generator"] and total > 0
    uncompiled = gan.dcgan(blocks=1)
    with pytest.raises(UsageError, match="compiled with its own compile"):
        models.build_model(lambda: uncompiled, "gan")
    uncompiled.input_spec = None
    with pytest.raises(UsageError, match="input_spec"):
        models.build_model(lambda: uncompiled, "gan")


def test_the_command_line_process_gets_the_simulated_devices_it_was_given(tmp_path):
    """The `kerasmgpu` process defers the environment (so --help starts no TensorFlow);
    a command that runs TensorFlow still gets KERASMGPU_SIMULATED_DEVICES' devices,
    without the 'called after TensorFlow initialised' warning."""
    script = tmp_path / "kerasmgpu"  # what `_started_as_command_line` recognises
    script.write_text(textwrap.dedent("""
        from kerasmgpu.tools import cli
        cli.start_tensorflow_quietly()
        import tensorflow as tf
        tf.constant(1.0)  # a command's first tensor
        print(len(tf.config.list_logical_devices("CPU")))
    """))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERASMGPU_")}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", KERASMGPU_SIMULATED_DEVICES="3")
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["3"]
    assert "initialised its devices" not in result.stderr
