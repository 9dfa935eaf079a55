"""Will it fit? The peak GPU memory of a recipe's training, estimated before launch from the model's
config.json alone (no weights read, no torch): the weights by precision, the trainable weights with
their gradients and optimizer moments, the activations each decoder layer keeps (all of them, or only
its input where it recomputes) for one forward of the rows the trainer will take, the loss's logits
(in chunks on a GPU) and the optimizer step's own scratch. The peak is the larger of the end of the
forward, the first layer's backward and the optimizer step. `tunedeck train CFG --dry-run` prints it
per visible GPU; the app shows it beside Start; bench/memory_estimate.py checks it against measured
peaks on a GPU. Torch-free, so the TUI imports it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from engine.core.errors import UserError
from engine.model.recompute import layer_activation_bytes, plan_recompute
from engine.recipe.schema import Recipe

GIB = 1 << 30
CUDA_CONTEXT_BYTES = 600 << 20      # the CUDA context and kernels: outside the allocator's peak
FRAGMENTATION = 1.05                # the caching allocator's blocks around what is allocated


def read_config(path: str, what: str = "model.path") -> dict[str, Any]:
    """A model folder's (or a cached hub id's) config.json, as a dict."""
    p = Path(path)
    file = p / "config.json" if p.is_dir() else None
    if file is None and path.count("/") == 1 and not path.startswith((".", "/", "~")):
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(path, "config.json")
            file = Path(hit) if isinstance(hit, str) else None
        except Exception:
            file = None
    if file is None or not file.is_file():
        raise UserError(f"{what}: {path!r}: no config.json to estimate from (not a model folder, and not in the "
                        "Hugging Face cache)")
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{file}: not readable JSON ({e})") from None


@dataclass(frozen=True)
class Shape:
    """A Llama-shaped decoder (InternLM2, Llama, Qwen2 and Mistral all read alike)."""
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def of(cls, cfg: dict[str, Any]) -> Shape:
        cfg = cfg.get("text_config", cfg)
        try:
            h, n = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])
            heads = int(cfg["num_attention_heads"])
            return cls(h, int(cfg.get("intermediate_size") or 4 * h), n, heads,
                       int(cfg.get("num_key_value_heads") or heads), int(cfg.get("head_dim") or h // heads),
                       int(cfg["vocab_size"]), bool(cfg.get("tie_word_embeddings", False)))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"model config.json: {e} missing or not a number: not a decoder this estimate "
                            "knows") from None

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of one layer's seven projections."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    def layer_linear_params(self) -> int:
        return sum(a * b for a, b in self.linears())

    def lora_params(self, r: int) -> int:
        return self.layers * sum(r * (a + b) for a, b in self.linears())

    def activation_config(self) -> Any:
        """What layer_activation_bytes reads of a model config."""
        return SimpleNamespace(hidden_size=self.hidden, intermediate_size=self.intermediate)


def quantized_bytes_per_param(quantization: str, double_quant: bool) -> float:
    """bitsandbytes' storage: 4-bit values with an fp32 scale each 64 (double quant: an 8-bit scale,
    and an fp32 one each 256 of those), or int8 with a scale a row."""
    if quantization == "4bit":
        return 0.5 + (1 / 64 + 4 / (64 * 256) if double_quant else 4 / 64)
    return 1.0 + 4 / 2048


def moment_bytes(optim_type: str) -> int:
    return 2 if optim_type in ("adamw_8bit", "paged_adamw_8bit") else 8


def pending_optimizer_bytes(n_trainable: int, optim_type: str, low_memory: bool) -> int:
    """What the trainable weights still claim once loaded: fp32 gradients and, on the GPU, the moments."""
    return n_trainable * (4 + (0 if low_memory and optim_type == "adamw" else moment_bytes(optim_type)))


@dataclass
class Estimate:
    peak_bytes: int
    parts: dict[str, int]                  # where the peak comes from, bytes
    rows_per_forward: int
    tokens_per_forward: int
    recompute_layers: int | None          # None: checkpointing off
    layers: int
    phase: str                            # which moment is the peak
    notes: list[str] = field(default_factory=list)

    @property
    def need_bytes(self) -> int:
        """What a GPU must have free: the peak, the allocator's slack and the CUDA context."""
        return int(self.peak_bytes * FRAGMENTATION) + CUDA_CONTEXT_BYTES

    def fits(self, free_bytes: int) -> bool:
        return self.need_bytes <= free_bytes

    def to_json(self) -> dict[str, Any]:
        return {"peak_gib": round(self.peak_bytes / GIB, 2), "need_gib": round(self.need_bytes / GIB, 2),
                "phase": self.phase, "rows_per_forward": self.rows_per_forward,
                "tokens_per_forward": self.tokens_per_forward, "recompute_layers": self.recompute_layers,
                "layers": self.layers, "parts_gib": {k: round(v / GIB, 3) for k, v in self.parts.items()},
                "notes": self.notes}


