"""Serving LLaVA checkpoints: one LLM and one vision tower in memory; each served name (a pretrain
or a finetune checkpoint) brings its own projector and, when it has them, LoRA adapters of the LLM
and the vision tower (PEFT named adapters). Same interface as ModelHost, so the OpenAI server, the
scheduler and the web page work unchanged; requests that arrive together (the two sides of a
comparison) are generated together, each row with its own projector and adapters."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any

import torch

from engine.core.errors import UserError
from engine.data.templates import stop_token_ids, stop_words
from engine.llava.model import (
    CONFIG_FILE,
    LLM_ADAPTER,
    VIT_ADAPTER,
    ImageProcessor,
    LlavaModel,
    Projector,
    encode_llava,
    llava_checkpoint_dir,
    load_projector,
    load_vision,
)
from engine.serve.generation import RowStreams, sampling_kwargs
from engine.serve.scheduler import GenRequest, ServedModel


class LlavaHost:
    accepts_images = True
    static_cache = False

    def __init__(self, llm_path: str, visual_encoder: str, llavas: list[tuple[str, str]], *, bits: int | None = None,
                 trust_remote_code: bool = False, workspace: str | Path = "."):
        import json

        from engine.model.loading import load_model, load_tokenizer, pick_precision

        if not llavas:
            raise UserError("--llava: give at least one NAME=CHECKPOINT")
        self.base_path = llm_path
        self.workspace = Path(workspace).resolve()
        self.precision = pick_precision()
        self.device = torch.device("cuda" if self.precision.device == "cuda" else "cpu")
        self.tokenizer = load_tokenizer(llm_path, trust_remote_code)
        ckpts = [(name, llava_checkpoint_dir(path)) for name, path in llavas]
        llm = load_model(llm_path, quantization={4: "4bit", 8: "8bit"}.get(bits or 0, "none"), precision=self.precision,
                         trust_remote_code=trust_remote_code,
                         device_map={"": 0} if self.device.type == "cuda" else {"": "cpu"})
        vision = load_vision(visual_encoder, self.precision.weight_dtype, self.device)
        llm_hidden = llm.get_input_embeddings().weight.shape[1]
        self.models: dict[str, ServedModel] = {}
        self.entries: dict[str, dict[str, Any]] = {}
        for name, ckpt in ckpts:
            if name in self.entries:
                raise UserError(f"--llava {name}: the name is given twice")
            info = json.loads((ckpt / CONFIG_FILE).read_text())
            projector = Projector(vision.config.hidden_size, llm_hidden)
            load_projector(projector, ckpt, vision.config.hidden_size, llm_hidden, what=f"--llava {name}")
            entry = {"info": info, "projector": projector.to(self.device).eval(), "llm": False, "vision": False}
            llm, entry["llm"] = _add_adapter(llm, ckpt / LLM_ADAPTER, name)
            vision, entry["vision"] = _add_adapter(vision, ckpt / VIT_ADAPTER, name)
            self.entries[name] = entry
            self.models[name] = ServedModel(name, str(ckpt), info.get("prompt_template", "default"),
                                            info.get("system", ""))
        first = self.entries[ckpts[0][0]]["info"]
        self.model = LlavaModel(llm, vision, self.entries[ckpts[0][0]]["projector"], first)
        self.model.eval()
        self.images = ImageProcessor(visual_encoder, first["image_size"], first.get("pad_image_to_square", True))
        self.context_length = int(getattr(llm.config, "max_position_embeddings", 4096) or 4096)
        self.lock = threading.Lock()

    # the server's adapter verbs: LLaVA checkpoints are given at start
    def add_adapter(self, name: str, path: str, template: str | None = None, system: str | None = None):
        raise UserError("adding checkpoints while serving LLaVA is not supported; restart with --llava NAME=DIR")

    def remove_adapter(self, name: str) -> None:
        raise KeyError(name)

    def warmup(self) -> float:
        return 0.0

    def encode(self, model: str, messages: list[dict]) -> tuple[list[int], list[str], set[int]]:
        sm = self.models[model]
        if sm.system and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": sm.system}, *messages]
        ids, _ = encode_llava(self.tokenizer, sm.template, messages, self.model.n_image_tokens,
                              generation_prompt=True)
        return ids, stop_words(self.tokenizer, sm.template), set(stop_token_ids(self.tokenizer, sm.template))

    def open_image(self, data: bytes | str):
        """A PIL image from bytes or a path under the workspace; UserError says why not."""
        import io

        from PIL import Image

        if isinstance(data, bytes):
            try:
                return Image.open(io.BytesIO(data)).convert("RGB")
            except Image.DecompressionBombError:
                from engine.llava.model import too_many_pixels

                raise UserError(too_many_pixels()) from None
            except Exception:
                raise UserError("not a readable image") from None
        path = Path(data.removeprefix("file://")).expanduser()
        path = (self.workspace / path).resolve() if not path.is_absolute() else path.resolve()
        if self.workspace not in path.parents:
            raise UserError(f"{path}: only images under the workspace {self.workspace} are served")
        from engine.llava.model import open_image

        return open_image(path)

    @contextlib.contextmanager
    def _use(self, name: str):
        """The served name's projector and adapters while one request's image and prompt are embedded."""
        e = self.entries[name]
        m = self.model
        m.projector = e["projector"]
        m.info = e["info"]
        with contextlib.ExitStack() as stack:
            for part, has in ((m.llm, e["llm"]), (m.vision, e["vision"])):
                if hasattr(part, "peft_config"):
                    if has:
                        part.set_adapter(name)
                    else:
                        stack.enter_context(part.disable_adapter())
            yield

    @torch.inference_mode()
    def run_batch(self, reqs: list[GenRequest]) -> None:
        """One ``generate`` for the whole batch: each request's image goes through its own vision adapter
        and projector into its prompt's embeddings, the rows are left-padded together, and each row's
        LLM adapter is chosen per row (PEFT's mixed-adapter batch; the base where it has none)."""
        reqs = [r for r in reqs if not r.cancelled.is_set()]
        if not reqs:
            return
        with self.lock, torch.autocast(self.device.type, dtype=self.precision.autocast_dtype or torch.float32,
                                       enabled=self.precision.autocast_dtype is not None):
            self._generate(reqs)

    def _generate(self, reqs: list[GenRequest]) -> None:
        tok = self.tokenizer
        embeds = []
        for r in reqs:
            pixels = self.images(r.images).to(self.device) if r.images else None
            with self._use(r.model):
                embeds.append(self.model.embed(torch.tensor([r.prompt_ids], device=self.device), pixels)[0])
        width = max(e.shape[0] for e in embeds)
        emb = embeds[0].new_zeros((len(reqs), width, embeds[0].shape[-1]))
        mask = torch.zeros((len(reqs), width), dtype=torch.long, device=self.device)
        for i, e in enumerate(embeds):              # left padding: every row ends at the same column
            emb[i, width - e.shape[0]:] = e
            mask[i, width - e.shape[0]:] = 1
        kw: dict[str, Any] = {}
        if hasattr(self.model.llm, "peft_config"):
            kw["adapter_names"] = [r.model if self.entries[r.model]["llm"] else "__base__" for r in reqs]
        rows = RowStreams(reqs, tok)
        sampling = sampling_kwargs(reqs[0].params)
        if sampling["do_sample"] and reqs[0].seed is not None:
            torch.manual_seed(reqs[0].seed)
        self.model.llm.generate(inputs_embeds=emb, attention_mask=mask, **kw, **sampling,
                                max_new_tokens=max(r.params.max_new_tokens for r in reqs),
                                pad_token_id=tok.pad_token_id or 0, eos_token_id=None, streamer=rows.streamer(),
                                stopping_criteria=rows.stopping())


def _add_adapter(part: Any, path: Path, name: str) -> tuple[Any, bool]:
    """``part`` with the adapter at ``path`` loaded under ``name`` (wrapping it in PEFT the first time)."""
    if not path.is_dir():
        return part, False
    from peft import PeftModel

    if hasattr(part, "peft_config"):
        part.load_adapter(str(path), adapter_name=name)
        return part, True
    return PeftModel.from_pretrained(part, str(path), adapter_name=name), True
