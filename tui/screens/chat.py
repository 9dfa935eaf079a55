"""Chat: split pane — left the base model, right a fine-tuned checkpoint picked from a run; one
input goes to both and the answers stream side by side. The model runs in `tunedeck serve`
(started when none runs); this screen only talks HTTP."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from rich.text import Text
from textual import events, on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, Input, Label, Select, Static

from engine.train.runs import find_runs

from ..client import ServiceClient, ServiceError
from ..dialogs import PathPicker
from ..typing import type_into
from ..widgets.image import half_blocks
from ..widgets.select import chosen


def checkpoint_choices(workspace: Path) -> list[tuple[str, str]]:
    out = []
    for run in find_runs(workspace / "work_dirs"):
        for ck in reversed(run.checkpoints()):
            out.append((f"{run.path.name}/{ck.name}", str(ck)))
    return out


def pretrain_of(checkpoint: Path) -> Path | None:
    """The pretrain checkpoint a LLaVA finetune started from (its recipe's llava.pretrained_pth)."""
    from engine.train.runs import RunDirectory

    try:
        ref = json.loads((checkpoint / "tunedeck.json").read_text()).get("pretrained_pth")
    except (OSError, ValueError):
        return None
    if not ref:
        return None
    p = Path(ref)
    if (p / "llava.json").is_file():
        return p
    return RunDirectory(p).latest_checkpoint() if p.is_dir() else None


def image_part(path: str) -> dict:
    """An OpenAI image_url part carrying the file as a data: URI."""
    import base64
    import mimetypes

    mime = mimetypes.guess_type(path)[0] or "image/png"
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}


def base_of(checkpoint: Path) -> str | None:
    try:
        return json.loads((checkpoint / "tunedeck.json").read_text()).get("base_model")
    except (OSError, ValueError):
        return None


class Transcript(VerticalScroll):
    """One side: the conversation, the answer growing as it streams."""

    def __init__(self, title: str, **kw):
        super().__init__(**kw)
        self.title = title
        self.history: list[dict] = []
        self.text = Text()
        self.current = ""

    def compose(self) -> ComposeResult:
        yield Static("", classes="side-body")

    def on_mount(self) -> None:
        self._show_title()

    def set_title(self, title: str) -> None:
        self.title = title
        self.stats = ""
        self._show_title()

    def set_stats(self, stats: str) -> None:
        self.stats = stats
        self._show_title()

    def _show_title(self) -> None:
        # in the border, so they stay in view however long the answers grow
        self.border_title = self.title
        self.border_subtitle = getattr(self, "stats", "")

    def _redraw(self) -> None:
        body = self.text.copy()
        if self.current:
            body.append(self.current)
        self.query_one(".side-body", Static).update(body)
        if self.scroll_y >= self.max_scroll_y - 2:    # follow only when already at the bottom
            self.scroll_end(animate=False)

    def ask(self, prompt: str) -> None:
        self.text.append(f"\n> {prompt}\n", style="bold")
        self.current = ""
        self._redraw()

    def piece(self, text: str) -> None:
        self.current += text
        self._redraw()

    def done(self, prompt: str | list, error: str | None = None) -> None:
        if error:
            self.text.append(self.current)
            self.text.append(f"\n[{error}]\n", style="bold red")
        else:
            self.text.append(self.current + "\n")
            self.history += [{"role": "user", "content": prompt}, {"role": "assistant", "content": self.current}]
        self.current = ""
        self._redraw()

    def reset(self) -> None:
        self.history.clear()
        self.text = Text()
        self.current = ""
        self._redraw()


def answer_stats(t0: float, first: float | None, end: float, usage: dict) -> str:
    """Time to first token and decode speed of one answer (tokens as the service counted them)."""
    if first is None:
        return "no answer"
    text = f"first token {first - t0:.2f} s"
    tokens = usage.get("completion_tokens")
    if tokens and tokens > 1 and end > first:
        text += f" · {(tokens - 1) / (end - first):.1f} tok/s"
    return text


