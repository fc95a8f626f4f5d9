import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasmgpu import slice_sizes, slicing


@pytest.mark.parametrize(
    "batch, replicas, expected",
    [
        (10, 4, [3, 3, 2, 2]),
        (8, 4, [2, 2, 2, 2]),
        (13, 3, [5, 4, 4]),
        (2, 4, [1, 1]),
        (1, 8, [1]),
        (7, 1, [7]),
    ],
)
def test_slice_sizes_are_near_equal_and_never_empty(batch, replicas, expected):
    assert slice_sizes(batch, replicas) == expected


@pytest.mark.parametrize("batch, replicas", [(0, 2), (4, 0), (-1, 2)])
def test_slice_sizes_rejects_empty_inputs(batch, replicas):
    with pytest.raises(ValueError, match="batch_size"):
        slice_sizes(batch, replicas)


def test_split_structure_cuts_nested_inputs_contiguously_and_keeps_none():
    data = {
        "image": tf.reshape(tf.range(10 * 2), (10, 2)),
        "extra": [tf.range(10), None],
    }
    parts = slicing.split_structure(data, 4)
    assert [int(p["image"].shape[0]) for p in parts] == [3, 3, 2, 2]
    assert all(p["extra"][1] is None for p in parts)
    merged = slicing.merge_structures(parts)
    np.testing.assert_array_equal(merged["image"], data["image"])
    np.testing.assert_array_equal(merged["extra"][0], data["extra"][0])
    # Slices are contiguous and in order: replica 1 holds samples 3, 4, 5.
    np.testing.assert_array_equal(parts[1]["extra"][0], [3, 4, 5])


def test_split_structure_follows_a_batch_size_known_only_at_run_time():
    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    def sizes(x):
        return [tf.shape(p)[0] for p in slicing.split_structure(x, 3)]

    assert [int(s) for s in sizes(tf.zeros((7, 3)))] == [3, 2, 2]
    assert [int(s) for s in sizes(tf.zeros((3, 3)))] == [1, 1, 1]


def test_merge_keeps_softmax_logits_so_the_loss_reads_the_same_tensor():
    logits = [tf.constant([[1.0, 2.0]]), tf.constant([[0.5, -1.0], [3.0, 0.0]])]
    parts = [keras.activations.softmax(t) for t in logits]
    merged = slicing.merge_structures(parts)
    np.testing.assert_allclose(merged._keras_logits, tf.concat(logits, 0))
    np.testing.assert_allclose(merged, tf.nn.softmax(tf.concat(logits, 0)), rtol=1e-6)
