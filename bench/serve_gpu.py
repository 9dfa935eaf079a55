"""Inference-service benchmark, on a GPU machine, beside a plain transformers `generate`
in the same process: time to first token, decode tokens/s of one stream, base + tuned streams at
once, peak memory. Random-init InternLM2-1.8B shape with a random r-64 LoRA on every linear layer.

    python bench/serve_gpu.py [--new-tokens 256]

Writes bench/results/serve_<gpu>.json (and a copy under $OUT when set).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
MODEL = Path(os.environ.get("BENCH_MODEL", "/tmp/internlm2_1_8b_shape"))
ADAPTER = Path(os.environ.get("BENCH_ADAPTER", "/tmp/internlm2_1_8b_shape_lora64"))
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
PROMPT = "请你介绍一下你自己，并且详细说明你能帮我做哪些事情。Please also answer in English, in detail."


def build() -> None:
    if not CUDA:   # a CPU dry run of the script's logic on models made beforehand
        return
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from engine.model.tiny import build_tokenizer

    if not (MODEL / "config.json").exists():
        cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16,
                          num_key_value_heads=8, vocab_size=92544, max_position_embeddings=32768, rope_theta=1e6,
                          tie_word_embeddings=False)
        with torch.device("cuda"):
            m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        m.save_pretrained(MODEL)
        del m
    tok_ok = (MODEL / "tokenizer.json").exists() and len(AutoTokenizer.from_pretrained(str(MODEL))) >= 92544
    if not tok_ok:   # every id the random model can emit must decode: pad the vocabulary
        tok = build_tokenizer(MODEL)
        tok.add_tokens([f"<x{i}>" for i in range(92544 - len(tok))])
        tok.save_pretrained(str(MODEL))
    if not (ADAPTER / "adapter_config.json").exists():
        base = AutoModelForCausalLM.from_pretrained(str(MODEL), dtype=torch.bfloat16, device_map={"": 0})
        lora = get_peft_model(base, LoraConfig(r=64, lora_alpha=16, target_modules="all-linear",
                                               init_lora_weights=False))
        lora.save_pretrained(str(ADAPTER))
        (ADAPTER / "tunedeck.json").write_text(json.dumps({"prompt_template": "internlm2_chat"}))
        del base, lora
    torch.cuda.empty_cache()


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()
        self.first = None
        self.last = None
        self.n = 0

    def token(self):
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        self.last = now
        self.n += 1

    def result(self) -> dict:
        dec = (self.n - 1) / (self.last - self.first) if self.n > 1 else 0.0
        return {"ttft_ms": round(1000 * (self.first - self.t0), 1), "tokens": self.n,
                "decode_tokens_per_s": round(dec, 1)}


def baseline(new_tokens: int, ids: list[int]) -> dict:
    """What a user writes by hand: from_pretrained + generate, greedy, streamed."""
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    model = AutoModelForCausalLM.from_pretrained(str(MODEL), dtype=torch.bfloat16 if CUDA else torch.float32,
                                                 device_map={"": DEV}).eval()

    class S(BaseStreamer):
        def __init__(self, timer):
            self.timer, self.seen = timer, False

        def put(self, v):
            if self.seen:
                self.timer.token()
            self.seen = True

        def end(self):
            pass

    x = torch.tensor([ids], device=DEV)
    runs = []
    for _ in range(3):
        t = Timer()
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, streamer=S(t), pad_token_id=0)
        runs.append(t.result())
    del model
    if CUDA:
        torch.cuda.empty_cache()
    best = max(runs[1:], key=lambda r: r["decode_tokens_per_s"])
    return best | {"runs": runs}


def ours(new_tokens: int) -> dict:
    from engine.serve.generation import GenerationParams
    from engine.serve.scheduler import GenRequest, ModelHost, Scheduler

    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    t_load = time.perf_counter()
    host = ModelHost(str(MODEL), template="internlm2_chat")
    host.add_adapter("tuned", str(ADAPTER))
    load_s = time.perf_counter() - t_load
    sched = Scheduler(host)                      # the service's own: no window; a pair is one group
    msgs = [{"role": "user", "content": PROMPT}]

    def stream(models: list[str]) -> tuple[list[dict], float]:
        timers, done = [], []
        group = (f"pair-{time.perf_counter_ns()}", len(models)) if len(models) > 1 else None
        t0 = time.perf_counter()
        for m in models:
            ids, _, _ = host.encode(m, msgs)
            timer, ev = Timer(), threading.Event()
            timers.append(timer)
            done.append(ev)

            def emit(item, timer=timer, ev=ev):
                if item[0] == "delta":
                    timer.token()
                else:   # deltas are text pieces; count the tokens the service reports
                    if item[0] == "done" and item[2]:
                        timer.n = item[2]["completion_tokens"]
                    ev.set()
            params = GenerationParams(max_new_tokens=new_tokens, temperature=0.0, stop=[])
            sched.submit(GenRequest(m, ids, params, set(), emit, group=group))
        for ev in done:
            ev.wait(600)
        wall = time.perf_counter() - t0
        return [t.result() for t in timers], wall

    compile_s = host.warmup((1, 2))              # what `tunedeck serve` does before it listens
    warm = []
    for models in (["tuned"], ["base", "tuned"]):   # first real requests after the start-up compile
        t = time.perf_counter()
        stream(models)
        warm.append(round(time.perf_counter() - t, 1))
    single = [stream(["tuned"])[0][0] for _ in range(3)]
    single_best = max(single, key=lambda r: r["decode_tokens_per_s"])
    pair_runs = [stream(["base", "tuned"]) for _ in range(3)]
    pair_rates = []
    for rows, wall in pair_runs:
        first = min(r["ttft_ms"] for r in rows) / 1000
        toks = sum(r["tokens"] - 1 for r in rows)
        pair_rates.append({"rows": rows, "total_decode_tokens_per_s": round(toks / (wall - first), 1)})
    pair_best = max(pair_rates, key=lambda r: r["total_decode_tokens_per_s"])
    single_rate = single_best["tokens"] - 1
    one_stream_wall = single_rate / single_best["decode_tokens_per_s"]
    sched.close()
    return {"load_s": round(load_s, 1), "startup_compile_s": round(compile_s, 1), "first_requests_s": warm,
            "single": single_best, "single_runs": single,
            "pair": pair_best, "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if CUDA else None,
            "static_cache": host.static_cache, "one_stream_wall_s": round(one_stream_wall, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=256)
    args = ap.parse_args()
    import transformers

    build()
    from transformers import AutoTokenizer

    from engine.data.templates import encode_prompt

    tok = AutoTokenizer.from_pretrained(str(MODEL))
    ids = encode_prompt(tok, "internlm2_chat", [{"role": "user", "content": PROMPT}])
    gpu = torch.cuda.get_device_name(0) if CUDA else "cpu-dry-run"
    res = {"what": "tunedeck serve core (ModelHost + Scheduler, in process) vs plain transformers generate; "
                   "random-init InternLM2-1.8B shape, bf16, greedy, random LoRA r64 on all linear layers",
           "gpu": gpu, "torch": torch.__version__, "transformers": transformers.__version__,
           "prompt_tokens": len(ids), "new_tokens": args.new_tokens, "date": time.strftime("%Y-%m-%d")}
    res["baseline_generate"] = baseline(args.new_tokens, ids)
    print("baseline", json.dumps(res["baseline_generate"]), flush=True)
    res["tunedeck"] = ours(args.new_tokens)
    b = res["baseline_generate"]["decode_tokens_per_s"]
    t = res["tunedeck"]
    res["ratio_single_vs_generate"] = round(t["single"]["decode_tokens_per_s"] / b, 2)
    res["ratio_pair_vs_single"] = round(t["pair"]["total_decode_tokens_per_s"] / t["single"]["decode_tokens_per_s"], 2)
    text = json.dumps(res, indent=1, ensure_ascii=False)
    print(text, flush=True)
    slug = gpu.replace(" ", "_").replace("/", "_")
    for d in [REPO / "bench/results" if CUDA else None, Path(os.environ["OUT"]) if os.environ.get("OUT") else None]:
        if d is not None:
            d.mkdir(parents=True, exist_ok=True)
            (d / f"serve_{slug}.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
