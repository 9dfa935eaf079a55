"""One autograd function for a LoRA layer on a frozen base weight (4-bit or plain).

peft's LoRA forward on a bitsandbytes 4-bit layer is a dozen small operations in Python per linear
layer — the 4-bit matmul, a defensive clone, dropout, two adapter matmuls with their weight casts,
a scale and an add — and as many again in backward. On a GPU, at one or two 1024-token rows per
forward, that launch overhead, not the arithmetic, sets the speed. Here the same computation

    y = x W^T + scale * dropout(x) A^T B^T

is one forward (dequantize W, two matmuls, the adapter's product added into the base output: by
``addmm`` on a plain base; on a 4-bit base in the input's dtype, as bitsandbytes and peft do) and one
backward (the input gradient, and A's and B's; W is frozen, so its gradient is never formed). It
saves only the dropped input, the dropout mask and the rank-r product, not the several input copies
peft's path keeps.

It is installed on peft's LoRA modules by replacing their ``forward``; the parameters, their names
and the checkpoints do not change. Anything this path does not cover (merged or disabled adapters,
several active adapters, DoRA and other variants, mixed-adapter batches) goes to peft's forward.
"""

from __future__ import annotations

import types
from typing import Any

import torch


def _dense_weight(base: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's weight as a dense (out, in) tensor in ``dtype``. For 4-bit weights the block
    scales of double quantization are dequantized once, when the layer is fused, and kept (the weights
    are frozen): one kernel per call instead of bitsandbytes' two Python-level dequantizations."""
    w = base.weight
    state = getattr(w, "quant_state", None)
    if state is None:
        return w.to(dtype)
    if getattr(state, "packing_format_for_cpu", False):
        raise RuntimeError(f"{type(base).__name__}: its 4-bit weight is in bitsandbytes' CPU-only layout; "
                           "engine.modeling.standard_4bit_layout must run on the model first")
    absmax = getattr(w, "_tunedeck_absmax", None)
    if absmax is None:
        absmax = block_scales(state)
    code = getattr(w, "_tunedeck_code", None)
    if code is not None and torch.compiler.is_compiling():
        # in a compiled layer: the same arithmetic as torch operations, which the compiler fuses into one
        # kernel launched with the layer's others, instead of a call out to bitsandbytes' (Python) op
        return dequantize_4bit(w.data, absmax, code, state.blocksize, state.shape, state.dtype).to(dtype)
    out = torch.ops.bitsandbytes.dequantize_4bit.default(w.data, absmax, state.blocksize, state.quant_type,
                                                         state.shape, state.dtype)
    return out.to(dtype)


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                    shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' 4-bit dequantization (nf4 or fp4: ``code`` is the 16-value table) in torch
    operations: two values a byte, high nibble first, each block of ``blocksize`` times its scale, the
    product rounded once to ``dtype`` -- bit for bit bitsandbytes' result (tests/test_fused_lora.py)."""
    p = packed.reshape(-1)
    idx = torch.stack((p >> 4, p & 15), dim=-1).reshape(-1).long()
    return (code[idx].view(-1, blocksize) * absmax.view(-1, 1)).to(dtype).view(shape)


def block_scales(state: Any) -> torch.Tensor:
    """A 4-bit weight's per-block scales in fp32 (double quantization undone), from its quant_state."""
    if not state.nested:
        return state.absmax
    import bitsandbytes.functional as bnbf

    return (bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, base: torch.nn.Module,
                scale: float, p: float, dtype: torch.dtype, training: bool,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
        shape = x.shape
        x1 = x.reshape(-1, shape[-1])
        x2 = x1.to(dtype)
        y = torch.nn.functional.linear(x2, _dense_weight(base, dtype), None)
        if p > 0 and training:       # on the input as it came, as peft does (one rounding, the same masks)
            xd, mask = torch.ops.aten.native_dropout(x1, p, True)
            xd = xd.to(dtype)
        else:
            xd, mask = x2, None
        ad, bd = a.to(dtype), b.to(dtype)
        h = xd @ ad.t()                                   # (N, r)
        bias = getattr(base, "bias", None)
        if out_dtype is None or out_dtype == dtype:
            y.addmm_(h, bd.t(), alpha=scale)
            if bias is not None:
                y += bias.to(dtype)
        else:       # a 4-bit base: its product in out_dtype, and the adapter's output added there, as peft does
            if bias is not None:
                y += bias.to(dtype)
            y = y.to(out_dtype).add_(h @ bd.t(), alpha=scale)
        ctx.save_for_backward(xd, mask, h, a, b)
        ctx.base, ctx.scale, ctx.p, ctx.dtype, ctx.x_dtype, ctx.shape = base, scale, p, dtype, x.dtype, shape
        ctx.has_mask = mask is not None
        return y.reshape(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        xd, mask, h, a, b = ctx.saved_tensors
        dt = ctx.dtype
        dy2 = dy.reshape(-1, dy.shape[-1]).to(dt)
        ad, bd = a.to(dt), b.to(dt)
        dh = (dy2 @ bd).mul_(ctx.scale)                   # (N, r)
        da = db = dx = None
        if ctx.needs_input_grad[2]:
            db = (dy2.t() @ h).mul_(ctx.scale).to(b.dtype)
        if ctx.needs_input_grad[1]:
            da = (dh.t() @ xd).to(a.dtype)
        if ctx.needs_input_grad[0]:
            dxd = dh @ ad
            if ctx.has_mask:
                dxd = torch.ops.aten.native_dropout_backward(dxd, mask, 1.0 / (1.0 - ctx.p))
            dx = torch.addmm(dxd, dy2, _dense_weight(ctx.base, dt)).to(ctx.x_dtype).reshape(ctx.shape)
        return dx, da, db, None, None, None, None, None, None


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    active = self.active_adapters
    base = self.get_base_layer()
    bias = getattr(base, "bias", None)
    if (args or kwargs or self.disable_adapters or self.merged or len(active) != 1
            or active[0] not in self.lora_A or active[0] in getattr(self, "lora_variant", {})
            or self.use_dora.get(active[0], False) or base.weight.requires_grad
            or (bias is not None and bias.requires_grad)):        # trained base weights: peft's path
        return self._peft_forward(x, *args, **kwargs)
    name = active[0]
    drop = self.lora_dropout[name]
    dev = x.device.type
    dtype = (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev)
             else getattr(base, "compute_dtype", None) or x.dtype)
    # bitsandbytes' 4-bit layer returns its product in the input's dtype (fp32 under autocast when the
    # input is fp32) and peft adds the adapter's output there; a small early adapter output added into a
    # bf16 product instead would mostly round away
    out_dtype = x.dtype if getattr(base.weight, "quant_state", None) is not None else dtype
    with torch.autocast(dev, enabled=False):
        return _LoraLinear.apply(x, self.lora_A[name].weight, self.lora_B[name].weight, base,
                                 float(self.scaling[name]), float(getattr(drop, "p", 0.0)), dtype, drop.training,
                                 out_dtype)


def fuse_lora_layers(model: torch.nn.Module) -> int:
    """Give every peft LoRA linear layer (4-bit or plain base) the fused forward; returns how many."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    kinds: tuple[type, ...] = (LoraLinear,)
    try:
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

        kinds += (LoraLinear4bit,)
    except ImportError:  # peft without bitsandbytes support
        pass
    from engine.model.loading import standard_4bit_layout

    standard_4bit_layout(model)       # the fused dequantization reads the standard layout only
    n = 0
    for module in model.modules():
        if isinstance(module, kinds) and "forward" not in vars(module):
            base = module.get_base_layer()
            if not isinstance(base, torch.nn.Linear):      # Linear4bit subclasses nn.Linear; 8-bit too
                continue
            if getattr(base.weight, "SCB", None) is not None or type(base).__name__ == "Linear8bitLt":
                continue                                     # 8-bit weights: peft's path
            state = getattr(base.weight, "quant_state", None)
            if state is not None:
                base.weight._tunedeck_absmax = block_scales(state)
                if state.code is not None and state.code.numel() == 16 and state.shape.numel() % state.blocksize == 0:
                    base.weight._tunedeck_code = state.code.float()      # the compiled layers' dequantization
            module._peft_forward = module.forward
            module.forward = types.MethodType(_fused_forward, module)
            n += 1
    return n
