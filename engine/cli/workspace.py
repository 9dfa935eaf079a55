"""tree, demo: look around a workspace, or build the tiny demo one."""

from __future__ import annotations

from pathlib import Path

from engine.cli.common import add_verb


def register(sub) -> None:
    p = add_verb(sub, "tree", "print a directory tree with sizes (symlinks followed, as the tutorial's model "
                              "links are)", "tunedeck tree", "tunedeck tree work_dirs/my_recipe")
    p.add_argument("dir", nargs="?", default=".", help="the directory (default: the current one)")
    p.set_defaults(verb_handler=tree)

    p = add_verb(sub, "demo", "build the tiny demo workspace and fine-tune it on the CPU (a minute, offline)",
                 "tunedeck demo", "tunedeck demo --name Alice --no-tui", "tunedeck demo --llava",
                 description="Build a workspace with a tiny InternLM2-shaped model, the identity dataset and "
                             "a recipe; fine-tune it; print the answers before and after, and whether it "
                             "learned; then open the app there.")
    p.add_argument("--dir", default="workspace", help="the demo workspace (made if missing; kept between runs)")
    p.add_argument("--name", default="tunedeck", help="whose assistant the demo model learns to be")
    p.add_argument("--no-tui", action="store_true", help="print the before/after answers and exit")
    p.add_argument("--llava", action="store_true",
                   help="the LLaVA half instead: shape images, pretrain and finetune, accuracy before and after")
    p.set_defaults(verb_handler=demo)


def tree(args) -> int:
    from engine.core.tree import tree_lines

    for line in tree_lines(args.dir):
        print(line)
    return 0


def demo(args) -> int:
    if args.llava:
        from engine.llava.demo import run_llava_demo

        return run_llava_demo(Path(args.dir))
    from engine.workflow.demo import run_demo

    return run_demo(Path(args.dir), args.name, no_tui=args.no_tui)
