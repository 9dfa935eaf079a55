"""What `tunedeck --help` and every verb's --help show a person: a description and examples for each
verb, help on every positional and option with its default, --version, no internal verb anywhere."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import build_parser

REPO = Path(__file__).resolve().parent.parent


def verbs(parser: argparse.ArgumentParser, prefix: str = ""):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix}{name}", sub
                yield from verbs(sub, f"{prefix}{name} ")


ALL = dict(verbs(build_parser()))


def test_every_verb_is_listed_with_a_summary():
    top = build_parser().format_help()
    for name in ("list-cfg", "copy-cfg", "data", "train", "runs", "stop", "chat", "serve", "merge",
                 "export-adapter", "export-llava", "tree", "demo"):
        assert name in ALL
        assert f"    {name}" in top
    assert "_worker" not in top and "SUPPRESS" not in top


@pytest.mark.parametrize("name", sorted(ALL))
def test_each_verb_has_a_description_examples_and_help_on_every_argument(name):
    p = ALL[name]
    assert p.description and len(p.description) > 20
    assert p.epilog and "examples:" in p.epilog and "tunedeck " in p.epilog
    for a in p._actions:
        if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        assert a.help, f"{name}: {a.option_strings or a.dest} has no help"
    text = p.format_help()
    for a in p._actions:              # a default worth showing is shown
        if a.option_strings and a.default not in (None, False, [], argparse.SUPPRESS) and a.help:
            assert f"(default: {a.default})" in " ".join(text.split()), f"{name}: {a.option_strings} default"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, cwd=REPO)


def test_version_and_unknown_verbs():
    out = cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("tunedeck ")
    bad = cli("trian")
    assert bad.returncode == 2 and "invalid choice: 'trian'" in bad.stderr and "_worker" not in bad.stderr


def test_the_same_flag_means_the_same_everywhere():
    """--n in both data actions, -o/--output for what is written, --root for where runs are."""
    def flags(name):
        return {s for a in ALL[name]._actions for s in a.option_strings}

    assert {"--n", "-o", "--output", "--force"} <= flags("data identity") & flags("data repeat")
    assert "--root" in flags("runs") & flags("stop")
    for shared in ("--bits", "--template", "--system", "--trust-remote-code", "--api-key", "--visual-encoder",
                   "--llava", "--adapter"):
        assert shared in flags("chat") & flags("serve")


def test_tree_defaults_to_the_current_directory(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 10)
    out = subprocess.run([sys.executable, "-m", "engine.cli", "tree"], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert "a.txt" in out.stdout
