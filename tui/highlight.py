"""A fast YAML highlighter for recipe previews.

Pygments' YAML lexer takes ~0.1 s per recipe on a small CPU, which made the first frame and every
cursor move in the Configs tree sluggish; recipes are flat ``key: value`` files with comments, so a
handful of regular expressions colour them the same way in well under a millisecond."""

from __future__ import annotations

import re

from rich.style import Style
from rich.text import Text

_RULES = [
    (re.compile(r"^\s*(?:- )?(?P<m>[\w.\-/]+)(?=:(?:\s|$))", re.M), Style(color="cyan", bold=True)),
    (re.compile(r":\s+(?P<m>-?\d[\d_.eE+\-]*)\s*(?=#|$)", re.M), Style(color="magenta")),
    (re.compile(r":\s+(?P<m>true|false|null|~)\s*(?=#|$)", re.M | re.I), Style(color="yellow")),
    (re.compile(r"(?P<m>\"[^\"\n]*\"|'[^'\n]*')"), Style(color="green")),
    (re.compile(r"(?:^|\s)(?P<m>#.*)$", re.M), Style(color="bright_black", italic=True)),
]


def highlight_yaml(source: str) -> Text:
    """The recipe as rich Text: keys, numbers, booleans, strings and comments coloured."""
    text = Text(source)
    for pattern, style in _RULES:          # comments last: they win over anything inside them
        for match in pattern.finditer(source):
            start, end = match.span("m")
            text.stylize(style, start, end)
    return text
