"""The memory estimate as the app shows it beside Start: the recipe loaded as `tunedeck train` loads
it, estimated for the GPUs it would run on (engine/train/estimate.py does the counting)."""

from __future__ import annotations

from pathlib import Path

from engine.core.errors import UserError
from engine.core.gpus import list_gpus
from engine.core.tree import human_size
from engine.recipe.catalogue import deepspeed_config_path
from engine.recipe.paths import resolve_paths
from engine.recipe.schema import Recipe, load_recipe
from engine.train.estimate import GIB, estimate_recipe, fit_on
from engine.train.launch import config_path


def recipe_to_estimate(config: str | Path, base_dir: Path, overrides: list[str] | None = None,
                       deepspeed: str | None = None) -> Recipe:
    """The recipe as `tunedeck train` would run it: overrides and the DeepSpeed choice applied, its
    paths resolved against ``base_dir``."""
    overrides = list(overrides or [])
    if deepspeed and deepspeed != "none":
        deepspeed_config_path(deepspeed)
        overrides.append(f"deepspeed={deepspeed.removeprefix('deepspeed_')}")
    return resolve_paths(load_recipe(config_path(str(config)), overrides)[1], base_dir)


def fit_line(config: str | Path, base_dir: Path, devices: list[int] | None = None,
             deepspeed: str | None = None) -> tuple[str, bool | None]:
    """One line for the app's start row: the estimated peak and whether it fits the chosen GPUs
    (True / False; None where there is no GPU to check or no estimate)."""
    try:
        recipe = recipe_to_estimate(config, base_dir, deepspeed=deepspeed)
        gpus = list_gpus(devices)
        world = len(devices) if devices else 1
        if not gpus:
            est = estimate_recipe(recipe, None, world)
            return f"memory: ≈{human_size(est.peak_bytes)}B peak on a GPU (no GPU here to check)", None
        fits = fit_on(recipe, gpus, world)
    except UserError as e:
        return f"memory estimate: {e}", None
    bad = [(g, e) for g, e in fits if not e.fits(g.free_bytes)]
    worst = max((e for _, e in fits), key=lambda e: e.peak_bytes)
    if bad:
        g, e = bad[0]
        return (f"memory: ≈{human_size(e.peak_bytes)}B peak: does NOT fit GPU {g.index} "
                f"({g.free_bytes / GIB:.1f} GiB free)"), False
    names = ",".join(str(g.index) for g, _ in fits)
    free = min(g.free_bytes for g, _ in fits) / GIB
    return f"memory: ≈{human_size(worst.peak_bytes)}B peak: fits GPU {names} ({free:.0f} GiB free)", True
