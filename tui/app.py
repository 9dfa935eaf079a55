"""The tunedeck app: one tab per screen, footer bindings, command palette entries."""

from __future__ import annotations

import asyncio
from functools import partial
from pathlib import Path

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.command import Hit, Hits, Provider
from textual.lazy import Lazy
from textual.widgets import Footer, Header, TabbedContent, TabPane

from .client import ServiceClient
from .messages import ChatWith, ConfigsChanged, EditConfig, ShowRun
from .screens.chat import ChatPane
from .screens.configs import ConfigsPane
from .screens.data import DataPane
from .screens.editor import EditorPane
from .screens.files import FilesPane
from .screens.runs import RunsPane

TABS = [("configs", "Configs"), ("editor", "Editor"), ("runs", "Runs"), ("chat", "Chat"), ("files", "Files"),
        ("data", "Data")]


class TunedeckCommands(Provider):
    """Every screen and action in the command palette."""

    async def search(self, query: str) -> Hits:
        app = self.app
        assert isinstance(app, TunedeckApp)
        matcher = self.matcher(query)
        entries = [(f"Show {label}", partial(app.action_show, tab), f"switch to the {label} screen")
                   for tab, label in TABS]
        entries += [
            ("Copy recipe to workspace", partial(app.run_pane_action, "configs", "copy"), "copy-cfg + rename"),
            ("Edit recipe", partial(app.run_pane_action, "configs", "edit"), "open the highlighted recipe"),
            ("Save recipe", partial(app.run_pane_action, "editor", "save"), "validate and save"),
            ("Open recipe in $EDITOR", partial(app.run_pane_action, "editor", "external"), "suspend the app"),
            ("Start run", partial(app.run_pane_action, "runs", "start"), "train the chosen recipe, detached"),
            ("Stop run", partial(app.run_pane_action, "runs", "stop"), "save a checkpoint and stop"),
            ("Resume run", partial(app.run_pane_action, "runs", "resume"), "continue from the latest checkpoint"),
        ]
        for name, callback, help_text in entries:
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), callback, help=help_text)


class TunedeckApp(App):
    CSS_PATH = Path(__file__).parent / "app.tcss"   # absolute: subclasses elsewhere find it too
    TITLE = "tunedeck"
    COMMANDS = App.COMMANDS | {TunedeckCommands}
    BINDINGS = [
        Binding("1", "show('configs')", "Configs"),
        Binding("2", "show('editor')", "Editor"),
        Binding("3", "show('runs')", "Runs"),
        Binding("4", "show('chat')", "Chat"),
        Binding("5", "show('files')", "Files"),
        Binding("6", "show('data')", "Data"),
        Binding("c", "pane('configs', 'copy')", "Copy to workspace"),
        Binding("e", "pane('configs', 'edit')", "Edit"),
        Binding("ctrl+s", "pane('editor', 'save')", "Save"),
        Binding("ctrl+e", "pane('editor', 'external')", "$EDITOR"),
        Binding("n", "pane('runs', 'start')", "Start run"),
        Binding("s", "pane('runs', 'stop')", "Stop run"),
        Binding("r", "pane('runs', 'resume')", "Resume run"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, workspace: str | Path = ".", *, service_url: str | None = None,
                 api_key: str | None = None, **kw):
        super().__init__(**kw)
        self.workspace = Path(workspace).resolve()
        self.sub_title = str(self.workspace)
        self.service = ServiceClient(self.workspace, service_url, api_key)

    def compose(self) -> ComposeResult:
        yield Header()
        with TabbedContent(initial="configs", id="tabs"):
            with TabPane("Configs", id="configs"):
                yield ConfigsPane(self.workspace, id="configs-pane")
            # the hidden screens are built right after the first frame, not before it
            with TabPane("Editor", id="editor"):
                yield Lazy(EditorPane(self.workspace, id="editor-pane"))
            with TabPane("Runs", id="runs"):
                yield Lazy(RunsPane(self.workspace, id="runs-pane"))
            with TabPane("Chat", id="chat"):
                yield Lazy(ChatPane(self.workspace, self.service, id="chat-pane"))
            with TabPane("Files", id="files"):
                yield Lazy(FilesPane(self.workspace, id="files-pane"))
            with TabPane("Data", id="data"):
                yield Lazy(DataPane(self.workspace, id="data-pane"))
        yield Footer()

    FOCUS = {"configs": "#cfg-tree", "editor": "#ed-form Input", "runs": "#runs-table", "chat": "#chat-input",
             "files": "#files-tree", "data": "#id-name"}

    def action_show(self, tab: str) -> None:
        self.query_one("#tabs", TabbedContent).active = tab
        self.call_after_refresh(self._focus_pane, tab)

    def _focus_pane(self, tab: str) -> None:
        targets = self.query(self.FOCUS.get(tab, f"#{tab}-pane"))
        if targets:
            targets.first().focus()

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        if self.screen_stack:
            self.refresh_bindings()
        if event.pane is not None and event.pane.id == "chat":
            for pane in self.query(ChatPane):
                pane.refresh_checkpoints()

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        """A screen's keys work (and show in the footer) while its tab is active."""
        if action == "pane":
            tabs = self.query("#tabs")
            return bool(tabs) and parameters[0] == tabs.first(TabbedContent).active
        return True

    def action_pane(self, tab: str, action: str) -> None:
        self.run_pane_action(tab, action)

    def run_pane_action(self, tab: str, action: str) -> None:
        self.action_show(tab)
        pane = self.query_one(f"#{tab}-pane")
        getattr(pane, f"action_{action}")()

    async def on_edit_config(self, message: EditConfig) -> None:
        for _ in range(500):                 # the editor is built lazily, right after the first frame
            if self.query(EditorPane):
                break
            await asyncio.sleep(0.01)
        await self.query_one(EditorPane).load(message.path)
        self.action_show("editor")

    def on_configs_changed(self, message: ConfigsChanged) -> None:
        self.query_one(ConfigsPane).refresh_tree(select=message.path)
        for pane in self.query(RunsPane):
            pane.refresh_configs()
        for pane in self.query(DataPane):
            pane.refresh_configs()

    def on_chat_with(self, message: ChatWith) -> None:
        self.query_one(ChatPane).pick(message.path)
        self.action_show("chat")

    def on_unmount(self) -> None:
        self.service.close()    # a service this app started goes with it; runs never do

    def on_show_run(self, message: ShowRun) -> None:
        self.query_one(RunsPane).on_show_run(message)
        self.action_show("runs")


def run_app(workspace: str | Path = ".") -> int:
    TunedeckApp(workspace).run()
    return 0
