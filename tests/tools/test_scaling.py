"""The scaling predictor: its arithmetic on hand-computed cases, verdicts and command line."""

import json

import keras
import pytest

from kerasmgpu.tools import card_memory, scaling
from kerasmgpu.tools.scaling import Link
from tests.helpers import run_cli

# Round numbers so every expected figure below is computed by hand.
TEN_GB = Link("test link", bandwidth=1e10, latency=0.0)
SLOW_START = Link("test link with latency", bandwidth=1e10, latency=1e-5)
G = 4e6  # gradient bytes (1M float32 parameters)


def by_key(predictions):
    return {(p.link, p.aggregation, p.gpus): p for p in predictions}


# ------------------------------------------------------------ communication

def test_ring_all_reduce_moves_2_n_minus_1_over_n_of_the_gradients():
    # 2 * 3/4 * 4e6 B / 1e10 B/s = 0.6 ms
    assert scaling.communication_time("allreduce", 4, G, TEN_GB) == pytest.approx(6e-4)
    # 2 GPUs: 2 * 1/2 * 4e6 / 1e10 = 0.4 ms; 8 GPUs: 2 * 7/8 * ... = 0.7 ms
    assert scaling.communication_time("allreduce", 2, G, TEN_GB) == pytest.approx(4e-4)
    assert scaling.communication_time("allreduce", 8, G, TEN_GB) == pytest.approx(7e-4)
    # Latency: 2 (N - 1) = 6 steps of 10 us on top.
    assert scaling.communication_time("allreduce", 4, G, SLOW_START) == pytest.approx(6.6e-4)


def test_aggregation_through_the_cpu_grows_with_the_gpus_sharing_the_host():
    # Each GPU pulls G and pushes G; one at a time: 2 * 4 * 0.4 ms = 3.2 ms.
    assert scaling.communication_time("cpu", 4, G, TEN_GB) == pytest.approx(3.2e-3)
    # Two host links serve two GPUs at once: 2 rounds -> 1.6 ms; four -> 0.8 ms.
    assert scaling.communication_time("cpu", 4, G, TEN_GB, host_links=2) == pytest.approx(1.6e-3)
    assert scaling.communication_time("cpu", 4, G, TEN_GB, host_links=4) == pytest.approx(8e-4)
    # 8 transfers, each with 10 us latency.
    assert scaling.communication_time("cpu", 4, G, SLOW_START) == pytest.approx(3.28e-3)


def test_one_gpu_communicates_nothing():
    for aggregation in scaling.AGGREGATIONS:
        assert scaling.communication_time(aggregation, 1, G, SLOW_START) == 0.0


def test_communication_rejects_unknown_aggregation():
    with pytest.raises(ValueError, match="aggregation must be one of cpu, allreduce"):
        scaling.communication_time("parameter-server", 2, G, TEN_GB)


# ------------------------------------------------------------------ steps

def test_step_time_without_overlap_adds_communication_to_split_compute():
    per_gpu, exposed, total = scaling.step_time(0.1, 2, 0.02)
    assert (per_gpu, exposed, total) == pytest.approx((0.05, 0.02, 0.07))


def test_overlap_hides_communication_behind_part_of_the_backward_pass():
    # Backward = 2/3 of 50 ms; 30% of it = 10 ms hidden out of 20 ms.
    assert scaling.step_time(0.1, 2, 0.02, overlap=0.3) == pytest.approx((0.05, 0.01, 0.06))
    # Full overlap can hide at most the whole communication.
    assert scaling.step_time(0.1, 2, 0.02, overlap=1.0) == pytest.approx((0.05, 0.0, 0.05))


def test_min_compute_time_reaches_exactly_the_target_efficiency():
    # t1 >= N c / ((1 - e) / e) = 4 * 1 ms / 0.25 = 16 ms.
    assert scaling.min_compute_time(4, 1e-3) == pytest.approx(0.016)
    for overlap in (0.0, 0.5):
        t1 = scaling.min_compute_time(4, 1e-3, overlap=overlap)
        _, _, total = scaling.step_time(t1, 4, 1e-3, overlap=overlap)
        assert t1 / total / 4 == pytest.approx(scaling.EFFICIENCY_TARGET)


# -------------------------------------------------------------- predictions

