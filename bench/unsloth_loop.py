"""Unsloth on the tutorial's recipe, for bench/train_throughput.py (`--only unsloth,unsloth_dropout0`):
the same random-init InternLM2-1.8B-shaped model (Llama layout, which Unsloth supports), the same
LoRA (r 64, alpha 16, the 7 linear layers, nf4 with double quantization: Unsloth's load_in_4bit),
the same rows in the same order (16 packed 1024-token rows a step, as tunedeck's window), the
recipe's AdamW, warm-up + cosine and clipping, Unsloth's own gradient checkpointing and its fused
loss. Run in its own process: Unsloth patches transformers when it is imported.

Each forward passes Unsloth's packing metadata (``packed_seq_lengths``: every sample's length, row
after row, padding its own segment), so its attention keeps the packed samples apart as tunedeck's
does. Without it Unsloth attends across the samples of a row: a different computation, whose first
loss was 11.69 against 12.11 (bench/packed_attention_check.py measures that difference alone).

    python bench/unsloth_loop.py OUT.json --steps 30 [--dropout 0.1] [--rows-per-forward 16]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def segment_lengths(position_ids: list[list[int]]) -> list[int]:
    """Each packed sample's length, row after row (a sample starts where its position ids restart at
    0; a row's padding is a segment of its own): Unsloth's ``packed_seq_lengths``."""
    out = []
    for row in position_ids:
        starts = [i for i, p in enumerate(row) if p == 0] + [len(row)]
        out += [b - a for a, b in zip(starts, starts[1:])]
    return out


def unsloth_loop(r, steps: int, rows_per_forward: int, dropout: float) -> dict:
    import unsloth  # noqa: F401, I001  (first: it patches transformers and peft)
    from unsloth import FastLanguageModel
    import torch
    import unsloth_zoo
    from train_throughput import recipe_rows, train_windows

    from engine.data.packing import collate
    from engine.data.templates import IGNORE_INDEX

    torch.manual_seed(r.train.seed)
    tok, rows = recipe_rows(r)
    t_load = time.perf_counter()
    model, _ = FastLanguageModel.from_pretrained(model_name=str(r.model.path), max_seq_length=r.data.max_length,
                                                 dtype=torch.bfloat16, load_in_4bit=True, fix_tokenizer=False,
                                                 local_files_only=True)
    model = FastLanguageModel.get_peft_model(
        model, r=r.lora.r, lora_alpha=r.lora.alpha, lora_dropout=dropout, bias="none",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        use_gradient_checkpointing="unsloth", random_state=r.train.seed)
    load_s = time.perf_counter() - t_load
    model.train()

    def window_loss(window: list, n: int) -> float:
        total = 0.0
        for s in range(0, len(window), rows_per_forward):
            part = window[s:s + rows_per_forward]
            cols = collate(part, tok.pad_token_id)
            b = {k: torch.tensor(v, device="cuda") for k, v in cols.items()}
            lengths = torch.tensor(segment_lengths(cols["position_ids"]), dtype=torch.int32, device="cuda")
            m = sum(sum(1 for y in row.labels[1:] if y != IGNORE_INDEX) for row in part)
            with torch.autocast("cuda", dtype=torch.bfloat16):    # as its trainer runs with bf16=True
                out = model(input_ids=b["input_ids"], position_ids=b["position_ids"], labels=b["labels"],
                            packed_seq_lengths=lengths)
            # its loss is the token mean of this forward: weighted to the window's token mean
            (out.loss * (m / n)).backward()
            total += float(out.loss) * m
            del out
        return total

    res = train_windows(r, steps, rows, model, window_loss, "unsloth", cuda=True)
    return {
        "what": f"Unsloth {unsloth.__version__} (unsloth_zoo {unsloth_zoo.__version__}): FastLanguageModel 4-bit, "
                f"get_peft_model r{r.lora.r}/alpha{r.lora.alpha}/dropout {dropout}, its gradient checkpointing "
                f"and fused loss, {rows_per_forward} rows per forward, bf16 autocast, the recipe's optimizer",
        "note": "packed_seq_lengths passed with every forward: Unsloth keeps the packed samples apart, as "
                "every other run; position_ids restart per sample",
        "unsloth": unsloth.__version__, "unsloth_zoo": unsloth_zoo.__version__,
        "transformers": __import__("transformers").__version__, "load_s": round(load_s, 1), **res}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--dropout", type=float, default=None, help="default: the recipe's lora.dropout")
    ap.add_argument("--rows-per-forward", type=int, default=16)
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    import unsloth  # noqa: F401  (before anything imports transformers)
    from train_throughput import BASE_SETS, _recipe

    BASE_SETS.extend(args.set)
    r = _recipe([f"max_steps={args.steps}"])
    dropout = r.lora.dropout if args.dropout is None else args.dropout
    Path(args.out).write_text(json.dumps(unsloth_loop(r, args.steps, args.rows_per_forward, dropout)))


if __name__ == "__main__":
    main()
