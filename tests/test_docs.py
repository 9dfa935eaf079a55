"""The documents a user reads: the recipe reference equals what the schema says, every link and
picture in the README and docs/ exists, and none of them speaks of issues, sessions or commits."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_the_recipe_reference_is_current():
    from engine.recipe.reference import markdown
    from engine.recipe.schema import field_specs

    text = (REPO / "docs" / "recipes.md").read_text(encoding="utf-8")
    assert text == markdown(), "docs/recipes.md is stale: run `make docs`"
    for spec in field_specs():                       # every field, with its help
        assert f"| `{spec.path.split('.', 1)[1]}` |" in text and spec.help[:40] in text


def test_links_and_pictures_exist():
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)", doc.read_text(encoding="utf-8")):
            if target.startswith("http"):
                continue
            assert (doc.parent / target).exists(), f"{doc.name}: {target} does not exist"
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (REPO / "README.md").read_text(encoding="utf-8"))
    screens = {f"docs/images/{n}.svg" for n in ("configs", "editor", "runs", "chat", "files", "data", "gpus")}
    assert screens <= set(pictures)                  # one per screen (and the comparison view)


def test_no_issue_session_or_commit_talk():
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for pattern in (r"issues? #\d", r"\(#\d+\)", r"\bsession \d", r"\bthe seed\b", r"\bin progress\b",
                        r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b"):
            found = re.search(pattern, text, re.I)
            assert not found, f"{doc.name}: {found.group(0)!r}"


def test_readme_gives_exactly_the_two_setup_commands():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    setup = text.split("## Set up", 1)[1].split("```", 2)[1]
    assert [line.split("#")[0].strip() for line in setup.strip().splitlines()[1:]] == ["make demo", "make test"]
