"""``tunedeck chat --llava``: a conversation about one image with a LLaVA checkpoint, in this process."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from engine.core.errors import UserError
from engine.llava.model import IMAGE_TAG, answer, llava_checkpoint_dir, load_llava_for_inference, open_image


class LlavaChatSession:
    """Greedy answers about ``image`` (or text only), the history kept as the model saw it."""

    def __init__(self, llm: str, visual_encoder: str | None, checkpoint: str | None, image: str | None = None, *,
                 bits: int | None = None, template: str | None = None, system: str | None = None,
                 max_new_tokens: int = 512, trust_remote_code: bool = False):
        for opt, value in (("llava", checkpoint), ("visual-encoder", visual_encoder)):
            if not value:
                raise UserError(f"--{opt}: needed to chat about an image "
                                "(--visual-encoder VIT --llava CHECKPOINT --image FILE)")
        if image:
            open_image(image)                  # before minutes of model loading
        llava_checkpoint_dir(checkpoint)
        self.model, self.tokenizer, self.processor, found = load_llava_for_inference(
            llm, visual_encoder, checkpoint, bits={4: "4bit", 8: "8bit"}.get(bits, "none"),
            trust_remote_code=trust_remote_code)
        self.template = template or found
        self.system = system or ""
        self.max_new_tokens = max_new_tokens
        self.image: Any = self.processor.open(image) if image else None
        self.history: list[dict] = []

    def reset(self) -> None:
        self.history.clear()

    def answer(self, question: str) -> str:
        reply = answer(self.model, self.tokenizer, self.processor, self.template, question, self.image,
                       system=self.system, max_new_tokens=self.max_new_tokens, history=self.history)
        first = self.image is not None and not self.history
        self.history += [{"role": "user", "content": f"{IMAGE_TAG}\n{question}" if first else question},
                         {"role": "assistant", "content": reply}]
        return reply

    def ask(self, question: str) -> Iterator[str]:
        yield self.answer(question)
