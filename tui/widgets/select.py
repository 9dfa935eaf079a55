"""What an empty Select holds: Textual 8 calls it ``Select.NULL``; earlier releases ``Select.BLANK``
(in 8 a plain False, so a comparison with it never matches an empty Select)."""

from __future__ import annotations

from typing import Any

from textual.widgets import Select

NO_CHOICE: Any = getattr(Select, "NULL", Select.BLANK)


def chosen(value: Any) -> bool:
    """True when a Select's value is a real choice, not its empty state."""
    return value is not NO_CHOICE and value is not None and value is not Select.BLANK
