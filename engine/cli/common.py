"""What every verb module shares: the help layout, the --set option, reading the API key."""

from __future__ import annotations

import argparse
import os
import textwrap


class VerbHelp(argparse.RawDescriptionHelpFormatter):
    """Description and examples kept as written; every option's default shown where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or default in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def add_verb(sub, name: str, summary: str, *examples: str, description: str = "") -> argparse.ArgumentParser:
    """A verb with its one-line summary (the list in `tunedeck --help`), a description and examples."""
    epilog = ("examples:\n" + "\n".join(f"  {e}" for e in examples)) if examples else None
    description = textwrap.fill(description or summary[:1].upper() + summary[1:] + ".", 79)
    return sub.add_parser(name, help=summary, description=description, epilog=epilog, formatter_class=VerbHelp)


def add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one recipe field, e.g. --set lr=1e-4 or --set train.max_epochs=3 (repeatable)")


def add_api_key(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--api-key", default=argparse.SUPPRESS, help=f"{what} (default: $TUNEDECK_API_KEY)")


def api_key(args) -> str | None:
    """--api-key, else $TUNEDECK_API_KEY (read here, so --help never prints a key)."""
    return getattr(args, "api_key", None) or os.environ.get("TUNEDECK_API_KEY") or None
