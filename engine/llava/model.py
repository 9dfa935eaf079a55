"""LLaVA: a CLIP vision tower (features of its second-to-last layer, CLS dropped), a two-layer MLP
projector (Linear → GELU → Linear) and a causal LM, trained in the tutorial's two stages:

* pretrain — only the projector trains; the LLM (4-bit allowed) and the vision tower are frozen;
* finetune — starts from the pretrain projector (``llava.pretrained_pth``); LLM QLoRA, vision-tower
  LoRA and the projector train.

An ``<image>`` in a user message becomes ``n_image_tokens`` placeholder positions
(``IMAGE_TOKEN``) whose embeddings are the projected image features; they are never in the loss.
A checkpoint directory holds everything in safetensors, usable as it is:

    llava.json                          shapes, stage, template, paths
    projector.safetensors
    llm_adapter/                        PEFT adapter of the LLM (finetune)
    visual_encoder_adapter/             PEFT adapter of the vision tower (finetune)
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.core.errors import DataError, UserError
from engine.data.formats import read_records, to_messages
from engine.data.packing import collate
from engine.data.templates import IGNORE_INDEX, TEMPLATES, _pieces, resolve_template_name

log = logging.getLogger("tunedeck")

IMAGE_TOKEN = -200
IMAGE_TAG = "<image>"
PROJECTOR_FILE = "projector.safetensors"
CONFIG_FILE = "llava.json"
LLM_ADAPTER = "llm_adapter"
VIT_ADAPTER = "visual_encoder_adapter"


# --------------------------------------------------------------------------- images

def open_image(path: str | Path):
    """The image as RGB, or one clear error naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"{path}: no such image") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not an image") from None
    except Image.DecompressionBombError:
        raise UserError(f"{path}: {too_many_pixels()}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{path}: cannot read the image ({type(e).__name__})") from None


def too_many_pixels() -> str:
    from PIL import Image

    limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    return (f"the image has more than {limit:,} pixels (Pillow's guard against decompression bombs); "
            "scale it down first")


class ImageProcessor:
    """CLIP preprocessing (transformers' CLIPImageProcessor), with LLaVA's pad-to-square in the mean colour."""

    def __init__(self, visual_encoder: str | Path, image_size: int, pad_to_square: bool):
        from transformers import CLIPImageProcessor

        vdir = Path(visual_encoder)
        if (vdir / "preprocessor_config.json").is_file():
            self.processor = CLIPImageProcessor.from_pretrained(str(vdir))
        else:
            self.processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                                crop_size={"height": image_size, "width": image_size})
        self.pad_to_square = pad_to_square
        self.background = tuple(int(round(255 * m)) for m in self.processor.image_mean)

    def open(self, path: str | Path):
        return open_image(path)

    def __call__(self, images: list) -> torch.Tensor:
        from PIL import Image

        prepared = []
        for im in images:
            if self.pad_to_square and im.width != im.height:
                side = max(im.size)
                square = Image.new("RGB", (side, side), self.background)
                square.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
                im = square
            prepared.append(im)
        return self.processor(images=prepared, return_tensors="pt")["pixel_values"]


# --------------------------------------------------------------------------- data