def test_predict_on_pcie3_by_hand():
    """12 MB of gradients, 10 ms of compute at batch 64, PCIe 3.0 (12 GB/s, 10 us)."""
    predictions = by_key(scaling.predict(0.01, 12e6, 64, gpus=(2, 4), links=("pcie3",)))
    ring = predictions[("pcie3", "allreduce", 2)]
    # comm = 2 * 10 us + 1 * 12e6 / 12e9 = 1.02 ms; step = 5 ms + 1.02 ms.
    assert ring.communication_time == pytest.approx(1.02e-3)
    assert ring.step_time == pytest.approx(6.02e-3)
    assert ring.samples_per_sec == pytest.approx(64 / 6.02e-3)
    assert ring.speedup == pytest.approx(0.01 / 6.02e-3)
    assert ring.efficiency == pytest.approx(0.01 / 6.02e-3 / 2)
    # 80% needs t1 >= 2 * 1.02 ms / 0.25 = 8.16 ms: batch 64 * 8.16 / 10 -> 53.
    assert ring.batch_for_target == 53
    host = predictions[("pcie3", "cpu", 4)]
    # 4 GPUs one at a time: 2 * 4 * (10 us + 1 ms) = 8.08 ms; step = 2.5 + 8.08 ms.
    assert host.communication_time == pytest.approx(8.08e-3)
    assert host.step_time == pytest.approx(10.58e-3)
    assert host.verdict == "slower than 1 GPU"


def test_nvlink_machines_aggregate_through_the_cpu_over_pcie():
    predictions = by_key(scaling.predict(0.01, 12e6, 64, gpus=(2,), links=("nvlink",)))
    pcie4 = scaling.LINKS["pcie4"]
    assert predictions[("nvlink", "cpu", 2)].communication_time == pytest.approx(
        2 * 2 * (pcie4.latency + 12e6 / pcie4.bandwidth)
    )
    nvlink = scaling.LINKS["nvlink"]
    assert predictions[("nvlink", "allreduce", 2)].communication_time == pytest.approx(
        2 * nvlink.latency + 12e6 / nvlink.bandwidth
    )


def test_verdicts_flag_configurations_that_do_not_pay_off():
    # A big model and plenty of compute scales well.
    big = by_key(scaling.predict(1.0, 4e6, 256, links=("nvlink",), aggregations=("allreduce",)))
    assert {p.verdict for p in big.values()} == {"pays off"}
    # A small model at a small batch gets slower with more GPUs through the CPU:
    # 2 GPUs: 0.5 ms + 2 * 2 * (10 us + 2.7e6 / 12e9 s) = 0.5 + 0.94 ms > 1 ms.
    small = by_key(scaling.predict(1e-3, 2.7e6, 128, links=("pcie3",), aggregations=("cpu",)))
    assert small[("pcie3", "cpu", 2)].step_time == pytest.approx(1.44e-3)
    assert small[("pcie3", "cpu", 2)].verdict == "slower than 1 GPU"
    assert small[("pcie3", "cpu", 8)].speedup < small[("pcie3", "cpu", 2)].speedup
    # Ring all-reduce of 4 MB over PCIe 3.0: 0.56 ms on 4 GPUs, 0.723 ms on 8.
    # t1 = 3 ms: 4 GPUs 0.75 + 0.56 ms, 8 GPUs 0.375 + 0.723 ms: +19%, but 34% efficient.
    medium = by_key(scaling.predict(3e-3, 4e6, 128, gpus=(4, 8), links=("pcie3",),
                                    aggregations=("allreduce",)))
    assert medium[("pcie3", "allreduce", 8)].efficiency < 0.5
    assert medium[("pcie3", "allreduce", 8)].verdict == "poor efficiency"
    # t1 = 1.5 ms: 4 GPUs 0.375 + 0.56 ms, 8 GPUs 0.1875 + 0.723 ms: +3% for twice the GPUs.
    tight = by_key(scaling.predict(1.5e-3, 4e6, 128, gpus=(4, 8), links=("pcie3",),
                                   aggregations=("allreduce",)))
    assert tight[("pcie3", "allreduce", 8)].verdict == "no gain over 4 GPUs"


def test_predict_rejects_bad_input():
    with pytest.raises(ValueError, match="compute_time must be > 0"):
        scaling.predict(0.0, G, 32)
    with pytest.raises(ValueError, match="overlap must be between 0 and 1"):
        scaling.predict(0.1, G, 32, overlap=1.5)
    with pytest.raises(ValueError, match="Unknown links"):
        scaling.predict(0.1, G, 32, links=("infiniband",))


def test_gradient_bytes_are_the_trainable_float32_parameters():
    model = keras.Sequential([
        keras.Input((10,)),
        keras.layers.Dense(4),
        keras.layers.BatchNormalization(),  # 8 trainable, 8 non-trainable
    ])
    assert scaling.gradient_bytes_of(model) == (10 * 4 + 4 + 8) * 4


# ------------------------------------------------------------ command line

