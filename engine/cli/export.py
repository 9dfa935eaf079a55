"""merge, export-adapter, export-llava: models to take elsewhere."""

from __future__ import annotations

import sys

from engine.cli.common import add_verb


def register(sub) -> None:
    p = add_verb(sub, "merge", "merge a trained adapter into its base model, as a full model folder",
                 "tunedeck merge ./internlm2-chat-1_8b work_dirs/my_recipe ./merged",
                 "tunedeck merge ./llama work_dirs/run/checkpoint-200 ./merged --format llama --device cuda",
                 description="Merge a LoRA or QLoRA adapter into its base model (in 16 bits) and write the "
                             "result as a model folder any transformers code can load.")
    p.add_argument("base", help="the base model's folder or hub id")
    p.add_argument("adapter", help="a checkpoint, or a run directory (its latest checkpoint)")
    p.add_argument("out", help="the folder to write (must not exist, or be empty)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the merge is computed")
    p.add_argument("--max-shard-size", default="2GB", help="largest weight file written, e.g. 2GB or 500MB")
    p.add_argument("--format", default="auto", choices=("auto", "internlm2", "llama"),
                   help="auto: an InternLM2 base is written in InternLM2's own format (its code and tokenizer "
                        "files beside it), any other in transformers' layout; llama: transformers' Llama layout")
    p.set_defaults(verb_handler=merge)

    p = add_verb(sub, "export-adapter", "write an InternLM2 adapter under InternLM2's own module names",
                 "tunedeck export-adapter work_dirs/my_recipe ./adapter_internlm2",
                 description="Write a LoRA adapter of an InternLM2 model with InternLM2's module names (wqkv, "
                             "wo, w1-w3), for peft on the model's original code.")
    p.add_argument("adapter", help="a checkpoint, or a run directory (its latest checkpoint)")
    p.add_argument("out", help="the folder to write (must not exist, or be empty)")
    p.add_argument("--base", help="the InternLM2 model folder (default: the one the adapter was trained on)")
    p.set_defaults(verb_handler=export_adapter)

    p = add_verb(sub, "export-llava", "write a LLaVA checkpoint as transformers' LlavaForConditionalGeneration",
                 "tunedeck export-llava ./llm ./clip work_dirs/llava_ft ./llava_hf")
    p.add_argument("llm", help="the language model's folder")
    p.add_argument("visual_encoder", help="the CLIP vision model's folder")
    p.add_argument("checkpoint", help="a LLaVA checkpoint, or its run directory")
    p.add_argument("out", help="the folder to write")
    p.add_argument("--force", action="store_true", help="write into a non-empty OUT")
    p.set_defaults(verb_handler=export_llava)

    p = add_verb(sub, "export", "take a trained model elsewhere: a GGUF file, an Ollama model, a deploy bundle",
                 "tunedeck export work_dirs/my_recipe assistant.gguf --format gguf --quant q8_0",
                 "tunedeck export work_dirs/my_recipe ./ollama-assistant --format ollama",
                 "tunedeck export work_dirs/my_recipe ./assistant-bundle --format bundle",
                 description="gguf: one GGUF file (llama.cpp's Llama architecture, InternLM2 included) with the "
                             "tokenizer, its special tokens and the chat template the run was trained with. "
                             "ollama: a folder with the GGUF and a Modelfile (ollama create NAME -f "
                             "OUT/Modelfile). bundle: a folder to deploy from: the merged model, a model card, "
                             "the recipe, a requirements file and start.sh, which serves the web chat.")
    p.add_argument("source", help="a run directory (its latest checkpoint), a checkpoint, or a model folder")
    p.add_argument("out", help="gguf: the file to write; ollama, bundle: the folder to write")
    p.add_argument("--format", required=True, choices=("gguf", "ollama", "bundle"), help="what to write")
    p.add_argument("--quant", default="f16", choices=("f16", "q8_0"), help="gguf, ollama: weight precision")
    p.add_argument("--base", help="the base model (default: the one the run was trained on)")
    p.add_argument("--force", action="store_true", help="replace an existing OUT")
    p.set_defaults(verb_handler=export)


def merge(args) -> int:
    from engine.export.merge import merge

    print(merge(args.base, args.adapter, args.out, device=args.device, max_shard_size=args.max_shard_size,
                fmt=args.format, progress=lambda m: print(m, file=sys.stderr)))
    return 0


def export_adapter(args) -> int:
    from engine.export.adapter import export_internlm2_adapter

    print(export_internlm2_adapter(args.adapter, args.out, args.base))
    return 0


def export_llava(args) -> int:
    from engine.llava.export import export_llava

    out = export_llava(args.llm, args.visual_encoder, args.checkpoint, args.out, overwrite=args.force)
    print(f"wrote LlavaForConditionalGeneration + LlavaProcessor to {out}")
    return 0


def export(args) -> int:
    def progress(m: str) -> None:
        print(m, file=sys.stderr, flush=True)

    if args.format == "gguf":
        from engine.export.gguf import export_gguf

        ex = export_gguf(args.source, args.out, quant=args.quant, base=args.base, force=args.force,
                         progress=progress)
        print(f"wrote {ex.path}  (llama.cpp: llama-cli -m {ex.path} -cnv)")
    elif args.format == "ollama":
        from engine.export.gguf import export_ollama
        from engine.serve.generation import GenerationParams

        out = export_ollama(args.source, args.out, GenerationParams(), quant=args.quant, base=args.base,
                            force=args.force, progress=progress)
        print(f"wrote {out}/Modelfile  (ollama create {out.resolve().name} -f {out}/Modelfile)")
    else:
        from engine.export.bundle import export_bundle

        out = export_bundle(args.source, args.out, base=args.base, force=args.force, progress=progress)
        print(f"wrote {out}  (start it with: {out}/start.sh)")
    return 0
