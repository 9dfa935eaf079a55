"""Files: the workspace as a tree (symlinks followed, sizes shown), a preview, and for a
checkpoint its step, the loss at that step, adapter rank/alpha/targets and size, with actions:
chat with it, merge it, resume from it."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.syntax import Syntax
from rich.text import Text
from textual import events, on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, DirectoryTree, Log, Static

from engine.core.tree import dir_size, human_size
from engine.train.runs import RunDirectory, checkpoint_step, is_complete_checkpoint

from ..dialogs import ConfirmDialog, NameDialog
from ..messages import ChatWith
from ..typing import SCREEN_KEYS, in_field, printable
from ..workspace import engine_command, engine_env, run_engine

PREVIEW_BYTES = 64 * 1024
SYNTAX = {".py": "python", ".json": "json", ".jsonl": "json", ".yaml": "yaml", ".yml": "yaml", ".md": "markdown",
          ".sh": "bash", ".toml": "toml", ".log": "text", ".txt": "text"}


class SizedDirectoryTree(DirectoryTree):
    """File sizes beside the names."""

    def render_label(self, node, base_style, style):
        label = super().render_label(node, base_style, style)
        path = node.data.path if node.data is not None else None
        if path is not None and path.is_file():
            try:
                label.append(f"  {human_size(path.stat().st_size)}", style="dim")
            except OSError:
                pass
        return label


def checkpoint_info(path: Path) -> dict:
    """What the Files screen shows about a checkpoint (torch-free)."""
    step = checkpoint_step(path)
    run = RunDirectory(path.parent)
    loss = next((m["loss"] for m in run.metrics() if m["step"] == step), None)
    info = {"step": step, "loss": loss, "size": dir_size(path), "run": str(path.parent)}
    cfg = path / "adapter_config.json"
    if cfg.is_file():
        a = json.loads(cfg.read_text())
        info.update(kind="LoRA adapter", r=a.get("r"), alpha=a.get("lora_alpha"),
                    targets=sorted(a.get("target_modules") or []), base=a.get("base_model_name_or_path"))
    else:
        info["kind"] = "full model"
    meta = path / "tunedeck.json"
    if meta.is_file():
        m = json.loads(meta.read_text())
        info.update(template=m.get("prompt_template"), base=m.get("base_model", info.get("base")))
    return info


class FilesPane(Horizontal):
    def __init__(self, workspace: Path, **kw):
        super().__init__(**kw)
        self.workspace = workspace
        self.selected: Path | None = None

    def compose(self) -> ComposeResult:
        yield SizedDirectoryTree(str(self.workspace), id="files-tree")
        with Vertical(id="files-right"):
            yield Static("", id="files-info")
            with Horizontal(classes="buttons", id="ckpt-actions"):
                yield Button("Chat with it", id="ckpt-chat")
                yield Button("Merge it", id="ckpt-merge")
                yield Button("Resume from it", id="ckpt-resume")
            with VerticalScroll(id="files-preview-box"):
                yield Static("", id="files-preview")
            yield Log(id="files-log", max_lines=500)

    def on_mount(self) -> None:
        self.query_one("#ckpt-actions").display = False
        self.query_one("#files-log").display = False

    JUMP_PAUSE_S = 1.0            # letters typed within this of each other make one name to jump to
    _typed, _typed_at = "", 0.0

    def on_key(self, event: events.Key) -> None:
        """Letters typed on the tree jump to the first entry in view whose name starts with them, as in a
        file manager ("wo" reaches work_dirs)."""
        ch = printable(event)
        if ch is None or ch in SCREEN_KEYS or in_field(self.app.focused):
            return
        now = time.monotonic()
        self._typed = (self._typed if now - self._typed_at < self.JUMP_PAUSE_S else "") + ch.lower()
        self._typed_at = now
        event.stop()
        event.prevent_default()
        tree = self.query_one("#files-tree", DirectoryTree)
        for line in range(tree.last_line + 1):
            node = tree.get_node_at_line(line)
            if node is not None and node.data is not None and \
                    Path(node.data.path).name.lower().startswith(self._typed):
                self.screen.set_focus(tree)
                tree.move_cursor(node)
                return
        self.app.bell()                                  # nothing in view starts so

    @on(DirectoryTree.DirectorySelected)
    @on(DirectoryTree.FileSelected)
    def picked(self, event) -> None:
        self.show(Path(event.path))

    @on(DirectoryTree.NodeHighlighted)
    def highlighted(self, event: DirectoryTree.NodeHighlighted) -> None:
        if event.node.data is not None:
            self.show(Path(event.node.data.path))

    def show(self, path: Path) -> None:
        self.selected = path
        info = self.query_one("#files-info", Static)
        preview = self.query_one("#files-preview", Static)
        is_ckpt = is_complete_checkpoint(path)
        self.query_one("#ckpt-actions").display = is_ckpt
        if is_ckpt:
            c = checkpoint_info(path)
            lines = [Text.assemble(("checkpoint ", "bold"), (path.name, "bold cyan"), f"  ({c['kind']})"),
                     Text(f"step {c['step']}   loss at that step {c['loss'] if c['loss'] is not None else '-'}   "
                          f"size {human_size(c['size'])}")]
            if "r" in c:
                lines.append(Text(f"LoRA rank {c['r']}  alpha {c['alpha']}  targets {', '.join(c['targets'])}"))
            if c.get("base"):
                lines.append(Text(f"base {c['base']}  template {c.get('template') or '-'}", style="dim"))
            info.update(Text("\n").join(lines))
            preview.update("")
            return
        if path.is_dir():
            link = f" → {path.resolve()}" if path.is_symlink() else ""
            info.update(Text.assemble((path.name + "/", "bold"), f"  {human_size(dir_size(path))}{link}"))
            preview.update("")
            return
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(PREVIEW_BYTES)
        except OSError as e:
            info.update(f"{path.name}: cannot read ({e.strerror})")
            return
        info.update(Text.assemble((path.name, "bold"), f"  {human_size(size)}"))
        if b"\0" in head[:4096]:
            preview.update(Text(f"binary file, {size:,} bytes", style="dim"))
            return
        text = head.decode("utf-8", errors="replace")
        lang = SYNTAX.get(path.suffix, "text")
        preview.update(Syntax(text, lang, theme="ansi_dark", word_wrap=True, line_numbers=True))

    # -- checkpoint actions
    @on(Button.Pressed, "#ckpt-chat")
    def chat(self) -> None:
        if self.selected is not None:
            self.post_message(ChatWith(self.selected))

    @on(Button.Pressed, "#ckpt-resume")
    def resume(self) -> None:
        if self.selected is None:
            return
        ckpt = self.selected
        run = RunDirectory(ckpt.parent)
        args = ["train", str(run.config_path), "--work-dir", str(run.path), "--resume", str(ckpt), "--detach"]
        later = [c.name for c in run.checkpoints_after(ckpt)]
        state = run.status().get("state")
        if not later and state != "finished":
            self._engine(args, f"resuming from {ckpt.name}")
            return
        lost = f" and replaces {', '.join(later)}" if later else ""

        def answered(yes: bool | None) -> None:
            if yes:
                self._engine(args + ["--force"], f"resuming from {ckpt.name}")

        self.app.push_screen(ConfirmDialog(
            f"{run.path.name} is {state or 'past this checkpoint'}. Resuming from {ckpt.name} trains its steps "
            f"after {checkpoint_step(ckpt)} again{lost}. Go on?", yes="Resume and replace"), answered)

    @on(Button.Pressed, "#ckpt-merge")
    def merge(self) -> None:
        if self.selected is None:
            return
        c = checkpoint_info(self.selected)
        if c["kind"] != "LoRA adapter" or not c.get("base"):
            self.app.notify("only LoRA checkpoints with a known base model can be merged", severity="warning")
            return
        ckpt = self.selected
        default = f"merged/{ckpt.parent.name}-{ckpt.name}"

        def problem(name: str) -> str | None:
            out = (self.workspace / name).resolve()
            if self.workspace.resolve() not in out.parents:
                return f"{name}: outside the workspace; give a folder under {self.workspace}"
            if out.is_file() or (out.is_dir() and any(out.iterdir())):
                return f"{name}: exists and is not an empty folder; choose another"
            return None

        def chosen_dir(name: str | None) -> None:
            if name:
                self._merge(c["base"], ckpt, (self.workspace / name).resolve())

        self.app.push_screen(NameDialog(f"Merge {ckpt.parent.name}/{ckpt.name} into {Path(c['base']).name}; "
                                        "write the model to (a folder in the workspace):", default, ok="Merge",
                                        input_id="merge-dest", check=problem), chosen_dir)

    @work(thread=True, exclusive=True, group="merge", exit_on_error=False)
    def _merge(self, base: str, ckpt: Path, out: Path) -> None:
        import subprocess

        log = self.query_one("#files-log", Log)
        self.app.call_from_thread(setattr, log, "display", True)
        self.app.call_from_thread(log.write_line, f"merging {ckpt} into {base} → {out}")
        proc = subprocess.Popen(engine_command("merge", base, str(ckpt), str(out)), cwd=self.workspace,
                                env=engine_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            self.app.call_from_thread(log.write_line, line.rstrip())
        rc = proc.wait()
        msg = f"merged into {out}" if rc == 0 else f"merge failed (exit {rc})"
        self.app.call_from_thread(self.app.notify, msg, severity="information" if rc == 0 else "error")
        self.app.call_from_thread(self.query_one("#files-tree", DirectoryTree).reload)

    @work(thread=True, exclusive=True, group="files-engine", exit_on_error=False)
    def _engine(self, args: list[str], what: str) -> None:
        self.app.call_from_thread(self.app.notify, what + "…")
        proc = run_engine(self.workspace, *args)
        msg = proc.stderr.strip().splitlines()[-1] if proc.returncode and proc.stderr.strip() else what
        self.app.call_from_thread(self.app.notify, msg, severity="error" if proc.returncode else "information")