def test_predict_scaling_command_prints_assumptions_and_writes_json(tmp_path, capsys):
    path = tmp_path / "prediction.json"
    status, out, _ = run_cli(
        ["predict-scaling", "--model", "tests.tools.test_bench:tiny_classifier", "--step-time",
         "0.002", "--batch-size", "32", "--gpus", "2,4", "--json", str(path)],
        capsys,
    )
    assert status == 0
    assert "a model, not a measurement" in out and "PCIe 3.0 x16 12 GB/s" in out
    report = json.loads(path.read_text())
    assert report["gradient_bytes"] == (6 * 5 + 5 + 5 * 3 + 3) * 4
    assert report["compute_time"] == 0.002
    assert len(report["predictions"]) == 2 * len(scaling.LINKS) * 2


def test_predict_scaling_from_gpu_tflops_uses_the_model_flops(capsys):
    status, out, _ = run_cli(
        ["predict-scaling", "--model", "tests.tools.test_bench:tiny_classifier", "--gpu-tflops",
         "1e-9", "--batch-size", "10", "--gpus", "2", "--links", "pcie4"],
        capsys,
    )
    assert status == 0
    # 3 x 113 forward FLOPs x 10 samples at 1000 FLOP/s = 3.39 s.
    assert "compute 3390.00 ms per step" in out


def test_predict_scaling_measures_the_step_time_when_not_given(capsys):
    status, out, _ = run_cli(
        ["predict-scaling", "--model", "tests.tools.test_bench:tiny_classifier",
         "--batch-size", "8", "--steps", "2", "--repeats", "1", "--warmup-steps", "1",
         "--gpus", "2",
         "--links", "pcie3", "--aggregation", "allreduce"],
        capsys,
    )
    assert status == 0
    assert "measured with plain Keras on /device:CPU:0" in out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--links", "pcie3,infiniband"], "--links must be a comma-separated list from"),
        (["--gpus", "2,x"], "--gpus must be a comma-separated list of whole numbers"),
        (["--aggregation", "nccl"], "--aggregation must be a comma-separated list from"),
        (["--overlap", "-0.1"], "--overlap must be between 0 and 1"),
        (["--step-time", "0.1", "--gpu-tflops", "10"], "either --step-time or --gpu-tflops"),
        (["--step-time", "0"], "--step-time must be > 0"),
    ],
)
def test_predict_scaling_flag_errors(flags, message, capsys):
    status, _, err = run_cli(
        ["predict-scaling", "--model", "tests.tools.test_bench:tiny_classifier", *flags], capsys
    )
    assert status == 2
    assert message in err


# ------------------------------------------------------------ measured bytes

def test_measured_bytes_replace_the_formulas_by_hand():
    """Busiest device 6 MB sent / 5 MB received at 10 GB/s, 10 us per transfer."""
    measured = {"sent": 6e6, "received": 5e6}
    # Ring: sends and receives at once -> the larger, 6e6 / 1e10 = 0.6 ms, + 6 x 10 us.
    assert scaling.communication_time(
        "allreduce", 4, G, SLOW_START, measured=measured
    ) == pytest.approx(6e-4 + 6e-5)
    # Through one device: weights out, then gradients in -> 11e6 / 1e10 = 1.1 ms, + 6 x 10 us
    # (3 peers, each one pull and one push); host_links does not split one device's link.
    assert scaling.communication_time(
        "cpu", 4, G, SLOW_START, host_links=2, measured=measured
    ) == pytest.approx(1.1e-3 + 6e-5)
    assert scaling.communication_time("cpu", 1, G, SLOW_START, measured=measured) == 0.0


def test_predict_uses_measured_bytes_only_where_measured():
    # PCIe 3.0: 12 GB/s, 10 us. Measured at N=2 only (keys as read back from JSON).
    measured = {
        "replicated": {"2": {"sent": 24e6, "received": 12e6}},
        "central": {2: {"sent": 12e6, "received": 12e6}},
    }
    predictions = by_key(scaling.predict(
        0.01, 12e6, 64, gpus=(2, 4), links=("pcie3",), measured=measured
    ))
    ring2, ring4 = predictions[("pcie3", "allreduce", 2)], predictions[("pcie3", "allreduce", 4)]
    # 2 x 10 us + 24e6 / 12e9 = 2.02 ms (the formula would give 1.02 ms).
    assert ring2.communication_time == pytest.approx(2.02e-3)
    assert ring2.bytes_source == "measured"
    assert ring4.communication_time == pytest.approx(6 * 1e-5 + 1.5 * 1e-3)
    assert ring4.bytes_source == "formula"
    host2 = predictions[("pcie3", "cpu", 2)]
    # 2 x 10 us + (12e6 + 12e6) / 12e9 = 2.02 ms.
    assert host2.communication_time == pytest.approx(2.02e-3)
    assert host2.bytes_source == "measured"


