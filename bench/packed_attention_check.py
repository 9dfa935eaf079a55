"""Where Unsloth's first loss could differ from every other run's: the first-step loss of the
random-init InternLM2-1.8B shape on tunedeck's packed rows, on the same weights and tokens, as

  apart       each packed sample attends only to itself (position ids restart per sample and no
              attention mask: transformers builds the block-diagonal mask; tunedeck and the
              hand-written loop train this way)
  across      the same position ids, but every token attends to all earlier tokens of its row (an
              all-ones attention mask turns the per-sample mask off): what Unsloth computes when it
              gets no packed_seq_lengths
  apart_nf4   apart, with the linear layers in 4-bit nf4 (double quantization) as every QLoRA run loads
              them (bitsandbytes; its CPU kernels on the CPU)

Before any update the LoRA adds nothing, so this is the base model's loss. In the call of
2026-12-02 (H200, bf16, 16 rows) tunedeck's first loss was 12.11 and Unsloth's 11.69 (-0.42). The
differences printed say how much of that each cause can carry; bench/unsloth_loop.py now passes
packed_seq_lengths, so attention across samples is out of the comparison either way.

    python bench/packed_attention_check.py [--rows 16] [--model DIR]    # a GPU: bf16, the bench model
    python bench/packed_attention_check.py --rows 1                     # the CPU: fp32, a few minutes

Writes bench/results/packed_attention_check_<device>.json; exits 1 when a loss is not finite.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine_gpu import MODEL, REPO, build_data  # noqa: E402

CPU_MODEL = Path("/tmp/internlm2_1_8b_shape_cpu")


def build_cpu_model(path: Path) -> None:
    """The bench model's shape and initialisation (std 0.02), made on the CPU (the GPU's random stream
    differs, so the weights are not the GPU model's; the distribution is)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from engine.model.tiny import build_tokenizer

    if not (path / "config.json").exists():
        cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16,
                          num_key_value_heads=8, vocab_size=92544, max_position_embeddings=32768, rope_theta=1e6,
                          tie_word_embeddings=False)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    if not (path / "tokenizer.json").exists():
        build_tokenizer(path)


def first_losses(model_dir: Path, rows_n: int, device: str) -> dict:
    import torch
    from train_throughput import _recipe, recipe_rows
    from transformers import AutoModelForCausalLM

    from engine.data.packing import collate
    from engine.data.templates import IGNORE_INDEX

    r = _recipe([f"model.path={model_dir}"])
    tok, rows = recipe_rows(r)
    g = torch.Generator().manual_seed(r.train.seed * 1_000_003)       # the first window, as every run takes it
    order = torch.randperm(len(rows), generator=g).tolist()
    window = [rows[i] for i in order[:rows_n]]
    from transformers import BitsAndBytesConfig

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    b = {k: torch.tensor(v, device=device) for k, v in collate(window, tok.pad_token_id).items()}
    out = {}
    for quantized in (False, True):
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype) if quantized else None
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation="sdpa",
                                                     quantization_config=quant, device_map={"": device}).eval()
        model.config.use_cache = False
        variants = (("apart_nf4", None),) if quantized else (("apart", None),
                                                             ("across", torch.ones_like(b["input_ids"])))
        with torch.no_grad():
            for name, mask in variants:
                t0 = time.perf_counter()
                logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"],
                               attention_mask=mask).logits
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].float().reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1),
                    ignore_index=IGNORE_INDEX)
                out[name] = round(float(loss), 4)
                print(f"{name:9s} first loss {out[name]:.4f}  ({time.perf_counter() - t0:.1f} s)", flush=True)
                del logits
        del model
    samples = sum(int((torch.tensor(row.position_ids) == 0).sum()) for row in window)
    return {"rows": rows_n, "samples_in_rows": samples, "dtype": str(dtype).removeprefix("torch."), **out}


def main() -> int:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=None,
                    help="rows of the first window (default 16 on a GPU, 1 on the CPU)")
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    build_data(Path("/tmp/ft/data/personal_assistant.json"))
    if args.model:
        model_dir = Path(args.model)
    elif device == "cuda":
        from engine_gpu import build_model

        build_model()
        model_dir = MODEL
    else:
        build_cpu_model(CPU_MODEL)
        model_dir = CPU_MODEL
    res = first_losses(model_dir, args.rows or (16 if device == "cuda" else 1), device)
    from tui_perf import cpu_model

    where = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    res = {"what": "first-step loss of the bench model: packed samples kept apart, attending across the row, "
                   "and apart with nf4 weights",
           "device": where if device == "cuda" else f"cpu: {cpu_model()}",
           "torch": torch.__version__, "transformers": __import__("transformers").__version__,
           "seen_2026_12_02_h200": {"tunedeck": 12.11, "unsloth": 11.69}, **res}
    ok = all(math.isfinite(res[k]) for k in ("apart", "across", "apart_nf4"))
    res["across_minus_apart"] = round(res["across"] - res["apart"], 4)
    res["nf4_minus_apart"] = round(res["apart_nf4"] - res["apart"], 4)
    res["verdict"] = (f"attending across packed samples moves the first loss by {res['across_minus_apart']:+.3f}, "
                      f"nf4 weights by {res['nf4_minus_apart']:+.3f}; Unsloth's was -0.42 from tunedeck's "
                      "(H200, 2026-12-02)" if ok else "a loss is not finite: the check itself is broken")
    print(res["verdict"])
    out = REPO / "bench" / "results" / f"packed_attention_check_{where.replace(' ', '_')}.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
