"""The tunedeck app: one tab per screen, footer bindings, command palette entries."""

from __future__ import annotations

import asyncio
import importlib
from functools import partial
from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.widget import MountError, Widget
from textual.widgets import Footer, Header, Static, TabbedContent, TabPane

from .client import ServiceClient
from .messages import ChatWith, ConfigsChanged, EditConfig, ShowRun
from .typeahead import TypeaheadApp
from .typing import in_field

# keys a screen handles itself (not app bindings), for the ? screen
PANE_KEYS = {
    "configs": [("letters", "filter the recipes (as list-cfg -p)"), ("enter", "edit a workspace recipe"),
                ("↑ ↓ ← →", "move in the tree")],
    "runs": [("enter", "show the run"), ("↑ ↓", "move in the run list"),
             ("space", "mark the run for comparison"), ("u", "queue the chosen recipe (starts when GPUs are free)"),
             ("d on a queued entry", "take it out of the queue"), ("c", "compare the marked runs"),
             ("l", "the run's log full screen (search, follow, wrap, stderr)")],
    "gpus": [("↑ ↓", "move in the lists")],
    "chat": [("letters", "start typing a prompt"), ("enter", "send it to both sides")],
    "files": [("letters", "jump to the entry starting with them"), ("enter", "open a folder / show a file")],
    "data": [("letters", "type the name of whose assistant it is"), ("enter", "write the identity dataset"),
             ("tab", "the next setting, then a recipe whose data to check")],
}

PANE_CLASSES = {"configs": "ConfigsPane", "editor": "EditorPane", "runs": "RunsPane", "chat": "ChatPane",
                "files": "FilesPane", "data": "DataPane",
                "gpus": "GpusPane"}


class Deferred(Widget):
    """Stands in for a screen until the first frame (title, tabs, footer) is on the terminal; the app
    then imports the screens' modules and builds them one per frame, the visible one first. Building
    all six before the first frame kept the terminal blank twice as long (bench/tui_perf.py)."""

    DEFAULT_CSS = "Deferred { height: 0; }"

    def __init__(self, tab: str, *args) -> None:
        super().__init__()
        self.tab = tab
        self.args = args
        self.started = False

    async def replace(self) -> bool:
        """Mount the real pane in this placeholder's place; False when the app is closing or another
        caller is already building it."""
        parent = self.parent
        if self.started or not isinstance(parent, Widget) or not parent.is_attached:
            return False
        self.started = True
        module = importlib.import_module(f"{__package__}.screens.{self.tab}")
        pane = getattr(module, PANE_CLASSES[self.tab])(*self.args, id=f"{self.tab}-pane")
        try:
            await parent.mount(pane, after=self)
        except MountError:
            return False
        await self.remove()
        return True


class KeyFooter(Footer):
    """The footer, rebuilt only when the keys it shows change. Textual's rebuilds all its key widgets
    on every bindings signal (each focus change, each tab switch: about fifteen per switch here),
    which made a tab switch take a fifth of a second on a small CPU."""

    _shown: tuple | None = None

    async def recompose(self) -> None:
        if not self.is_attached:
            return
        shown = tuple((b.key, b.description, enabled) for _, b, enabled, _ in self.screen.active_bindings.values()
                      if b.show)
        if shown == self._shown and self.children:
            return
        self._shown = shown
        await super().recompose()


TABS = [("configs", "Configs"), ("editor", "Editor"), ("runs", "Runs"), ("chat", "Chat"), ("files", "Files"),
        ("data", "Data"), ("gpus", "GPUs")]


