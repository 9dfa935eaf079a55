"""The fused LoRA layer (engine/fused_lora.py) computes what peft's LoRA forward computes."""

from __future__ import annotations

import pytest
import torch

from engine.model.fused_lora import _LoraLinear, fuse_lora_layers


def _unfuse(model: torch.nn.Module) -> None:
    for m in model.modules():
        if "forward" in vars(m) and hasattr(m, "_peft_forward"):
            del m.forward


@pytest.mark.parametrize("quantization", ["4bit", "none"])
def test_fused_layers_give_peft_loss_and_gradients(tiny_model, quantization):
    from engine.model.loading import attach_lora, load_model, pick_precision

    model = load_model(str(tiny_model), quantization=quantization, precision=pick_precision(device="cpu"))
    torch.manual_seed(0)
    model = attach_lora(model, r=8, alpha=16, dropout=0.0, target_modules="all-linear", bias="none",
                        quantized=quantization != "none", gradient_checkpointing=True)
    for n, p in model.named_parameters():            # B starts at zero: give it values so A's gradient is not 0
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    trainable = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads():
        for p in trainable:
            p.grad = None
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return float(loss), [p.grad.clone() for p in trainable]

    ref_loss, ref_grads = loss_and_grads()
    n = fuse_lora_layers(model)
    assert n == 2 * 7                                   # q k v o gate up down in each of the 2 layers
    assert fuse_lora_layers(model) == 0                 # idempotent
    loss, grads = loss_and_grads()
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(grads, ref_grads))
    with model.disable_adapter():                       # not covered by the fused path: peft's forward
        base_loss = float(model(input_ids=ids, labels=ids).loss)
    assert base_loss != pytest.approx(loss, rel=1e-3)
    _unfuse(model)
    assert float(model(input_ids=ids, labels=ids).loss) == pytest.approx(ref_loss, rel=1e-6)


def test_fused_dropout_uses_one_mask_for_forward_and_backward():
    """With dropout, the fused function's output and gradients equal the textbook formula evaluated with
    the same mask (the same random draw: same seed, same op)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=g, dtype=torch.float64, requires_grad=True)
    base = torch.nn.Linear(16, 12, bias=True).double().requires_grad_(False)
    a = (torch.randn(4, 16, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    b = (torch.randn(12, 4, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    p, scale = 0.3, 2.0
    dy = torch.randn(3, 5, 12, generator=g, dtype=torch.float64)

    torch.manual_seed(7)
    y = _LoraLinear.apply(x, a, b, base, scale, p, torch.float64, True)
    y.backward(dy)
    got = [y.detach(), x.grad.clone(), a.grad.clone(), b.grad.clone()]
    for t in (x, a, b):
        t.grad = None

    torch.manual_seed(7)
    xd, _ = torch.ops.aten.native_dropout(x.reshape(-1, 16), p, True)
    ref = (base(x).reshape(-1, 12) + scale * (xd @ a.t()) @ b.t()).reshape(3, 5, 12)
    ref.backward(dy)
    want = [ref.detach(), x.grad, a.grad, b.grad]
    for g_, w in zip(got, want):
        assert torch.allclose(g_, w, atol=1e-12)
    assert (xd == 0).any()                              # the mask really dropped something


def test_fused_dropout_under_bf16_is_drawn_and_scaled_on_the_input_as_it_comes():
    """In bf16 the dropout mask is drawn, and the kept values scaled, on the fp32 input before the cast
    to bf16 (one rounding, as peft's dropout before its adapter's cast), not on a bf16 copy (two)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 32, generator=g)
    base = torch.nn.Linear(32, 24, bias=False).requires_grad_(False)
    a, b = torch.randn(8, 32, generator=g) * 0.5, torch.randn(24, 8, generator=g) * 0.5
    bf = torch.bfloat16

    torch.manual_seed(3)
    y = _LoraLinear.apply(x, a, b, base, 0.25, 0.1, bf, True)
    torch.manual_seed(3)
    xd = torch.ops.aten.native_dropout(x.reshape(-1, 32), 0.1, True)[0].to(bf)
    want = torch.nn.functional.linear(x.reshape(-1, 32).to(bf), base.weight.to(bf))
    want.addmm_(xd @ a.to(bf).t(), b.to(bf).t(), alpha=0.25)
    assert torch.equal(y.reshape(-1, 24), want)


def test_fused_4bit_layer_adds_a_small_adapter_output_in_the_inputs_dtype_as_peft(tiny_model):
    """bitsandbytes' 4-bit layer hands its bf16 product back in the input's dtype (fp32 here), and peft adds
    the adapter's bf16 output to it there. Early in training B is small: added into a bf16 base output its
    contribution would mostly round away (the first optimizer steps moved the loss less than peft's on an
    H200). The fused layer returns what peft's returns, in its dtype."""
    from engine.model.loading import Precision, attach_lora, load_model

    prec = Precision("cpu", "bf16", torch.bfloat16)
    model = load_model(str(tiny_model), quantization="4bit", precision=prec)
    torch.manual_seed(0)
    model = attach_lora(model, r=8, alpha=16, dropout=0.0, target_modules="all-linear", bias="none",
                        quantized=True, gradient_checkpointing=False)
    layer = model.get_base_model().model.layers[0].mlp.up_proj
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=1e-4)     # a first update's size
    x = torch.randn(2, 24, layer.in_features, generator=torch.Generator().manual_seed(1))

    def out() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return layer(x)

    want = out()
    with model.disable_adapter():
        delta = want - out()
    assert want.dtype == torch.float32 and delta.abs().mean() > 0
    assert fuse_lora_layers(model) == 14
    got = out()
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=0, atol=1e-3 * float(delta.abs().max()))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_torch_dequantization_is_bitsandbytes_bit_for_bit(quant_type):
    """The compiled layers dequantize with torch operations; they must give bitsandbytes' weights."""
    import bitsandbytes.functional as bnbf

    from engine.model.fused_lora import block_scales, dequantize_4bit

    w = torch.randn(256, 192, generator=torch.Generator().manual_seed(0))
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=True)
    absmax = block_scales(state)
    for dtype in (torch.bfloat16, torch.float32):
        ref = torch.ops.bitsandbytes.dequantize_4bit.default(packed, absmax, 64, quant_type, state.shape, dtype)
        assert torch.equal(dequantize_4bit(packed, absmax, state.code.float(), 64, state.shape, dtype), ref)
