"""Loss curves in braille dots (2×4 dots a cell), with the loss range on the left and the step range
below: the larger companion of the run view's sparkline, and the comparison view's overlay of
several runs (one colour each, on one step axis and one loss range)."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

# dot bits of a braille cell, by (column, row) within the 2×4 cell
_DOTS = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))
LABEL_WIDTH = 9
COLOURS = ("green", "cyan", "magenta", "yellow", "blue", "red", "white", "bright_green")


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


def braille_curves(series: list[list[float]], cols: int, rows: int) -> tuple[list[list[int]], list[list[int]],
                                                                              float, float]:
    """Each series drawn as a connected line on a shared grid: the longest one spans the width, a
    shorter one as far as its last step. Returns the dot bits and the series index owning each cell
    (-1 for none; where lines cross the later series wins), and the plotted loss range."""
    longest = max((len(s) for s in series), default=0)
    width_dots = cols * 2
    points = [buckets(s, max(1, round(width_dots * len(s) / longest))) if s else [] for s in series]
    flat = [v for p in points for v in p]
    lo, hi = (min(flat), max(flat)) if flat else (0.0, 1.0)
    span = (hi - lo) or 1.0
    dots_high = rows * 4
    grid = [[0] * cols for _ in range(rows)]
    owner = [[-1] * cols for _ in range(rows)]
    for k, pts in enumerate(points):
        if not pts:
            continue
        reach = (width_dots - 1) * len(series[k]) / longest        # how far along the shared step axis
        xscale = reach / max(len(pts) - 1, 1)
        dots = [(min(round(i * xscale), width_dots - 1), round((hi - v) / span * (dots_high - 1)))   # y 0 = top
                for i, v in enumerate(pts)]
        path = [dots[0]]
        for (x0, y0), (x1, y1) in zip(dots, dots[1:]):            # every column between two points
            path += [(x, round(y0 + (y1 - y0) * (x - x0) / (x1 - x0))) for x in range(x0 + 1, x1 + 1)]
        prev = None
        for x, y in path:
            ys = range(min(prev, y), max(prev, y) + 1) if prev is not None else (y,)
            for yy in ys:                                           # vertical fill keeps the line connected
                grid[yy // 4][x // 2] |= _DOTS[x % 2][yy % 4]
                owner[yy // 4][x // 2] = k
            prev = y
    return grid, owner, lo, hi


def braille_plot(values: list[float], cols: int, rows: int) -> tuple[list[str], float, float]:
    """``rows`` lines of ``cols`` braille cells drawing one curve (top = the highest plotted value),
    and the low and high ends of the plotted range."""
    grid, _, lo, hi = braille_curves([values], cols, rows)
    return ["".join(chr(0x2800 + c) for c in row) for row in grid], lo, hi


def _fmt(v: float) -> str:
    return f"{v:.4g}".rjust(LABEL_WIDTH - 1)


def render_curves(series: list[list[float]], width: int, height: int) -> Text:
    if not any(series):
        return Text("no loss yet", style="dim")
    cols, rows = max(width - LABEL_WIDTH, 1), max(height - 1, 1)
    grid, owner, lo, hi = braille_curves(series, cols, rows)
    out = Text(no_wrap=True, overflow="crop")
    for r in range(rows):
        label = _fmt(hi) if r == 0 else _fmt(lo) if r == rows - 1 else " " * (LABEL_WIDTH - 1)
        out.append(label + " ", style="dim")
        for c in range(cols):
            k = owner[r][c]
            out.append(chr(0x2800 + grid[r][c]), style=COLOURS[k % len(COLOURS)] if k >= 0 else "")
        out.append("\n")
    first, last = "step 1", f"step {max(len(s) for s in series)}"
    out.append(" " * LABEL_WIDTH + (first + last.rjust(max(cols - len(first), 1)))[:cols], style="dim")
    return out


class LossPlot(Widget):
    """Loss against optimizer step; ``data`` is the loss of steps 1..n."""

    DEFAULT_CSS = "LossPlot { height: 1fr; min-height: 5; }"
    data: reactive[list[float]] = reactive(list, always_update=True)

    def render(self) -> Text:
        width, height = self.content_size
        return render_curves([self.data], width, height)


class CurvesPlot(Widget):
    """Several runs' loss curves overlaid; ``series`` is one loss list (steps 1..n) per run, drawn in
    COLOURS order."""

    DEFAULT_CSS = "CurvesPlot { height: 1fr; min-height: 5; }"
    series: reactive[list[list[float]]] = reactive(list, always_update=True)

    def render(self) -> Text:
        width, height = self.content_size
        return render_curves(self.series, width, height)
