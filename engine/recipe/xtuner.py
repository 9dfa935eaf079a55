"""An XTuner (v0.1.x, mmengine-style) Python config read as data: its syntax tree is walked and the
top-level assignments are evaluated over literals, names already assigned, arithmetic and ``dict(...)``;
nothing in the file is ever executed (no import runs, no call but dict/int/float/str/list/tuple/min/max
happens). The values then map onto tunedeck's recipe schema; whatever has no place there is listed, one
line each, instead of being dropped."""

from __future__ import annotations

import ast
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.core.errors import UserError


@dataclass(frozen=True)
class Sym:
    """A name the config imports or reaches through attributes (AdamW, PROMPT_TEMPLATE.default, torch.float16)."""
    name: str

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Unknown:
    """An expression that would need running the config (a call, a comparison, a conditional)."""
    source: str

    def __str__(self) -> str:
        return f"<{self.source}>"


_BIN = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow, ast.Mod: operator.mod}
_PURE_CALLS = {"dict": dict, "int": int, "float": float, "str": str, "list": list, "tuple": tuple, "min": min,
               "max": max, "bool": bool}
# XTuner's SYSTEM_TEMPLATE texts (xtuner/utils/templates.py), by name
SYSTEM_TEMPLATES = {
    "alpaca": "Below is an instruction that describes a task. Write a response that appropriately completes "
              "the request.\n",
    "moss_sft": "You are an AI assistant whose name is MOSS.\n",
}
# XTuner's PROMPT_TEMPLATE names -> tunedeck's template names
TEMPLATES = {"default": "default", "internlm2_chat": "internlm2_chat", "internlm_chat": "internlm2_chat",
             "llama3_chat": "llama3_chat", "qwen_chat": "qwen_chat", "chatml": "qwen_chat"}
MAP_FNS = {"openai_map_fn": "openai", "alpaca_map_fn": "alpaca", "alpaca_zh_map_fn": "alpaca",
           "llava_map_fn": "sharegpt"}
OPTIMIZERS = {"AdamW": "adamw", "PagedAdamW8bit": "paged_adamw_8bit", "AdamW8bit": "adamw_8bit"}


class _Reader:
    def __init__(self, path: Path, text: str):
        self.path, self.text = path, text
        self.env: dict[str, Any] = {}
        self.lines: dict[str, int] = {}
        self.skipped: list[str] = []           # statements that were not assignments

    def where(self, node: ast.AST) -> str:
        return f"{self.path}:{getattr(node, 'lineno', '?')}"

    def value(self, node: ast.expr) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return self.env.get(node.id, Sym(node.id))
        if isinstance(node, ast.Attribute):
            base = self.value(node.value)
            return Sym(f"{base}.{node.attr}") if isinstance(base, Sym) else Unknown(ast.unparse(node))
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [self.value(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.Dict):
            return {self.value(k): self.value(v) for k, v in zip(node.keys, node.values) if k is not None}
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = self.value(node.operand)
            if isinstance(v, (int, float)):
                return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in _BIN:
            a, b = self.value(node.left), self.value(node.right)
            ok = (isinstance(a, (int, float)) and isinstance(b, (int, float))) or (
                isinstance(node.op, ast.Add) and isinstance(a, str) and isinstance(b, str))
            if ok:
                try:
                    return _BIN[type(node.op)](a, b)
                except (ArithmeticError, ValueError):
                    pass
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _PURE_CALLS \
                and node.func.id not in self.env:
            args = [self.value(a) for a in node.args]
            kwargs = {k.arg: self.value(k.value) for k in node.keywords if k.arg}
            if node.func.id == "dict":
                return {**(args[0] if args and isinstance(args[0], dict) else {}), **kwargs}
            if all(not isinstance(a, (Sym, Unknown)) for a in args) and not kwargs:
                try:
                    return _PURE_CALLS[node.func.id](*args)
                except (TypeError, ValueError):
                    pass
        return Unknown(ast.unparse(node))

    def read(self) -> None:
        try:
            tree = ast.parse(self.text, filename=str(self.path))
        except SyntaxError as e:
            raise UserError(f"{self.path}:{e.lineno}: not Python ({e.msg})") from None
        for st in tree.body:
            if isinstance(st, (ast.Import, ast.ImportFrom)):
                for alias in st.names:
                    name = alias.asname or alias.name.split(".")[0]
                    self.env[name] = Sym(alias.name if isinstance(st, ast.Import) else alias.name)
            elif isinstance(st, ast.Assign):
                v = self.value(st.value)
                for t in st.targets:
                    if isinstance(t, ast.Name):
                        self.env[t.id] = v
                        self.lines[t.id] = st.lineno
                    else:
                        self.skipped.append(f"{self.where(st)}: {ast.unparse(st)[:80]} (not a plain assignment)")
            elif isinstance(st, ast.AugAssign) and isinstance(st.target, ast.Name):
                cur = self.env.get(st.target.id)
                new = self.value(ast.BinOp(left=ast.Constant(cur), op=st.op, right=st.value)) \
                    if isinstance(cur, (int, float)) else Unknown(ast.unparse(st))
                self.env[st.target.id] = new
            elif isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant):
                continue                                      # a docstring
            else:
                first = ast.unparse(st).splitlines()[0]
                self.skipped.append(f"{self.where(st)}: {first[:80]} (not evaluated: the config is never run)")


