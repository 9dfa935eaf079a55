"""The machine's NVIDIA GPUs through NVML (nvidia-ml-py): names, utilisation and memory, for the Runs
screen's GPU choice and the run view. Torch-free and cheap (microseconds a query); a machine without
the driver simply has no GPUs here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    util_pct: int | None
    mem_used_gib: float
    mem_total_gib: float

    def label(self) -> str:
        util = f"{self.util_pct}%" if self.util_pct is not None else "-"
        return f"GPU {self.index} {self.name}: {util} busy, {self.mem_used_gib:.1f}/{self.mem_total_gib:.0f} GiB"


_nvml = None            # the module once initialised; False once it proved unusable


def _init():
    global _nvml
    if _nvml is None:
        try:
            import pynvml

            pynvml.nvmlInit()
            _nvml = pynvml
        except Exception:        # no package, no driver, no device: all mean "no GPUs to show"
            _nvml = False
    return _nvml or None


def list_gpus(indices: list[int] | None = None) -> list[Gpu]:
    """Every GPU (or those with the given indices), in index order."""
    nvml = _init()
    if nvml is None:
        return []
    try:
        count = nvml.nvmlDeviceGetCount()
    except Exception:
        return []
    out = []
    for i in range(count):
        if indices is not None and i not in indices:
            continue
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            name = nvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                util = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except Exception:    # some MIG slices and vGPUs do not report it
                util = None
        except Exception:
            continue
        out.append(Gpu(i, name.removeprefix("NVIDIA "), util, mem.used / 2**30, mem.total / 2**30))
    return out

