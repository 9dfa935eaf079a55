"""The machine's NVIDIA GPUs through NVML (nvidia-ml-py): names, utilisation, memory, temperature,
power and the processes on each, for the GPU screen, the Runs screen's GPU choice and the run view;
CPU and memory through psutil. Torch-free and cheap (microseconds a query); a machine without the
driver simply has no GPUs here."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    util_pct: int | None
    mem_used_gib: float
    mem_total_gib: float
    temperature_c: int | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    pids: tuple[int, ...] = field(default=())           # compute processes on it

    @property
    def free_bytes(self) -> int:
        return int((self.mem_total_gib - self.mem_used_gib) * 2**30)

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
            util = _optional(lambda handle=handle: int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu))
        except Exception:
            continue
        # what some MIG slices, vGPUs and older boards do not report stays None
        temp = _optional(lambda handle=handle: int(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)))
        power = _optional(lambda handle=handle: nvml.nvmlDeviceGetPowerUsage(handle) / 1000)
        limit = _optional(lambda handle=handle: nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000)
        procs = _optional(lambda handle=handle: nvml.nvmlDeviceGetComputeRunningProcesses(handle)) or []
        pids = tuple(p.pid for p in procs)
        out.append(Gpu(i, name.removeprefix("NVIDIA "), util, mem.used / 2**30, mem.total / 2**30, temp, power,
                       limit, pids))
    return out


def _optional(read):
    try:
        return read()
    except Exception:
        return None


def process_tree_owner(pid: int, owners: dict[int, str]) -> str | None:
    """The owner (a run's name) of ``pid`` or of the nearest ancestor in ``owners``: torchrun's and
    DeepSpeed's workers are children of the process a run's status names."""
    import psutil

    try:
        proc = psutil.Process(pid)
        chain = [proc, *proc.parents()]
    except (psutil.Error, OSError):
        return owners.get(pid)
    for p in chain:
        if p.pid in owners:
            return owners[p.pid]
    return None

