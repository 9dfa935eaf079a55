"""Training throughput of the tutorial's QLoRA recipe, tunedeck beside the hand-written way,
in one call on one GPU machine.

    python bench/train_throughput.py --baseline PATH/hf_peft_baseline.py [--steps 50] [--gpus 2]

What runs, each in its own process (clean GPU memory), on a random-init InternLM2-1.8B-shaped model
(weights' values do not change a step's cost) and the tutorial's identity data:

  baseline    ../shared/bench/hf_peft_baseline.py qlora 1024: the tutorial's recipe as people run it
              (tokens/s and peak memory: the reference point of every ratio)
  reference   the same hand-written transformers + peft + bitsandbytes code (model, prepare_model_for_
              kbit_training, LoRA, no autocast), trained on tunedeck's rows in tunedeck's order, with
              the recipe's optimizer, schedule, clipping and window-mean loss: the loss curve to match
  tunedeck    `tunedeck train` with the recipe's default settings
  tunedeck_internlm2  the same on the 1.8B shape laid out as internlm2-chat-1_8b ships (InternLM2 names,
              wqkv fused, its own config and tokenizer.model), loaded through tunedeck's native conversion:
              it must train as fast as the Llama-layout stand-in (internlm2_vs_llama_tokens_per_s)
  low_memory  the same with `train.low_memory: true` (the <= 3.2 GiB preset)
  tunedeck_recompute_all (ask with --only) the same with model.checkpoint_layers: all (the <= 12 GiB preset:
              every layer recomputes; the default, auto, keeps activations where the GPU has room)
  zero2       (--gpus 2) `tunedeck train --gpus 2 --deepspeed zero2`, accumulative_counts halved so the
              global batch (and the loss curve) stays the recipe's
  ddp         (--gpus 2) the same with plain PyTorch DDP
  zero2_overlap (ask with --only, --gpus 2) zero2 with DeepSpeed's overlap_comm and contiguous_gradients on
              (their "auto" is off for adapters: engine/train/distributed.py resolve_zero_auto)
  tunedeck_half  (ask with --only) one GPU on one rank's share of a --gpus step (of 2 GPUs when --gpus
              is 1): the multi-GPU step less its communication; tunedeck_half_pygc the same with Python's
              own garbage-collection schedule (TUNEDECK_PYTHON_GC=1); zero2_one the same under DeepSpeed
              ZeRO-2 on one GPU
  tunedeck_eager, tunedeck_sdpa (ask with --only): tunedeck without torch.compile (and so with Liger's
              kernels), with SDPA instead of FlexAttention -- one lever each
  plain_fused, plain_flex (ask with --only): tunedeck_plain with the fused LoRA layers, with FlexAttention
  unsloth, unsloth_dropout0 (ask with --only): Unsloth (bench/unsloth_loop.py) on the same model, LoRA,
              rows and optimizer, at the recipe's dropout and at 0 (its fast path), beside tunedeck and
              tunedeck_dropout0 of the same call (goals: >= 1.3x and >= 1.0x; --merge keeps the other runs)
  tunedeck_plain, reference_bf16, reference_reseeded (ask with --only): tunedeck with peft's LoRA
              forward, no Liger, SDPA, no compile; the reference loop under bf16 autocast; the reference
              loop with other dropout masks -- to attribute curve differences

Prints a table and writes bench/results/train_throughput_[<n>gpu_]<gpu>.json (keys tokens_per_s and
peak_mem_gib for tunedeck's default run at the top, the GPU's name, every run's curve).

    python bench/train_throughput.py --explore VARIANTS.json     # levers one by one, in one process
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine_gpu import (  # noqa: E402
    MODEL,
    MODEL_INTERNLM2,
    RECIPE,
    REPO,
    build_data,
    build_internlm2_model,
    build_model,
    run_baseline,
    run_tunedeck,
)

DATA = Path("/tmp/ft/data/personal_assistant.json")
BASE_SETS = [f"model.path={MODEL}", "model.trust_remote_code=false", f"data.data_path={DATA}",
             "save_steps=100000", "evaluation_inputs=[]"]


MULTI_GPU = ("zero2", "ddp", "zero2_overlap")     # runs of --gpus GPUs: left out when it is 1


def _recipe(extra: list[str]):
    from engine.recipe.schema import load_recipe

    return load_recipe(str(RECIPE), BASE_SETS + list(extra))[1]


# ---------------------------------------------------------------- the hand-written reference loop
def reference_loop(r, steps: int, rows_per_forward: int, autocast: bool = False, device: str = "cuda",
                   dropout_seed: int | None = None) -> dict:
    """The baseline script's model and LoRA set-up, trained the way its author would write a loop for
    the recipe ``r``: same rows and order as tunedeck, AdamW, warm-up + cosine, clipping, and the loss
    as the token mean over the window (passed position_ids keep packed samples apart). As the
    baseline script, it runs without autocast (LoRA, attention and the output head in fp32 where
    prepare_model_for_kbit_training left fp32 weights); autocast=True runs the same loop under bf16
    autocast, as tunedeck does, to show what bf16 alone does to the curve. dropout_seed reseeds the
    random stream after the LoRA init: the same run with other dropout masks, to show what they alone
    do. On the CPU (tests) the 4-bit compute dtype is fp32."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from engine.data.packing import collate
    from engine.data.templates import IGNORE_INDEX

    cuda = device == "cuda"
    torch.manual_seed(r.train.seed)
    tok, rows = recipe_rows(r)
    compute = torch.bfloat16 if cuda or autocast else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        r.model.path, dtype=compute, attn_implementation="sdpa", device_map={"": 0 if cuda else "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute,
                                               bnb_4bit_use_double_quant=r.model.double_quant,
                                               bnb_4bit_quant_type=r.model.quant_type))
    # the usual line of QLoRA scripts; it also matters here: with a KV cache object, transformers does not
    # turn restarting position_ids into a per-sample mask, and packed samples would attend to each other
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=r.model.gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(r.train.seed)
    model = get_peft_model(model, LoraConfig(r=r.lora.r, lora_alpha=r.lora.alpha, lora_dropout=r.lora.dropout,
                                             bias="none", task_type="CAUSAL_LM", target_modules="all-linear"))
    model.train()
    if dropout_seed is not None:
        torch.manual_seed(dropout_seed)

    def window_loss(window: list, n: int) -> float:
        total = 0.0
        for s in range(0, len(window), rows_per_forward):
            b = {k: torch.tensor(v, device=device)
                 for k, v in collate(window[s:s + rows_per_forward], tok.pad_token_id).items()}
            with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     b["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
                                                     reduction="sum")
            (loss / n).backward()
            total += float(loss)
            del logits, loss
        return total

    res = train_windows(r, steps, rows, model, window_loss, "reference", cuda)
    return {
        "what": f"hand-written transformers + peft loop (baseline script's set-up, "
                f"{'bf16 autocast' if autocast else 'no autocast'}), {rows_per_forward} rows per forward"
                + (f", dropout reseeded with {dropout_seed}" if dropout_seed is not None else ""),
        **{k: res[k] for k in ("tokens_per_s", "peak_mem_gib", "loss_curve", "grad_norm_curve")}}


