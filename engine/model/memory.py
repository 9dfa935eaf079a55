"""Memory savers of the low-memory preset (train.low_memory) that keep the computation the same:
AdamW's weights and moments in CPU memory, the frozen input embedding on the CPU, and the tensors a
forward keeps for its backward outside the checkpointed layers (their inputs) in CPU memory."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


class OffloadedAdamW(torch.optim.AdamW):
    """AdamW on fp32 master copies of the trainable weights held in pinned CPU memory, with its two
    moments beside them. A step copies the (clipped) GPU gradients over, steps on the CPU and copies
    the new weights back: the GPU keeps only the weights and their gradients (for QLoRA r64 on a
    1.8B model that frees 0.55 GB of moments). The update is torch's AdamW, in fp32, as on the GPU;
    state_dict() is AdamW's, so checkpoints resume with or without offloading. The CPU step is
    torch's fused AdamW kernel (7x its foreach form on 63M weights, 2 cores)."""

    def __init__(self, params: list[torch.nn.Parameter], **kw: Any):
        self.gpu_params = list(params)
        pin = torch.cuda.is_available()
        masters = []
        for p in self.gpu_params:
            m = torch.empty(p.shape, dtype=torch.float32, pin_memory=pin)
            m.copy_(p.detach())
            masters.append(m)
        super().__init__(masters, fused=True, **kw)
        self.masters = masters

    def reload_params(self) -> None:
        """After the GPU weights were loaded from a checkpoint: take them as the master copies."""
        for p, m in zip(self.gpu_params, self.masters):
            m.copy_(p.detach())

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        for p, m in zip(self.gpu_params, self.masters):
            if p.grad is None:
                m.grad = None
                continue
            if m.grad is None:
                m.grad = torch.empty(m.shape, dtype=torch.float32, pin_memory=m.is_pinned())
            m.grad.copy_(p.grad, non_blocking=True)
        if torch.cuda.is_available():
            torch.cuda.current_stream().synchronize()
        super().step(closure)
        for p, m in zip(self.gpu_params, self.masters):
            p.copy_(m, non_blocking=True)
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.gpu_params:
            p.grad = None


def embedding_on_cpu(model: torch.nn.Module, device: torch.device) -> None:
    """Keep the frozen input embedding (vocab x hidden, 0.38 GB in bf16 for InternLM2-1.8B) in CPU memory:
    token ids go over, the looked-up rows come back, the same values as on the GPU."""
    emb = model.get_input_embeddings()
    if emb is None or emb.weight.requires_grad:
        return
    emb.to("cpu")

    def ids_to_table(m: Any, args: tuple) -> tuple:
        return (args[0].to(m.weight.device), *args[1:])

    def rows_to_gpu(_m: Any, _args: Any, out: torch.Tensor) -> torch.Tensor:
        return out.to(device, non_blocking=True)

    emb.register_forward_pre_hook(ids_to_table)
    emb.register_forward_hook(rows_to_gpu, prepend=True)


@contextlib.contextmanager
def embedding_on(model: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """The input embedding on ``device`` within the block (then back where it was): transformers'
    generate() moves its inputs to the device of the model's first weight, which is the embedding --
    on the CPU, position ids would meet the GPU's rotary tables there."""
    get = getattr(model, "get_input_embeddings", None)     # (LLaVA's model keeps its embedding elsewhere)
    emb = get() if get is not None else None
    if emb is None or emb.weight.device == device:
        yield
        return
    home = emb.weight.device
    emb.to(device)
    try:
        yield
    finally:
        emb.to(home)


@contextlib.contextmanager
def offload_saved_tensors(device_type: str = "cuda", min_bytes: int = 1 << 20) -> Iterator[None]:
    """Within the block, tensors autograd saves for the backward (of ``device_type``, ``min_bytes`` or
    more, not weights) are copied to CPU memory and back when the backward needs them. Inside a
    checkpointed layer the checkpoint's own hooks take precedence, so what moves is what lies between
    them: each layer's input (for InternLM2-1.8B, 4 rows: 24 x 32 MB in fp32). Both copies run on the
    current stream, so they are ordered with the kernels around them without waiting on the CPU."""
    pin = device_type == "cuda"

    def pack(t: torch.Tensor) -> Any:
        if (t.device.type != device_type or t.numel() * t.element_size() < min_bytes
                or isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter)):
            return t
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
        host.copy_(t, non_blocking=pin)
        return (t.device, host)

    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, tuple):
            device, host = packed
            return host.to(device, non_blocking=pin)
        return packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
