"""Images in the terminal with half blocks: each cell shows two pixels, the upper one as the
foreground of '▀' and the lower one as its background. Works in any truecolour terminal (and
degrades to the nearest colours in 256-colour ones); Pillow only, torch-free."""

from __future__ import annotations

from pathlib import Path

from rich.style import Style
from rich.text import Text


def half_blocks(path: str | Path, width: int = 24, height: int = 12) -> Text:
    """The image fitted into width × height cells (aspect kept), or a one-line reason it cannot be shown."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((width, height * 2))
    except FileNotFoundError:
        return Text(f"{path}: no such image", style="red")
    except Exception as e:
        return Text(f"{path}: cannot read the image ({type(e).__name__})", style="red")
    w, h = im.size
    px = im.load()
    out = Text(no_wrap=True, overflow="crop")
    for y in range(0, h, 2):
        for x in range(w):
            top = px[x, y]
            bottom = px[x, y + 1] if y + 1 < h else None
            style = Style(color=f"rgb{top}", bgcolor=f"rgb{bottom}" if bottom else None)
            out.append("▀", style=style)
        if y + 2 < h:
            out.append("\n")
    return out
