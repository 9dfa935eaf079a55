"""The training loss: a causal LM's summed token cross-entropy taken from hidden states in checkpointed
chunks (no batch-sized fp32 logits), and regrouping a window's rows into forwards of another size."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from engine.data.templates import IGNORE_INDEX


class LossHead(torch.nn.Module):
    """A causal LM's summed token loss as one module's forward: the decoder, then the output head and
    the cross-entropy in checkpointed chunks (chunked_cross_entropy_sum). DDP and DeepSpeed wrap this
    module, so the chunked loss and their gradient reduction go together."""

    def __init__(self, model: torch.nn.Module, decoder: torch.nn.Module, head: torch.nn.Module,
                 chunk_tokens: int):
        super().__init__()
        self.model = model
        self._parts = (decoder, head)       # submodules of model: a tuple keeps them from registering twice
        self.chunk_tokens = chunk_tokens

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        decoder, head = self._parts
        hidden = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        return chunked_cross_entropy_sum(hidden[:, :-1], head, labels[:, 1:], self.chunk_tokens)


def _ce_chunk(hidden: torch.Tensor, head: Any, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy_sum(hidden: torch.Tensor, head: Any, labels: torch.Tensor,
                              chunk_tokens: int = 4096) -> torch.Tensor:
    """Sum of token cross-entropies without ever holding the whole batch's logits: the output head
    and the loss run on chunks of target positions, each recomputed in backward (checkpointed).
    Positions that are not targets never reach the head."""
    from torch.utils.checkpoint import checkpoint

    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    keep = (y != IGNORE_INDEX).nonzero(as_tuple=True)[0]
    h, y = h.index_select(0, keep), y.index_select(0, keep)
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, int(y.shape[0]), chunk_tokens):
        total = total + checkpoint(_ce_chunk, h[s:s + chunk_tokens], head, y[s:s + chunk_tokens],
                                   use_reentrant=False)
    return total


def regroup(batches: list[dict[str, torch.Tensor]], rows: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """The window's rows in forwards of ``rows`` rows (right-padded to the widest; padding is its own
    position segment and never a target, as in collate)."""
    flat = [{k: v[i] for k, v in b.items()} for b in batches for i in range(int(b["input_ids"].shape[0]))]
    out = []
    for s in range(0, len(flat), max(1, rows)):
        group = flat[s:s + rows]
        width = max(int(r["input_ids"].shape[0]) for r in group)
        fill = {"input_ids": pad_id, "labels": IGNORE_INDEX}
        chunk: dict[str, list[torch.Tensor]] = {k: [] for k in group[0]}
        for r in group:
            pad = width - int(r["input_ids"].shape[0])
            for k, v in r.items():
                if pad:
                    extra = (torch.arange(pad, device=v.device, dtype=v.dtype) if k == "position_ids"
                             else torch.full((pad,), fill.get(k, 0), device=v.device, dtype=v.dtype))
                    v = torch.cat([v, extra])
                chunk[k].append(v)
        out.append({k: torch.stack(v) for k, v in chunk.items()})
    return out
