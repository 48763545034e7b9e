"""The accelerators `qat-jax compile` knows by jax's device_kind: memory, peak bf16 FLOP/s and
memory and interconnect bandwidth, the vendors' nominal figures (tools/aot.py's roofline)."""

from __future__ import annotations

import dataclasses

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
    hbm_bytes: float
    peak_flops: float  # bf16 dense FLOP/s
    hbm_bw: float  # bytes/s
    ici_bw: float  # bytes/s per chip, all links


# By jax's device_kind. Google Cloud's published figures per chip.
CHIPS = {
    "TPU v4": Chip(32 * GIB, 275e12, 1.228e12, 300e9),
    "TPU v5 lite": Chip(16 * GIB, 197e12, 0.819e12, 200e9),  # v5e
    "TPU v5": Chip(95 * GIB, 459e12, 2.765e12, 600e9),  # v5p
    "TPU v5p": Chip(95 * GIB, 459e12, 2.765e12, 600e9),
    "TPU v6 lite": Chip(32 * GIB, 918e12, 1.640e12, 448e9),  # v6e (Trillium)
    "NVIDIA H100 80GB HBM3": Chip(80 * GIB, 989e12, 3.35e12, 450e9),
    "NVIDIA H200": Chip(141e9, 989e12, 4.8e12, 450e9),
}