class ChatPane(Vertical):
    def __init__(self, workspace: Path, service: ServiceClient, **kw):
        super().__init__(**kw)
        self.workspace = workspace
        self.service = service
        self.right_model: str | None = None
        self.left_model = "base"
        self.llava = False
        self.pending: str | None = None     # a question asked before the service was ready: sent then

    def compose(self) -> ComposeResult:
        with Horizontal(id="chat-controls"):
            yield Select([], prompt="checkpoint to compare (F2)", id="chat-ckpt", compact=True)
            yield Label(" temperature ")
            yield Input("0", id="chat-temperature", type="number", compact=True)
            yield Label(" max tokens ")
            yield Input("128", id="chat-max-tokens", type="integer", compact=True)
            yield Button("Reset", id="chat-reset", compact=True)
        with Horizontal(id="chat-system-row"):
            yield Label("system ")
            yield Input(placeholder="system prompt (default: the run's own)", id="chat-system", compact=True)
        yield Label("", id="chat-status")
        with Horizontal(id="chat-image-row"):           # LLaVA checkpoints: the image both sides are asked about
            yield Input(placeholder="image (path) for the LLaVA comparison", id="chat-image", compact=True)
            yield Button("…", id="chat-image-pick", classes="pick", compact=True)
        yield Static("", id="chat-image-view")
        with Horizontal(id="chat-sides"):
            yield Transcript("base", id="chat-left")
            yield Transcript("fine-tuned", id="chat-right")
        yield Input(placeholder="ask both… (enter sends)", id="chat-input", select_on_focus=False)

    def on_key(self, event: events.Key) -> None:
        type_into(self, event, "#chat-input")     # a question typed anywhere on the screen goes to the prompt

    def on_mount(self) -> None:
        self.set_llava(False)
        self.refresh_checkpoints()

    def refresh_checkpoints(self) -> list[tuple[str, str]]:
        sel = self.query_one("#chat-ckpt", Select)
        keep = sel.value
        choices = checkpoint_choices(self.workspace)
        with self.prevent(Select.Changed):
            sel.set_options(choices)
            if chosen(keep) and any(v == keep for _, v in choices):
                sel.value = keep
        return choices

    def action_checkpoint(self) -> None:
        """F2: the checkpoint list open, to move in with the arrows and pick with enter."""
        sel = self.query_one("#chat-ckpt", Select)
        if not self.refresh_checkpoints():
            self.app.notify("no checkpoint to chat with yet: train a run first (3 Runs)", severity="warning")
            return
        self.screen.set_focus(sel)
        sel.action_show_overlay()

    def status(self, text: str, style: str = "dim") -> None:
        self.query_one("#chat-status", Label).update(Text(text, style=style))

    def pick(self, checkpoint: Path) -> None:
        self.refresh_checkpoints()
        self.query_one("#chat-ckpt", Select).value = str(checkpoint)

    @on(Select.Changed, "#chat-ckpt")
    def checkpoint_changed(self, event: Select.Changed) -> None:
        # another model on the right: the old answers and the old image go, or they would sit under it
        for t in self.query(Transcript):
            t.reset()
        self.query_one("#chat-image", Input).value = ""
        self.right_model = None
        if chosen(event.value):
            self._connect(Path(str(event.value)))

    def set_llava(self, on: bool) -> None:
        self.llava = on
        self.query_one("#chat-image-row").display = on
        self.query_one("#chat-image-view").display = on

    @on(Input.Changed, "#chat-image")
    def image_changed(self, event: Input.Changed) -> None:
        path = self.image_path()
        self.query_one("#chat-image-view", Static).update(half_blocks(path, 16, 6) if path else "")

    def image_path(self) -> str | None:
        value = self.query_one("#chat-image", Input).value.strip()
        if not value:
            return None
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else self.workspace / p)

    @on(Button.Pressed, "#chat-image-pick")
    def pick_image(self) -> None:
        def done(path: str | None) -> None:
            if path:
                self.query_one("#chat-image", Input).value = path
                self._to_prompt()
        self.app.push_screen(PathPicker(self.workspace), done)

    @on(Input.Submitted, "#chat-image")
    def image_submitted(self) -> None:
        """Enter on the image: with one there, on to the question (typed next, it went into the path)."""
        path = self.image_path()
        if path and Path(path).is_file():
            self._to_prompt()
        else:
            self.app.notify(f"image: {path}: no such image" if path else "image: type the image's path",
                            severity="warning")

    def _to_prompt(self) -> None:
        prompt = self.query_one("#chat-input", Input)
        self.screen.set_focus(prompt)

    def action_image(self) -> None:
        """F3: the image field (LLaVA checkpoints), its path selected to be typed over."""
        if not self.llava:
            self.app.notify("images are for LLaVA checkpoints: pick one with F2", severity="warning")
            return
        field = self.query_one("#chat-image", Input)
        self.screen.set_focus(field)
        field.select_all()

    @work(thread=True, exclusive=True, group="chat-connect", exit_on_error=False)
    def _connect(self, ckpt: Path) -> None:
        if (ckpt / "llava.json").is_file():
            self._connect_llava(ckpt)
        else:
            self._connect_lora(ckpt)
        prompt, failed = self.pending, self.right_model is None
        if failed and prompt:               # it failed (the status line says why): the question goes back
            self.pending = None
            self.app.call_from_thread(self._give_back, prompt)

    def _give_back(self, prompt: str) -> None:
        box = self.query_one("#chat-input", Input)
        if not box.value:
            box.value = prompt

    def _connect_lora(self, ckpt: Path) -> None:
        self.app.call_from_thread(self.set_llava, False)
        self.left_model = "base"
        base = base_of(ckpt)
        say = lambda t, s="dim": self.app.call_from_thread(self.status, t, s)  # noqa: E731
        if not base:
            say(f"{ckpt}: no tunedeck.json naming its base model", "red")
            return
        try:
            self.service.ensure(base, say)
            name = f"{ckpt.parent.name}-{ckpt.name}"
            self.service.add_adapter(name, ckpt)
        except ServiceError as e:
            say(str(e), "bold red")
            return
        self.right_model = name
        self.app.call_from_thread(self.query_one("#chat-left", Transcript).set_title, f"base · {Path(base).name}")
        self.app.call_from_thread(self.query_one("#chat-right", Transcript).set_title, name)
        say(f"ready: {self.service.url}", "green")
        self.app.call_from_thread(self._send_pending)

    def _connect_llava(self, ckpt: Path) -> None:
        """Left: the pretrain checkpoint (projector only); right: this finetune checkpoint."""
        say = lambda t, s="dim": self.app.call_from_thread(self.status, t, s)  # noqa: E731
        try:
            info = json.loads((ckpt / "llava.json").read_text())
        except (OSError, ValueError):
            say(f"{ckpt}: unreadable llava.json", "red")
            return
        pre = pretrain_of(ckpt) if info.get("stage") == "finetune" else ckpt
        if pre is None:
            say(f"{ckpt}: its recipe names no pretrain checkpoint (llava.pretrained_pth) to compare with", "red")
            return
        name = f"{ckpt.parent.name}-{ckpt.name}"
        try:
            args = ("--visual-encoder", info["visual_encoder"], "--llava", f"pre-finetune={pre}",
                    "--llava", f"{name}={ckpt}")
            self.service.ensure(info["llm"], say, extra_args=args, models=("pre-finetune", name))
        except ServiceError as e:
            say(str(e), "bold red")
            return
        self.left_model, self.right_model = "pre-finetune", name
        self.app.call_from_thread(self.set_llava, True)
        self.app.call_from_thread(self.query_one("#chat-left", Transcript).set_title,
                                  f"pre-finetune · {pre.parent.name}/{pre.name}")
        self.app.call_from_thread(self.query_one("#chat-right", Transcript).set_title, name)
        say(f"ready: {self.service.url} — an image (F3), then ask", "green")
        self.app.call_from_thread(self._send_pending)

    @on(Input.Submitted, "#chat-input")
    def send(self, event: Input.Submitted) -> None:
        prompt = event.value.strip()
        if not prompt:
            return
        if self.right_model is None:
            # asked before a model is ready: the question waits for the checkpoint being connected, or
            # for the newest checkpoint, picked now
            sel = self.query_one("#chat-ckpt", Select)
            if not chosen(sel.value):
                choices = checkpoint_choices(self.workspace)
                if not choices:
                    self.app.notify("no checkpoint to chat with yet: train a run first (3 Runs)", severity="warning")
                    return
                self.app.notify(f"asking {choices[0][0]}, the newest checkpoint (pick another above)")
                self.pending = prompt
                event.input.value = ""
                sel.value = choices[0][1]            # connects it (checkpoint_changed)
                return
            self.pending = prompt
            event.input.value = ""
            if not any(w.group == "chat-connect" and not w.is_finished for w in self.workers):
                self._connect(Path(str(sel.value)))      # its start had failed: asking tries again
            self.status("starting the model: the question goes as soon as it is ready")
            return
        self._ask(prompt, event.input)

    def _send_pending(self) -> None:
        prompt, self.pending = self.pending, None
        if prompt and self.right_model is not None:
            self._ask(prompt, None)

    def _ask(self, prompt: str, field: Input | None) -> None:
        image = self.image_path() if self.llava else None
        if image is not None and not Path(image).is_file():
            self.app.notify(f"{image}: no such image", severity="error")
            return
        if field is not None:
            field.value = ""
        group = f"{uuid.uuid4().hex[:12]}/2"     # the two sides: the service answers them in one batch
        for side, model in (("#chat-left", self.left_model), ("#chat-right", self.right_model)):
            t = self.query_one(side, Transcript)
            t.ask(prompt)
            content: str | list = prompt
            if image is not None and not t.history:      # the image goes with the first question
                content = [image_part(image), {"type": "text", "text": prompt}]
            self._stream(t, model, content, group)

    def params(self) -> dict:
        def num(id_: str, default: float) -> float:
            try:
                return float(self.query_one(id_, Input).value)
            except ValueError:
                return default
        p = {"temperature": num("#chat-temperature", 0.0), "max_tokens": int(num("#chat-max-tokens", 128))}
        return p

    def system(self) -> list[dict]:
        s = self.query_one("#chat-system", Input).value.strip()
        return [{"role": "system", "content": s}] if s else []

    @work(thread=True, exit_on_error=False)
    def _stream(self, side: Transcript, model: str, prompt: str | list, group: str | None = None) -> None:
        messages = self.system() + side.history + [{"role": "user", "content": prompt}]
        usage: dict = {}
        t0 = time.perf_counter()
        first = None
        try:
            for piece in self.service.stream(model, messages, usage=usage, group=group, **self.params()):
                first = first or time.perf_counter()
                self.app.call_from_thread(side.piece, piece)
        except ServiceError as e:
            self.app.call_from_thread(side.done, prompt, str(e))
            self.app.call_from_thread(self.status, str(e), "bold red")
            return
        self.app.call_from_thread(side.done, prompt)
        self.app.call_from_thread(side.set_stats, answer_stats(t0, first, time.perf_counter(), usage))

    @on(Button.Pressed, "#chat-reset")
    def reset(self) -> None:
        for t in self.query(Transcript):
            t.reset()
