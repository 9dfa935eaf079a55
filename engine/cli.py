"""``tunedeck``: every action as a CLI verb, XTuner's names where it has one.

Errors a user can cause print one line each and exit 2; nothing here prints a traceback
for them. Heavy imports (torch, transformers) happen inside the verbs that need them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import UserError
from .launch import _config_path, _release, _torchrun, _train_here, prepare_run, resolve_paths, start_detached
from .runlock import RunLock, claim


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one recipe field (repeatable), e.g. --set lr=1e-4")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tunedeck")
    except PackageNotFoundError:
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="tunedeck", description="Fine-tune language and vision-language models from the terminal: with no "
                                     "arguments, `tunedeck` opens the app in the current directory.")
    ap.add_argument("--version", action="version", version=f"tunedeck {_version()}")
    sub = ap.add_subparsers(dest="verb", metavar="VERB")

    p = sub.add_parser("list-cfg", help="list built-in recipes")
    p.add_argument("-p", "--pattern", help="only names matching PATTERN")

    p = sub.add_parser("copy-cfg", help="copy a built-in recipe to DIR/NAME_copy.yaml")
    p.add_argument("name", help="a built-in recipe (see list-cfg)")
    p.add_argument("dir", help="the folder to copy it into (made if missing)")
    p.add_argument("--as", dest="new_name", help="file name (without .yaml) instead of NAME_copy")

    p = sub.add_parser("data", help="make or check datasets")
    dsub = p.add_subparsers(dest="data_verb", metavar="ACTION")
    d = dsub.add_parser("identity", help="the seed's identity dataset (generate_data.py)")
    d.add_argument("--name", required=True, help="whose assistant the model is")
    d.add_argument("--n", type=int, default=10000, help="repetitions (n+1 records are written)")
    d.add_argument("--answer", default=None, help="the answer, with {name} where the name goes")
    d.add_argument("--varied", action="store_true", help="vary the question (Chinese and English phrasings)")
    d.add_argument("-o", "--output", required=True, help=".json (list, as the seed) or .jsonl")
    d.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    d = dsub.add_parser("repeat", help="repeat every record of a .json/.jsonl dataset N times (the seed's repeat.py)")
    d.add_argument("-i", "--input", required=True)
    d.add_argument("-o", "--output", required=True)
    d.add_argument("-n", "--n", type=int, required=True, help="times each record appears")
    d.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    d = dsub.add_parser("check", help="record count, token lengths, truncation, the first sample masked")
    d.add_argument("config")
    d.add_argument("--json", action="store_true", help="machine-readable: stats, length histogram, samples")
    _add_set(d)

    p = sub.add_parser("train", help="train a recipe")
    p.add_argument("config", help="a recipe file or a built-in recipe name")
    p.add_argument("--work-dir", help="run directory (default: work_dirs/<config name>, numbered if taken)")
    _add_set(p)
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CKPT",
                   help="continue the latest run (or a given checkpoint/run directory) at its exact step")
    p.add_argument("--deepspeed", help="zero1 | zero2 | zero3 | zero2_offload | zero3_offload")
    p.add_argument("--gpus", type=int, default=None,
                   help="GPUs to train on (data parallel, via torchrun); default: one per --devices entry, else 1")
    p.add_argument("--devices", help="which GPUs, e.g. 0 or 1,3 (sets CUDA_VISIBLE_DEVICES for the run)")
    p.add_argument("--detach", action="store_true", help="run in the background; print the run directory")
    p.add_argument("--force", action="store_true",
                   help="with --resume: continue even though the recipe differs from the run's own config.yaml")

    p = sub.add_parser("runs", help="list runs with state and progress")
    p.add_argument("--root", default="work_dirs", help="the folder the run directories are in")
    p.add_argument("--json", action="store_true", help="machine-readable: one object per run")

    p = sub.add_parser("stop", help="save a checkpoint and stop a running training")
    p.add_argument("run", help="run directory (or its name under --root)")
    p.add_argument("--root", default="work_dirs", help="the folder the run directories are in")
    p.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the checkpoint")

    p = sub.add_parser("chat", help="chat with a model, optionally with an adapter")
    p.add_argument("model", help="the base model's folder (or, with --url, a served name)")
    p.add_argument("--adapter", help="checkpoint or run directory (its latest checkpoint)")
    p.add_argument("--template", help="prompt template (default: what the run used, else auto)")
    p.add_argument("--system", help="system prompt (default: what the run used)")
    p.add_argument("--bits", type=int, choices=(4, 8), help="load the base in 4 or 8 bits")
    p.add_argument("--max-new-tokens", type=int, default=512, help="longest answer, in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the most likely tokens up "
                                                            "to this probability mass")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeating tokens")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--prompt", help="answer this once and exit")
    p.add_argument("--trust-remote-code", action="store_true", default=None)
    p.add_argument("--url", help="talk to a running `tunedeck serve` (MODEL is then a served name: base or an adapter)")
    p.add_argument("--api-key", default=argparse.SUPPRESS, help="bearer token for --url (default: $TUNEDECK_API_KEY)")
    p.add_argument("--visual-encoder", help="LLaVA: the CLIP vision model directory")
    p.add_argument("--llava", help="LLaVA: a pretrain or finetune checkpoint (or run) directory")
    p.add_argument("--image", help="LLaVA: the image the conversation is about")

    p = sub.add_parser("serve", help="OpenAI-compatible API and web chat: one base model, many adapters")
    p.add_argument("model", help="the base model's folder")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="serve a checkpoint or run directory as NAME (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--api-key", default=argparse.SUPPRESS,
                   help="require this bearer token (default: $TUNEDECK_API_KEY)")
    p.add_argument("--bits", type=int, choices=(4, 8))
    p.add_argument("--template", help="prompt template of the base (adapters bring their own)")
    p.add_argument("--system", help="system prompt of the base")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--no-warmup", action="store_true", help="skip compiling the GPU decode step at start")
    p.add_argument("--max-request-mb", type=float, default=32.0,
                   help="largest request body accepted (413 past it; default 32 MiB)")
    p.add_argument("--visual-encoder", help="LLaVA: the CLIP vision model directory")
    p.add_argument("--llava", action="append", default=[], metavar="NAME=DIR",
                   help="LLaVA: serve a pretrain or finetune checkpoint as NAME (repeatable; image_url parts)")

    p = sub.add_parser("merge", help="merge an adapter into its base model")
    p.add_argument("base", help="the base model's folder")
    p.add_argument("adapter", help="checkpoint or run directory")
    p.add_argument("out", help="the folder to write (must not exist or be empty)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the merge is computed")
    p.add_argument("--max-shard-size", default="2GB", help="largest weight file written (e.g. 2GB, 500MB)")
    p.add_argument("--format", default="auto", choices=("auto", "internlm2", "llama"),
                   help="auto: an InternLM2 base is written in InternLM2's own format (its code and tokenizer "
                        "files beside it), any other in transformers' layout; llama: transformers' Llama layout")

    p = sub.add_parser("export-adapter",
                       help="a LoRA adapter of an InternLM2 model in InternLM2's module names (wqkv, wo, w1-w3)")
    p.add_argument("adapter", help="checkpoint or run directory")
    p.add_argument("out", help="the folder to write (must not exist or be empty)")
    p.add_argument("--base", help="the InternLM2 model folder (default: the one the adapter was trained on)")

    p = sub.add_parser("export-llava", help="a LLaVA checkpoint as transformers' LlavaForConditionalGeneration")
    p.add_argument("llm", help="the language model's folder")
    p.add_argument("visual_encoder", help="the CLIP vision model's folder")
    p.add_argument("checkpoint", help="LLaVA checkpoint or run directory")
    p.add_argument("out", help="the folder to write")
    p.add_argument("--force", action="store_true", help="write into a non-empty OUT")

    p = sub.add_parser("tree", help="print a directory tree with sizes (follows symlinks)")
    p.add_argument("dir", nargs="?", default=".", help="the directory")

    p = sub.add_parser("demo", help="build the tiny demo workspace and fine-tune it on the CPU")
    p.add_argument("--dir", default="workspace", help="the demo workspace (made if missing; kept between runs)")
    p.add_argument("--name", default="tunedeck", help="whose assistant the demo model learns to be")
    p.add_argument("--no-tui", action="store_true", help="print the before/after answers and exit")
    p.add_argument("--llava", action="store_true",
                   help="the LLaVA half instead: shapes images, pretrain + finetune, accuracy before/after")

    for name, verb in sub.choices.items():       # every verb's --help starts with what it does
        action = next((a for a in sub._choices_actions if a.dest == name), None)
        if verb.description is None and action is not None:
            verb.description = action.help[:1].upper() + action.help[1:] + "."
        verb.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    return ap


def _worker_parser() -> argparse.ArgumentParser:
    """The detached / torchrun training process's own arguments (not a user-facing verb)."""
    p = argparse.ArgumentParser(prog="tunedeck _worker")
    p.add_argument("run_dir")
    p.add_argument("--resume-from")
    p.add_argument("--gpus", type=int, default=1)
    return p


