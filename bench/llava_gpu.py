"""GPU run of the LLaVA finetune stage on the real shapes: CLIP ViT-L/14-336 + an
InternLM2-1.8B-shaped LLM (random init; weights' values don't change a step's cost), the tutorial's
finetune settings (batch 1, 4-bit LLM QLoRA r 512 / alpha 256, ViT LoRA r 64 / alpha 16, projector
trained, gradient checkpointing), beside a plain transformers + peft LLaVA loop
(LlavaForConditionalGeneration, 4-bit language model, the same LoRA ranks, the same token sequences
and images), in the same process, same GPU.

    python bench/llava_gpu.py [--steps 40] [--records 64]

Writes bench/results/llava_finetune_<gpu>.json (and a copy under $OUT when set).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from engine_gpu import MODEL as LLM  # noqa: E402  (the same InternLM2-1.8B-shaped stand-in)
from engine_gpu import build_model as build_llm  # noqa: E402

VIT = Path("/tmp/clip_vit_large_p14_336")
WORK = Path("/tmp/llava_bench")
WORDS = ("the a picture shows person doctor screen table window light blue green large small near far "
         "left right with of in on computer equipment room wall desk chair people two one").split()


def build_models() -> None:
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    build_llm(extra_texts=[" ".join(WORDS)])
    if not (VIT / "config.json").exists():
        vcfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
        CLIPVisionModel(vcfg).to(torch.bfloat16).save_pretrained(VIT)
        CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).save_pretrained(VIT)
    torch.cuda.empty_cache()


def build_data(n: int) -> Path:
    import numpy as np
    from PIL import Image

    rng = random.Random(0)
    images = WORK / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        name = f"img_{i:03d}.png"
        if not (images / name).exists():
            arr = np.random.default_rng(i).integers(0, 255, (336, 336, 3), dtype=np.uint8)
            Image.fromarray(arr).save(images / name)
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20)))
        a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 120)))
        records.append({"id": i, "image": f"images/{name}", "conversations": [
            {"from": "human", "value": f"<image>\n{q}?"}, {"from": "gpt", "value": a + "."}]})
    path = WORK / "data.json"
    path.write_text(json.dumps(records))
    return path


def run_tunedeck(data: Path, steps: int) -> dict:
    from engine.train.launch import prepare_run, train_here
    from engine.train.runs import RunDirectory
    from engine.workflow.train import trainer_for

    recipe = REPO / "configs/llava/llava_internlm2_chat_1_8b_qlora_clip_vit_large_p14_336_lora_e1_finetune.yaml"
    overrides = [f"model.path={LLM}", "trust_remote_code=false", "dtype=bfloat16", f"data_path={data}",
                 f"visual_encoder={VIT}", "pretrained_pth=", f"image_folder={data.parent}",
                 "evaluation_images=[]", "evaluation_inputs=[]", f"max_steps={steps}", f"save_steps={steps + 1}"]
    run_dir, _, _ = prepare_run(str(recipe), overrides, work_dir=str(WORK / f"run_{int(time.time())}"),
                                resume=None, deepspeed=None)
    t0 = time.time()
    assert train_here(run_dir, trainer_for=trainer_for) == 0, (run_dir / "train.log").read_text()[-3000:]
    wall = time.time() - t0
    metrics = RunDirectory(run_dir).metrics()
    timed = metrics[5:]                                    # the first steps warm up kernels and caches
    step_s = statistics.median(m["step_time_s"] for m in timed)
    tokens = statistics.median(m["tokens_per_s"] * m["step_time_s"] for m in timed)
    return {"steps": len(metrics), "trainable_params": RunDirectory(run_dir).status().get("trainable_params"),
            "samples_per_s": round(1 / step_s, 3), "tokens_per_s": round(tokens / step_s, 1),
            "peak_mem_gib": max(m["gpu_mem_gib"] for m in metrics), "median_step_s": round(step_s, 4),
            "wall_s_incl_loading": round(wall, 1), "loss_first": metrics[0]["loss"], "loss_last": metrics[-1]["loss"]}


def run_baseline(data: Path, steps: int) -> dict:
    """What a user writes by hand: LlavaForConditionalGeneration, bitsandbytes 4-bit for the language
    model, PEFT LoRA (r 512 on the LLM, r 64 on the vision tower via rank_pattern), projector trained."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoConfig,
        BitsAndBytesConfig,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    from engine.llava.model import IMAGE_TOKEN, encode_llava, load_llava_records
    from engine.model.loading import load_tokenizer

    hf_dir = WORK / "hf_llava"
    image_id = 92543
    if not (hf_dir / "config.json").exists():
        from transformers import AutoModelForCausalLM, CLIPVisionModel

        cfg = LlavaConfig(vision_config=CLIPVisionConfig.from_pretrained(VIT),
                          text_config=AutoConfig.from_pretrained(LLM),
                          image_token_index=image_id, projector_hidden_act="gelu", vision_feature_layer=-2,
                          vision_feature_select_strategy="default", image_seq_length=576)
        with torch.device("cuda"):
            m = LlavaForConditionalGeneration(cfg).to(torch.bfloat16)
        m.model.vision_tower.load_state_dict(CLIPVisionModel.from_pretrained(VIT).state_dict())
        lm = AutoModelForCausalLM.from_pretrained(LLM, torch_dtype=torch.bfloat16)
        m.model.language_model.load_state_dict(lm.get_decoder().state_dict())
        m.lm_head.load_state_dict(lm.lm_head.state_dict())
        m.save_pretrained(hf_dir)
        del m, lm
        torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True,
                             bnb_4bit_quant_type="nf4", llm_int8_skip_modules=["vision_tower", "multi_modal_projector",
                                                                                "lm_head"])
    model = LlavaForConditionalGeneration.from_pretrained(hf_dir, torch_dtype=torch.bfloat16, quantization_config=bnb,
                                                          device_map={"": 0})
    # some transformers versions quantize the projector despite llm_int8_skip_modules: put a bf16 one back
    import bitsandbytes as bnb_lib

    proj = model.model.multi_modal_projector
    for name in ("linear_1", "linear_2"):
        layer = getattr(proj, name)
        if isinstance(layer, bnb_lib.nn.Linear4bit):
            setattr(proj, name, torch.nn.Linear(layer.in_features, layer.out_features, device="cuda",
                                                dtype=torch.bfloat16))
    quantized = sorted({n.split(".")[1] for n, m in model.named_modules() if isinstance(m, bnb_lib.nn.Linear4bit)})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = r"model\.(language_model|vision_tower\.vision_model\.encoder).*\.(q_proj|k_proj|v_proj|o_proj|" \
              r"out_proj|gate_proj|up_proj|down_proj|fc1|fc2)"
    lora = LoraConfig(r=512, lora_alpha=256, lora_dropout=0.05, bias="none", target_modules=targets,
                      rank_pattern={"vision_tower": 64}, alpha_pattern={"vision_tower": 16})
    model = get_peft_model(model, lora)
    for p in proj.parameters():                       # the projector trains in full, as in tunedeck
        p.data = p.data.float()
        p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    model.train()
    tok = load_tokenizer(str(LLM))
    proc = CLIPImageProcessor.from_pretrained(VIT)
    from PIL import Image

    samples = []
    for messages, image in load_llava_records(str(data), str(data.parent)):
        ids, labels = encode_llava(tok, "internlm2_chat", messages, 576)
        ids = [image_id if t == IMAGE_TOKEN else t for t in ids]
        samples.append((ids, labels, image))
    times, tokens = [], []
    for i in range(steps):
        ids, labels, image = samples[i % len(samples)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        pixels = proc(images=Image.open(image).convert("RGB"), return_tensors="pt")["pixel_values"]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=torch.tensor([ids], device="cuda"), labels=torch.tensor([labels], device="cuda"),
                        pixel_values=pixels.to("cuda", torch.bfloat16))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        tokens.append(len(ids))
    step_s = statistics.median(times[5:])
    return {"steps": steps, "quantized_4bit": quantized, "trainable_params": sum(p.numel() for p in params),
            "samples_per_s": round(1 / step_s, 3),
            "tokens_per_s": round(statistics.median(tokens[5:]) / step_s, 1),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3), "median_step_s": round(step_s, 4)}


