"""The built-in recipes under configs/, by model family (XTuner's list-cfg / copy-cfg)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from engine.core.errors import UserError

CONFIG_ROOT = Path(__file__).resolve().parents[2] / "configs"
COPIED_FROM = "# copied from the tunedeck recipe "


@dataclass(frozen=True)
class CatalogueEntry:
    name: str
    family: str
    path: Path


def recipes(root: Path = CONFIG_ROOT) -> list[CatalogueEntry]:
    out = [CatalogueEntry(p.stem, p.parent.name, p) for p in root.glob("*/*.yaml")]
    return sorted(out, key=lambda e: (e.family, e.name))


def list_cfg(pattern: str | None = None, root: Path = CONFIG_ROOT) -> list[CatalogueEntry]:
    """Recipes whose name contains ``pattern`` (case-insensitive; a regex is allowed too)."""
    entries = recipes(root)
    if not pattern:
        return entries
    try:
        rx = re.compile(pattern, re.IGNORECASE)
    except re.error:
        rx = re.compile(re.escape(pattern), re.IGNORECASE)
    return [e for e in entries if rx.search(e.name) or pattern.lower() in e.name.lower()]


def find(name: str, root: Path = CONFIG_ROOT) -> CatalogueEntry:
    for e in recipes(root):
        if e.name == name or e.name == name.removesuffix(".yaml"):
            return e
    close = [e.name for e in list_cfg(name.split("_")[0], root)][:5]
    hint = f"; similar: {', '.join(close)}" if close else "; `tunedeck list-cfg` lists them"
    raise UserError(f"{name}: no such recipe{hint}")


def deepspeed_config_path(name: str, root: Path = CONFIG_ROOT) -> Path:
    name = name.removeprefix("deepspeed_")
    p = root / "deepspeed" / f"{name}.json"
    if not p.is_file():
        choices = sorted(q.stem for q in (root / "deepspeed").glob("*.json"))
        raise UserError(f"--deepspeed {name}: unknown; choose one of: {', '.join(choices)}")
    return p


def recipe_stem(name: str, what: str = "--as") -> str:
    """A recipe's file name without .yaml, as typed: letters, digits, _ . - only, so it names a file in
    the folder it is saved in and nowhere else (no folders, no ``..``, no leading dot)."""
    stem = name.strip().removesuffix(".yaml") if name else ""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", stem) or ".." in stem:
        raise UserError(f"{what}: {name!r} is not a recipe name (letters, digits, _ . - only; no folders); "
                        "give a name like my_recipe")
    return stem


def copy_cfg(name: str, dest_dir: str | Path, new_name: str | None = None) -> Path:
    """Write DIR/NAME_copy.yaml (or DIR/NEW_NAME.yaml); never overwrites."""
    entry = find(name)
    dest = Path(dest_dir)
    if dest.exists() and not dest.is_dir():
        raise UserError(f"{dest}: not a directory")
    target = dest / f"{recipe_stem(new_name or f'{entry.name}_copy')}.yaml"
    if target.exists():
        raise UserError(f"{target}: already exists; not overwritten")
    text = entry.path.read_text(encoding="utf-8")
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with open(target, "x", encoding="utf-8") as f:       # never overwrites, even in a race
            f.write(f"{COPIED_FROM}{entry.name}\n{text}")
    except FileExistsError:
        raise UserError(f"{target}: already exists; not overwritten") from None
    return target


def copied_from(path: Path) -> str | None:
    """The built-in recipe a workspace recipe was copied from (copy-cfg's first-line comment)."""
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline().strip()
    except OSError:
        return None
    return first[len(COPIED_FROM):].strip() or None if first.startswith(COPIED_FROM) else None
