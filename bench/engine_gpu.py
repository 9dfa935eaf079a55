"""GPU run of the engine on the real shape: the tutorial's QLoRA recipe on a random-init
InternLM2-1.8B-shaped model, beside the hand-written transformers + peft baseline, same call.

    python bench/engine_gpu.py --baseline PATH/hf_peft_baseline.py [--deepspeed zero2] [--steps 50]

Writes bench/results/engine_<mode>_<gpu>.json (and a copy under $OUT when set). Weights' values
don't change a step's cost, so random init stands in for the real checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL = Path("/tmp/internlm2_1_8b_shape")             # Llama-architecture stand-in of the 1.8B shape
MODEL_INTERNLM2 = Path("/tmp/internlm2_1_8b_hub")    # the same shape as internlm2-chat-1_8b ships it
RECIPE = REPO / "configs/internlm2/internlm2_chat_1_8b_qlora_self_e2.yaml"


def build_model(extra_texts: list[str] | None = None) -> None:
    """The random-init InternLM2-1.8B-shaped model and a tokenizer (trained on the spot) at MODEL."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    sys.path.insert(0, str(REPO))
    from engine.model.tiny import build_tokenizer

    if not (MODEL / "config.json").exists():
        cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16,
                          num_key_value_heads=8, vocab_size=92544, max_position_embeddings=32768, rope_theta=1e6,
                          tie_word_embeddings=False, torch_dtype="bfloat16")
        torch.manual_seed(0)       # the same weights on every machine: curves compare across calls
        with torch.device("cuda"):
            m = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
        m.save_pretrained(MODEL)
        del m
    if not (MODEL / "tokenizer.json").exists():
        build_tokenizer(MODEL, extra_texts=extra_texts)


def build_internlm2_model() -> None:
    """The 1.8B shape laid out as internlm/internlm2-chat-1_8b is on the hub (InternLM2-named bf16
    shards with wqkv fused, auto_map config, SentencePiece tokenizer.model, chat tokenizer_config),
    random init; tunedeck loads it through its native conversion."""
    sys.path.insert(0, str(REPO))
    from engine.model.tiny import build_tiny_internlm2

    if not (MODEL_INTERNLM2 / "config.json").exists():
        build_tiny_internlm2(MODEL_INTERNLM2, hidden=2048, layers=24, heads=16, kv_heads=8, intermediate=8192,
                             max_positions=32768, rope_scaling={"type": "dynamic", "factor": 2.0},
                             vocab_rows=92544, init_std=0.02, dtype="bfloat16", shards=2)


def build_data(path: Path) -> None:
    sys.path.insert(0, str(REPO))
    from engine.data.identity import identity_records, write_identity

    if not path.exists():
        write_identity(path, identity_records("tunedeck", 10000))


def run_baseline(script: str) -> dict:
    out = subprocess.run([sys.executable, script, "qlora", "1024"], capture_output=True, text=True, timeout=600)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if not line:
        return {"error": (out.stderr or out.stdout)[-2000:]}
    return json.loads(line[-1])


def summarize(work: Path, returncode: int = 0, wall: float | None = None, log: str = "") -> dict:
    metrics = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()] if (
        work / "metrics.jsonl").exists() else []
    status = json.loads((work / "status.json").read_text()) if (work / "status.json").exists() else {}
    steady = [m for m in metrics if m["step"] > 3 and not m.get("profiled")] if returncode == 0 else []
    res = {"returncode": returncode, "state": status.get("state"), "error": status.get("error"),
           "steps": len(metrics), "wall_s": round(wall, 1) if wall else None}
    if steady:
        tok = sum(m["tokens_per_s"] * m["step_time_s"] for m in steady)
        res.update(tokens_per_s=round(tok / sum(m["step_time_s"] for m in steady)),
                   median_step_s=round(statistics.median(m["step_time_s"] for m in steady), 3),
                   peak_mem_gib=round(max(m["gpu_mem_gib"] for m in metrics), 2),
                   first_step_s=round(metrics[0]["step_time_s"], 1),     # compilation included
                   max_step_s=round(max(m["step_time_s"] for m in steady), 3),
                   step_times_s=[m["step_time_s"] for m in steady],
                   loss_first=metrics[0]["loss"], loss_last=metrics[-1]["loss"],
                   loss_curve=[m["loss"] for m in metrics], grad_norm_curve=[m.get("grad_norm") for m in metrics])
    if returncode != 0:
        res["log_tail"] = log[-3000:]
    for prof in sorted((work / "profile").glob("*.txt")) if (work / "profile").is_dir() else ():
        res.setdefault("profiles", {})[prof.stem] = prof.read_text().splitlines()[0]
    evals = work / "evals.jsonl"
    if evals.exists():
        res["evals_last"] = [json.loads(x) for x in evals.read_text().splitlines()][-3:]
    return res


