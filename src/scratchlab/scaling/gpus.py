"""Peak dense bf16 matmul throughput per accelerator, to turn GPU-hours into FLOPs.

Vendor datasheet numbers without 2:4 sparsity (the datasheets' headline figures are often
the sparse ones, twice these). Real training reaches a fraction of this: the model FLOPs
utilisation (MFU), typically 0.3-0.5 for well-tuned dense LM training on NVIDIA GPUs.
"""

from __future__ import annotations

from scratchlab.errors import UserError

# name -> (peak dense bf16 FLOP/s, what it is)
PEAK_BF16_FLOPS: dict[str, tuple[float, str]] = {
    "h100": (989.4e12, "NVIDIA H100 SXM5"),
    "h100-pcie": (756.5e12, "NVIDIA H100 PCIe"),
    "h200": (989.4e12, "NVIDIA H200 SXM (same compute as H100 SXM, more memory)"),
    "b200": (2250e12, "NVIDIA B200 (HGX B200)"),
    "a100": (312e12, "NVIDIA A100 (SXM or PCIe)"),
    "l40s": (362.05e12, "NVIDIA L40S"),
    "l4": (121e12, "NVIDIA L4"),
    "a10": (125e12, "NVIDIA A10"),
    "rtx4090": (165.2e12, "NVIDIA GeForce RTX 4090 (fp32 accumulate)"),
    "v100": (125e12, "NVIDIA V100 SXM2 (fp16 tensor cores; no bf16)"),
    "mi300x": (1307.4e12, "AMD Instinct MI300X"),
    "tpu-v4": (275e12, "Google TPU v4 (per chip)"),
    "tpu-v5e": (197e12, "Google TPU v5e (per chip)"),
    "tpu-v5p": (459e12, "Google TPU v5p (per chip)"),
}


def peak_flops(gpu: str) -> float:
    try:
        return PEAK_BF16_FLOPS[gpu.lower()][0]
    except KeyError:
        raise UserError(f"unknown --gpu '{gpu}'; known: {', '.join(PEAK_BF16_FLOPS)} (or give --flops directly)") from None


def flops_from_gpu_hours(gpu_hours: float, gpu: str, mfu: float) -> float:
    """Training FLOPs that ``gpu_hours`` of ``gpu`` deliver at model FLOPs utilisation ``mfu``."""
    if not gpu_hours > 0:
        raise UserError(f"--gpu-hours must be positive (got {gpu_hours})")
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1], a fraction of peak (got {mfu}); 0.4 is typical")
    return gpu_hours * 3600.0 * peak_flops(gpu) * mfu
