"""``tunedeck export-llava LLM VIT CHECKPOINT OUT``: a LLaVA checkpoint as transformers'
LlavaForConditionalGeneration (LoRA merged into the LLM and the vision tower, projector copied,
an ``<image>`` token added, LlavaProcessor saved), for a transformers-native LLM."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from engine.core.errors import UserError
from engine.llava.model import CONFIG_FILE, LLM_ADAPTER, VIT_ADAPTER, llava_checkpoint_dir

IMAGE_TAG = "<image>"


def export_llava(llm_path: str, visual_encoder: str, checkpoint: str | Path, out: str | Path,
                 *, overwrite: bool = False) -> Path:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import (
        AutoModelForCausalLM,
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from engine.llava.model import load_vision
    from engine.model.loading import check_model_dir, load_tokenizer

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: exists and is not empty; choose another OUT or pass --force")
    ckpt = llava_checkpoint_dir(checkpoint)
    info = json.loads((ckpt / CONFIG_FILE).read_text())
    check_model_dir(llm_path)
    from transformers import AutoConfig

    from engine.model.loading import resolve_model

    native, _ = resolve_model(llm_path)          # an InternLM2 LLM: its Llama-layout conversion
    llm_cfg = AutoConfig.from_pretrained(native, trust_remote_code=native == llm_path)
    if llm_cfg.model_type not in CONFIG_MAPPING or getattr(llm_cfg, "auto_map", None):
        raise UserError(f"{llm_path}: a {llm_cfg.model_type} model with its own code; LlavaForConditionalGeneration "
                        "needs a transformers-native LLM (Llama, Qwen2, ...): use `tunedeck chat --llava` instead")
    llm = AutoModelForCausalLM.from_pretrained(native, torch_dtype=torch.float32)
    if (ckpt / LLM_ADAPTER).is_dir():
        llm = PeftModel.from_pretrained(llm, str(ckpt / LLM_ADAPTER)).merge_and_unload()
    vision = load_vision(visual_encoder, torch.float32, "cpu")
    if (ckpt / VIT_ADAPTER).is_dir():
        vision = PeftModel.from_pretrained(vision, str(ckpt / VIT_ADAPTER)).merge_and_unload()
    if vision.config.hidden_size != info["vision_hidden"]:
        raise UserError(f"{visual_encoder}: hidden size {vision.config.hidden_size}, the checkpoint's projector "
                        f"takes {info['vision_hidden']}")

    tok = load_tokenizer(llm_path)
    if IMAGE_TAG not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TAG]})
    image_id = tok.convert_tokens_to_ids(IMAGE_TAG)
    text_cfg = llm.config
    if image_id >= text_cfg.vocab_size:
        llm.resize_token_embeddings(image_id + 1)
    config = LlavaConfig(vision_config=vision.config, text_config=llm.config, image_token_index=image_id,
                         projector_hidden_act="gelu", vision_feature_select_strategy="default",
                         vision_feature_layer=info["select_layer"], image_seq_length=info["n_image_tokens"])
    model = LlavaForConditionalGeneration(config)
    inner = model.model
    inner.vision_tower.load_state_dict(vision.state_dict())
    inner.language_model.load_state_dict(llm.get_decoder().state_dict())
    model.lm_head.load_state_dict(llm.get_output_embeddings().state_dict())
    proj = load_file(str(ckpt / "projector.safetensors"))
    inner.multi_modal_projector.load_state_dict({
        "linear_1.weight": proj["0.weight"], "linear_1.bias": proj["0.bias"],
        "linear_2.weight": proj["2.weight"], "linear_2.bias": proj["2.bias"]})
    model.generation_config.pad_token_id = tok.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    vdir = Path(visual_encoder)
    image_processor = (CLIPImageProcessor.from_pretrained(str(vdir)) if (vdir / "preprocessor_config.json").is_file()
                       else CLIPImageProcessor(size={"shortest_edge": info["image_size"]},
                                               crop_size={"height": info["image_size"], "width": info["image_size"]}))
    LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=vision.config.patch_size,
                   vision_feature_select_strategy="default", image_token=IMAGE_TAG,
                   num_additional_image_tokens=1).save_pretrained(str(out))
    (out / "tunedeck_export.json").write_text(json.dumps(
        {"from": str(ckpt), "llm": llm_path, "visual_encoder": visual_encoder,
         "prompt_template": info.get("prompt_template"),
         "note": "images were padded to square in training; pad non-square images the same way before the "
                 "processor" if info.get("pad_image_to_square") else ""}, indent=1))
    return out