class TunedeckCommands(Provider):
    """Every screen and tunedeck action in the command palette, before Textual's own commands (theme,
    keys, screenshot, quit), which come last."""

    def entries(self) -> list[tuple[str, object, str]]:
        app = self.app
        assert isinstance(app, TunedeckApp)
        act = partial(app.run_pane_action)
        out = [(f"Show {label}", partial(app.action_show, tab), f"switch to the {label} screen ({i})")
               for i, (tab, label) in enumerate(TABS, 1)]
        out += [
            ("Copy recipe to workspace", partial(act, "configs", "copy"), "copy-cfg under a new name (F5)"),
            ("Edit recipe", partial(act, "configs", "edit"), "open the highlighted recipe (F4, enter)"),
            ("Import an XTuner config", partial(act, "configs", "import"),
             "read an XTuner .py as a recipe, without running it (F6)"),
            ("Save recipe", partial(act, "editor", "save"), "validate and save (ctrl+s)"),
            ("Save recipe as", partial(act, "editor", "save_as"), "save under another name"),
            ("Open recipe in $EDITOR", partial(act, "editor", "external"), "suspend the app (ctrl+o)"),
            ("Check a recipe's data", partial(act, "data", "check"), "records, token lengths, masked sample"),
            ("Start run", partial(act, "runs", "start"), "train the chosen recipe, detached (n)"),
            ("Queue run", partial(act, "runs", "queue"), "start the recipe when its GPUs are free (u)"),
            ("Pause or resume the queue", partial(act, "runs", "pause_queue"), "nothing new starts while paused"),
            ("Stop run", partial(act, "runs", "stop"), "save a checkpoint and stop (s)"),
            ("Resume run", partial(act, "runs", "resume"), "continue from the latest checkpoint (r)"),
            ("Archive or delete run", partial(act, "runs", "delete"), "out of the list, or gone (d)"),
            ("Loss plot / log", partial(act, "runs", "plot"), "swap the run's log for a loss plot (p)"),
            ("Merge checkpoint", partial(act, "files", "merge"), "the highlighted checkpoint, into a full model"),
            ("Chat with checkpoint", partial(act, "files", "chat"), "the highlighted checkpoint beside its base"),
            ("Keys of this screen", app.action_help, "every key (?)"),
        ]
        return out

    async def discover(self) -> Hits:
        for name, callback, help_text in self.entries():
            yield DiscoveryHit(name, callback, help=help_text)
        for name, help_text, callback, discover in self.app.get_system_commands(self.screen):
            if discover:
                yield DiscoveryHit(name, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, callback, help_text in self.entries():
            if (score := matcher.match(name)) > 0:
                yield Hit(score, matcher.highlight(name), callback, help=help_text)
        for name, help_text, callback, *_ in self.app.get_system_commands(self.screen):
            if (score := matcher.match(name)) > 0:          # Textual's own after tunedeck's
                yield Hit(score / 2, matcher.highlight(name), callback, help=help_text)


class TunedeckApp(TypeaheadApp):
    CSS_PATH = Path(__file__).parent / "app.tcss"   # absolute: subclasses elsewhere find it too
    TITLE = "tunedeck"
    COMMANDS = {TunedeckCommands}
    # One keyboard model: screen keys (digits, letters) act only outside text fields, where a field
    # would otherwise take them as typing; escape always leaves a field; keys that must work inside
    # fields are ctrl or function keys. Configs and Chat send letters typed outside a field to their
    # filter / prompt, so typing "qwen" filters and never quits.
    BINDINGS = [
        Binding("1", "show('configs')", "Screens", key_display="1-7", show=True),
        Binding("2", "show('editor')", "Editor", show=False),
        Binding("3", "show('runs')", "Runs", show=False),
        Binding("4", "show('chat')", "Chat", show=False),
        Binding("5", "show('files')", "Files", show=False),
        Binding("6", "show('data')", "Data", show=False),
        Binding("7", "show('gpus')", "GPUs", show=False),
        Binding("escape", "leave_field", "Leave field"),
        Binding("question_mark", "help", "Keys"),
        Binding("slash", "find", "Find"),
        Binding("f5", "pane('configs', 'copy')", "Copy to workspace"),
        Binding("f4", "pane('configs', 'edit')", "Edit"),
        Binding("f6", "pane('configs', 'import')", "Import XTuner .py", show=False),
        Binding("f2", "pane('chat', 'checkpoint')", "Checkpoint"),
        Binding("f3", "pane('chat', 'image')", "Image"),
        Binding("ctrl+s", "pane('editor', 'save')", "Save", priority=True),
        Binding("ctrl+o", "pane('editor', 'external')", "$EDITOR", priority=True),
        Binding("n", "pane('runs', 'start')", "Start run"),
        Binding("u", "pane('runs', 'queue')", "Queue", show=False),
        Binding("s", "pane('runs', 'stop')", "Stop run", show=False),        # the run view's buttons say so
        Binding("r", "pane('runs', 'resume')", "Resume run", show=False),
        Binding("space", "pane('runs', 'mark')", "Mark", show=False),
        Binding("c", "pane('runs', 'compare')", "Compare"),
        Binding("l", "pane('runs', 'log')", "Log"),
        Binding("p", "pane('runs', 'plot')", "Plot"),
        Binding("d", "pane('runs', 'delete')", "Archive/delete"),
        Binding("q", "quit_app('q')", "Quit"),
        Binding("ctrl+q", "quit_app", "Quit", show=False, priority=True),
    ]
    # letters typed outside a field are typing there (a filter, a prompt, a name, a name to jump to): q too
    TYPING_TABS = ("configs", "chat", "data", "files")

    def __init__(self, workspace: str | Path = ".", *, service_url: str | None = None,
                 api_key: str | None = None, **kw):
        super().__init__(**kw)
        self.workspace = Path(workspace).resolve()
        self.sub_title = str(self.workspace)
        self.service = ServiceClient(self.workspace, service_url, api_key)
        self._building: set[str] = set()      # screens being built now

    _tabs: TabbedContent | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with TabbedContent(initial="configs", id="tabs") as self._tabs:
            # the screens are imported and built right after the first frame, not before it
            for tab, label in TABS:
                with TabPane(label, id=tab):
                    yield Deferred(tab, self.workspace, *((self.service,) if tab == "chat" else ()))
        yield KeyFooter()
        yield Static("", id="too-small")

    MIN_SIZE = (80, 24)

    def on_resize(self, event) -> None:
        """Below 80x24 one clear notice instead of text stacked a character a line."""
        w, h = event.size
        small = w < self.MIN_SIZE[0] or h < self.MIN_SIZE[1]
        for note in self.query("#too-small"):
            note.update(f"The terminal is {w}×{h}; tunedeck needs at least {self.MIN_SIZE[0]}×{self.MIN_SIZE[1]}.\n"
                        "Make the window larger (or the font smaller). ctrl+q quits.")
            note.display = small
        for tabs in self.query("#tabs"):
            tabs.display = not small

    def on_mount(self) -> None:
        self.call_after_refresh(self._build_visible)

    async def _build_visible(self) -> None:
        tab = self.query_one("#tabs", TabbedContent).active
        await self._build(tab)
        # the hidden ones once the visible one is on the terminal; a key that needs one sooner builds it then
        self.set_timer(0.3, self._build_hidden)

    async def _build_hidden(self) -> None:
        for tab, _ in TABS:
            await self._build(tab)
            await asyncio.sleep(0.02)             # let input and frames through between screens

    async def _build(self, tab: str) -> None:
        for placeholder in self.query(f"#{tab} > Deferred"):
            self._building.add(tab)
            try:
                if await placeholder.replace():
                    self._focus_pane(tab)                          # at once, if it is the active one
                    self.call_after_refresh(self._focus_pane, tab)     # and once it is on the terminal
            finally:
                self._building.discard(tab)

    def settled(self) -> bool:
        """Keys typed ahead also wait for the screen they were typed on while it is being built."""
        if not super().settled():
            return False
        return self._tabs is None or len(self.screen_stack) > 1 or not (
            self._tabs.active in self._building or self.query(f"#{self._tabs.active} > Deferred"))

    # where focus lands on a screen, and goes back to on escape: never a text field, so the next digit
    # switches screens instead of being typed
    FOCUS = {"configs": "#cfg-tree", "editor": "#ed-form", "runs": "#runs-table", "chat": "#chat-left",
             "files": "#files-tree", "data": "#id-generate", "gpus": "#gpu-table"}

    def action_show(self, tab: str) -> None:
        tabs = self.query_one("#tabs", TabbedContent)
        if tabs.active != tab:
            # drop focus first: a focused widget that gets hidden hands focus to a neighbour in the
            # pane being hidden, and TabbedContent then switches back to that pane
            self.set_focus(None)
        tabs.active = tab
        # focus moves now, not after the next frame: keys typed right behind the digit reach the new
        # screen (a built screen); one still being built is focused once it is on the terminal
        self._focus_pane(tab, force=True)
        self.call_after_refresh(self._focus_pane, tab)

    def _focus_pane(self, tab: str, force: bool = False) -> None:
        """Focus the screen's resting widget; unless ``force``, only where focus is not on that screen
        already (a later call must not take focus from a field the user has moved to meanwhile)."""
        if self.query_one("#tabs", TabbedContent).active != tab:     # the user has moved on meanwhile
            return
        targets = self.query(self.FOCUS.get(tab, f"#{tab}-pane"))
        if targets and (force or self.focused is None or not self._in_pane(self.focused, tab)):
            # at once (Widget.focus waits for the next message: keys already queued would miss it), on
            # the widget's own screen (a dialog may be open over it)
            target = targets.first()
            target.screen.set_focus(target)

    @staticmethod
    def _in_pane(widget, tab: str) -> bool:
        return any(getattr(node, "id", None) == tab for node in widget.ancestors_with_self)

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        if self.screen_stack:
            self.refresh_bindings()
        if event.pane is not None and self.query(f"#{event.pane.id} > Deferred"):
            self.run_worker(self._build(event.pane.id))
        if event.pane is not None and event.pane.id == "chat":
            for pane in self.query("#chat-pane"):
                pane.refresh_checkpoints()
        if event.pane is not None and event.pane.id == "gpus":
            for pane in self.query("#gpus-pane"):
                pane.refresh_panel()

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        """A screen's keys work (and show in the footer) while its tab is active; escape shows while a
        field has focus; q is not a key on a screen where letters are typing."""
        # asked for every binding on every focus or tab change: no DOM query here
        active = self._tabs.active if self._tabs is not None else None
        if len(self.screen_stack) > 1 and action in ("show", "pane", "find", "help", "leave_field") or \
                len(self.screen_stack) > 1 and action == "quit_app" and parameters == ("q",):
            return False           # a screen on top (log, comparison, dialog) has its own keys
        if action == "pane":
            return parameters[0] == active
        if action == "leave_field":
            return in_field(self.focused)
        if action == "find":
            return active in self.FIND
        if action == "quit_app" and parameters == ("q",):
            return active not in self.TYPING_TABS         # there q is a letter of the filter / prompt
        return True

    # `/`: the screen's filter, jump-to-field or first field
    FIND = {"configs": "#cfg-filter", "editor": "#ed-jump", "data": "#id-name"}

    def action_find(self) -> None:
        if self._tabs is not None and (target := self.query(self.FIND.get(self._tabs.active, "#none"))):
            field = target.first()
            field.screen.set_focus(field)        # at once: the letters typed next go into it

    def action_leave_field(self) -> None:
        if in_field(self.focused) and self._tabs is not None:
            self._focus_pane(self._tabs.active, force=True)

    def action_help(self) -> None:
        from .dialogs import KeysScreen

        tab = self._tabs.active if self._tabs is not None else "configs"
        self.push_screen(KeysScreen(dict(TABS)[tab], self.key_rows(tab)))

    def key_rows(self, tab: str) -> list[tuple[str, str]]:
        """(key, what it does) on this screen: the app's and this screen's keys, then the fixed ones."""
        rows: list[tuple[str, str]] = []
        for b in self.BINDINGS:
            action = b.action
            if action.startswith("pane(") and f"'{tab}'" not in action:
                continue
            if action == "leave_field" or b.key == "ctrl+q":
                continue
            if action.startswith("quit_app") and tab in self.TYPING_TABS:
                continue
            if action == "find" and tab not in self.FIND:          # `/` does nothing there
                continue
            if action.startswith("show("):
                rows.append((b.key, f"the {dict(TABS)[action[6:-2]]} screen"))
            else:
                rows.append((self.get_key_display(b), b.description))
        rows += PANE_KEYS.get(tab, [])
        rows += [("tab / shift+tab", "next / previous field or list"), ("esc", "leave a text field"),
                 ("ctrl+p", "command palette: every action"), ("ctrl+q", "quit")]
        return rows

    def started_runs(self) -> list:
        """Runs this app started that are still running (RunDirectory each)."""
        from engine.train.runs import RunDirectory

        out = []
        for pane in self.query("#runs-pane"):
            for path in pane.started:
                run = RunDirectory(path)
                if run.status().get("state") in ("running", "starting"):
                    out.append(run)
        return out

    async def action_quit_app(self, key: str = "ctrl+q") -> None:
        """Quit; first ask about the editor's unsaved changes, then about runs and a service this app
        started (nothing is lost or stopped unless the user says so)."""
        from .dialogs import ChoiceDialog

        editor = next(iter(self.query("#editor-pane")), None)
        if editor is not None and editor.dirty and editor.doc is not None and editor.doc.path is not None:
            def answered(answer: str | None) -> None:
                if answer is None:
                    return
                if answer == "save":
                    editor.action_save()
                    if editor.dirty:             # not saved: its problems are on the screen
                        self.action_show("editor")
                        return
                self.call_later(self._quit_runs_and_service)

            self.push_screen(ChoiceDialog(f"{editor.doc.path.name} has unsaved changes.",
                                          [("save", "Save and quit"), ("discard", "Quit without saving")],
                                          warning="discard"), answered)
            return
        await self._quit_runs_and_service()

    async def _quit_runs_and_service(self) -> None:
        runs = self.started_runs()
        service = self.service.started_here()
        if not runs and not service:
            self.exit()
            return
        from .dialogs import ChoiceDialog

        def chosen(answer: str | None) -> None:
            if answer is None:
                return
            if answer == "stop":
                for run in runs:
                    try:
                        run.request_stop(wait_s=0)       # each saves a checkpoint, then stops
                    except Exception:
                        pass                             # it ended meanwhile
            if answer == "keep" and service:
                self.service.keep = True             # "keep-runs" stops the service as the app closes
            self.exit()

        what = []
        if service:
            what.append(self.service.describe())
        for r in runs:
            st = r.status()
            what.append(f"the run {r.path.name} (step {st.get('step') or 0}/{st.get('total_steps') or '?'})")
        if runs and service:
            answers = [("stop", "Stop all"), ("keep-runs", "Keep runs, stop service"), ("keep", "Keep all")]
        elif runs:
            answers = [("stop", "Stop them and quit" if len(runs) > 1 else "Stop it and quit"),
                       ("keep", "Keep them and quit" if len(runs) > 1 else "Keep it and quit")]
        else:
            answers = [("stop", "Stop it and quit"), ("keep", "Keep it and quit")]
        note = ("\nA stopped run saves a checkpoint first; resume continues from there." if runs else
                "\nTraining runs keep running whatever you choose.")
        question = "This app started " + "; ".join(what) + "." + note
        self.push_screen(ChoiceDialog(question, answers, warning="stop"), chosen)

    async def action_pane(self, tab: str, action: str) -> None:
        await self.run_pane_action(tab, action)

    async def pane(self, tab: str) -> Widget:
        """The screen's pane, built now if it has not been yet (or waited for, if it is being built)."""
        await self._build(tab)
        for _ in range(500):
            if panes := self.query(f"#{tab}-pane"):
                return panes.first()
            await asyncio.sleep(0.01)
        return self.query_one(f"#{tab}-pane")

    async def run_pane_action(self, tab: str, action: str) -> None:
        self.action_show(tab)
        pane = await self.pane(tab)
        result = (getattr(pane, f"action_{action}", None) or getattr(pane, action))()
        if asyncio.iscoroutine(result):
            await result

    async def on_edit_config(self, message: EditConfig) -> None:
        await (await self.pane("editor")).load(message.path)
        self.action_show("editor")

    async def on_configs_changed(self, message: ConfigsChanged) -> None:
        (await self.pane("configs")).refresh_tree(select=message.path)
        for pane in self.query("#runs-pane"):
            pane.refresh_configs(select=message.path)
        for pane in self.query("#data-pane"):
            pane.refresh_configs()

    async def on_chat_with(self, message: ChatWith) -> None:
        (await self.pane("chat")).pick(message.path)
        self.action_show("chat")

    def on_unmount(self) -> None:
        self.service.close()    # a service this app started goes with it; runs never do

    async def on_show_run(self, message: ShowRun) -> None:
        (await self.pane("runs")).on_show_run(message)
        self.action_show("runs")


def run_app(workspace: str | Path = ".") -> int:
    TunedeckApp(workspace).run()
    return 0