def estimate(recipe: Recipe, model_config: dict[str, Any], *, gpu_free_bytes: int | None = None,
             world: int = 1, vision_config: dict[str, Any] | None = None,
             rows_per_forward: int | None = None) -> Estimate:
    """The peak of one GPU's training memory. ``gpu_free_bytes`` (what the GPU has free before the run)
    drives ``checkpoint_layers: auto`` as the trainer plans it; without it (no GPU here) every layer
    recomputes. The rows per forward are the trainer's choice on a GPU (the whole accumulation window,
    4 rows with low_memory, or train.rows_per_forward)."""
    m, lo, t, d, lv = recipe.model, recipe.lora, recipe.train, recipe.data, recipe.llava
    s = Shape.of(model_config)
    llava = lv.enabled
    quant = m.quantization != "none"
    # LLaVA trains the LLM only through LoRA in the finetune stage: otherwise it is frozen
    frozen_llm = llava and (lv.stage == "pretrain" or not lo.enabled)
    full = not lo.enabled or frozen_llm
    wbytes = 4 if m.dtype == "float32" else 2
    notes: list[str] = []
    parts: dict[str, int] = {}

    # ---- weights
    n_linear = s.layers * s.layer_linear_params()
    n_embed = s.vocab * s.hidden * (1 if s.tied else 2)
    if full and not frozen_llm:                # full fine-tune: fp32 master weights
        linear_b, embed_b = 4.0, 4
    else:
        linear_b = quantized_bytes_per_param(m.quantization, m.double_quant) if quant else wbytes
        # the text trainer keeps the frozen embedding and head in 16-bit; LLaVA's QLoRA leaves peft's fp32
        embed_b = 4 if (quant and llava) else wbytes
    emb_rows = s.vocab * s.hidden
    embed_bytes = n_embed * embed_b
    if t.low_memory and not llava:
        embed_bytes -= emb_rows * embed_b           # the input embedding waits in CPU memory
    parts["weights"] = int(n_linear * linear_b) + embed_bytes + (2 * s.layers + 1) * s.hidden * 4

    # ---- trainable weights, gradients, optimizer moments
    if full and not frozen_llm:
        n_train = n_linear + n_embed
    elif frozen_llm:
        n_train = 0
    else:
        n_train = s.lora_params(lo.r)
    vision_tokens = 0
    if llava:
        if vision_config is None:
            raise UserError("llava.visual_encoder: no config.json read for the estimate")
        vc = vision_config.get("vision_config", vision_config)
        vh, vi, vl = int(vc["hidden_size"]), int(vc["intermediate_size"]), int(vc["num_hidden_layers"])
        vision_tokens = (int(vc["image_size"]) // int(vc["patch_size"])) ** 2 + 1
        n_vision = vl * (4 * vh * vh + 2 * vh * vi)
        parts["weights"] += n_vision * wbytes
        n_train += vh * s.hidden + s.hidden * s.hidden + 2 * s.hidden          # the projector
        if lv.stage == "finetune" and lv.visual_encoder_lora:
            n_train += vl * lv.visual_encoder_lora_r * (4 * 2 * vh + 2 * (vh + vi))
    ds = t.deepspeed
    shard_states = world if ds != "none" else 1
    moments = 0 if ds.endswith("offload") else n_train * moment_bytes(t.optim_type)
    if t.low_memory and t.optim_type == "adamw":
        moments = 0                                   # AdamW's fp32 weights and moments in CPU memory
    train_w = 0 if full and not frozen_llm else n_train * 4          # LoRA / projector weights in fp32
    grads = n_train * 4 // (shard_states if ds.startswith(("zero2", "zero3")) else 1)
    parts["trainable weights"] = train_w
    parts["gradients"] = grads
    parts["optimizer moments"] = moments // shard_states
    if ds.startswith("zero3"):
        parts["weights"] //= world
        notes.append("ZeRO-3: weights counted as partitioned; the gathered layer is not")

    # ---- one forward: rows and tokens
    window = t.batch_size * t.accumulative_counts
    if rows_per_forward is None:
        if t.rows_per_forward:
            rows_per_forward = t.rows_per_forward
        elif llava:
            rows_per_forward = t.batch_size             # LLaVA's batches carry their images as they are
        else:
            rows_per_forward = min(window, max(4, t.batch_size)) if t.low_memory else window
    seq = d.max_length + (vision_tokens - 1 if llava else 0)
    tokens = rows_per_forward * seq
    resid_b = 4 if (quant or (full and not frozen_llm) or wbytes == 4) else 2     # the residual stream's dtype
    cfg = s.activation_config()
    trains_all = full and not frozen_llm
    per_layer = layer_activation_bytes(cfg, tokens, quantized=quant, full=trains_all)
    if trains_all:
        per_layer += s.layer_linear_params() * 2        # autocast's 16-bit copies of the weights, saved too
    else:
        per_layer += tokens * 7 * lo.r * 2               # the adapters' rank-sized intermediates

    # ---- which layers recompute (as the trainer plans it)
    recompute: int | None = None
    if m.gradient_checkpointing:
        if llava:
            recompute = s.layers                          # LLaVA's LLM: transformers' checkpointing, every layer
        else:
            setting = "all" if t.low_memory else m.checkpoint_layers
            free_after = None
            if gpu_free_bytes is not None:
                free_after = (gpu_free_bytes - CUDA_CONTEXT_BYTES - parts["weights"] - train_w
                              - pending_optimizer_bytes(n_train, t.optim_type, t.low_memory))
            recompute = plan_recompute(setting, s.layers, per_layer, free_after)
    kept_layers = s.layers - (recompute or 0) if recompute is not None else s.layers
    layer_input = tokens * s.hidden * resid_b
    acts = kept_layers * per_layer + (recompute or 0) * (0 if t.low_memory and not llava else layer_input)
    parts["activations"] = acts
    if llava:          # the tower runs without checkpointing: every layer keeps its activations, per image
        vision_act = vision_tokens * (14 * vh + 6 * vi) * 2 * vl * rows_per_forward
        parts["vision activations"] = vision_act
    # ---- the loss: the head's logits
    chunked = not llava                             # on a GPU the text trainer's loss is chunked
    if chunked:
        chunk = t.loss_chunk_tokens or (128 if t.low_memory else 1024)
        logit_tokens = min(chunk, tokens)
        parts["hidden states for the loss"] = tokens * s.hidden * 4 * 2
    else:
        logit_tokens = tokens
    parts["logits"] = s.vocab * logit_tokens * (2 + 4 + 4 + 4)   # 16-bit, fp32, its softmax, its gradient

    # ---- the moments that can be the peak
    static = parts["weights"] + train_w + parts["optimizer moments"]
    forward = static + acts + parts.get("vision activations", 0) + parts.get("hidden states for the loss", 0)
    accumulated = grads if rows_per_forward < window else 0      # earlier forwards' gradients
    head_grad = s.vocab * s.hidden * 4 if trains_all else 0        # the output head's, first of all
    # the first layer's backward: what it recomputes, the incoming and outgoing fp32 gradients of the
    # hidden states, and the MLP's two intermediate-sized gradients at once
    working = (per_layer if recompute else 0) + 2 * tokens * s.hidden * 4 + 2 * tokens * s.intermediate * 2
    phases = {
        "the loss's backward": forward + accumulated + head_grad + parts["logits"],
        "the first layer's backward": forward + accumulated + head_grad + working,
        "the optimizer step": static + grads + (n_train * 4 if t.optim_type == "adamw" and not t.low_memory else 0),
    }
    phase, peak = max(phases.items(), key=lambda kv: kv[1])
    if peak == phases["the optimizer step"] and n_train:
        parts["optimizer scratch"] = phases["the optimizer step"] - static - grads
    if gpu_free_bytes is None and not llava and m.gradient_checkpointing and m.checkpoint_layers == "auto":
        notes.append("no GPU measured: checkpoint_layers auto counted as every layer recomputing")
    if llava:
        notes.append(f"rows of max_length + image positions ({seq} tokens): the longest sample the data may have")
    return Estimate(int(peak), parts, rows_per_forward, tokens, recompute, s.layers, phase, notes)


def estimate_recipe(recipe: Recipe, gpu_free_bytes: int | None = None, world: int = 1,
                    rows_per_forward: int | None = None) -> Estimate:
    """The estimate for a recipe, its model's (and vision tower's) config.json read from disk."""
    cfg = read_config(recipe.model.path)
    vision = read_config(recipe.llava.visual_encoder, "llava.visual_encoder") if recipe.llava.enabled else None
    return estimate(recipe, cfg, gpu_free_bytes=gpu_free_bytes, world=world, vision_config=vision,
                    rows_per_forward=rows_per_forward)


def fit_on(recipe: Recipe, gpus: list[Any], world: int = 1) -> list[tuple[Any, Estimate]]:
    """Each GPU (engine.core.gpus.Gpu) with the estimate made for its
    free memory; where the whole window does not fit, the halved rows per forward the trainer would
    fall back to."""
    out = []
    for g in gpus:
        free = g.free_bytes
        est = estimate_recipe(recipe, free, world)
        auto_rows = not recipe.train.rows_per_forward and not recipe.llava.enabled
        while auto_rows and not est.fits(free) and est.rows_per_forward > recipe.train.batch_size:
            est = estimate_recipe(recipe, free, world, max(recipe.train.batch_size, est.rows_per_forward // 2))
        out.append((g, est))
    return out


def describe(est: Estimate) -> list[str]:
    lines = [f"estimated peak GPU memory: {est.peak_bytes / GIB:.1f} GiB (at {est.phase}); "
             f"a GPU needs {est.need_bytes / GIB:.1f} GiB free with the CUDA context"]
    rec = ("checkpointing off" if est.recompute_layers is None
           else f"{est.recompute_layers} of {est.layers} layers recompute")
    lines.append(f"  {est.rows_per_forward} rows a forward ({est.tokens_per_forward} tokens), {rec}")
    for k, v in est.parts.items():
        if v:
            lines.append(f"  {k:<28}{v / GIB:8.2f} GiB")
    lines += [f"  note: {n}" for n in est.notes]
    return lines

