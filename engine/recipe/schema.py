"""The recipe schema: one place for every field's type, range, default and help.

Recipes are YAML data, never executed. ``Recipe`` validates them; ``RecipeDocument``
edits one field at a time while keeping comments and key order (the TUI editor and
``--set`` both go through it). This module must stay importable without torch.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from engine.core.constants import DEEPSPEED_CHOICES
from engine.core.errors import ConfigError
from engine.core.files import atomic_write_text
from engine.data.templates import TEMPLATE_NAMES


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    path: str = Field(
        ..., min_length=1,
        description="Local model directory (or a Hugging Face repo id) of the model to fine-tune.")
    trust_remote_code: bool = Field(
        False, description="Allow the model folder's own Python code to run (InternLM2 needs none: it is "
                           "loaded natively).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights/compute dtype: auto = bf16 on GPUs that have it, else fp16; fp32 on CPU.")
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "4bit", description="Load the frozen base weights in 4-bit (QLoRA) or 8-bit with bitsandbytes.")
    quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="4-bit data type: nf4 (QLoRA's NormalFloat) or fp4.")
    double_quant: bool = Field(
        True, description="Quantize the 4-bit quantization constants again (saves ~0.4 bit a weight).")
    gradient_checkpointing: bool = Field(
        True, description="Recompute activations in backward: far less memory, about 30% more compute.")
    checkpoint_layers: str | int = Field(
        "auto", description="With gradient_checkpointing: how many decoder layers recompute (the others keep "
                            "their activations: faster, more memory). auto = on a GPU, keep them in as many "
                            "layers as its free memory allows with room to spare; all = every layer recomputes "
                            "(the least memory); a number N = the first N layers. train.low_memory means all.")
    liger_kernels: Literal["auto", "on", "off"] = Field(
        "auto", description="Liger's Triton kernels for RMSNorm, RoPE and SwiGLU (the same math, less memory "
                            "traffic); auto = on a GPU when liger-kernel is installed and knows the model.")
    fused_lora: Literal["auto", "on", "off"] = Field(
        "auto", description="Each LoRA layer as one autograd function (4-bit dequantize, base and adapter matmuls, "
                            "dropout) instead of peft's dozen small operations; the same math; auto = on a GPU.")
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile each decoder layer of a text model for training (fused kernels, far "
                            "less Python per step; the first step waits about a minute for the compiler); "
                            "auto = on a GPU for LoRA on a 4-bit or unquantized model, except with ZeRO-3.")
    attn_implementation: Literal["auto", "sdpa", "eager", "flex_attention"] = Field(
        "auto", description="Attention kernel; auto = flex_attention for packed rows on a GPU, else sdpa. "
                            "Packed samples stay isolated with all three.")


    @field_validator("checkpoint_layers")
    @classmethod
    def _checkpoint_layers(cls, v: str | int) -> str | int:
        if isinstance(v, bool):
            raise ValueError("must be auto, all or a number of layers")
        if isinstance(v, int):
            if v < 0:
                raise ValueError("must be auto, all or a number of layers (0 or more)")
            return v
        if v.strip().isdigit():
            return int(v)
        if v.strip() in ("auto", "all"):
            return v.strip()
        raise ValueError("must be auto, all or a number of layers")


class LoraSection(_Section):
    enabled: bool = Field(True, description="Train LoRA adapters; off = full fine-tune of every weight.")
    r: int = Field(64, ge=1, le=4096, description="LoRA rank.")
    alpha: float = Field(16, gt=0, description="LoRA scaling numerator (the update is scaled by alpha / r).")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: str | list[str] = Field(
        "all-linear",
        description="Layers that get adapters: all-linear (every linear layer but the output head, "
                    "found by type) or a list of module names such as [wqkv, wo, w1, w2, w3].")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases are trained.")

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, str) and v != "all-linear":
            raise ValueError("must be 'all-linear' or a list of module names")
        if isinstance(v, list) and not v:
            raise ValueError("the list of module names is empty")
        return v


class DataSection(_Section):
    data_path: str = Field(
        ..., min_length=1, description="Training data: a .json/.jsonl file (or a Hugging Face dataset name).")
    format: Literal["auto", "openai", "alpaca", "sharegpt"] = Field(
        "auto", description="Record format: openai messages, alpaca instruction/input/output, or sharegpt.")
    prompt_template: str = Field(
        "auto", description="Chat template: auto = the tokenizer's own chat_template, else 'default'.")
    system: str = Field("", description="System prompt used in training and evaluation (empty = none).")
    max_length: int = Field(2048, ge=8, le=1_048_576, description="Tokens per sample; longer ones are cut.")
    pack_to_max_length: bool = Field(
        True, description="Pack several short samples into one max_length row (they never attend "
                          "to each other) to keep the GPU busy.")
    shuffle: bool = Field(True, description="Shuffle samples every epoch (seeded by seed).")
    dataloader_num_workers: int = Field(
        0, ge=0, le=64, description="Worker processes that tokenize the dataset (0 = in the trainer).")
    use_varlen_attn: bool = Field(
        False, description="Kept for XTuner recipes: packed rows are always isolated here (position ids "
                           "restart per sample, block-diagonal attention).")

    @field_validator("prompt_template")
    @classmethod
    def _template(cls, v: str) -> str:
        if v != "auto" and v not in TEMPLATE_NAMES:
            raise ValueError(f"unknown template; choose one of: auto, {', '.join(TEMPLATE_NAMES)}")
        return v


class TrainSection(_Section):
    batch_size: int = Field(1, ge=1, le=4096, description="Rows per forward pass on each device.")
    accumulative_counts: int = Field(
        16, ge=1, le=65536, description="Gradient accumulation: forward/backward passes per optimizer step.")
    max_epochs: float = Field(3, gt=0, le=1000, description="Passes over the data.")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (empty = run all epochs).")
    optim_type: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "adamw", description="Optimizer: AdamW, or bitsandbytes' 8-bit / paged 8-bit AdamW.")
    lr: float = Field(2e-4, gt=0, le=10, description="Peak learning rate.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas (momentum, squared-gradient).")
    weight_decay: float = Field(0.0, ge=0, le=10, description="Decoupled weight decay.")
    max_norm: float = Field(1.0, ge=0, description="Clip the gradient norm to this (0 = no clipping).")
    warmup_ratio: float = Field(
        0.03, ge=0, le=1, description="Fraction of steps with a linear warm-up, then cosine decay to 0.")
    save_steps: int = Field(500, ge=1, description="Save a checkpoint every this many optimizer steps.")
    save_total_limit: int = Field(
        2, ge=-1, description="Checkpoints to keep (-1 = all); the newest complete one is never deleted.")
    evaluation_freq: int = Field(
        500, ge=0, description="Answer evaluation_inputs every this many steps (0 = only at start and end).")
    evaluation_inputs: list[str] = Field(
        default_factory=list, description="Prompts answered during training to watch the model learn.")
    evaluation_max_new_tokens: int = Field(
        64, ge=1, le=8192, description="Longest evaluation answer, in tokens.")
    sequence_parallel_size: int = Field(
        1, ge=1, le=1, description="Sequence parallelism across GPUs (only 1 is supported yet).")
    seed: int = Field(0, ge=0, description="Random seed: data order, LoRA init, dropout.")
    mixed_precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto = bf16 where the GPU has it, else fp16 with loss scaling; fp32 on CPU.")
    deepspeed: Literal[DEEPSPEED_CHOICES] = Field(  # type: ignore[valid-type]
        "none", description="DeepSpeed ZeRO stage (configs/deepspeed/NAME.json); none = plain PyTorch.")
    logging_steps: int = Field(1, ge=1, description="Write metrics every this many optimizer steps.")
    rows_per_forward: int = Field(
        0, ge=0, le=65536,
        description="Rows of an accumulation window run through the model together (the same gradient as one "
                    "micro-batch at a time, fewer and larger kernels); 0 = auto: the whole window on a GPU, halved "
                    "while it does not fit in memory; batch_size on the CPU.")
    low_memory: bool = Field(
        False, description="One switch for small GPUs, the same math: 4 rows per forward, the loss in 128-token "
                           "chunks, AdamW's fp32 weights and moments in CPU memory, the input embedding on the CPU, "
                           "each layer's input in CPU memory from forward to backward (2.6 GiB for QLoRA r64 on a "
                           "1.8B model, at about a third of the default speed).")
    loss_chunk_tokens: int = Field(
        0, ge=0, le=1_048_576,
        description="The loss is taken from hidden states this many target tokens at a time (the fp32 "
                    "logits of a chunk are vocabulary x chunk x 4 bytes); 0 = auto: 1024 on a GPU, the whole "
                    "micro-batch's logits at once on the CPU.")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError("both betas must be in [0, 1)")
        return v


class LlavaSection(_Section):
    """A vision-language (LLaVA) recipe: a CLIP vision tower and a projector in front of the LLM."""

    enabled: bool = Field(False, description="Train a LLaVA model (the LLM is model.path).")
    stage: Literal["pretrain", "finetune"] = Field(
        "finetune", description="pretrain: only the projector trains; finetune: projector + LLM LoRA "
                                "(the lora section) + vision-tower LoRA.")
    visual_encoder: str = Field(
        "", description="CLIP vision model directory (e.g. clip-vit-large-patch14-336).")
    pretrained_pth: str = Field(
        "", description="The pretrain stage's checkpoint (or run) directory whose projector finetune starts "
                        "from (empty = a fresh projector).")
    image_folder: str = Field("", description="Folder the records' image paths are relative to.")
    pad_image_to_square: bool = Field(
        True, description="Pad images to a square with the mean colour before resizing (else centre crop).")
    select_layer: int = Field(-2, ge=-64, le=64, description="Vision-tower layer whose features are used.")
    visual_encoder_lora: bool = Field(True, description="Finetune: train a LoRA on the vision tower.")
    visual_encoder_lora_r: int = Field(64, ge=1, le=4096, description="Vision-tower LoRA rank.")
    visual_encoder_lora_alpha: float = Field(16, gt=0, description="Vision-tower LoRA alpha.")
    visual_encoder_lora_dropout: float = Field(0.05, ge=0, lt=1, description="Vision-tower LoRA dropout.")
    evaluation_images: list[str] = Field(
        default_factory=list, description="Images for train.evaluation_inputs (one per prompt, or one for all).")


class Recipe(_Section):
    """A whole training recipe."""

    model: ModelSection
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)
    llava: LlavaSection = Field(default_factory=LlavaSection)


SECTIONS: dict[str, type[_Section]] = {
    "model": ModelSection, "lora": LoraSection, "data": DataSection, "train": TrainSection,
    "llava": LlavaSection,
}


# ---------------------------------------------------------------------------
# Field catalogue (for --set short names and the TUI editor)


@dataclass(frozen=True)
class FieldSpec:
    path: str                     # "train.lr"
    annotation: Any
    default: Any
    help: str
    choices: tuple[str, ...] | None
    required: bool


def field_specs() -> list[FieldSpec]:
    """Every editable field, in schema order, with its help text and choices."""
    specs = []
    for section, cls in SECTIONS.items():
        for name, info in cls.model_fields.items():
            choices = _literal_choices(info.annotation)
            if name == "prompt_template":
                choices = ("auto", *TEMPLATE_NAMES)
            default = None if info.is_required() else info.get_default(call_default_factory=True)
            specs.append(FieldSpec(f"{section}.{name}", info.annotation, default,
                                   info.description or "", choices, info.is_required()))
    return specs


def _literal_choices(annotation: Any) -> tuple[str, ...] | None:
    if getattr(annotation, "__origin__", None) is Literal:
        return tuple(annotation.__args__)
    return None


def resolve_key(key: str) -> str:
    """Turn ``lr`` or ``train.lr`` into the full dotted path; unknown keys raise ConfigError."""
    key = key.strip()
    paths = [s.path for s in field_specs()]
    if key in paths:
        return key
    matches = [p for p in paths if p.split(".", 1)[1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(f"{key}: ambiguous key; write one of {', '.join(matches)}")
    raise ConfigError(f"{key}: unknown key; known keys: {', '.join(p.split('.', 1)[1] for p in paths)}")


# ---------------------------------------------------------------------------
# Loading, validating and editing YAML


def _yaml() -> YAML:
    y = YAML()  # round-trip: keeps comments, key order and quoting
    y.preserve_quotes = True
    y.indent(mapping=2, sequence=4, offset=2)
    y.width = 4096
    return y


def parse_value(text: str) -> Any:
    """Parse a ``--set`` value the way YAML would (``2e-4`` is a float, ``[a, b]`` a list)."""
    if text == "":
        return ""
    try:
        value = YAML().load(text)   # round-trip types keep how the number was written (1e-4)
    except Exception:
        return text
    return text if value is None and text.strip() not in ("null", "~") else value


def format_errors(err: ValidationError, data: Any) -> list[str]:
    """One line per problem: field, the value given, what is allowed."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        value = e.get("input")
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            section = str(e["loc"][0]) if len(e["loc"]) > 1 else None
            known = (SECTIONS[section].model_fields if section in SECTIONS else SECTIONS)
            lines.append(f"{loc}: unknown key; allowed here: {', '.join(known)}")
            continue
        if e["type"] == "missing":
            lines.append(f"{loc}: required field is missing")
            continue
        msg = msg.removeprefix("Value error, ")
        lines.append(f"{loc}: {value!r} is not allowed: {msg[0].lower() + msg[1:]}")
    return lines