@dataclass
class Imported:
    recipe: dict[str, dict[str, Any]]
    unmapped: list[str] = field(default_factory=list)        # one line each
    notes: list[str] = field(default_factory=list)


def _member(v: Any, table: str) -> str | None:
    """``name`` when ``v`` is the imported ``TABLE.name`` (PROMPT_TEMPLATE.default), else None."""
    return str(v).split(".", 1)[1] if isinstance(v, Sym) and str(v).startswith(table + ".") else None


def _type(d: Any) -> str:
    return str(d.get("type", "")).rsplit(".", 1)[-1] if isinstance(d, dict) else ""


def import_xtuner(path: str | Path, deepspeed: str | None = None) -> Imported:
    """The recipe (as a dict of sections) an XTuner config describes, with what could not be mapped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the XTuner config ({getattr(e, 'strerror', None) or e})") from None
    rd = _Reader(path, text)
    rd.read()
    env = rd.env
    used: set[str] = set()
    unmapped: list[str] = list(rd.skipped)
    notes: list[str] = []
    out: dict[str, dict[str, Any]] = {"model": {}, "lora": {}, "data": {}, "train": {}}
    m, lo, d, t = out["model"], out["lora"], out["data"], out["train"]

    def take(name: str) -> Any:
        used.add(name)
        return env.get(name)

    def plain(v: Any) -> bool:
        return v is not None and not isinstance(v, (Sym, Unknown))

    def leftover(prefix: str, dct: dict, consumed: set[str]) -> None:
        for k, v in dct.items():
            if k not in consumed and k != "type":
                unmapped.append(f"{prefix}.{k} = {v!s:.60} (no tunedeck setting)")

    model = take("model") if isinstance(env.get("model"), dict) else {}
    llava = _type(model) == "LLaVAModel"
    llm = model.get("llm", {}) if isinstance(model.get("llm"), dict) else {}
    # ---- the model
    path_value = llm.get("pretrained_model_name_or_path")
    for name in ("pretrained_model_name_or_path", "llm_name_or_path"):
        if name in env:
            used.add(name)
    if plain(path_value):
        m["path"] = path_value
    dtype = str(llm.get("torch_dtype", ""))
    if dtype.startswith("torch."):
        m["dtype"] = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}.get(dtype[6:], "auto")
    if llm.get("trust_remote_code"):
        notes.append("model: trust_remote_code=True not carried over: tunedeck loads InternLM2 natively, its own "
                     "code is never run")
    q = llm.get("quantization_config")
    if isinstance(q, dict):
        m["quantization"] = "4bit" if q.get("load_in_4bit") else "8bit" if q.get("load_in_8bit") else "none"
        if plain(q.get("bnb_4bit_quant_type")):
            m["quant_type"] = q["bnb_4bit_quant_type"]
        if "bnb_4bit_use_double_quant" in q:
            m["double_quant"] = bool(q["bnb_4bit_use_double_quant"])
        compute = str(q.get("bnb_4bit_compute_dtype", ""))
        if compute.startswith("torch.") and dtype and compute != dtype:
            unmapped.append(f"model.llm.quantization_config.bnb_4bit_compute_dtype = {compute} (tunedeck computes "
                            "in the training precision)")
        leftover("model.llm.quantization_config", q, {"load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type",
                                                      "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype",
                                                      "llm_int8_threshold", "llm_int8_has_fp16_weight"})
    else:
        m["quantization"] = "none"
    leftover("model.llm", llm, {"pretrained_model_name_or_path", "trust_remote_code", "torch_dtype",
                                "quantization_config"})
    lora = model.get("llm_lora" if llava else "lora")
    if isinstance(lora, dict):
        lo["enabled"] = True
        for src, dst in (("r", "r"), ("lora_alpha", "alpha"), ("lora_dropout", "dropout"), ("bias", "bias"),
                         ("target_modules", "target_modules")):
            if plain(lora.get(src)):
                lo[dst] = lora[src]
        leftover("model." + ("llm_lora" if llava else "lora"), lora,
                 {"r", "lora_alpha", "lora_dropout", "bias", "target_modules", "task_type"})
    else:
        lo["enabled"] = False
    # XTuner's SupervisedFinetune and LLaVAModel checkpoint activations unless told not to
    m["gradient_checkpointing"] = bool(model.get("use_activation_checkpointing", True))
    consumed_model = {"use_activation_checkpointing", "llm", "lora", "llm_lora", "use_varlen_attn", "visual_encoder",
                      "visual_encoder_lora",
                      "freeze_llm", "freeze_visual_encoder", "pretrained_pth"}
    leftover("model", model, consumed_model)
    # ---- the data
    loader = take("train_dataloader") if isinstance(env.get("train_dataloader"), dict) else {}
    ds = loader.get("dataset", {}) if isinstance(loader.get("dataset"), dict) else {}
    for name, v in env.items():                    # the dataset dict is also a top-level name (alpaca_en)
        if v is ds and ds:
            used.add(name)
    hf = ds.get("dataset") if isinstance(ds.get("dataset"), dict) else None
    data_path = ds.get("data_path")
    if hf is not None:
        files = hf.get("data_files")
        data_path = (files.get("train") if isinstance(files, dict) else files) if hf.get("path") in (
            "json", "jsonl") else hf.get("path")
    if plain(data_path):
        d["data_path"] = data_path
    for name in ("alpaca_en_path", "data_path", "data_root", "image_folder"):
        if name in env:
            used.add(name)
    map_fn = str(ds.get("dataset_map_fn", ""))
    if map_fn in MAP_FNS:
        d["format"] = MAP_FNS[map_fn]
    elif map_fn and map_fn != "None":
        unmapped.append(f"dataset_map_fn = {map_fn} (no tunedeck format: openai, alpaca or sharegpt records)")
    tmpl = ds.get("template_map_fn", {}).get("template") if isinstance(ds.get("template_map_fn"), dict) else None
    tmpl = tmpl or take("prompt_template")
    used.add("prompt_template")
    name = _member(tmpl, "PROMPT_TEMPLATE")
    if name is not None:
        if name in TEMPLATES:
            d["prompt_template"] = TEMPLATES[name]
        else:
            unmapped.append(f"prompt_template = {tmpl} (no tunedeck template of that name)")
    for src in ("max_length", "pack_to_max_length", "use_varlen_attn"):
        v = ds.get(src, env.get(src))
        used.add(src)
        if plain(v):
            d[src] = v
    if "dataloader_num_workers" in env or plain(loader.get("num_workers")):
        d["dataloader_num_workers"] = loader.get("num_workers", take("dataloader_num_workers"))
        used.add("dataloader_num_workers")
    sampler = loader.get("sampler") if isinstance(loader.get("sampler"), dict) else {}
    if "shuffle" in sampler:
        d["shuffle"] = bool(sampler["shuffle"])
    leftover("train_dataloader.dataset", ds, {
        "tokenizer", "image_processor", "dataset", "data_path", "image_folder", "dataset_map_fn", "template_map_fn",
        "max_length", "pack_to_max_length", "use_varlen_attn", "pad_image_to_square", "remove_unused_columns",
        "shuffle_before_pack"})
    system = take("SYSTEM")
    key = _member(system, "SYSTEM_TEMPLATE")
    if key is not None:
        if key in SYSTEM_TEMPLATES:
            d["system"] = SYSTEM_TEMPLATES[key]
        else:
            unmapped.append(f"SYSTEM = {system} (its text is not known here; set data.system)")
    elif isinstance(system, str):
        d["system"] = system
    # ---- training
    for name in ("batch_size", "accumulative_counts", "max_epochs", "lr", "weight_decay", "max_norm",
                 "warmup_ratio", "save_steps", "save_total_limit", "evaluation_freq", "evaluation_inputs",
                 "sequence_parallel_size"):
        v = take(name)
        if plain(v):
            t[name] = list(v) if isinstance(v, tuple) else v
        elif name in env:
            unmapped.append(f"{name} = {v} (not a value without running the config)")
    if plain(env.get("betas")):
        t["betas"] = list(take("betas"))
    opt = take("optim_type")
    if opt is not None:
        key = str(opt).rsplit(".", 1)[-1]
        if key in OPTIMIZERS:
            t["optim_type"] = OPTIMIZERS[key]
        else:
            unmapped.append(f"optim_type = {opt} (tunedeck trains with AdamW, AdamW8bit or PagedAdamW8bit)")
    wrapper = take("optim_wrapper") if isinstance(env.get("optim_wrapper"), dict) else {}
    if wrapper.get("dtype") in ("float16", "bfloat16"):
        t["mixed_precision"] = "fp16" if wrapper["dtype"] == "float16" else "bf16"
    if _type(wrapper) and _type(wrapper) not in ("AmpOptimWrapper", "OptimWrapper"):
        unmapped.append(f"optim_wrapper.type = {wrapper['type']} (tunedeck's loop is AMP with dynamic loss scaling)")
    sched = take("param_scheduler")
    kinds = [_type(s) for s in sched] if isinstance(sched, list) else []
    if kinds and kinds != ["LinearLR", "CosineAnnealingLR"]:
        unmapped.append(f"param_scheduler = {kinds} (tunedeck schedules a linear warm-up then cosine decay to 0)")
    elif kinds:
        notes.append("param_scheduler: LinearLR warm-up then CosineAnnealingLR = tunedeck's warm-up + cosine")
    train_cfg = take("train_cfg")
    if isinstance(train_cfg, dict) and plain(train_cfg.get("max_iters")):
        t["max_steps"] = train_cfg["max_iters"]
    randomness = take("randomness")
    if isinstance(randomness, dict) and isinstance(randomness.get("seed"), int):
        t["seed"] = randomness["seed"]
    hooks = take("custom_hooks")
    for hook in hooks if isinstance(hooks, list) else []:
        if _type(hook) == "EvaluateChatHook":
            if isinstance(hook.get("every_n_iters"), int):
                t["evaluation_freq"] = hook["every_n_iters"]
            if isinstance(hook.get("evaluation_inputs"), list):
                t["evaluation_inputs"] = hook["evaluation_inputs"]
    for name in ("default_hooks", "env_cfg", "visualizer", "log_level", "load_from", "resume", "log_processor",
                 "tokenizer", "image_processor", "sampler", "launcher"):
        used.add(name)                  # the runtime's plumbing: tunedeck has its own logging, hooks and resume
    if deepspeed:
        t["deepspeed"] = deepspeed.removeprefix("deepspeed_")
    else:
        notes.append("XTuner picks DeepSpeed on its command line (--deepspeed deepspeed_zero2): pass the same "
                     "--deepspeed to import-xtuner or to tunedeck train")
    # ---- LLaVA
    if llava:
        lv: dict[str, Any] = {"enabled": True}
        out["llava"] = lv
        ve = model.get("visual_encoder", {})
        if isinstance(ve, dict) and plain(ve.get("pretrained_model_name_or_path")):
            lv["visual_encoder"] = ve["pretrained_model_name_or_path"]
        used.update({"visual_encoder_name_or_path", "pretrained_pth"})
        pth = model.get("pretrained_pth")
        lv["stage"] = "finetune" if isinstance(lora, dict) or pth else "pretrain"
        if plain(pth):
            lv["pretrained_pth"] = pth
            if str(pth).endswith(".pth"):
                notes.append(f"llava.pretrained_pth = {pth}: an XTuner .pth; tunedeck reads the projector of a "
                             "tunedeck pretrain run or checkpoint: point it at one")
        if plain(ds.get("image_folder")):
            lv["image_folder"] = ds["image_folder"]
        if "pad_image_to_square" in ds:
            lv["pad_image_to_square"] = bool(ds["pad_image_to_square"])
        vlora = model.get("visual_encoder_lora")
        lv["visual_encoder_lora"] = isinstance(vlora, dict)
        if isinstance(vlora, dict):
            for src, dst in (("r", "visual_encoder_lora_r"), ("lora_alpha", "visual_encoder_lora_alpha"),
                             ("lora_dropout", "visual_encoder_lora_dropout")):
                if plain(vlora.get(src)):
                    lv[dst] = vlora[src]
        images = take("evaluation_images")
        if images is not None:
            lv["evaluation_images"] = [images] if isinstance(images, str) else list(images)
            if any(str(i).startswith(("http://", "https://")) for i in lv["evaluation_images"]):
                notes.append("llava.evaluation_images: a URL; tunedeck evaluates on local images, give a file")
    for name in env:
        if name not in used and not isinstance(env[name], Sym):
            unmapped.append(f"{path}:{rd.lines.get(name, '?')}: {name} = {env[name]!s:.60} (no tunedeck setting)")
    return Imported(out, unmapped, notes)


def write_recipe(imported: Imported, source: Path, out: Path, force: bool = False) -> Path:
    """Validate the imported recipe against the schema and write it as YAML (never over a file unless
    ``force``); the lines that could not be mapped go in its header as comments."""
    import io

    from ruamel.yaml import YAML

    from engine.core.files import atomic_write_text
    from engine.recipe.schema import validate

    sections = {k: v for k, v in imported.recipe.items() if v}
    for key in ("path",):
        sections.setdefault("model", {}).setdefault(key, "")
    validate(sections, str(source))         # one line per problem, each naming its field
    if out.exists() and not force:
        raise UserError(f"{out}: exists; pass --force to overwrite it, or -o another file")
    buf = io.StringIO()
    yaml = YAML()
    yaml.default_flow_style = False
    yaml.dump(sections, buf)
    head = [f"# Imported from {source} by tunedeck import-xtuner (read as data; the config was not run)."]
    head += [f"# note: {n}" for n in imported.notes]
    head += [f"# not mapped: {u}" for u in imported.unmapped]
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "\n".join(head) + "\n" + buf.getvalue())
    return out
