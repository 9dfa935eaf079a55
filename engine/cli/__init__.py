"""``tunedeck``: every action as a CLI verb, XTuner's names where it has one. One module per verb group
registers its verbs and calls the engine; nothing here trains, serves or converts by itself.

Errors a user can cause print one line each and exit 2; nothing here prints a traceback for them.
Heavy imports (torch, transformers) happen inside the verbs that need them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.cli import chat, data, export, recipes, runqueue, train, workspace
from engine.core.errors import UserError

GROUPS = (recipes, data, train, runqueue, chat, export, workspace)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tunedeck")
    except PackageNotFoundError:
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="tunedeck", description="Fine-tune language and vision-language models from the terminal: with no "
                                     "arguments, `tunedeck` opens the app in the current directory.",
        epilog="`tunedeck VERB --help` tells more about each verb.")
    ap.add_argument("--version", action="version", version=f"tunedeck {_version()}")
    sub = ap.add_subparsers(dest="verb", metavar="VERB")
    for group in GROUPS:
        group.register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    import warnings

    # the libraries' deprecation notices are for tunedeck's authors, not for the console
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|accelerate|torch)(\.|$)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["_queue-scheduler"]:          # the queue's own process (not a verb people type)
        import logging

        from engine.workflow.queue import run_scheduler

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        return run_scheduler(Path(argv[1]))
    if argv[:1] == ["_worker"]:
        args = train.worker_parser().parse_args(argv[1:])
    else:
        ap = build_parser()
        args = ap.parse_args(argv)
        if not args.verb:
            ap.print_help()
            return 0
    try:
        return args.verb_handler(args) or 0
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
