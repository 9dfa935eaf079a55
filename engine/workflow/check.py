"""``tunedeck data check``: what a recipe's data becomes before any training: records, token lengths,
truncation, and the first samples with their untrained spans marked (LLaVA records with their images
opened and counted as image positions)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.core.errors import UserError
from engine.data.packing import TokenizedData


@dataclass
class DataReport:
    data_path: str
    template: str
    max_length: int
    data: TokenizedData
    tokenizer: Any
    images: int | None = None            # LLaVA: records with an image
    image_positions: int = 0             # LLaVA: what one image costs, in positions
    stats: dict[str, float] = field(default_factory=dict)

    def first_sample(self) -> str:
        """The first sample as text, untrained spans in ⟦ ⟧ (an image shown as its positions)."""
        from engine.data.preview import render_masked

        if not self.data.samples:
            return ""
        prefix = f"[image → {self.image_positions} positions] " if self.image_positions else ""
        return prefix + render_masked(self.tokenizer, *self.data.samples[0])

    def as_json(self) -> dict[str, Any]:
        from engine.data.preview import length_histogram, masked_segments

        return {"data_path": self.data_path, "records": self.data.n_records, "template": self.template,
                "length": self.stats, "truncated": self.data.n_truncated, "dropped": self.data.n_dropped,
                "max_length": self.max_length, "histogram": length_histogram(self.data.lengths),
                "samples": [masked_segments(self.tokenizer, *x) for x in self.data.samples[:3]],
                "images": self.images}


def check_data(config: str, overrides: list[str]) -> DataReport:
    from engine.data.templates import resolve_template_name
    from engine.model.loading import load_tokenizer
    from engine.recipe.paths import resolve_paths
    from engine.recipe.schema import load_recipe
    from engine.train.launch import config_path

    _, recipe = load_recipe(config_path(config), overrides)
    recipe = resolve_paths(recipe, Path.cwd())
    tok = load_tokenizer(recipe.model.path, recipe.model.trust_remote_code)
    template = resolve_template_name(recipe.data.prompt_template, tok)
    images, positions = None, 0
    if recipe.llava.enabled:
        from engine.llava.model import load_llava_records, text_part, tokenize_llava, vision_shape

        if not recipe.llava.visual_encoder:
            raise UserError("llava.visual_encoder: empty; give the CLIP vision model directory")
        _, positions = vision_shape(recipe.llava.visual_encoder)
        records = load_llava_records(recipe.data.data_path, recipe.llava.image_folder)
        samples, data = tokenize_llava(records, tok, template, positions, recipe.data.max_length, recipe.data.system)
        data.samples = [text_part(x) for x in samples]
        images = sum(x.image is not None for x in samples)
        if not (samples and samples[0].image):
            positions = 0
    else:
        from engine.data.formats import load_conversations
        from engine.data.packing import tokenize_conversations

        convs = load_conversations(recipe.data.data_path, recipe.data.format)
        if recipe.data.system:
            convs = [c if c[0]["role"] == "system" else [{"role": "system", "content": recipe.data.system}, *c]
                     for c in convs]
        data = tokenize_conversations(convs, tok, template, recipe.data.max_length)
    return DataReport(recipe.data.data_path, template, recipe.data.max_length, data, tok, images, positions,
                      data.stats())
