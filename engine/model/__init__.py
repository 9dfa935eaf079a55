"""Models: loading a hub id or folder (InternLM2 converted to the native layout), precision, 4-bit
quantization, LoRA, fused 4-bit LoRA layers, compiled decoder layers, memory savers, tiny test models."""
