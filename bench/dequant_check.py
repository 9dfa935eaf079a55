"""On a GPU: the compiled layers' torch dequantization (engine/fused_lora.dequantize_4bit, compiled as
in a layer) against bitsandbytes' CUDA kernel, bit for bit, for nf4 and fp4 at bf16 and fp32."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bitsandbytes.functional as bnbf  # noqa: E402

from engine.model.fused_lora import block_scales, dequantize_4bit  # noqa: E402

fn = torch.compile(dequantize_4bit, dynamic=True)
for qt in ("nf4", "fp4"):
    w = torch.randn(8192, 2048, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(0))
    packed, st = bnbf.quantize_4bit(w, blocksize=64, quant_type=qt, compress_statistics=True)
    absmax = block_scales(st)
    for dt in (torch.bfloat16, torch.float32):
        ref = torch.ops.bitsandbytes.dequantize_4bit.default(packed, absmax, 64, qt, st.shape, dt)
        got = fn(packed, absmax, st.code.float(), 64, st.shape, dt)
        diff = (got.float() - ref.float()).abs().max().item()
        print(f"dequant {qt} {dt}: equal={torch.equal(got, ref)} max_abs_diff={diff}")