def test_predict_scaling_reads_measured_traffic_from_a_bench_report(tmp_path, capsys):
    bench = tmp_path / "bench.json"
    entry = {"method": "kerasmgpu", "devices": 2, "batch_size": 32, "busiest_device": "CPU:0"}
    bench.write_text(json.dumps({"traffic": {"results": [
        dict(entry, variables="central", sent=1_200_000, received=1_200_000),
        dict(entry, variables="replicated", sent=600_000, received=1_200_000),
    ]}}))
    path = tmp_path / "prediction.json"
    status, out, _ = run_cli(
        ["predict-scaling", "--model", "tests.tools.test_bench:tiny_classifier", "--step-time",
         "0.01", "--batch-size", "32", "--gpus", "2,4", "--links", "pcie3",
         "--measured-traffic", str(bench), "--json", str(path)],
        capsys,
    )
    assert status == 0
    assert 'bytes MEASURED on kerasmgpu variables="replicated" at batch 32' in out
    assert "600,000 B sent, 1,200,000 B received" in out
    rows = {(p["aggregation"], p["gpus"]): p for p in json.loads(path.read_text())[
        "predictions"]}
    # 2 x 10 us + 1.2e6 / 12e9 = 0.12 ms; through one device 2.4e6 / 12e9 + 20 us = 0.22 ms.
    assert rows[("allreduce", 2)]["communication_time"] == pytest.approx(1.2e-4)
    assert rows[("cpu", 2)]["communication_time"] == pytest.approx(2.2e-4)
    assert rows[("allreduce", 4)]["bytes_source"] == "formula"


def test_predict_scaling_measured_traffic_errors(tmp_path, capsys):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"results": []}))
    base = ["predict-scaling", "--model", "tests.tools.test_bench:tiny_classifier", "--step-time",
            "0.01"]
    status, _, err = run_cli([*base, "--measured-traffic", str(empty)], capsys)
    assert status == 2 and "holds no measured traffic" in err
    status, _, err = run_cli(
        [*base, "--measured-traffic", str(empty), "--measure-traffic"], capsys
    )
    assert status == 2 and "either --measured-traffic or --measure-traffic" in err


def test_predict_scaling_measures_the_traffic_itself(tmp_path, capsys):
    path = tmp_path / "prediction.json"
    status, out, _ = run_cli(
        ["predict-scaling", "--model", "tests.tools.test_bench:tiny_classifier", "--step-time",
         "0.01", "--batch-size", "8", "--gpus", "2", "--links", "pcie3", "--measure-traffic",
         "--json", str(path)],
        capsys,
    )
    assert status == 0
    assert "measure_traffic at batch 8 on 2 simulated devices" in out
    report = json.loads(path.read_text())
    g = (6 * 5 + 5 + 5 * 3 + 3) * 4
    replicated = report["measured_bytes"]["replicated"]["2"]
    # A ring over 2 devices moves G each way, plus the batch slices and output gradients.
    assert min(replicated["sent"], replicated["received"]) >= g
    assert {p["bytes_source"] for p in report["predictions"]} == {"measured"}


def test_sharded_optimizer_state_fits_larger_models_per_device():
    # Adam: 16 bytes a parameter replicated; sharded over 4: 8 + 4 x 4 / 4 = 12.
    assert card_memory.bytes_per_parameter(4, 2, sharded=False) == 16
    assert card_memory.bytes_per_parameter(4, 2, sharded=True) == 12
    rows = card_memory.largest_models(16e9, [2, 8], 2)
    assert rows[0]["full"] == 1_000_000_000 and rows[1]["sharded"] > rows[0]["sharded"]
    assert rows[1]["sharded"] == int(16e9 // 10.0)  # (2 + 4 / 8) x 4 bytes


def test_predict_scaling_shows_the_largest_model_per_card(tmp_path, capsys):
    status, out, _ = run_cli(
        ["predict-scaling", "--model", "tests.tools.test_bench:tiny_classifier", "--step-time",
         "0.01", "--card-memory", "16", "--optimizer", "momentum", "--gpus", "2,4",
         "--json", str(tmp_path / "p.json")], capsys,
    )
    assert status == 0
    assert "Largest model per device on a 16 GB card" in out
    rows = json.loads((tmp_path / "p.json").read_text())["memory"]["largest_models"]
    assert [r["gpus"] for r in rows] == [2, 4]
    assert rows[0]["full"] == int(16e9 // 12) and rows[1]["sharded"] == int(16e9 // 11)