def main(argv: list[str] | None = None) -> int:
    import warnings

    # the libraries' deprecation notices are for tunedeck's authors, not for the console
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|accelerate|torch)(\.|$)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["_worker"]:
        args = _worker_parser().parse_args(argv[1:])
        args.verb = "_worker"
    else:
        ap = build_parser()
        args = ap.parse_args(argv)
    if not args.verb:
        ap.print_help()
        return 0
    try:
        handler = VERBS[args.verb]
        if args.verb == "data" and not args.data_verb:
            raise UserError("data: choose an action: identity or check")
        return handler(args) or 0
    except UserError as e:
        for line in e.problems or [str(e)]:
            print(f"error: {line}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:            # a file the user named cannot be read or written: one line, no traceback
        if not e.filename:
            raise
        reason = e.strerror or str(e)
        if isinstance(e, FileExistsError) and Path(e.filename).is_file():
            reason = "is a file, not a folder"          # a folder was to be made where a file is
        print(f"error: {e.filename}: {reason}", file=sys.stderr)
        return 2


# ----------------------------------------------------------------------------- catalogue


def cmd_list_cfg(args) -> int:
    from .catalogue import list_cfg

    for e in list_cfg(args.pattern):
        print(e.name)
    return 0


def cmd_copy_cfg(args) -> int:
    from .catalogue import copy_cfg

    print(f"Copy to {copy_cfg(args.name, args.dir, args.new_name)}")
    return 0


# ----------------------------------------------------------------------------- data


def cmd_data(args) -> int:
    if args.data_verb == "identity":
        from .identity import DEFAULT_ANSWER, identity_records, write_identity

        recs = identity_records(args.name, args.n, args.answer or DEFAULT_ANSWER, args.varied)
        out = write_identity(args.output, recs, overwrite=args.force)
        print(f"wrote {len(recs)} records to {out}")
        return 0
    if args.data_verb == "repeat":
        from .data import read_records
        from .identity import write_identity

        if args.n < 1:
            raise UserError(f"-n: {args.n} is not allowed: must be >= 1")
        if Path(args.output).resolve() == Path(args.input).resolve():
            raise UserError(f"-o {args.output}: is the input; choose another file")
        records = read_records(args.input)
        out = write_identity(args.output, [r for r in records for _ in range(args.n)], overwrite=args.force)
        print(f"wrote {len(records) * args.n} records ({len(records)} × {args.n}) to {out}")
        return 0
    return cmd_data_check(args)


def cmd_data_check(args) -> int:
    from .config import load_recipe
    from .data import load_conversations, render_masked, tokenize_conversations

    cfg_path = _config_path(args.config)
    _, recipe = load_recipe(cfg_path, args.overrides)
    recipe = resolve_paths(recipe, Path.cwd())
    from .modeling import load_tokenizer
    from .templates import resolve_template_name

    tok = load_tokenizer(recipe.model.path, recipe.model.trust_remote_code)
    template = resolve_template_name(recipe.data.prompt_template, tok)
    prefix, images = "", None
    if recipe.llava.enabled:             # images checked, each one counted as its positions
        from .llava import load_llava_records, text_part, tokenize_llava, vision_shape

        if not recipe.llava.visual_encoder:
            raise UserError("llava.visual_encoder: empty; give the CLIP vision model directory")
        _, n_image = vision_shape(recipe.llava.visual_encoder)
        records = load_llava_records(recipe.data.data_path, recipe.llava.image_folder)
        llava_samples, data = tokenize_llava(records, tok, template, n_image, recipe.data.max_length,
                                             recipe.data.system)
        data.samples = [text_part(x) for x in llava_samples]
        images = sum(x.image is not None for x in llava_samples)
        prefix = f"[image → {n_image} positions] " if llava_samples and llava_samples[0].image else ""
    else:
        convs = load_conversations(recipe.data.data_path, recipe.data.format)
        if recipe.data.system:
            convs = [c if c[0]["role"] == "system" else [{"role": "system", "content": recipe.data.system}, *c]
                     for c in convs]
        data = tokenize_conversations(convs, tok, template, recipe.data.max_length)
    s = data.stats()
    if args.json:
        from .data import length_histogram, masked_segments

        print(json.dumps({"data_path": recipe.data.data_path, "records": data.n_records, "template": template,
                          "length": s, "truncated": data.n_truncated, "dropped": data.n_dropped,
                          "max_length": recipe.data.max_length, "histogram": length_histogram(data.lengths),
                          "samples": [masked_segments(tok, *x) for x in data.samples[:3]],
                          "images": images}, ensure_ascii=False))
        return 0
    print(f"data:      {recipe.data.data_path}")
    print(f"records:   {data.n_records}" + (f" ({images} with an image)" if images is not None else ""))
    print(f"template:  {template}")
    print(f"tokens:    min {s['min']}  mean {s['mean']}  median {s['median']}  p95 {s['p95']}  max {s['max']}")
    print(f"truncated: {data.n_truncated} of {data.n_records} longer than max_length {recipe.data.max_length}")
    if data.n_dropped:
        print(f"dropped:   {data.n_dropped} with no assistant token left after truncation")
    if data.samples:
        print("first sample (masked, untrained spans in ⟦ ⟧):")
        print(prefix + render_masked(tok, *data.samples[0]))
    return 0


# ----------------------------------------------------------------------------- training


def parse_devices(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        devices = [int(x) for x in text.split(",")]
    except ValueError:
        devices = []
    if not devices or any(d < 0 for d in devices) or len(set(devices)) != len(devices):
        raise UserError(f"--devices: {text!r} is not allowed: give GPU indices like 0 or 1,3")
    return devices


def cmd_train(args) -> int:
    devices = parse_devices(args.devices)
    if args.gpus is None:
        args.gpus = len(devices) if devices else 1
    if args.gpus < 1:
        raise UserError(f"--gpus: {args.gpus} is not allowed: must be >= 1")
    if devices is not None and args.gpus > len(devices):
        raise UserError(f"--gpus: {args.gpus} is more than the {len(devices)} GPU(s) in --devices {args.devices}")
    run_dir, ckpt, name = prepare_run(args.config, args.overrides, work_dir=args.work_dir, resume=args.resume,
                                      deepspeed=args.deepspeed, force=args.force)
    if devices is not None:              # this process's children (detached worker, torchrun ranks) inherit it
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, devices))
        os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"        # the numbering nvidia-smi and the TUI show
    from .runs import RunDirectory

    RunDirectory(run_dir).write_status(devices=devices)      # None: whatever the process can see
    if args.detach:
        proc = start_detached(run_dir, ckpt, args.gpus)
        print(run_dir)
        print(f"started pid {proc.pid}; follow with: tail -f {run_dir / 'train.log'}", file=sys.stderr)
        return 0
    if args.gpus > 1:
        try:
            return _torchrun(run_dir, ckpt, args.gpus)
        finally:
            _release(run_dir)
    return _train_here(run_dir, ckpt)