def validate(data: Any, source: str = "config") -> Recipe:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a recipe is a YAML mapping with model, lora, data and train sections")
    try:
        return Recipe.model_validate(_plain(data))
    except ValidationError as err:
        raise ConfigError(*format_errors(err, data)) from None


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


class RecipeDocument:
    """A recipe file open for editing: load → set → validate → save, comments kept."""

    def __init__(self, data: CommentedMap, path: Path | None = None):
        self.data = data
        self.path = path

    @classmethod
    def load(cls, path: str | os.PathLike) -> RecipeDocument:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
        return cls.loads(text, path)

    @classmethod
    def loads(cls, text: str, path: Path | None = None) -> RecipeDocument:
        try:
            data = _yaml().load(text)
        except Exception as e:  # ruamel raises many classes; all mean "not YAML"
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{where}: not valid YAML: {problem}") from None
        if data is None:
            data = CommentedMap()
        if not isinstance(data, CommentedMap):
            raise ConfigError(f"{path}: a recipe is a YAML mapping with model, lora, data and train sections")
        return cls(data, path)

    def get(self, key: str) -> Any:
        section, name = resolve_key(key).split(".")
        return _plain(self.data.get(section, {}).get(name))

    def set(self, key: str, value: Any) -> str:
        """Set one field (``value`` may be the raw text of ``--set``); returns the full path.

        Does not validate: call ``validate()`` (or ``save()``, which does) afterwards.
        """
        full = resolve_key(key)
        section, name = full.split(".")
        if isinstance(value, str):
            value = parse_value(value)
        if section not in self.data or self.data[section] is None:
            self.data[section] = CommentedMap()
        sec = self.data[section]
        if isinstance(value, (list, tuple)):
            from ruamel.yaml.comments import CommentedSeq
            seq = CommentedSeq(list(value))
            if name == "betas":
                seq.fa.set_flow_style()
            value = seq
        sec[name] = value
        return full

    def unset(self, key: str) -> None:
        section, name = resolve_key(key).split(".")
        if section in self.data and name in (self.data[section] or {}):
            del self.data[section][name]
            if not self.data[section]:        # a section emptied by it goes too (no `llava: {}` left behind)
                del self.data[section]

    def validate(self) -> Recipe:
        return validate(self.data, str(self.path or "config"))

    def problems(self) -> list[str]:
        try:
            self.validate()
        except ConfigError as e:
            return e.problems
        return []

    def dumps(self) -> str:
        buf = io.StringIO()
        _yaml().dump(self.data, buf)
        return buf.getvalue()

    def save(self, path: str | os.PathLike | None = None, *, overwrite: bool = True) -> Path:
        """Validate, then write atomically (a crash never leaves half a file)."""
        self.validate()
        target = Path(path or self.path or "")
        if not str(target):
            raise ConfigError("no path to save the config to")
        if not overwrite and target.exists():
            raise ConfigError(f"{target}: already exists; choose another name")
        atomic_write_text(target, self.dumps())
        self.path = target
        return target


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> tuple[RecipeDocument, Recipe]:
    """Load a recipe file, apply ``key=value`` overrides, validate. All problems at once."""
    doc = RecipeDocument.load(path)
    problems = []
    for item in overrides or []:
        if "=" not in item:
            problems.append(f"--set {item}: expected key=value")
            continue
        key, value = item.split("=", 1)
        try:
            doc.set(key, value)
        except ConfigError as e:
            problems.extend(e.problems)
    try:
        recipe = doc.validate()
    except ConfigError as e:
        problems.extend(e.problems)
    if problems:
        raise ConfigError(*problems)
    return doc, recipe


def diff(a: Recipe, b: Recipe) -> list[tuple[str, Any, Any]]:
    """Fields whose values differ: (path, value in a, value in b)."""
    da, db = a.model_dump(), b.model_dump()
    out = []
    for spec in field_specs():
        s, n = spec.path.split(".")
        va, vb = da[s].get(n), db[s].get(n)
        if va != vb:
            out.append((spec.path, va, vb))
    return out
