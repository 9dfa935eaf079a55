"""The `tunedeck` command: no arguments opens the app in the current directory (the workspace);
anything else is an engine CLI verb. `tunedeck demo` opens the app on the demo workspace
once it has trained (unless --no-tui)."""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        from .app import run_app

        return run_app(Path.cwd())
    from engine.cli import build_parser
    from engine.cli import main as cli_main

    rc = cli_main(argv)
    if argv[0] == "demo" and rc == 0:
        workspace = Path(build_parser().parse_args(argv).dir)
        if "--no-tui" not in argv and sys.stdout.isatty() and sys.stdin.isatty():
            from .app import run_app

            return run_app(workspace)
        print(f"open the app with:  cd {workspace} && tunedeck", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
