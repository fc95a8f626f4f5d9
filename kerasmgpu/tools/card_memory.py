"""The largest model that fits a card: bytes per parameter with full or sharded optimizer state
(`kerasmgpu predict-scaling --card-memory`)."""


STATE_SLOTS = {"sgd": 0, "momentum": 1, "rmsprop": 1, "adam": 2, "adamw": 2}


def bytes_per_parameter(num_gpus, state_slots, sharded, parameter_bytes=4):
    """Bytes a device holds per parameter of the model, before activations.

    Replicated state ("full"): the weights, one gradient and `state_slots` optimizer
    slots, all whole: (2 + k) x p. Sharded state (ZeRO stage 1, over N devices): the
    whole weights and gradient, plus 1/N of the slots, of a flat copy of the weights the
    optimizer updates, and of the summed gradient: (2 + (k + 2) / N) x p. The same
    accounting as `kerasmgpu.measure_memory`.

    Example:

    >>> bytes_per_parameter(4, 2, sharded=False), bytes_per_parameter(4, 2, sharded=True)
    (16, 12.0)
    """
    if sharded:
        return (2 + (state_slots + 2) / num_gpus) * parameter_bytes
    return (2 + state_slots) * parameter_bytes


def largest_models(card_bytes, gpus, state_slots, reserved_fraction=0.0):
    """The most parameters that fit on one device, replicated state and sharded, per N.

    Args:
        card_bytes: one device's memory, in bytes.
        gpus: device counts.
        state_slots: optimizer slots per parameter (`STATE_SLOTS`).
        reserved_fraction: the share of the card kept for activations and workspace.

    Returns:
        `[{"gpus": N, "full": parameters, "sharded": parameters}]`.
    """
    usable = card_bytes * (1.0 - reserved_fraction)
    return [
        {
            "gpus": n,
            "full": int(usable // bytes_per_parameter(n, state_slots, sharded=False)),
            "sharded": int(usable // bytes_per_parameter(n, state_slots, sharded=True)),
        }
        for n in sorted(gpus)
    ]


def format_memory(rows, card_gb, optimizer, reserved_fraction, model_parameters=None):
    """A printable table of `largest_models` rows."""
    lines = [
        f"Largest model per device on a {card_gb:g} GB card ({optimizer}: "
        f"{STATE_SLOTS[optimizer]} state slot(s) per parameter, float32; "
        f"{reserved_fraction:.0%} of the card kept for activations):",
        f"{'GPUs':>4}  {'optimizer_state=full':>22}  {'optimizer_state=sharded':>24}  gain",
    ]
    for row in rows:
        lines.append(
            f"{row['gpus']:>4}  {row['full'] / 1e6:>18.1f} M p  "
            f"{row['sharded'] / 1e6:>20.1f} M p  {row['sharded'] / row['full']:.2f}x"
        )
    if model_parameters is not None:
        lines.append(f"this model: {model_parameters:,} parameters")
    return "\n".join(lines)


# ------------------------------------------------------------ predictor options
