"""list-cfg, copy-cfg: the shipped recipes."""

from __future__ import annotations

from engine.cli.common import add_verb


def register(sub) -> None:
    p = add_verb(sub, "list-cfg", "list the built-in recipes", "tunedeck list-cfg",
                 "tunedeck list-cfg -p internlm2")
    p.add_argument("-p", "--pattern", help="only names containing PATTERN")
    p.set_defaults(verb_handler=list_cfg)

    p = add_verb(sub, "copy-cfg", "copy a built-in recipe into a folder, to edit it",
                 "tunedeck copy-cfg internlm2_chat_1_8b_qlora_alpaca_e3 .",
                 "tunedeck copy-cfg internlm2_chat_1_8b_qlora_alpaca_e3 recipes --as my_assistant",
                 description="Copy a built-in recipe to DIR/NAME_copy.yaml (or DIR/AS.yaml); an existing file "
                             "is never overwritten.")
    p.add_argument("name", help="a built-in recipe (see list-cfg)")
    p.add_argument("dir", help="the folder to copy it into (made if missing)")
    p.add_argument("--as", dest="new_name", metavar="AS", help="file name (without .yaml) instead of NAME_copy")
    p.set_defaults(verb_handler=copy_cfg)

    p = add_verb(sub, "import-xtuner", "turn an XTuner .py config into a tunedeck recipe, without running it",
                 "tunedeck import-xtuner internlm2_1_8b_qlora_self_e2.py",
                 "tunedeck import-xtuner llava_finetune.py -o configs/llava_finetune.yaml --deepspeed zero2",
                 description="Read an XTuner config by its syntax tree (nothing in it runs), map its settings, "
                             "model, LoRA, dataset, optimizer, schedule and save/eval settings to a recipe, and "
                             "list what has no tunedeck setting, one line each.")
    p.add_argument("config", help="the XTuner config (.py)")
    p.add_argument("-o", "--output", help="the recipe to write (default: configs/<config name>.yaml)")
    p.add_argument("--deepspeed", help="the DeepSpeed choice XTuner takes on its command line, e.g. zero2")
    p.add_argument("--force", action="store_true", help="overwrite --output")
    p.set_defaults(verb_handler=import_xtuner)


def list_cfg(args) -> int:
    from engine.recipe.catalogue import list_cfg

    for e in list_cfg(args.pattern):
        print(e.name)
    return 0


def copy_cfg(args) -> int:
    from engine.recipe.catalogue import copy_cfg

    print(f"Copy to {copy_cfg(args.name, args.dir, args.new_name)}")
    return 0


def import_xtuner(args) -> int:
    import sys
    from pathlib import Path

    from engine.recipe.xtuner import import_xtuner, write_recipe

    src = Path(args.config)
    imported = import_xtuner(src, args.deepspeed)
    out = write_recipe(imported, src, Path(args.output or f"configs/{src.stem}.yaml"), args.force)
    for line in imported.notes:
        print(f"note: {line}", file=sys.stderr)
    for line in imported.unmapped:
        print(f"not mapped: {line}", file=sys.stderr)
    print(f"wrote {out}")
    return 0
