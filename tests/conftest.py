"""Test set-up: simulated devices must exist before TensorFlow initialises."""

import os

os.environ.setdefault("KERASMGPU_SIMULATED_DEVICES", "4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import kerasmgpu  # noqa: E402,F401  (applies KERASMGPU_SIMULATED_DEVICES)
