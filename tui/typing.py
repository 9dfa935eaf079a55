"""Letters typed where no field has focus go to the screen's field (the Configs filter, the Chat
prompt), so typing just types; digits, `?` and `/` stay screen keys."""

from __future__ import annotations

from textual import events
from textual.widget import Widget
from textual.widgets import Input, TextArea

SCREEN_KEYS = set("0123456789?/ ")


def in_field(widget: Widget | None) -> bool:
    """A widget that takes typed characters."""
    return isinstance(widget, (Input, TextArea))


def type_into(pane: Widget, event: events.Key, selector: str) -> bool:
    """Send a printable letter typed on ``pane`` outside any field to the Input ``selector``."""
    ch = event.character
    if not ch or len(ch) != 1 or not ch.isprintable() or ch in SCREEN_KEYS or in_field(pane.app.focused):
        return False
    target = pane.query_one(selector, Input)
    target.focus()
    target.insert_text_at_cursor(ch)
    event.stop()
    event.prevent_default()
    return True