def cmd_worker(args) -> int:
    run_dir = Path(args.run_dir).resolve()
    ckpt = Path(args.resume_from) if args.resume_from else None
    if args.gpus > 1 and "LOCAL_RANK" not in os.environ:
        lock = RunLock.adopt(run_dir) or claim(run_dir)     # held while the ranks train
        try:
            return _torchrun(run_dir, ckpt, args.gpus)
        finally:
            lock.release()
    return _train_here(run_dir, ckpt)


def cmd_runs(args) -> int:
    from .runs import find_runs, format_eta, format_loss

    rows = [r.summary() for r in find_runs(args.root)]
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=1))
        return 0
    if not rows:
        print(f"no runs under {args.root}")
        return 0
    print(f"{'RUN':<40} {'STATE':<9} {'STEP':>11} {'LOSS':>8} {'ETA':>8}  INFO")
    for r in rows:
        prog = f"{r['step']}/{r['total_steps'] or '?'}"
        loss = format_loss(r["loss"])
        info = r["error"] if r["state"] == "failed" else (r["latest_checkpoint"] or "")
        eta = format_eta(r["eta_s"]) if r["state"] == "running" else "-"
        rel = os.path.relpath(r["run"])
        shown = r["run"] if rel.startswith("..") else rel
        print(f"{shown:<40} {r['state']:<9} {prog:>11} {loss:>8} {eta:>8}  {info}")
    return 0


