"""``tunedeck demo --llava``: the LLaVA half of the tutorial on a tiny synthetic task, offline, on the CPU.

Images are coloured shapes drawn with Pillow; questions ask for the colour, the shape or where it
is. A tiny CLIP vision tower and a tiny LLM laid out as internlm2-chat-1_8b ships (both random init,
made here) go through both stages:
pretrain (projector only, on captions) and finetune (projector + LLM QLoRA + vision LoRA, on
questions), and both are scored on held-out images.

DIR/models/tiny-chat-vl, DIR/models/tiny-clip    the models
DIR/data/shapes/                                 images, pretrain.json, finetune.json, heldout.json
DIR/configs/llava_pretrain.yaml, llava_finetune.yaml
DIR/work_dirs/llava_pretrain*/, llava_finetune*/
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from engine.recipe.catalogue import find

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
SHAPES = ("circle", "square", "triangle")
PLACES = ("left", "right", "top", "bottom")
QUESTIONS = {"colour": "What colour is the shape?", "shape": "What shape is it?",
             "place": "Where is the shape?"}
CAPTION_PROMPT = "Describe the image."
IMAGE_SIZE = 32
PRETRAIN_RECIPE = "demo_tiny_llava_pretrain"
FINETUNE_RECIPE = "demo_tiny_llava_finetune"
LEARNED_ACCURACY = 0.9      # held-out accuracy the finetuned model must reach
LEARNED_GAIN = 0.4          # and how far above the pretrain-only model it must be


def draw(colour: str, shape: str, place: str, rng: random.Random):
    """One IMAGE_SIZE² picture: a shape of that colour in that part of a light background."""
    from PIL import Image, ImageDraw

    s = IMAGE_SIZE
    bg = tuple(rng.randint(225, 255) for _ in range(3))
    im = Image.new("RGB", (s, s), bg)
    d = ImageDraw.Draw(im)
    r = rng.randint(7, 9)
    cx = {"left": s // 4, "right": 3 * s // 4}.get(place, s // 2) + rng.randint(-2, 2)
    cy = {"top": s // 4, "bottom": 3 * s // 4}.get(place, s // 2) + rng.randint(-2, 2)
    fill = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLOURS[colour])
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return im


def caption(colour: str, shape: str, place: str) -> str:
    return f"a {colour} {shape} at the {place}"


def make_images(folder: Path, n: int, seed: int, prefix: str) -> list[dict]:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        c, sh, pl = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(PLACES)
        name = f"{prefix}_{i:04d}.png"
        draw(c, sh, pl, rng).save(folder / name)
        items.append({"image": name, "colour": c, "shape": sh, "place": pl})
    return items


def _record(image: str, question: str, reply: str, rid: str) -> dict:
    return {"id": rid, "image": image,
            "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": reply}]}


def build_data(data_dir: Path, n_train: int = 600, n_heldout: int = 40) -> dict[str, Path]:
    """Images and the three LLaVA JSON files (pretrain captions, finetune questions, held-out set)."""
    images = data_dir / "images"
    train = make_images(images, n_train, 1, "train")
    heldout = make_images(images, n_heldout, 2, "heldout")
    pretrain = [_record(it["image"], CAPTION_PROMPT, caption(it["colour"], it["shape"], it["place"]), f"p{i}")
                for i, it in enumerate(train)]
    finetune = []
    for i, it in enumerate(train):
        for key, q in QUESTIONS.items():
            finetune.append(_record(it["image"], q, it[key], f"f{i}{key}"))
    finetune += [{"id": f"t{i}", "conversations": [{"from": "human", "value": "What can you do?"},
                                                   {"from": "gpt", "value": "I answer questions about shapes."}]}
                 for i in range(20)]                             # text-only samples mixed in
    paths = {"pretrain": data_dir / "pretrain.json", "finetune": data_dir / "finetune.json",
             "heldout": data_dir / "heldout.json"}
    paths["pretrain"].write_text(json.dumps(pretrain, indent=1))
    paths["finetune"].write_text(json.dumps(finetune, indent=1))
    paths["heldout"].write_text(json.dumps(heldout, indent=1))
    return paths


def vocabulary() -> list[str]:
    words = [*COLOURS, *SHAPES, *PLACES, *QUESTIONS.values(), CAPTION_PROMPT, "What can you do?",
             "I answer questions about shapes.", "<image>"]
    return words + [caption(c, s, p) for c in COLOURS for s in SHAPES for p in PLACES]


def build_tiny_vision(out_dir: Path, seed: int = 0) -> Path:
    """A random-init CLIP vision tower (IMAGE_SIZE² pixels, 4×4 patches of 8) and its processor."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=8, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, projection_dim=64)
    torch.manual_seed(seed)
    CLIPVisionModel(cfg).save_pretrained(str(out_dir), safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                       crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(str(out_dir))
    return out_dir


def prepare_workspace(workspace: Path) -> dict[str, Path]:
    """Models, data and the two recipes; what exists is reused, never overwritten."""
    from engine.model.tiny import build_tiny_internlm2

    out: dict[str, Path] = {"llm": workspace / "models" / "tiny-chat-vl", "vit": workspace / "models" / "tiny-clip"}
    if not (out["llm"] / "config.json").is_file():
        print(f"building a tiny LLM in {out['llm']}", flush=True)
        build_tiny_internlm2(out["llm"], extra_texts=vocabulary())
    if not (out["vit"] / "config.json").is_file():
        print(f"building a tiny CLIP vision tower in {out['vit']}", flush=True)
        build_tiny_vision(out["vit"])
    data_dir = workspace / "data" / "shapes"
    if not (data_dir / "heldout.json").is_file():
        print(f"drawing the shapes dataset in {data_dir}", flush=True)
        build_data(data_dir)
    out |= {"pretrain_data": data_dir / "pretrain.json", "finetune_data": data_dir / "finetune.json",
            "heldout": data_dir / "heldout.json", "images": data_dir / "images"}
    for key, name in (("pretrain_recipe", PRETRAIN_RECIPE), ("finetune_recipe", FINETUNE_RECIPE)):
        path = workspace / "configs" / f"{name.removeprefix('demo_tiny_')}.yaml"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(find(name).path.read_text(encoding="utf-8"), encoding="utf-8")
        out[key] = path
    return out


def score(llm: Path, vit: Path, llava_dir: Path, heldout: Path, images: Path) -> tuple[float, list[dict]]:
    """Accuracy on the held-out images: every question, greedy, the first word of the answer."""
    from engine.llava.model import answer, load_llava_for_inference

    model, tok, proc, template = load_llava_for_inference(str(llm), str(vit), llava_dir, device="cpu")
    items = json.loads(heldout.read_text())
    rows = []
    for it in items:
        image = proc.open(images / it["image"])
        for key, q in QUESTIONS.items():
            got = answer(model, tok, proc, template, q, image, max_new_tokens=8)
            first = (got.split() or [""])[0].strip(".,").lower()
            rows.append({"image": it["image"], "question": q, "want": it[key], "got": got, "ok": first == it[key]})
    return sum(r["ok"] for r in rows) / len(rows), rows


def run_llava_demo(workspace: Path) -> int:
    from engine.llava.train import LlavaTrainer
    from engine.train.launch import prepare_run, train_here

    workspace = workspace.resolve()
    p = prepare_workspace(workspace)
    common = [f"model.path={p['llm']}", f"llava.visual_encoder={p['vit']}", f"llava.image_folder={p['images']}"]
    run_pre, _, _ = prepare_run(str(p["pretrain_recipe"]), common + [f"data.data_path={p['pretrain_data']}"],
                                work_dir=None, resume=None, deepspeed=None, base_dir=workspace)
    print(f"pretrain (projector only) -> {run_pre}", flush=True)
    if (rc := train_here(run_pre, trainer_for=lambda _: LlavaTrainer)) != 0:
        return rc
    run_ft, _, _ = prepare_run(str(p["finetune_recipe"]), common + [f"data.data_path={p['finetune_data']}",
                                                                     f"llava.pretrained_pth={run_pre}"],
                               work_dir=None, resume=None, deepspeed=None, base_dir=workspace)
    print(f"finetune (projector + LLM QLoRA + vision LoRA) -> {run_ft}", flush=True)
    if (rc := train_here(run_ft, trainer_for=lambda _: LlavaTrainer)) != 0:
        return rc
    before, _ = score(p["llm"], p["vit"], run_pre, p["heldout"], p["images"])
    after, rows = score(p["llm"], p["vit"], run_ft, p["heldout"], p["images"])
    print()
    print(f"held-out accuracy before finetune (pretrain projector only): {before:.1%}")
    print(f"held-out accuracy after finetune:                            {after:.1%}")
    ex = rows[0]
    print(f"e.g. {ex['image']}: {ex['question']} -> {ex['got']!r} (truth {ex['want']})")
    (workspace / "llava_demo_scores.json").write_text(json.dumps({"before": before, "after": after}) + "\n")
    learned, verdict = accuracy_verdict(before, after)
    print(verdict)
    print()
    if not learned:
        print(f"the LLaVA demo did not learn what it should on this machine: read {run_ft / 'train.log'} (the "
              "loss curve and the evaluation answers); `make test` runs the checks that tell which part broke",
              flush=True)
        return 1
    print(f"chat about an image:  tunedeck chat {p['llm']} --visual-encoder {p['vit']} --llava {run_ft} "
          f"--image {p['images'] / ex['image']}")
    return 0


def accuracy_verdict(before: float, after: float) -> tuple[bool, str]:
    """Whether the LLaVA demo learned: held-out accuracy after finetune at least LEARNED_ACCURACY and
    LEARNED_GAIN above the pretrain-only model's."""
    if after >= LEARNED_ACCURACY and after - before >= LEARNED_GAIN:
        return True, (f"verdict: learned -- {after:.1%} held-out after finetune (needs {LEARNED_ACCURACY:.0%}), "
                      f"{after - before:+.1%} over the pretrain-only model (needs +{LEARNED_GAIN:.0%})")
    return False, (f"verdict: NOT learned -- {after:.1%} held-out after finetune (needs {LEARNED_ACCURACY:.0%}), "
                   f"{after - before:+.1%} over the pretrain-only model (needs +{LEARNED_GAIN:.0%})")
