"""The GPU's own bounds, measured or looked up, beside which ``rlrelay bench learner`` reads
its figures: the dense bf16 peak (MFU's denominator), an achievable matmul rate, and copy
bandwidths (the bounds of the weight push and of CPU offload)."""

from __future__ import annotations

import statistics
import time

GIB = 2**30

DENSE_BF16_TFLOPS = (("H200 NVL", 835.0), ("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0),
                     ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0))
"""Vendor dense bf16 peaks (no sparsity; half the datasheets' sparse figures), matched against
``torch.cuda.get_device_name()`` in order, so a variant comes before its family: the PCIe
cards with NVLink bridges (NVL, 1671 sparse) run below the SXM parts (1979 sparse), and taking
the SXM peak for them would understate their MFU by 16 %."""


def dense_peak_tflops(device_name: str) -> float | None:
    for key, tflops in DENSE_BF16_TFLOPS:
        if key in device_name:
            return tflops
    return None


def matmul_tflops(n: int = 8192, repeats: int = 10) -> float:
    """Achieved bf16 TFLOP/s of an n^3 matrix product (mean of ``repeats`` after a warm-up)."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return round(2 * n**3 * repeats / (time.perf_counter() - t0) / 1e12, 1)


def copy_bandwidth(nbytes: int = 2 * GIB, repeats: int = 5) -> dict:
    """GB/s of device-to-device (bytes read + written), pinned host-to-device and device-to-host
    copies: the bounds of the weight push and of CPU offload on this machine."""
    import torch

    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev2 = torch.empty_like(dev)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def rate(copy, factor: int) -> float:
        copy()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            copy()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return round(factor * nbytes / statistics.median(times) / 1e9, 1)

    return {"device_to_device": rate(lambda: dev2.copy_(dev), 2),
            "host_to_device_pinned": rate(lambda: dev.copy_(host, non_blocking=True), 1),
            "device_to_host_pinned": rate(lambda: host.copy_(dev, non_blocking=True), 1)}


def measure_bounds() -> dict:
    """Both bounds, for a process of their own: their buffers (4 GiB) and CUDA context then
    leave the GPU before the options run, instead of counting in each option's
    ``device_used_gib``."""
    return {"matmul_tflops": matmul_tflops(), "bandwidth_gbps": copy_bandwidth()}