def recipe_rows(r) -> tuple:
    """The tokenizer and tunedeck's packed rows of the recipe's data: the same tokens as every run."""
    from engine.data.formats import load_conversations
    from engine.data.packing import build_rows, tokenize_conversations
    from engine.data.templates import resolve_template_name
    from engine.model.loading import load_tokenizer

    tok = load_tokenizer(r.model.path)
    template = resolve_template_name(r.data.prompt_template, tok)
    convs = load_conversations(r.data.data_path, r.data.format)
    samples = tokenize_conversations(convs, tok, template, r.data.max_length, 0)
    return tok, build_rows(samples, r.data.max_length, r.data.pack_to_max_length, r.train.seed)


def train_windows(r, steps: int, rows: list, model, window_loss, label: str, cuda: bool) -> dict:
    """The loop the hand-written runs share, as the recipe says: tunedeck's order (a seeded permutation
    per epoch, cut into windows; the last one may be short), AdamW, warm-up + cosine, clipping.
    ``window_loss(window, n)`` runs one window's forwards and backwards (each forward's loss weighted
    to the window's token mean over its ``n`` trained tokens) and returns the summed token loss."""
    import torch

    from engine.data.templates import IGNORE_INDEX
    from engine.train.schedule import warmup_cosine

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=r.train.lr, betas=tuple(r.train.betas), weight_decay=r.train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps, r.train.warmup_ratio))
    acc = r.train.accumulative_counts * r.train.batch_size
    windows: list[list[int]] = []
    epoch = 0
    while len(windows) < steps:
        g = torch.Generator().manual_seed(r.train.seed * 1_000_003 + epoch)
        order = torch.randperm(len(rows), generator=g).tolist() if r.data.shuffle else list(range(len(rows)))
        windows += [order[s:s + acc] for s in range(0, len(order), acc)]
        epoch += 1
    curve, times, norms = [], [], []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for step in range(steps):
        window = [rows[i] for i in windows[step]]
        sync()
        t0 = time.perf_counter()
        n = sum(sum(1 for y in row.labels[1:] if y != IGNORE_INDEX) for row in window)
        total = window_loss(window, n)
        norms.append(round(float(torch.nn.utils.clip_grad_norm_(
            params, r.train.max_norm if r.train.max_norm > 0 else float("inf"))), 6))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        curve.append(round(total / n, 6))
        print(f"{label} step {step + 1}: loss {curve[-1]:.4f} {times[-1]:.2f}s", flush=True)
    tokens = [len(w) * r.data.max_length for w in windows[:steps]]
    steady = list(range(3, steps)) or list(range(steps))
    timed = sorted(times[3:] or times)
    return {"tokens_per_s": round(sum(tokens[i] for i in steady) / sum(times[i] for i in steady)),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "first_step_s": round(times[0], 2), "median_step_s": round(timed[len(timed) // 2], 4),
            "loss_curve": curve, "grad_norm_curve": norms}


# ---------------------------------------------------------------- levers, one by one, in one process
def explore(variants: list[dict], out_dir: Path, save=lambda results: None) -> list[dict]:
    """One Trainer; each variant switches a lever in place and times a few steps (peak memory reset
    per variant). Keys: name, steps, and any of rows (rows per forward), chunk (loss chunk tokens),
    acc (micro-batches per window: a shorter one, e.g. one rank's share of a 2-GPU step),
    fused (bool), keep (eager layers only: decoder layers not checkpointed, from the top), profile (bool),
    mode (torch.compile every decoder layer anew with this mode, "" for the default, "reduce-overhead"
    for CUDA graphs; inside: true puts each layer's checkpoint inside its compiled graph, rng: true with it
    recomputes dropout from its Philox state; stays on),
    cpp_wrapper (bool, with mode: inductor's C++ wrapper launches the kernels instead of Python),
    skip_guards (bool: dynamo's skip_guard_eval_unsafe for this variant), gc ("python": Python's own
    collector schedule; else the trainer's StepCollector, collections between steps)."""
    import gc
    import statistics

    import torch
    from torch._dynamo.utils import counters

    from engine.model.loading import compile_decoder_layers, uncompile
    from engine.train.collector import StepCollector
    from engine.train.runs import RunDirectory
    from engine.train.trainer import Trainer

    # layers are compiled by the variants (mode); Liger's kernels do not go with compiled layers
    t = Trainer(_recipe(["max_steps=1000", "model.compile=off", "model.liger_kernels=off"]),
                RunDirectory(Path("/tmp/ft/explore")))
    t.setup()
    layers = t.model.get_base_model().model.layers
    fused = {m: m.__dict__["forward"] for m in t.model.modules() if "forward" in vars(m)}
    results = []
    window = 0
    mode = None
    for v in variants:
        mode = v.get("mode", mode)
        if "mode" in v:           # (re)compile every decoder layer with this torch.compile mode (stays on)
            uncompile(t.compiled_layers)
            torch._dynamo.reset()
            import torch._inductor.config

            torch._inductor.config.cpp_wrapper = bool(v.get("cpp_wrapper"))   # kernels launched from C++
            if v.get("inside"):
                _checkpoint_inside(layers, rng=v.get("rng", False))
            t.compiled_layers = compile_decoder_layers(t.model, mode=v["mode"] or None)
        torch.compiler.set_stance("default", skip_guard_eval_unsafe=bool(v.get("skip_guards")))
        for m, f in fused.items():
            if v.get("fused", True):
                m.forward = f
            elif "forward" in vars(m):
                del m.forward
        for i, layer in enumerate(layers):      # eager layers: transformers' checkpoint around each
            if not t.compiled_layers:
                layer.gradient_checkpointing = i < len(layers) - v.get("keep", 0)
        t._auto_rows = v.get("rows", 0)
        t.loss_head.chunk_tokens = v.get("chunk", 1024)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        times = []
        gc_s = [0.0, 0.0]       # time in Python's collector (start mark, total), from gc.callbacks

        def gc_note(phase: str, info: dict, gc_s=gc_s) -> None:
            if phase == "start":
                gc_s[0] = time.perf_counter()
            else:
                gc_s[1] += time.perf_counter() - gc_s[0]

        gc.callbacks.append(gc_note)
        try:
            tokens = 0
            with StepCollector(active=v.get("gc") != "python") as collector:
                for s in range(v.get("steps", 5) + 2 + bool(v.get("profile"))):
                    batches = t._window(0, window % t.steps_per_epoch)[:v.get("acc")]   # acc: a shorter window
                    window += 1
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    if mode == "reduce-overhead":
                        torch.compiler.cudagraph_mark_step_begin()
                    if v.get("profile") and s == 2:            # the profiled step is not timed
                        t._profiled_step(batches)
                        for prof in (t.run.path / "profile").glob("*.txt"):
                            prof.replace(out_dir / f"profile_{v['name']}.txt")
                        continue
                    t._train_step(batches)
                    collector.step()
                    torch.cuda.synchronize()
                    if s == 1:
                        gc_s[1] = 0.0
                    if s >= 2:
                        times.append(time.perf_counter() - t0)
                        tokens += sum(int(b["input_ids"].numel()) for b in batches)
            res = {**v, "tokens_per_s": round(tokens / sum(times)),
                   "step_s": round(sum(times) / len(times), 3),
                   "median_step_s": round(statistics.median(times), 3), "max_step_s": round(max(times), 3),
                   "gc_s_per_step": round(gc_s[1] / len(times), 4), "step_times_s": [round(x, 3) for x in times],
                   "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        except Exception as e:        # out of memory, a CUDA-graph or compile failure: noted, the next variant runs
            t.optimizer.zero_grad(set_to_none=True)
            res = {**v, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        finally:
            gc.callbacks.remove(gc_note)
        # CUDA graphs skipped (and why) or taken: the reason a reduce-overhead variant is no faster
        res["inductor_counters"] = {k: n for k, n in counters["inductor"].items() if "cudagraph" in k}
        counters["inductor"].clear()
        print("explore", json.dumps(res), flush=True)
        results.append(res)
        save(results)                 # after every variant: a call cut short keeps what ran
    return results


def _checkpoint_inside(layers, rng: bool) -> None:
    """Each layer's checkpoint inside its forward, so inside the compiled graph (transformers 5.17 puts
    it around __call__, outside); rng: dropout recomputed from its Philox state (CUDA only), not kept."""
    import torch
    import torch._functorch.config
    from torch.utils.checkpoint import checkpoint

    torch._functorch.config.functionalize_rng_ops = rng
    for layer in layers:
        if "forward" in vars(layer):
            continue
        forward = layer.forward
        layer.gradient_checkpointing = False

        def run(*args, _forward=forward, _layer=layer, **kwargs):
            if _layer.training and torch.is_grad_enabled():
                return checkpoint(functools.partial(_forward, **kwargs), *args, use_reentrant=False)
            return _forward(*args, **kwargs)
        layer.forward = run


# ---------------------------------------------------------------- main
def same_length(a: dict, b: dict) -> bool:       # a different step count is a different lr schedule
    return bool(a.get("loss_curve")) and len(a["loss_curve"]) == len(b.get("loss_curve") or ())


def curve_match(a: list[float], b: list[float]) -> dict:
    n = min(len(a), len(b))
    diffs = [abs(x - y) for x, y in zip(a[:n], b[:n])]
    rel = [d / max(abs(y), 1e-9) for d, y in zip(diffs, b[:n])]
    return {"steps": n, "max_abs_diff": round(max(diffs), 5), "max_rel_diff": round(max(rel), 4),
            "mean_rel_diff": round(sum(rel) / n, 4),
            "worst_step": 1 + rel.index(max(rel))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", help="path to hf_peft_baseline.py")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--low-memory-steps", type=int, default=20)
    ap.add_argument("--reference-rows", type=int, default=16, help="rows per forward of the reference loop")
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--multi-steps", type=int, help="steps of the multi-GPU runs (default: --steps; their curves "
                                                    "are compared with one GPU's only at the same step count)")
    ap.add_argument("--only", default="baseline,tunedeck,reference,low_memory,zero2,ddp",
                    help="runs, in this order")
    ap.add_argument("--explore", help="JSON list of lever variants to time in one process")
    ap.add_argument("--profile-step", type=int, default=0,
                    help="profile this step of every tunedeck run (TUNEDECK_PROFILE_STEP; left out of the timing)")
    ap.add_argument("--tag", default="", help="suffix of the result file's name")
    ap.add_argument("--merge", action="store_true",
                    help="keep the runs of the current result file that this call does not run again (each run "
                         "says which call measured it; ratios are taken only within one call)")
    ap.add_argument("--reference-loop", help=argparse.SUPPRESS)   # internal: run the reference, write JSON here
    ap.add_argument("--autocast", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dropout-seed", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--set", action="append", default=[],
                    help="recipe override for every run, the reference loop's too (e.g. lora.dropout=0 to compare "
                         "curves without dropout's random masks)")
    args = ap.parse_args()
    args.multi_steps = args.multi_steps or args.steps
    if args.profile_step:
        os.environ["TUNEDECK_PROFILE_STEP"] = str(args.profile_step)
    BASE_SETS.extend(args.set)
    import torch

    build_model()
    if "tunedeck_internlm2" in args.only.split(","):
        build_internlm2_model()
    build_data(DATA)
    if args.reference_loop:
        res = reference_loop(_recipe([f"max_steps={args.steps}"]), args.steps, args.reference_rows, args.autocast,
                             dropout_seed=args.dropout_seed)
        Path(args.reference_loop).write_text(json.dumps(res))
        return
    gpu = torch.cuda.get_device_name(0)
    # one current file per benchmark and GPU in bench/results (history in git); a --tag run is an
    # experiment: it goes to $OUT only
    slug = (f"{args.gpus}gpu_" if args.gpus > 1 else "") + gpu.replace(" ", "_").replace("/", "_") \
        + (f"_{args.tag}" if args.tag else "")
    out_dirs = ([] if args.tag else [REPO / "bench/results"]) + ([Path(os.environ["OUT"])] if os.environ.get("OUT")
                                                                 else [])
    if args.explore:
        def save(res: list[dict]) -> None:
            for d in out_dirs:
                d.mkdir(parents=True, exist_ok=True)
                (d / f"train_levers_{slug}.json").write_text(json.dumps({"gpu": gpu, "variants": res}, indent=1) + "\n")

        explore(json.loads(Path(args.explore).read_text()), Path(os.environ.get("OUT", "/tmp/ft")), save)
        return
    import bitsandbytes
    import peft
    import transformers

    only = args.only.split(",")
    result: dict = {"gpu": gpu, "overrides": args.set, "torch": torch.__version__,
                    "transformers": transformers.__version__, "peft": peft.__version__,
                    "bitsandbytes": bitsandbytes.__version__,
                    "date": time.strftime("%Y-%m-%d"),
                    "recipe": "internlm2_chat_1_8b_qlora_self_e2: nf4 QLoRA r64/alpha16/dropout 0.1 on all linear "
                              "layers, 1024-token packed rows, batch 1 x accumulative_counts 16, grad ckpt, "
                              "random-init InternLM2-1.8B shape", "runs": {}}
    call = time.strftime("%Y-%m-%dT%H:%M:%S")
    result["call"] = call
    current = REPO / "bench/results" / f"train_throughput_{slug}.json"
    if args.merge and current.is_file():
        kept = json.loads(current.read_text()).get("runs", {})
        for r in kept.values():
            r.setdefault("call", "earlier")
        result["runs"] = {n: r for n, r in kept.items() if n not in only}
    runs: dict = result["runs"]
    acc2 = str(16 // max(1, args.gpus))
    share = str(16 // max(2, args.gpus))     # one rank's share of a multi-GPU step (of 2 GPUs when --gpus 1)
    plans = {  # name: (work dir, overrides, gpus, deepspeed[, environment])
        "tunedeck": ("tp_default", [f"max_steps={args.steps}"], 1, None),
        "tunedeck_internlm2": ("tp_internlm2", [f"max_steps={args.steps}", f"model.path={MODEL_INTERNLM2}"], 1, None),
        # levers one by one, each in its own process (without compile, Liger's kernels are on by default)
        "tunedeck_eager": ("tp_eager", [f"max_steps={args.steps}", "model.compile=off"], 1, None),
        "tunedeck_sdpa": ("tp_sdpa", [f"max_steps={args.steps}", "model.attn_implementation=sdpa"], 1, None),
        # the same loop with peft's LoRA forward, no Liger, SDPA, no compile: which lever moves the curve
        "tunedeck_plain": ("tp_plain", [f"max_steps={args.steps}", "model.fused_lora=off", "model.liger_kernels=off",
                                        "model.attn_implementation=sdpa", "model.compile=off"], 1, None),
        # one GPU on one rank's share of a 2-GPU step (half the window): the multi-GPU runs less their communication
        "tunedeck_half": ("tp_half", [f"max_steps={args.multi_steps}", f"accumulative_counts={share}"], 1, None),
        # the same with Python's own garbage-collection schedule (engine/collector.py off)
        "tunedeck_half_pygc": ("tp_half_pygc", [f"max_steps={args.multi_steps}", f"accumulative_counts={share}"],
                               1, None, {"TUNEDECK_PYTHON_GC": "1"}),
        # one rank's share under DeepSpeed ZeRO-2 on one GPU: DeepSpeed's own cost, without a peer
        "zero2_one": ("tp_zero2_one", [f"max_steps={args.multi_steps}", f"accumulative_counts={share}"], 1, "zero2"),
        # tunedeck_plain plus one lever: which of them moves the curve
        "plain_fused": ("tp_plain_fused", [f"max_steps={args.steps}", "model.fused_lora=on", "model.liger_kernels=off",
                                           "model.attn_implementation=sdpa", "model.compile=off"], 1, None),
        "plain_flex": ("tp_plain_flex", [f"max_steps={args.steps}", "model.fused_lora=off", "model.liger_kernels=off",
                                         "model.attn_implementation=flex_attention", "model.compile=off"], 1, None),
        "low_memory": ("tp_lowmem", [f"max_steps={args.low_memory_steps}", "train.low_memory=true"], 1, None),
        # the <= 12 GiB preset: every layer recomputes (model.checkpoint_layers: auto keeps activations where
        # the GPU has room)
        "tunedeck_recompute_all": ("tp_recompute_all", [f"max_steps={args.steps}", "model.checkpoint_layers=all"],
                                   1, None),
        # the recipe at dropout 0, beside unsloth_dropout0 (Unsloth's fast path)
        "tunedeck_dropout0": ("tp_dropout0", [f"max_steps={args.steps}", "lora.dropout=0"], 1, None),
        "zero2": ("tp_zero2", [f"max_steps={args.multi_steps}", f"accumulative_counts={acc2}"], args.gpus, "zero2"),
        "ddp": ("tp_ddp", [f"max_steps={args.multi_steps}", f"accumulative_counts={acc2}"], args.gpus, None),
        # (ask with --only) ZeRO-2 with overlap_comm / contiguous_gradients on, as before their "auto"
        "zero2_overlap": ("tp_zero2_overlap", [f"max_steps={args.multi_steps}", f"accumulative_counts={acc2}"],
                        args.gpus, "zero2"),
    }
    for name in only:
        if name == "baseline" and args.baseline:
            runs[name] = run_baseline(args.baseline)
        elif name in ("reference", "reference_bf16", "reference_reseeded"):
            ref_out = Path(f"/tmp/ft/{name}.json")
            proc = subprocess.run([sys.executable, __file__, "--reference-loop", str(ref_out), "--steps",
                                   str(args.steps), "--reference-rows", str(args.reference_rows)]
                                  + (["--autocast"] if name == "reference_bf16" else [])
                                  + (["--dropout-seed", "12345"] if name == "reference_reseeded" else [])
                                  + [x for kv in args.set for x in ("--set", kv)],
                                  cwd=REPO, capture_output=True, text=True, timeout=900)
            runs[name] = (json.loads(ref_out.read_text()) if proc.returncode == 0
                          else {"error": (proc.stdout + proc.stderr)[-3000:]})
        elif name in ("unsloth", "unsloth_dropout0"):
            out = Path(f"/tmp/ft/{name}.json")
            extra = (["--dropout", "0"] if name.endswith("dropout0") else []) + [
                x for kv in args.set for x in ("--set", kv)]
            proc = subprocess.run([sys.executable, str(Path(__file__).with_name("unsloth_loop.py")), str(out),
                                   "--steps", str(args.steps)] + extra,
                                  cwd=REPO, capture_output=True, text=True, timeout=900)
            runs[name] = (json.loads(out.read_text()) if proc.returncode == 0
                          else {"error": (proc.stdout + proc.stderr)[-3000:]})
        elif name in plans and (args.gpus > 1 or name not in MULTI_GPU):
            work, sets, gpus, ds, *env = plans[name]
            ds_json, shipped = REPO / "configs/deepspeed/zero2.json", None
            if name == "zero2_overlap":     # zero2.json changed for this run only, then put back
                shipped = ds_json.read_text()
                cfg = json.loads(shipped)
                cfg["zero_optimization"].update(overlap_comm=True, contiguous_gradients=True)
                ds_json.write_text(json.dumps(cfg, indent=2) + "\n")
            try:
                runs[name] = run_tunedeck(Path("/tmp/ft") / work, BASE_SETS + sets, gpus=gpus, deepspeed=ds,
                                          env=env[0] if env else None)
            finally:
                if shipped is not None:
                    ds_json.write_text(shipped)
            for prof in sorted((Path("/tmp/ft") / work / "profile").glob("*.txt")):
                for d in out_dirs[1:]:                 # the full tables go to $OUT only
                    (d / f"profile_{name}_{prof.name}").write_text(prof.read_text())
        else:
            continue
        runs[name]["call"] = call
        runs[name].setdefault("transformers", transformers.__version__)
        print(name, json.dumps(runs[name]), flush=True)
        _finish(result, out_dirs, slug)


def _finish(result: dict, out_dirs: list[Path], slug: str) -> None:
    """Ratios, curve comparisons, the table; written after every run so a cut-off call keeps what ran."""
    runs = result["runs"]
    base, td = runs.get("baseline", {}), runs.get("tunedeck", {})
    if td.get("tokens_per_s"):
        result["tokens_per_s"], result["peak_mem_gib"] = td["tokens_per_s"], td["peak_mem_gib"]
    for name, r in runs.items():
        r.pop("ratio_tokens_per_s", None)
        if name != "baseline" and r.get("tokens_per_s") and base.get("tokens_per_s") \
                and r.get("call") == base.get("call"):                 # ratios within one call only
            r["ratio_tokens_per_s"] = round(r["tokens_per_s"] / base["tokens_per_s"], 2)
    # Unsloth beside tunedeck, each pair from one call; the goals said as met or MISSED
    goals = {}
    for ours, theirs, goal in (("tunedeck", "unsloth", 1.3), ("tunedeck_dropout0", "unsloth_dropout0", 1.0)):
        a, b = runs.get(ours, {}), runs.get(theirs, {})
        if a.get("tokens_per_s") and b.get("tokens_per_s") and a.get("call") == b.get("call"):
            ratio = round(a["tokens_per_s"] / b["tokens_per_s"], 3)
            result[f"{ours}_vs_{theirs}_tokens_per_s"] = ratio
            goals[f"{ours} >= {goal}x {theirs}"] = "met" if ratio >= goal else f"MISSED ({ratio}x)"
            if same_length(a, b):
                match = curve_match(a["loss_curve"], b["loss_curve"])
                result[f"curve_{ours}_vs_{theirs}"] = match
        elif b.get("error"):
            goals[f"{ours} >= {goal}x {theirs}"] = f"not measured: {theirs} failed"
    if goals:
        result["unsloth_goals"] = goals
    for key in [k for k in result if k.startswith(("internlm2_vs_llama", "curve_vs_reference", "curve_tunedeck_vs"))
                or k.endswith(("_scaling_vs_one_gpu", "_curve_vs_one_gpu"))]:
        del result[key]              # taken again below, from runs of one call
    il2 = runs.get("tunedeck_internlm2", {})
    if il2.get("tokens_per_s") and td.get("tokens_per_s") and il2.get("call") == td.get("call"):
        # both steps hold the same tokens (16 packed 1024-token rows); the median step is the layout's cost,
        # the mean also carries one-off stalls (a recompile at an epoch's short last window, whose step
        # depends on how each tokenizer split the data)
        result["internlm2_vs_llama_tokens_per_s"] = round(il2["tokens_per_s"] / td["tokens_per_s"], 3)
        result["internlm2_vs_llama_median_step"] = round(td["median_step_s"] / il2["median_step_s"], 3)
        result["internlm2_vs_llama_within_3_percent"] = abs(result["internlm2_vs_llama_median_step"] - 1) <= 0.03
    for name in MULTI_GPU:
        multi = runs.get(name, {})
        if multi.get("tokens_per_s") and td.get("tokens_per_s") and multi.get("call") == td.get("call"):
            result[f"{name}_scaling_vs_one_gpu"] = round(runs[name]["tokens_per_s"] / td["tokens_per_s"], 2)
            if same_length(runs[name], td):
                result[f"{name}_curve_vs_one_gpu"] = curve_match(runs[name]["loss_curve"], td["loss_curve"])
    ref = runs.get("reference", {})
    if ref.get("loss_curve"):
        result["curve_vs_reference"] = {n: curve_match(r["loss_curve"], ref["loss_curve"]) for n, r in runs.items()
                                        if same_length(r, ref) and n != "reference" and n != "baseline"
                                        and r.get("call") == ref.get("call")}
    ref16 = runs.get("reference_bf16", {})
    if same_length(td, ref16) and td.get("call") == ref16.get("call"):
        result["curve_tunedeck_vs_reference_bf16"] = curve_match(td["loss_curve"], ref16["loss_curve"])
    lines = [f"{'run':<12}{'tokens/s':>10}{'peak GiB':>10}{'x baseline':>12}   ({result['gpu']})"]
    for name, r in runs.items():
        lines.append(f"{name:<12}{r.get('tokens_per_s', '-'):>10}{r.get('peak_mem_gib', '-'):>10}"
                     f"{r.get('ratio_tokens_per_s', '-'):>12}")
    result["table"] = lines
    print("\n".join(lines), flush=True)
    for goal, state in result.get("unsloth_goals", {}).items():
        print(f"{'met   ' if state == 'met' else 'MISSED'}  {goal}" + ("" if state == "met" else f": {state}"),
              flush=True)
    text = json.dumps(result, ensure_ascii=False, indent=1)
    for d in out_dirs:
        d.mkdir(parents=True, exist_ok=True)
        (d / f"train_throughput_{slug}.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
