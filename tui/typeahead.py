"""Keys typed ahead reach what the earlier keys opened.

Textual hands each key to the widget focused when the key *arrives*. Over SSH keys often arrive
together (``/lr⏎5e-3`` in one packet), so the keys behind ``/`` went to the widget that had focus
before ``/`` moved it, and were lost. The app instead releases keys one at a time: the next key goes
out once the widgets that took the previous one (the focused widget, its ancestors, the screen and
the app) have handled every message it set off — a focus change, a submitted field, a dialog opened.
A key on an idle app goes out at once. While the app's own message loop is busy keys wait however
long that takes (every key passes through that loop: none could be handled sooner); while a widget
on the key's way is busy (a screen being built on a slow machine, seconds) they wait too, up to
``STALL_S``, a safety valve against a widget that never gets idle: then the keys held are released
together, as Textual would have delivered them.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from textual import events
from textual.app import App
from textual.message_pump import MessagePump

STALL_S = 10.0


def _busy(pump: MessagePump) -> bool:
    """A message is queued, or being handled: the pump's loop is not waiting on its queue's event."""
    queue = pump._message_queue
    if queue.qsize() or pump._next_callbacks:
        return True
    waiters = getattr(queue.ready_event, "_waiters", None)      # asyncio.Event's waiting futures
    return waiters is not None and pump.is_running and not waiters


class TypeaheadApp(App):
    """An App whose key and paste events are delivered in order of their effects (module docstring)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._held: deque[events.Key | events.Paste] = deque()
        self._releaser: asyncio.Task | None = None

    def _chain(self) -> list[MessagePump]:
        try:
            screen = self.screen
        except Exception:       # no screen yet, or the app is closing
            return [self]
        pumps: list[MessagePump] = [self, screen]
        if screen.focused is not None:
            pumps.extend(screen.focused.ancestors_with_self)
        return pumps

    def settled(self) -> bool:
        return not any(_busy(p) for p in self._chain())

    async def on_event(self, event: events.Event) -> None:
        if isinstance(event, (events.Key, events.Paste)) and not event.is_forwarded \
                and not getattr(event, "_released", False):
            self._held.append(event)
            if self._releaser is None or self._releaser.done():
                self._releaser = asyncio.create_task(self._release())
            return
        await super().on_event(event)

    async def _release(self) -> None:
        while self._held:
            deadline = time.monotonic() + STALL_S
            spins = 0
            while not self.settled():
                if _busy(self):                 # the app's own loop: the keys would queue behind it anyway
                    deadline = time.monotonic() + STALL_S
                elif time.monotonic() >= deadline:      # a widget busy for long: let everything through
                    while self._held:
                        self._post(self._held.popleft())
                    return
                spins += 1
                await asyncio.sleep(0 if spins < 50 else 0.002)
            self._post(self._held.popleft())
            await asyncio.sleep(0)

    def _post(self, event: events.Event) -> None:
        again = events.Key(event.key, event.character) if isinstance(event, events.Key) else events.Paste(event.text)
        again._released = True          # type: ignore[attr-defined]
        self.post_message(again)