def _encode_pieces(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` with every ``<image>`` as one IMAGE_TOKEN (expanded later)."""
    ids: list[int] = []
    for i, chunk in enumerate(text.split(IMAGE_TAG)):
        if i:
            ids.append(IMAGE_TOKEN)
        if chunk:
            ids += tokenizer(chunk, add_special_tokens=False)["input_ids"]
    return ids


def encode_llava(tokenizer: Any, template: str, messages: list[dict], n_image_tokens: int,
                 generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Ids and labels under a named template; each image becomes n_image_tokens untrained positions."""
    name = resolve_template_name(template, tokenizer)
    if name not in TEMPLATES:
        raise UserError(f"data.prompt_template: {template!r}: a LLaVA recipe needs a named template "
                        f"({', '.join(TEMPLATES)})")
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in _pieces(TEMPLATES[name], tokenizer, messages, generation_prompt):
        piece = _encode_pieces(tokenizer, text) if not trained else tokenizer(text, add_special_tokens=False)[
            "input_ids"]
        for t in piece:
            if t == IMAGE_TOKEN:
                ids += [IMAGE_TOKEN] * n_image_tokens
                labels += [IGNORE_INDEX] * n_image_tokens
            else:
                ids.append(t)
                labels.append(t if trained else IGNORE_INDEX)
    return ids, labels


@dataclass
class LlavaSample:
    input_ids: list[int]
    labels: list[int]
    image: Path | None

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def position_ids(self) -> list[int]:
        return list(range(len(self.input_ids)))


def load_llava_records(data_path: str, image_folder: str) -> list[tuple[list[dict], Path | None]]:
    """(messages, image) per record of a LLaVA JSON file; every image is checked to open."""
    from PIL import Image

    records = read_records(data_path)
    folder = Path(image_folder) if image_folder else Path(data_path).parent
    out = []
    checked: dict[Path, None] = {}
    for i, rec in enumerate(records):
        where = f"{data_path}: record {i + 1}"
        if not isinstance(rec, dict) or "conversations" not in rec:
            raise DataError(f"{where}: not a LLaVA record (needs 'conversations' and optionally 'image')")
        messages = to_messages(rec, "sharegpt", where)
        n_tags = sum(m["content"].count(IMAGE_TAG) for m in messages)
        image = rec.get("image")
        if image:
            if n_tags > 1:
                raise DataError(f"{where}: {n_tags} <image> tags; one image per record is supported")
            if n_tags == 0:        # LLaVA's convention: the image goes before the first question
                first = next(j for j, m in enumerate(messages) if m["role"] == "user")
                messages[first] = {**messages[first], "content": IMAGE_TAG + "\n" + messages[first]["content"]}
            path = (folder / image) if not Path(image).is_absolute() else Path(image)
            if path not in checked:
                try:
                    with Image.open(path) as im:
                        im.verify()
                except FileNotFoundError:
                    raise DataError(f"{where}: image {path}: no such file") from None
                except Image.DecompressionBombError:
                    raise DataError(f"{where}: image {path}: {too_many_pixels()}") from None
                except Exception as e:
                    raise DataError(f"{where}: image {path}: cannot read it ({type(e).__name__})") from None
                checked[path] = None
            out.append((messages, path))
        else:
            if n_tags:
                raise DataError(f"{where}: an <image> tag but no 'image' in the record")
            out.append((messages, None))
    return out


def vision_shape(visual_encoder: str) -> tuple[int, int]:
    """(image size, image positions) of a CLIP vision tower directory."""
    from transformers import CLIPVisionConfig

    from engine.model.loading import check_model_dir

    check_model_dir(visual_encoder)
    cfg = CLIPVisionConfig.from_pretrained(visual_encoder)
    return cfg.image_size, (cfg.image_size // cfg.patch_size) ** 2


def tokenize_llava(records: list[tuple[list[dict], Path | None]], tokenizer: Any, template: str,
                   n_image_tokens: int, max_length: int, system: str = ""):
    """(samples, TokenizedData stats) of LLaVA records; each distinct conversation is encoded once."""
    from engine.data.packing import TokenizedData

    samples: list[LlavaSample] = []
    lengths: list[int] = []
    truncated = dropped = 0
    cache: dict[str, tuple[list[int], list[int]]] = {}
    for messages, image in records:
        if system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}, *messages]
        key = json.dumps(messages, ensure_ascii=False)
        if key not in cache:
            cache[key] = encode_llava(tokenizer, template, messages, n_image_tokens)
        ids, labels = cache[key]
        lengths.append(len(ids))
        if len(ids) > max_length:
            truncated += 1
            if image is not None and ids.index(IMAGE_TOKEN) + n_image_tokens > max_length:
                raise DataError(f"data.max_length: {max_length} cuts into the image's {n_image_tokens} "
                                "positions; raise it")
            ids, labels = ids[:max_length], labels[:max_length]
        if all(lab == IGNORE_INDEX for lab in labels[1:]):
            dropped += 1
            continue
        samples.append(LlavaSample(ids, labels, image))
    stats = TokenizedData([(x.input_ids, x.labels) for x in samples], len(records), truncated, dropped, lengths)
    return samples, stats


def text_part(sample: LlavaSample) -> tuple[list[int], list[int]]:
    """The sample's token ids and labels without its image positions (for display)."""
    keep = [i for i, t in enumerate(sample.input_ids) if t >= 0]
    return [sample.input_ids[i] for i in keep], [sample.labels[i] for i in keep]


def grouped_order(samples: list[LlavaSample], batch: int, seed: int, shuffle: bool) -> list[int]:
    """The epoch's order: images and text-only samples never share a batch; within a megabatch
    (50 batches) samples of similar length go together, megabatches in random order."""
    rng = random.Random(seed)
    groups = [[i for i, s in enumerate(samples) if s.image is not None],
              [i for i, s in enumerate(samples) if s.image is None]]
    batches: list[list[int]] = []
    for group in groups:
        if shuffle:
            rng.shuffle(group)
        mega = batch * 50
        for k in range(0, len(group), mega):
            chunk = sorted(group[k:k + mega], key=lambda i: -samples[i].n_tokens)
            batches += [chunk[j:j + batch] for j in range(0, len(chunk), batch)]
    if shuffle:
        rng.shuffle(batches)
    return [i for b in batches for i in b]


# --------------------------------------------------------------------------- model

class Projector(nn.Sequential):
    def __init__(self, vision_hidden: int, llm_hidden: int):
        super().__init__(nn.Linear(vision_hidden, llm_hidden), nn.GELU(), nn.Linear(llm_hidden, llm_hidden))


class LlavaModel(nn.Module):
    def __init__(self, llm: nn.Module, vision: nn.Module, projector: Projector, info: dict[str, Any]):
        super().__init__()
        self.llm = llm
        self.vision = vision
        self.projector = projector
        self.info = info                     # written to llava.json
        self.select_layer = info["select_layer"]

    @property
    def n_image_tokens(self) -> int:
        return self.info["n_image_tokens"]

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vision_dtype = next(self.vision.parameters()).dtype
        out = self.vision(pixel_values.to(vision_dtype), output_hidden_states=True)
        feats = out.hidden_states[self.select_layer][:, 1:]          # drop CLS
        return self.projector(feats.to(self.projector[0].weight.dtype))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        emb = self.llm.get_input_embeddings()(input_ids.clamp(min=0))
        mask = input_ids == IMAGE_TOKEN
        if pixel_values is not None and bool(mask.any()):
            feats = self.encode_images(pixel_values)
            if feats.shape[0] * feats.shape[1] != int(mask.sum()):
                raise UserError(f"{int(mask.sum())} image positions for {feats.shape[0]} image(s) of "
                                f"{feats.shape[1]} tokens")
            emb = emb.masked_scatter(mask.unsqueeze(-1), feats.to(emb.dtype).reshape(-1, emb.shape[-1]))
        return emb

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, **kw):
        return self.llm(inputs_embeds=self.embed(input_ids, pixel_values), position_ids=position_ids,
                        use_cache=False, **kw)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, **kw) -> torch.Tensor:
        """New token ids only (generation from embeddings returns no prompt)."""
        emb = self.embed(input_ids, pixel_values)
        return self.llm.generate(inputs_embeds=emb, attention_mask=torch.ones(emb.shape[:2], dtype=torch.long,
                                                                              device=emb.device), **kw)

    def save_pretrained(self, out: str | Path, **_: Any) -> None:
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().float().cpu().contiguous() for k, v in self.projector.state_dict().items()},
                  str(out / PROJECTOR_FILE))
        if hasattr(self.llm, "peft_config"):
            self.llm.save_pretrained(str(out / LLM_ADAPTER), safe_serialization=True)
        if hasattr(self.vision, "peft_config"):
            self.vision.save_pretrained(str(out / VIT_ADAPTER), safe_serialization=True)
        (out / CONFIG_FILE).write_text(json.dumps(self.info, indent=1, ensure_ascii=False))


def llava_checkpoint_dir(path: str | Path) -> Path:
    p = Path(path)
    if (p / CONFIG_FILE).is_file():
        return p
    from engine.train.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(p)
    if not (ckpt / CONFIG_FILE).is_file():
        raise UserError(f"{path}: not a tunedeck LLaVA checkpoint (no {CONFIG_FILE})")
    return ckpt


def load_vision(path: str, dtype: torch.dtype, device: Any) -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from engine.model.loading import check_model_dir

    check_model_dir(path)
    cfg = CLIPVisionConfig.from_pretrained(path)
    if cfg.model_type not in ("clip_vision_model",):
        raise UserError(f"llava.visual_encoder: {path}: a {cfg.model_type} model, not a CLIP vision tower")
    return CLIPVisionModel.from_pretrained(path, torch_dtype=dtype).to(device)


def load_projector(projector: Projector, src: str | Path, vision_hidden: int, llm_hidden: int,
                   what: str = "llava.pretrained_pth") -> None:
    """Load a (pretrain) checkpoint's projector, refusing one made for other models."""
    from safetensors.torch import load_file

    ckpt = llava_checkpoint_dir(src)
    info = json.loads((ckpt / CONFIG_FILE).read_text())
    if (info.get("vision_hidden"), info.get("llm_hidden")) != (vision_hidden, llm_hidden):
        raise UserError(f"{what}: {src}: its projector maps {info.get('vision_hidden')} → {info.get('llm_hidden')} "
                        f"features, this model needs {vision_hidden} → {llm_hidden} (a checkpoint of another "
                        f"vision tower or LLM)")
    projector.load_state_dict(load_file(str(ckpt / PROJECTOR_FILE)))


def build_llava(*, llm: nn.Module, vision: nn.Module, stage: str, select_layer: int, image_size: int,
                info: dict[str, Any]) -> LlavaModel:
    vcfg = vision.config
    llm_hidden = llm.get_input_embeddings().weight.shape[1]
    n_layers = vcfg.num_hidden_layers
    if not -n_layers - 1 <= select_layer <= n_layers:
        raise UserError(f"llava.select_layer: {select_layer} is not allowed: the vision tower has "
                        f"{n_layers} layers")
    n_tokens = (vcfg.image_size // vcfg.patch_size) ** 2
    projector = Projector(vcfg.hidden_size, llm_hidden)
    info = {**info, "stage": stage, "select_layer": select_layer, "n_image_tokens": n_tokens,
            "vision_hidden": vcfg.hidden_size, "llm_hidden": llm_hidden, "image_size": vcfg.image_size}
    return LlavaModel(llm, vision, projector, info)


def attach_vision_lora(vision: nn.Module, r: int, alpha: float, dropout: float, gradient_checkpointing: bool):
    from peft import LoraConfig, get_peft_model

    for p in vision.parameters():
        p.requires_grad_(False)
    targets = sorted({n.rsplit(".", 1)[-1] for n, m in vision.named_modules()
                      if isinstance(m, nn.Linear) and ".encoder." in f".{n}"})
    if gradient_checkpointing:
        vision.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return get_peft_model(vision, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                                             target_modules=targets))


def load_llava_for_inference(llm_path: str, visual_encoder: str, llava_dir: str | Path, *, bits: str = "none",
                             device: str | None = None, trust_remote_code: bool = False):
    """(model, tokenizer, image processor, template) for chat: the base LLM and vision tower with the
    checkpoint's projector and adapters."""
    from peft import PeftModel

    from engine.model.loading import load_model, load_tokenizer, pick_precision

    ckpt = llava_checkpoint_dir(llava_dir)
    info = json.loads((ckpt / CONFIG_FILE).read_text())
    precision = pick_precision("auto", "auto", device)
    dev = torch.device("cuda" if precision.device == "cuda" else "cpu")
    tokenizer = load_tokenizer(llm_path, trust_remote_code)
    llm = load_model(llm_path, quantization=bits, precision=precision, trust_remote_code=trust_remote_code,
                     device_map={"": 0} if dev.type == "cuda" else {"": "cpu"})
    vision = load_vision(visual_encoder, precision.weight_dtype, dev)
    model = build_llava(llm=llm, vision=vision, stage=info.get("stage", "finetune"),
                        select_layer=info["select_layer"], image_size=info["image_size"], info=info)
    load_projector(model.projector, ckpt, vision.config.hidden_size,
                   llm.get_input_embeddings().weight.shape[1], what="--llava")
    if (ckpt / LLM_ADAPTER).is_dir():
        model.llm = PeftModel.from_pretrained(model.llm, str(ckpt / LLM_ADAPTER))
    if (ckpt / VIT_ADAPTER).is_dir():
        model.vision = PeftModel.from_pretrained(model.vision, str(ckpt / VIT_ADAPTER))
    model.projector.to(dev)
    model.eval()
    processor = ImageProcessor(visual_encoder, info["image_size"], info.get("pad_image_to_square", True))
    return model, tokenizer, processor, info.get("prompt_template", "default")


@torch.no_grad()
def answer(model: LlavaModel, tokenizer: Any, processor: ImageProcessor, template: str, question: str,
           image: Any, *, system: str = "", max_new_tokens: int = 64,
           history: list[dict] | None = None) -> str:
    """One greedy answer about ``image`` (a PIL image, a path, or None for text only)."""
    from engine.data.templates import stop_token_ids

    if isinstance(image, (str, Path)):
        image = processor.open(image)
    msgs = ([{"role": "system", "content": system}] if system else []) + list(history or [])
    content = (IMAGE_TAG + "\n" + question) if image is not None and not history else question
    msgs.append({"role": "user", "content": content})
    ids, _ = encode_llava(tokenizer, template, msgs, model.n_image_tokens, generation_prompt=True)
    device = model.projector[0].weight.device
    pixels = processor([image]).to(device) if image is not None else None
    out = model.generate(torch.tensor([ids], device=device), pixels, do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=stop_token_ids(tokenizer, template),
                         pad_token_id=tokenizer.pad_token_id or 0)
    return tokenizer.decode(out[0], skip_special_tokens=True).strip()


def collate_llava(samples: list[LlavaSample], pad_id: int) -> dict[str, list[list[int]]]:
    from engine.data.packing import Row

    return collate([Row(s.input_ids, s.labels, s.position_ids) for s in samples], pad_id)
