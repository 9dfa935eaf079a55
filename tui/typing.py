"""Letters typed where no field has focus go to the screen's field (the Configs filter, the Chat
prompt, the Data wizard's name), so typing just types; digits, `?` and `/` stay screen keys."""

from __future__ import annotations

from textual import events
from textual.widget import Widget
from textual.widgets import Input, TextArea

SCREEN_KEYS = set("0123456789?/ ")


def in_field(widget: Widget | None) -> bool:
    """A widget that takes typed characters."""
    return isinstance(widget, (Input, TextArea))


def printable(event: events.Key) -> str | None:
    """The one printable character a key types, or None (ctrl, function and arrow keys)."""
    ch = event.character
    return ch if ch and len(ch) == 1 and ch.isprintable() else None


def type_into(pane: Widget, event: events.Key, selector: str) -> bool:
    """Send a printable letter typed on ``pane`` outside any field to the Input ``selector``."""
    ch = printable(event)
    target = pane.query_one(selector, Input)
    # a key that reaches the pane came from outside any field (a field keeps what it types); keys queued
    # behind the first letter still reach the pane after focus has moved to the field: they are typed too
    typing = pane.app.focused is target
    if ch is None or (ch in SCREEN_KEYS and not typing):
        return False
    pane.screen.set_focus(target)
    target.insert_text_at_cursor(ch)
    event.stop()
    event.prevent_default()
    return True
