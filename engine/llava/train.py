"""Training a LLaVA recipe: the Trainer's loop, checkpoints, resume, stop and metrics, with LLaVA's
data (images, grouped sampling), model (vision tower + projector + LLM) and evaluation."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from engine.core.errors import UserError
from engine.llava.model import (
    CONFIG_FILE,
    LLM_ADAPTER,
    PROJECTOR_FILE,
    VIT_ADAPTER,
    ImageProcessor,
    LlavaSample,
    answer,
    attach_vision_lora,
    build_llava,
    collate_llava,
    grouped_order,
    load_llava_records,
    load_projector,
    load_vision,
    text_part,
    tokenize_llava,
    vision_shape,
)
from engine.model.loading import attach_lora, load_model
from engine.train.trainer import Trainer

log = logging.getLogger("tunedeck")


class LlavaTrainer(Trainer):
    find_unused_parameters = True        # a text-only batch gives the projector and vision LoRA no gradient
    chunked_loss_ok = False              # the forward goes through the image embedding

    def _rows_per_forward(self, window_rows: int) -> int:
        return self.recipe.train.batch_size      # batches carry their images: run them as they are

    def _setup_data(self) -> None:
        r, lv = self.recipe, self.recipe.llava
        if not lv.visual_encoder:
            raise UserError("llava.visual_encoder: empty; give the CLIP vision model directory")
        image_size, self.n_image_tokens = vision_shape(lv.visual_encoder)
        self.images = ImageProcessor(lv.visual_encoder, image_size, lv.pad_image_to_square)
        for img in lv.evaluation_images:            # fail now, not at the first evaluation
            self.images.open(img)
        records = load_llava_records(r.data.data_path, lv.image_folder)
        samples, tok = tokenize_llava(records, self.tokenizer, self.template, self.n_image_tokens,
                                      r.data.max_length, r.data.system)
        if not samples:
            raise UserError(f"data.data_path: {r.data.data_path}: no sample has an assistant token left")
        self.rows = samples                  # one sample a row: images are not packed
        self._plan()
        n_img = sum(s.image is not None for s in samples)
        self.data_info = {
            "records": len(records), "samples": len(samples), "truncated": tok.n_truncated,
            "dropped": tok.n_dropped, "rows": len(samples), "tokens": self.n_train_tokens, "images": n_img,
            "text_only": len(samples) - n_img, "length": tok.stats(),
            "template": self.template, "first_sample": self._describe(samples[0]),
        }

    def _describe(self, s: LlavaSample) -> str:
        from engine.data.preview import render_masked

        text = render_masked(self.tokenizer, *text_part(s))
        return f"[image {s.image.name} → {self.n_image_tokens} positions] {text}" if s.image else text

    def _setup_model(self) -> None:
        r, lv = self.recipe, self.recipe.llava
        quantized = r.model.quantization != "none"
        finetune = lv.stage == "finetune"
        if finetune and not r.lora.enabled and quantized:
            raise UserError(f"model.quantization: {r.model.quantization!r} needs lora.enabled: true in the "
                            "finetune stage; set quantization: none")
        precision = self.precision
        self.device = torch.device(f"cuda:{self.local_rank}" if precision.device == "cuda" else "cpu")
        device_map = ({"": self.local_rank} if precision.device == "cuda" else {"": "cpu"})
        llm = load_model(r.model.path, quantization=r.model.quantization, quant_type=r.model.quant_type,
                         double_quant=r.model.double_quant, precision=precision,
                         trust_remote_code=r.model.trust_remote_code,
                         attn_implementation=r.model.attn_implementation, device_map=device_map,
                         progress=self._weights_loaded)
        llm.config.use_cache = False
        self._phase("loading the vision tower")
        vision = load_vision(lv.visual_encoder, precision.weight_dtype, self.device)
        for p in vision.parameters():
            p.requires_grad_(False)
        torch.manual_seed(r.train.seed)
        if finetune and r.lora.enabled:
            llm = attach_lora(llm, r=r.lora.r, alpha=r.lora.alpha, dropout=r.lora.dropout,
                              target_modules=r.lora.target_modules, bias=r.lora.bias, quantized=quantized,
                              gradient_checkpointing=r.model.gradient_checkpointing)
        else:                                  # pretrain: the LLM is frozen, gradients only pass through
            for p in llm.parameters():
                p.requires_grad_(False)
            if r.model.gradient_checkpointing:
                llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if finetune and lv.visual_encoder_lora:
            vision = attach_vision_lora(vision, lv.visual_encoder_lora_r, lv.visual_encoder_lora_alpha,
                                        lv.visual_encoder_lora_dropout, False)
        info = {"llm": r.model.path, "visual_encoder": lv.visual_encoder, "prompt_template": self.template,
                "system": r.data.system, "pad_image_to_square": lv.pad_image_to_square}
        model = build_llava(llm=llm, vision=vision, stage=lv.stage, select_layer=lv.select_layer,
                            image_size=vision.config.image_size, info=info)
        if lv.pretrained_pth:
            load_projector(model.projector, lv.pretrained_pth, vision.config.hidden_size,
                           model.info["llm_hidden"])
            log.info("projector from %s", lv.pretrained_pth)
        elif finetune:
            log.warning("llava.pretrained_pth is empty: the finetune stage starts from a fresh projector")
        model.projector.to(self.device)
        model.train()        # from_pretrained hands the LLM and the tower over in eval mode
        self.model = model
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.n_trainable = sum(p.numel() for p in self.trainable)
        self.n_params = sum(p.numel() for p in model.parameters())

    def _epoch_order(self, epoch: int) -> list[int]:
        """Grouped by modality and length (see grouped_order); rank r takes its part of every global batch."""
        bs = self.recipe.train.batch_size
        order = grouped_order(self.rows, bs * self.world, self.recipe.train.seed * 1_000_003 + epoch,
                              self.recipe.data.shuffle)
        if self.world == 1:
            return order
        glob = bs * self.world
        order += order[: (-len(order)) % glob]
        return [i for g in range(0, len(order), glob) for i in order[g + self.rank * bs: g + (self.rank + 1) * bs]]

    def _batch(self, idx: list[int]) -> dict[str, torch.Tensor]:
        samples = [self.rows[i] for i in idx]
        b = collate_llava(samples, self.pad_id)
        out = {k: torch.tensor(v, dtype=torch.long, device=self.device) for k, v in b.items()}
        with_images = [s.image for s in samples if s.image is not None]
        if with_images:
            pics = [self.images.open(p) for p in with_images]
            out["pixel_values"] = self.images(pics).to(self.device)
        return out

    def _forward(self, batch: dict[str, torch.Tensor]) -> Any:
        return self._runner()(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                              pixel_values=batch.get("pixel_values"))

    def _load_weights(self, ckpt: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        if not (ckpt / CONFIG_FILE).is_file():
            raise UserError(f"{ckpt}: not a LLaVA checkpoint of this recipe (no {CONFIG_FILE})")
        model = self.model
        model.projector.load_state_dict(load_file(str(ckpt / PROJECTOR_FILE), device=str(self.device)))
        for sub, part in ((LLM_ADAPTER, model.llm), (VIT_ADAPTER, model.vision)):
            f = ckpt / sub / "adapter_model.safetensors"
            if hasattr(part, "peft_config"):
                if not f.is_file():
                    raise UserError(f"{ckpt}: no {sub}; it is not a checkpoint of this recipe's stage")
                set_peft_model_state_dict(part, load_file(str(f), device=str(self.device)))

    def meta(self) -> dict[str, Any]:
        return super().meta() | {"llava": True, "stage": self.recipe.llava.stage,
                                 "visual_encoder": self.recipe.llava.visual_encoder,
                                 "pretrained_pth": self.recipe.llava.pretrained_pth}

    def _eval_answer(self, model: Any, index: int, prompt: str) -> tuple[str, dict[str, Any]]:
        """The answer about evaluation image ``index`` (the last one serves every later prompt)."""
        images = self.recipe.llava.evaluation_images
        image = images[min(index, len(images) - 1)] if images else None
        text = answer(model, self.tokenizer, self.images, self.template, prompt, image,
                      system=self.recipe.data.system, max_new_tokens=self.recipe.train.evaluation_max_new_tokens)
        return text, {"image": image}
