"""A loss-curve plot in braille dots (2×4 dots a cell), with the loss range on the left and the step
range below: the larger companion of the run view's sparkline."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

# dot bits of a braille cell, by (column, row) within the 2×4 cell
_DOTS = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))
LABEL_WIDTH = 9


def buckets(values: list[float], n: int) -> list[float]:
    """``values`` averaged down (or kept) to at most ``n`` points, evenly over the steps."""
    if len(values) <= n:
        return list(values)
    out = []
    for i in range(n):
        lo, hi = i * len(values) // n, (i + 1) * len(values) // n
        chunk = values[lo:max(hi, lo + 1)]
        out.append(sum(chunk) / len(chunk))
    return out


def braille_plot(values: list[float], cols: int, rows: int) -> tuple[list[str], float, float]:
    """``rows`` lines of ``cols`` braille cells drawing ``values`` as a connected line (top = the
    highest plotted value), and the low and high ends of the plotted range."""
    grid = [[0] * cols for _ in range(rows)]
    points = buckets(values, cols * 2)
    lo, hi = min(points), max(points)
    span = (hi - lo) or 1.0
    dots_high = rows * 4
    xscale = (cols * 2 - 1) / max(len(points) - 1, 1)
    prev = None
    for i, v in enumerate(points):
        x = round(i * xscale)
        y = round((hi - v) / span * (dots_high - 1))        # 0 = top
        ys = range(min(prev, y), max(prev, y) + 1) if prev is not None else (y,)
        for yy in ys:                                       # vertical fill keeps the line connected
            grid[yy // 4][x // 2] |= _DOTS[x % 2][yy % 4]
        prev = y
    return ["".join(chr(0x2800 + c) for c in row) for row in grid], lo, hi


def _fmt(v: float) -> str:
    return f"{v:.4g}".rjust(LABEL_WIDTH - 1)


class LossPlot(Widget):
    """Loss against optimizer step; ``data`` is the loss of steps 1..n."""

    DEFAULT_CSS = "LossPlot { height: 1fr; min-height: 5; }"
    data: reactive[list[float]] = reactive(list, always_update=True)

    def render(self) -> Text:
        width, height = self.content_size
        values = self.data
        if not values:
            return Text("no loss yet", style="dim")
        cols, rows = max(width - LABEL_WIDTH, 1), max(height - 1, 1)
        lines, lo, hi = braille_plot(values, cols, rows)
        out = Text(no_wrap=True, overflow="crop")
        for r, line in enumerate(lines):
            label = _fmt(hi) if r == 0 else _fmt(lo) if r == rows - 1 else " " * (LABEL_WIDTH - 1)
            out.append(label + " ", style="dim")
            out.append(line, style="green")
            out.append("\n")
        first, last = "step 1", f"step {len(values)}"
        out.append(" " * LABEL_WIDTH + (first + last.rjust(max(cols - len(first), 1)))[:cols], style="dim")
        return out