def main() -> None:
    import torch
    import transformers

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--records", type=int, default=64)
    args = ap.parse_args()
    build_models()
    data = build_data(args.records)
    ours = run_tunedeck(data, args.steps)
    torch.cuda.empty_cache()
    base = run_baseline(data, args.steps)
    gpu = torch.cuda.get_device_name(0)
    res = {"gpu": gpu, "torch": torch.__version__, "transformers": transformers.__version__,
           "setup": "LLaVA finetune, CLIP ViT-L/14-336 + InternLM2-1.8B shape (random init), batch 1, 4-bit LLM "
                    "QLoRA r512/a256, ViT LoRA r64/a16, projector trained, gradient checkpointing, 576 image positions",
           "tunedeck": ours, "baseline_transformers_peft": base,
           "ratio_samples_per_s": round(ours["samples_per_s"] / base["samples_per_s"], 3),
           "ratio_peak_mem": round(ours["peak_mem_gib"] / base["peak_mem_gib"], 3), "date": time.strftime("%Y-%m-%d")}
    text = json.dumps(res, indent=1)
    print(text)
    name = f"llava_finetune_{gpu.replace(' ', '_')}.json"
    for d in [REPO / "bench" / "results"] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else []):
        d.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text + "\n")


if __name__ == "__main__":
    main()