def run_tunedeck(work: Path, sets: list[str], gpus: int = 1, deepspeed: str | None = None,
                 env: dict | None = None) -> dict:
    """`tunedeck train` on the tutorial's recipe with these --set overrides (and environment variables),
    summarized from its run directory."""
    cmd = [sys.executable, "-m", "engine.cli", "train", str(RECIPE), "--work-dir", str(work)]
    for kv in sets:
        cmd += ["--set", kv]
    if gpus > 1:
        cmd += ["--gpus", str(gpus)]
    if deepspeed:
        cmd += ["--deepspeed", deepspeed]
    shutil.rmtree(work, ignore_errors=True)     # the bench's own scratch run: a new run, never an old one's figures
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, **(env or {})})
    res = summarize(work, proc.returncode, time.time() - t0, proc.stdout + proc.stderr)
    res["settings"] = (list(sets) + ([f"--gpus {gpus}"] if gpus > 1 else [])
                       + ([f"--deepspeed {deepspeed}"] if deepspeed else [])
                       + [f"{k}={v}" for k, v in (env or {}).items()])
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", help="path to hf_peft_baseline.py (run in the same call)")
    ap.add_argument("--deepspeed", default=None)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--collect", help="summarize a finished run directory instead of training")
    ap.add_argument("--baseline-json", help="the baseline's JSON line, measured earlier in this lease")
    ap.add_argument("--set", action="append", default=[], help="recipe override for tunedeck's run (repeatable)")
    ap.add_argument("--tag", default="", help="suffix of the result file name")
    args = ap.parse_args()
    import bitsandbytes
    import peft
    import torch
    import transformers

    build_model()
    data = Path("/tmp/ft/data/personal_assistant.json")
    build_data(data)
    gpu = torch.cuda.get_device_name(0)
    result = {"what": "tunedeck train, tutorial recipe internlm2_chat_1_8b_qlora_self_e2 (nf4 QLoRA r64/alpha16, "
                      "1024-token packed rows, batch 1 x accumulative_counts 16, grad ckpt), random-init "
                      "InternLM2-1.8B shape", "gpu": gpu, "torch": torch.__version__,
              "transformers": transformers.__version__, "peft": peft.__version__,
              "bitsandbytes": bitsandbytes.__version__, "deepspeed": args.deepspeed or "none",
              "date": time.strftime("%Y-%m-%d")}
    if args.baseline_json:
        result["baseline"] = json.loads(args.baseline_json)
    elif args.baseline:
        result["baseline"] = run_baseline(args.baseline)
        print("baseline", json.dumps(result["baseline"]), flush=True)
    name = (f"qlora_{args.deepspeed}" if args.deepspeed else "qlora") + (f"_{args.tag}" if args.tag else "")
    result["overrides"] = args.set
    if args.collect:
        result["tunedeck"] = summarize(Path(args.collect))
    else:
        sets = [f"model.path={MODEL}", "model.trust_remote_code=false", f"data.data_path={data}",
                f"max_steps={args.steps}", "save_steps=1000", *args.set]
        result["tunedeck"] = run_tunedeck(Path(f"/tmp/ft/run_{name}"), sets, deepspeed=args.deepspeed)
    b = result.get("baseline", {})
    if b.get("tokens_per_s") and result["tunedeck"].get("tokens_per_s"):
        result["ratio_tokens_per_s"] = round(result["tunedeck"]["tokens_per_s"] / b["tokens_per_s"], 3)
        result["ratio_peak_mem"] = round(result["tunedeck"]["peak_mem_gib"] / b["peak_mem_gib"], 3)
    text = json.dumps(result, ensure_ascii=False, indent=1)
    print(text, flush=True)
    slug = gpu.replace(" ", "_").replace("/", "_")
    for d in [REPO / "bench/results", Path(os.environ["OUT"]) if os.environ.get("OUT") else None]:
        if d is not None:
            d.mkdir(parents=True, exist_ok=True)
            (d / f"engine_{name}_{slug}.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
