"""Unsloth on the tutorial's recipe, for bench/train_throughput.py (`--only unsloth,unsloth_dropout0`):
the same random-init InternLM2-1.8B-shaped model (Llama layout, which Unsloth supports), the same
LoRA (r 64, alpha 16, the 7 linear layers, nf4 with double quantization: Unsloth's load_in_4bit),
the same rows in the same order (16 packed 1024-token rows a step, as tunedeck's window), the
recipe's AdamW, warm-up + cosine and clipping, Unsloth's own gradient checkpointing and its fused
loss. Run in its own process: Unsloth patches transformers when it is imported.

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


def unsloth_loop(r, steps: int, rows_per_forward: int, dropout: float) -> dict:
    import unsloth  # noqa: F401, I001  (first: it patches transformers and peft)
    from unsloth import FastLanguageModel
    import torch

    from engine.data.formats import load_conversations
    from engine.data.packing import build_rows, collate, tokenize_conversations
    from engine.data.templates import IGNORE_INDEX, resolve_template_name
    from engine.model.loading import load_tokenizer
    from engine.train.schedule import warmup_cosine

    torch.manual_seed(r.train.seed)
    tok = load_tokenizer(r.model.path)          # tunedeck's rows: the same tokens as every other run
    template = resolve_template_name(r.data.prompt_template, tok)
    convs = load_conversations(r.data.data_path, r.data.format)
    samples = tokenize_conversations(convs, tok, template, r.data.max_length, 0)
    rows = build_rows(samples, r.data.max_length, r.data.pack_to_max_length, r.train.seed)

    t_load = time.perf_counter()
    model, _ = FastLanguageModel.from_pretrained(model_name=str(r.model.path), max_seq_length=r.data.max_length,
                                                 dtype=torch.bfloat16, load_in_4bit=True, fix_tokenizer=False,
                                                 local_files_only=True)
    model = FastLanguageModel.get_peft_model(
        model, r=r.lora.r, lora_alpha=r.lora.alpha, lora_dropout=dropout, bias="none",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        use_gradient_checkpointing="unsloth", random_state=r.train.seed)
    load_s = time.perf_counter() - t_load
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=r.train.lr, betas=tuple(r.train.betas), weight_decay=r.train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps, r.train.warmup_ratio))
    model.train()
    acc = r.train.accumulative_counts * r.train.batch_size
    windows, epoch = [], 0                     # tunedeck's order: a seeded permutation per epoch
    while len(windows) < steps:
        g = torch.Generator().manual_seed(r.train.seed * 1_000_003 + epoch)
        order = torch.randperm(len(rows), generator=g).tolist() if r.data.shuffle else list(range(len(rows)))
        windows += [order[s:s + acc] for s in range(0, len(order), acc)]
        epoch += 1
    curve, times, norms = [], [], []
    torch.cuda.reset_peak_memory_stats()
    for step in range(steps):
        window = [rows[i] for i in windows[step]]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        n = sum(sum(1 for y in row.labels[1:] if y != IGNORE_INDEX) for row in window)
        total = 0.0
        for s in range(0, len(window), rows_per_forward):
            part = window[s:s + rows_per_forward]
            b = {k: torch.tensor(v, device="cuda") for k, v in collate(part, tok.pad_token_id).items()}
            m = sum(sum(1 for y in row.labels[1:] if y != IGNORE_INDEX) for row in part)
            with torch.autocast("cuda", dtype=torch.bfloat16):    # as its trainer runs with bf16=True
                out = model(input_ids=b["input_ids"], position_ids=b["position_ids"], labels=b["labels"])
            # its loss is the token mean of this forward: weighted to the window's token mean
            (out.loss * (m / n)).backward()
            total += float(out.loss) * m
            del out
        norms.append(round(float(torch.nn.utils.clip_grad_norm_(
            params, r.train.max_norm if r.train.max_norm > 0 else float("inf"))), 6))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        curve.append(round(total / n, 6))
        print(f"unsloth step {step + 1}: loss {curve[-1]:.4f} {times[-1]:.2f}s", flush=True)
    tokens = [len(w) * r.data.max_length for w in windows[:steps]]
    steady = list(range(3, steps)) or list(range(steps))
    import unsloth_zoo

    return {
        "what": f"Unsloth {unsloth.__version__} (unsloth_zoo {unsloth_zoo.__version__}): FastLanguageModel 4-bit, "
                f"get_peft_model r{r.lora.r}/alpha{r.lora.alpha}/dropout {dropout}, its gradient checkpointing "
                f"and fused loss, {rows_per_forward} rows per forward, bf16 autocast, the recipe's optimizer",
        "note": "Unsloth attends across the packed samples of a row unless it finds its own packing metadata; "
                "position_ids restart per sample as in every other run",
        "unsloth": unsloth.__version__, "unsloth_zoo": unsloth_zoo.__version__,
        "transformers": __import__("transformers").__version__,
        "tokens_per_s": round(sum(tokens[i] for i in steady) / sum(times[i] for i in steady)),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "first_step_s": round(times[0], 2), "load_s": round(load_s, 1),
        "median_step_s": round(sorted(times[3:] or times)[len(times[3:] or times) // 2], 4),
        "loss_curve": curve, "grad_norm_curve": norms}


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
