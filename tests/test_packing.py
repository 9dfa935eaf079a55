"""Packed samples never attend to each other: position ids restart per sample and transformers
builds a block-diagonal causal mask from them (sdpa, eager)."""

from __future__ import annotations

import pytest
import torch

from engine.data.packing import Row, collate


@pytest.mark.parametrize("family", ["llama", "internlm2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_samples_logits_do_not_change_when_another_is_packed_beside_it(request, family, attn):
    """Also for an InternLM2 checkpoint as it ships, loaded through tunedeck's native conversion."""
    from engine.model.loading import load_model, pick_precision

    folder = request.getfixturevalue("tiny_model" if family == "llama" else "internlm2_model")
    model = load_model(str(folder), precision=pick_precision(device="cpu"), attn_implementation=attn).eval()
    g = torch.Generator().manual_seed(0)
    a = torch.randint(10, 600, (17,), generator=g).tolist()
    b = torch.randint(10, 600, (23,), generator=g).tolist()
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([a]), position_ids=torch.arange(len(a))[None], use_cache=False).logits[0]
        batch = collate([Row(b + a, [0] * 40, list(range(23)) + list(range(17))), Row(a, [0] * 17, list(range(17)))],
                        pad_id=3)
        packed = model(input_ids=torch.tensor(batch["input_ids"]),
                       position_ids=torch.tensor(batch["position_ids"]), use_cache=False).logits
        # control: the same row with positions running on, as naive packing does
        leaky = model(input_ids=torch.tensor([b + a]), position_ids=torch.arange(40)[None], use_cache=False).logits[0]
    torch.testing.assert_close(packed[0, 23:], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[1, :17], alone, atol=1e-5, rtol=1e-5)   # padding after it changes nothing
    assert (leaky[23:] - alone).abs().max() > 1e-3


def test_the_unsloth_bench_passes_each_packed_samples_length():
    """bench/unsloth_loop.py tells Unsloth where the packed samples of a row start (its
    packed_seq_lengths): one length per sample, row after row, the padding a segment of its own."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from unsloth_loop import segment_lengths

    rows = [Row([5] * 40, [0] * 40, list(range(23)) + list(range(17))), Row([6] * 17, [0] * 17, list(range(17)))]
    batch = collate(rows, pad_id=3)
    assert segment_lengths(batch["position_ids"]) == [23, 17, 17, 23]