def cmd_stop(args) -> int:
    from .runs import resolve_run

    run = resolve_run(args.run, args.root)
    st = run.request_stop(args.wait)
    latest = run.latest_checkpoint()
    print(f"{st.get('state')} at step {st.get('step')}; latest checkpoint: {latest or 'none'}")
    return 0 if st.get("state") in ("stopped", "finished") else 1


# ----------------------------------------------------------------------------- chat, merge, tree


def cmd_chat(args) -> int:
    from .generation import GenerationParams

    params = GenerationParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty)
    problems = params.validate()
    if problems:
        raise UserError(*[f"--{p.replace('_', '-')}" for p in problems])
    if args.llava or args.visual_encoder or args.image:
        return _chat_llava(args, params)
    if args.url:
        from .chat import RemoteChatSession

        session = RemoteChatSession(args.url, args.model, params, api_key=_api_key(args), system=args.system)
        source = f"{args.model} at {args.url}"
    else:
        from .chat import ChatSession, load_for_chat

        loaded = load_for_chat(args.model, args.adapter, template=args.template, system=args.system,
                               bits=args.bits, trust_remote_code=args.trust_remote_code)
        session = ChatSession(loaded, params)
        source = f"{loaded.source} (template {loaded.template})"
    return _converse(args.prompt, f"chatting with {source}", session.ask, session.reset)


