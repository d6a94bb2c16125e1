"""GPU specifications the planner works from (one SXM GPU of an 8-GPU HGX/DGX node).

Units: HBM in GB (1e9 bytes, the datasheets' nominal size), bandwidths in GB/s or TB/s, compute in
dense TFLOP/s (the datasheets' "with sparsity" figures halved). `nvlink_gbs` is the per-GPU NVLink
bandwidth as the datasheets state it (both directions added); `nic_gbs` is one GPU's scale-out NIC
in one direction (400 Gb/s InfiniBand or Ethernet = 50 GB/s), which is what bounds an all-to-all
that leaves the node.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuSpec:
    name: str
    hbm_gb: float
    hbm_tbs: float
    bf16_tflops: float
    fp8_tflops: float
    nvlink_gbs: float
    nic_gbs: float

    def __post_init__(self) -> None:
        for field in ("hbm_gb", "hbm_tbs", "bf16_tflops", "fp8_tflops", "nvlink_gbs", "nic_gbs"):
            if not getattr(self, field) > 0:
                raise ValueError(f"{self.name}: {field}={getattr(self, field)} must be > 0")


GPUS: dict[str, GpuSpec] = {
    # H800 SXM5: H100's die and memory with NVLink cut to 400 GB/s for export; DeepSeek-V3 report
    # section 3.1: 8 per node, NVLink ~160 GB/s achieved, one 400 Gb/s InfiniBand NIC (50 GB/s)
    # per GPU. Compute and HBM as H100 SXM (below).
    "h800": GpuSpec("h800", 80, 3.35, 989, 1979, 400, 50),
    # H100 SXM5 datasheet: 80 GB HBM3 at 3.35 TB/s, BF16 1979 / FP8 3958 TFLOP/s with sparsity,
    # NVLink 900 GB/s; DGX H100: 8x ConnectX-7 400 Gb/s (one per GPU).
    "h100": GpuSpec("h100", 80, 3.35, 989, 1979, 900, 50),
    # H200 SXM datasheet: 141 GB HBM3e at 4.8 TB/s, same compute and NVLink as H100; DGX H200:
    # 8x ConnectX-7 400 Gb/s.
    "h200": GpuSpec("h200", 141, 4.8, 989, 1979, 900, 50),
    # HGX/DGX B200 datasheet: 1440 GB HBM3e for 8 GPUs (180 GB each) at 8 TB/s per GPU, BF16 2.25 /
    # FP8 4.5 PFLOP/s dense per GPU, fifth-generation NVLink 1.8 TB/s per GPU; DGX B200: 8x
    # ConnectX-7 400 Gb/s.
    "b200": GpuSpec("b200", 180, 8.0, 2250, 4500, 1800, 50),
}


def gpu(name: str) -> GpuSpec:
    """The spec for `name` (case-insensitive); ValueError names the accepted GPUs."""
    key = name.lower()
    if key not in GPUS:
        raise ValueError(f"unknown GPU {name!r}: expected one of {sorted(GPUS)}")
    return GPUS[key]
