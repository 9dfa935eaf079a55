"""Messages the panes send each other through the app."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from textual.message import Message


@dataclass
class EditConfig(Message):
    """Open this recipe file in the editor."""

    path: Path


@dataclass
class ConfigsChanged(Message):
    """A recipe was created or saved in the workspace."""

    path: Path


@dataclass
class ShowRun(Message):
    """Open this run directory in the run view."""

    path: Path


@dataclass
class ChatWith(Message):
    """Open the chat with this checkpoint on the right."""

    path: Path