def _converse(once: str | None, greeting: str, ask: Callable[[str], Iterable[str]],
              reset: Callable[[], None]) -> int:
    """Answer ``once`` and return, or chat at a >>> prompt until EXIT or end of input (RESET
    clears the history); ``ask`` yields the answer's pieces as they come."""
    def say(prompt: str) -> None:
        for piece in ask(prompt):
            print(piece, end="", flush=True)
        print()

    if once is not None:
        say(once)
        return 0
    print(f"{greeting}; EXIT quits, RESET clears history", file=sys.stderr)
    while True:
        try:
            prompt = input(">>> ")
        except EOFError:
            print()
            return 0
        if prompt.strip() == "EXIT":
            return 0
        if prompt.strip() == "RESET":
            reset()
            print("(history cleared)")
            continue
        if prompt.strip():
            say(prompt)


def _chat_llava(args, params) -> int:
    from .llava import answer, llava_checkpoint_dir, load_llava_for_inference, open_image

    for opt in ("llava", "visual_encoder"):
        if not getattr(args, opt):
            raise UserError(f"--{opt.replace('_', '-')}: needed to chat about an image "
                            "(--visual-encoder VIT --llava CHECKPOINT --image FILE)")
    if args.image:
        open_image(args.image)                  # before minutes of model loading
    llava_checkpoint_dir(args.llava)
    model, tok, proc, template = load_llava_for_inference(
        args.model, args.visual_encoder, args.llava, bits={4: "4bit", 8: "8bit"}.get(args.bits, "none"),
        trust_remote_code=bool(args.trust_remote_code))
    template = args.template or template
    image = proc.open(args.image) if args.image else None
    history: list[dict] = []

    def ask(q: str) -> str:
        reply = answer(model, tok, proc, template, q, image, system=args.system or "",
                       max_new_tokens=params.max_new_tokens, history=history)
        history.extend([{"role": "user", "content": (("<image>\n" + q) if image is not None and not history
                                                       else q)}, {"role": "assistant", "content": reply}])
        return reply

    return _converse(args.prompt, f"chatting about {args.image or 'no image'} with {args.llava}",
                     lambda q: [ask(q)], history.clear)


