"""A recipe's paths: relative ones resolved against the directory a command runs in (the run directory
stores them absolute, so resume and chat work from anywhere), and the local ones checked before
anything starts. Pure Python: the app's editor uses the same checks."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from engine.core.errors import UserError
from engine.core.files import model_dir_problem

if TYPE_CHECKING:
    from engine.recipe.schema import Recipe


def resolve_one(value: str, base_dir: Path) -> str:
    """A local path made absolute; a hub id (such as internlm/internlm2-chat-1_8b) left as it is."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    candidate = base_dir / p
    if candidate.exists() or value.startswith((".", "~")) or p.suffix in (".json", ".jsonl"):
        return str(candidate.resolve())
    return value


def resolve_paths(recipe: Recipe, base_dir: Path) -> Recipe:
    """The recipe with its model, data and LLaVA paths resolved against ``base_dir``."""
    lv = recipe.llava
    local = lambda v: str((base_dir / Path(v).expanduser()).resolve()) if v else v      # noqa: E731
    return recipe.model_copy(update={
        "model": recipe.model.model_copy(update={"path": resolve_one(recipe.model.path, base_dir)}),
        "data": recipe.data.model_copy(update={"data_path": resolve_one(recipe.data.data_path, base_dir)}),
        "llava": lv.model_copy(update={
            "visual_encoder": resolve_one(lv.visual_encoder, base_dir) if lv.visual_encoder else "",
            "pretrained_pth": local(lv.pretrained_pth), "image_folder": local(lv.image_folder),
            "evaluation_images": [local(v) for v in lv.evaluation_images]}),
    })


def local_path_problems(recipe: Recipe, pretrain_may_come_later: bool = False) -> list[str]:
    """The resolved recipe's local model, data and image paths that are not there, one line each. A LLaVA
    finetune's pretrain checkpoint is left out when it may come later (its pretrain queued ahead of it)."""
    out = [model_dir_problem("model.path", recipe.model.path)]
    data = recipe.data.data_path
    if data and Path(data).is_absolute() and not Path(data).is_file():
        out.append(f"data.data_path: {data!r}: "
                   + ("is a directory, not a data file" if Path(data).is_dir() else "no such data file"))
    lv = recipe.llava
    if lv.enabled:
        if lv.visual_encoder:
            out.append(model_dir_problem("llava.visual_encoder", lv.visual_encoder))
        if lv.image_folder and not Path(lv.image_folder).is_dir():
            out.append(f"llava.image_folder: {lv.image_folder!r}: no such directory")
        if lv.pretrained_pth and not pretrain_may_come_later and not Path(lv.pretrained_pth).exists():
            out.append(f"llava.pretrained_pth: {lv.pretrained_pth!r}: no such checkpoint")
    return [p for p in out if p]


def check_local_paths(recipe: Recipe, pretrain_may_come_later: bool = False) -> None:
    """The first of local_path_problems as the command's one-line error (exit 2), before anything starts."""
    problems = local_path_problems(recipe, pretrain_may_come_later)
    if problems:
        raise UserError(problems[0])
