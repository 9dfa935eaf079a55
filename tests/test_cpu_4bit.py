"""bitsandbytes branches on the CPU: every branch is forced here, whichever CPU runs the suite.

On a CPU with AVX512-BF16 bitsandbytes' Linear4bit repacks its weight in place into a CPU-only layout
the first time it runs in eval mode on an input that needs no gradient (an evaluation, a chat answer),
and multiplies through a kernel without a backward from then on. The flag it reads
(``bitsandbytes.nn.modules.has_avx512bf16``) is forced both ways (conftest's ``cpu_bf16``), and a
layer is put through the repacking itself, so these tests say the same on every machine.

torch's own CPU capability (AVX512 / AVX2 / none) picks bitsandbytes' native or plain-torch
(de)quantization kernels; ATEN_CPU_CAPABILITY forces each in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO


def _qlora(tiny_model):
    from engine.model.loading import attach_lora, load_model, pick_precision

    model = load_model(str(tiny_model), quantization="4bit", precision=pick_precision(device="cpu"))
    torch.manual_seed(0)
    model = attach_lora(model, r=8, alpha=16, dropout=0.0, target_modules="all-linear", bias="none",
                        quantized=True, gradient_checkpointing=True)
    g = torch.Generator().manual_seed(3)
    for n, p in model.named_parameters():      # B starts at zero: give it values so every A gets a gradient
        if "lora_B" in n:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _grads(model, ids):
    model.train()
    for p in model.parameters():
        p.grad = None
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _linear4bit_layers(model):
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def test_evaluation_then_training_gives_the_gradients_of_training_alone(tiny_model, cpu_bf16):
    ids = torch.randint(0, 200, (2, 20), generator=torch.Generator().manual_seed(1))
    want = _grads(_qlora(tiny_model), ids)

    model = _qlora(tiny_model)
    assert len(_linear4bit_layers(model)) == 14
    model.eval()
    with torch.no_grad():                      # what the evaluation at step 0 does
        model.generate(input_ids=ids[:1, :6], max_new_tokens=3, do_sample=False)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in _linear4bit_layers(model))
    got = _grads(model, ids)
    assert got.keys() == want.keys()
    first_layer = [n for n in got if ".layers.0." in n and "lora_A" in n]
    assert first_layer and all(got[n].abs().sum() > 0 for n in first_layer)   # gradient reached the bottom
    for n in want:
        assert torch.allclose(got[n], want[n], rtol=1e-5, atol=1e-7), n


def test_a_repacked_layer_is_unpacked_before_the_fused_layer_reads_it(tiny_model):
    """A layer bitsandbytes has already repacked (its flag set, its bytes in the CPU layout) is put back
    in the standard layout when the fused forward is installed, and gives peft's output again."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    from engine.model.fused_lora import fuse_lora_layers

    model = _qlora(tiny_model)
    layer = model.get_base_model().model.layers[1].mlp.down_proj
    x = torch.randn(2, 7, layer.in_features, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = layer(x)                        # peft's forward on the standard layout
    base = layer.get_base_layer()
    base.weight.data, base.weight.quant_state = _convert_weight_packed_for_cpu(base.weight.data,
                                                                               base.weight.quant_state)
    assert base.weight.quant_state.packing_format_for_cpu
    assert fuse_lora_layers(model) == 14
    assert not base.weight.quant_state.packing_format_for_cpu
    with torch.no_grad():
        got = layer(x)
    # bitsandbytes' inverse rounds the block scales through bf16 once: the weights agree to that
    assert torch.allclose(got, want, rtol=0, atol=2e-2 * float(want.abs().max()))
    assert float((got - want).abs().mean()) < 2e-3 * float(want.abs().mean()) + 1e-6


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_fused_4bit_layers_equal_peft_on_each_cpu_kernel(capability):
    """bitsandbytes' native AVX512 (de)quantization kernels and its plain-torch ones: the fused layer,
    the torch dequantization and training after an evaluation agree with peft under each."""
    if torch.backends.cpu.get_cpu_capability() == capability.upper() and "ATEN_CPU_CAPABILITY" not in os.environ:
        pytest.skip(f"{capability} is this CPU's own: the same tests ran in this process under it")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "PYTHONPATH": str(REPO)}
    tests = ("tests/test_fused_lora.py::test_fused_layers_give_peft_loss_and_gradients "
             "tests/test_fused_lora.py::test_torch_dequantization_is_bitsandbytes_bit_for_bit "
             "tests/test_cpu_4bit.py::test_evaluation_then_training_gives_the_gradients_of_training_alone")
    probe = ("import torch, sys; c = torch.backends.cpu.get_cpu_capability(); "
             f"sys.exit(0 if c == {capability.upper()!r} else 3)")
    if subprocess.run([sys.executable, "-c", probe], env=env).returncode == 3:
        pytest.skip(f"this CPU cannot run torch's {capability} kernels")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "4bit or dequant",
                        *tests.split()], cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "failed" not in r.stdout