def _api_key(args) -> str | None:
    """--api-key, else $TUNEDECK_API_KEY (read here, so --help never prints a key)."""
    return getattr(args, "api_key", None) or os.environ.get("TUNEDECK_API_KEY") or None


def cmd_serve(args) -> int:
    from .inference import parse_adapter_args
    from .server import serve

    if not 0 < args.port < 65536:
        raise UserError(f"--port: {args.port} is not allowed: use 1-65535")
    return serve(args.model, adapters=parse_adapter_args(args.adapter), host=args.host, port=args.port,
                 api_key=_api_key(args), bits=args.bits, template=args.template, system=args.system,
                 trust_remote_code=args.trust_remote_code, warmup=not args.no_warmup,
                 log=lambda m: print(m, file=sys.stderr, flush=True), visual_encoder=args.visual_encoder,
                 llavas=parse_adapter_args(args.llava), max_request_mb=args.max_request_mb)


def cmd_merge(args) -> int:
    from .merge import merge

    out = merge(args.base, args.adapter, args.out, device=args.device, max_shard_size=args.max_shard_size,
                fmt=args.format, progress=lambda m: print(m, file=sys.stderr))
    print(out)
    return 0


def cmd_export_adapter(args) -> int:
    from .checkpoint import resolve_checkpoint
    from .internlm2 import export_adapter, is_internlm2
    from .modeling import read_adapter_meta

    ckpt = resolve_checkpoint(args.adapter)
    base = args.base or read_adapter_meta(ckpt).get("base_model")
    if not base:
        raise UserError(f"{ckpt}: its tunedeck.json names no base model; pass --base")
    if not is_internlm2(base):
        raise UserError(f"--base: {base} is not an InternLM2 checkpoint (config.json model_type internlm2)")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: already exists and is not empty; choose another OUT")
    print(export_adapter(ckpt, out, Path(base)))
    return 0


def cmd_export_llava(args) -> int:
    from .export_llava import export_llava

    out = export_llava(args.llm, args.visual_encoder, args.checkpoint, args.out, overwrite=args.force)
    print(f"wrote LlavaForConditionalGeneration + LlavaProcessor to {out}")
    return 0


def cmd_tree(args) -> int:
    from .tree import tree_lines

    for line in tree_lines(args.dir):
        print(line)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    if args.llava:
        from .llava_demo import run_llava_demo

        return run_llava_demo(Path(args.dir))
    return run_demo(Path(args.dir), args.name, no_tui=args.no_tui)


VERBS = {
    "list-cfg": cmd_list_cfg, "copy-cfg": cmd_copy_cfg, "data": cmd_data, "train": cmd_train,
    "runs": cmd_runs, "stop": cmd_stop, "chat": cmd_chat, "serve": cmd_serve, "merge": cmd_merge,
    "export-adapter": cmd_export_adapter, "tree": cmd_tree,
    "demo": cmd_demo, "export-llava": cmd_export_llava, "_worker": cmd_worker,
}


if __name__ == "__main__":
    sys.exit(main())
