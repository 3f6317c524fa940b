"""A pack's GPU as MLflow system metrics: utilisation and memory, sampled each time the pack
reports (at checkpoints, when a member finishes, at least every 30 s) and logged to every
member's run under MLflow's own names (`system/gpu_0_...`), so the UI's system-metrics charts
show them. What they say of `resources.pack`: utilisation well under ~80% with memory to spare
means the GPU can take a bigger pack; memory near its total means a smaller one.

MLflow's own monitor (`mlflow.system_metrics`) follows a fluent active run, which trials do not
have (their runs are fed by `tracking.Sender`), so this samples the device itself: torch's
memory counters always, utilisation through torch.cuda.utilization, which needs pynvml.
"""

from __future__ import annotations

from typing import Any

MB = 2**20


def sample(device: Any = None) -> dict[str, float]:
    """{metric key: value} of the current CUDA device ({} without one)."""
    import torch

    if not torch.cuda.is_available():
        return {}
    index = torch.cuda.current_device() if device is None else torch.device(device).index or 0
    prefix = f"system/gpu_{index}"
    out = {
        f"{prefix}_memory_allocated_megabytes": torch.cuda.memory_allocated(index) / MB,
        f"{prefix}_max_memory_allocated_megabytes": torch.cuda.max_memory_allocated(index) / MB,
    }
    try:
        free, total = torch.cuda.mem_get_info(index)
        out[f"{prefix}_memory_usage_megabytes"] = (total - free) / MB
        out[f"{prefix}_memory_usage_percentage"] = 100.0 * (total - free) / total
    except RuntimeError:
        pass
    try:
        out[f"{prefix}_utilization_percentage"] = float(torch.cuda.utilization(index))
    except (ModuleNotFoundError, ImportError, RuntimeError):  # pynvml missing, or no NVML
        pass
    return out
