"""A tiny line-plot PNG writer (zlib + struct only), so the bench needs no plotting library.

:func:`line_plot` draws one chart: axes with ticks and numbers, one polyline per series,
a legend and a title, with a built-in 5x7 pixel font (lower case, digits, a little
punctuation; upper case is drawn as lower case).
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence

Color = tuple[int, int, int]

_FONT: dict[str, tuple[int, ...]] = {
    "0": (0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E), "1": (0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E),
    "2": (0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F), "3": (0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E),
    "4": (0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02), "5": (0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E),
    "6": (0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E), "7": (0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08),
    "8": (0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E), "9": (0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C),
    "a": (0x00, 0x00, 0x0E, 0x01, 0x0F, 0x11, 0x0F), "b": (0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1E),
    "c": (0x00, 0x00, 0x0E, 0x10, 0x10, 0x11, 0x0E), "d": (0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F),
    "e": (0x00, 0x00, 0x0E, 0x11, 0x1F, 0x10, 0x0E), "f": (0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08),
    "g": (0x00, 0x0F, 0x11, 0x11, 0x0F, 0x01, 0x0E), "h": (0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11),
    "i": (0x04, 0x00, 0x0C, 0x04, 0x04, 0x04, 0x0E), "j": (0x02, 0x00, 0x06, 0x02, 0x02, 0x12, 0x0C),
    "k": (0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12), "l": (0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E),
    "m": (0x00, 0x00, 0x1A, 0x15, 0x15, 0x11, 0x11), "n": (0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11),
    "o": (0x00, 0x00, 0x0E, 0x11, 0x11, 0x11, 0x0E), "p": (0x00, 0x00, 0x1E, 0x11, 0x1E, 0x10, 0x10),
    "q": (0x00, 0x00, 0x0D, 0x13, 0x0F, 0x01, 0x01), "r": (0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10),
    "s": (0x00, 0x00, 0x0E, 0x10, 0x0E, 0x01, 0x1E), "t": (0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06),
    "u": (0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0D), "v": (0x00, 0x00, 0x11, 0x11, 0x11, 0x0A, 0x04),
    "w": (0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0A), "x": (0x00, 0x00, 0x11, 0x0A, 0x04, 0x0A, 0x11),
    "y": (0x00, 0x00, 0x11, 0x11, 0x0F, 0x01, 0x0E), "z": (0x00, 0x00, 0x1F, 0x02, 0x04, 0x08, 0x1F),
    " ": (0,) * 7, "/": (0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00),
    "-": (0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00), ".": (0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C),
    "%": (0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03), "(": (0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02),
    ")": (0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08), ",": (0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08),
    ":": (0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00), "=": (0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00),
    "+": (0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00), "?": (0x0E, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04),
}

WHITE: Color = (255, 255, 255)
BLACK: Color = (0, 0, 0)
GREY: Color = (200, 200, 200)
RED: Color = (214, 39, 40)
BLUE: Color = (31, 119, 180)
ORANGE: Color = (255, 127, 14)


class Canvas:
    """An RGB pixel buffer with just enough drawing for a line chart."""

    def __init__(self, width: int, height: int, background: Color = WHITE) -> None:
        self.width = width
        self.height = height
        self.pixels = bytearray(bytes(background) * (width * height))

    def set(self, x: int, y: int, color: Color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = (y * self.width + x) * 3
            self.pixels[i:i + 3] = bytes(color)

    def rect(self, x0: int, y0: int, x1: int, y1: int, color: Color) -> None:
        for y in range(max(0, y0), min(self.height, y1 + 1)):
            for x in range(max(0, x0), min(self.width, x1 + 1)):
                self.set(x, y, color)

    def line(self, x0: float, y0: float, x1: float, y1: float, color: Color,
             width: int = 1) -> None:
        steps = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        half = width // 2
        for i in range(steps + 1):
            t = i / steps
            x = round(x0 + (x1 - x0) * t)
            y = round(y0 + (y1 - y0) * t)
            if width == 1:
                self.set(x, y, color)
            else:
                self.rect(x - half, y - half, x - half + width - 1, y - half + width - 1, color)

    def text(self, x: int, y: int, s: str, color: Color = BLACK, scale: int = 2) -> int:
        """Draw ``s`` with its top-left corner at (x, y); return the x after it."""
        for ch in s.lower():
            rows = _FONT.get(ch, _FONT["?"])
            for r, bits in enumerate(rows):
                for c in range(5):
                    if bits & (0x10 >> c):
                        self.rect(x + c * scale, y + r * scale, x + c * scale + scale - 1,
                                  y + r * scale + scale - 1, color)
            x += 6 * scale
        return x

    @staticmethod
    def text_width(s: str, scale: int = 2) -> int:
        return len(s) * 6 * scale

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.pixels[y * self.width * 3:(y + 1) * self.width * 3])
                       for y in range(self.height))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return (struct.pack(">I", len(data)) + kind + data
                    + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def nice_step(span: float, ticks: int = 6) -> float:
    """A 1/2/5 x 10^n step giving about ``ticks`` ticks over ``span``."""
    if span <= 0:
        return 1.0
    raw = span / ticks
    base = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if raw <= m * base:
            return m * base
    return 10 * base


def _fmt(v: float) -> str:
    return f"{v:.0f}" if abs(v - round(v)) < 1e-9 else f"{v:g}"


def line_plot(series: Sequence[tuple[str, Sequence[tuple[float, float]], Color]], *,
              title: str, xlabel: str, ylabel: str, width: int = 960,
              height: int = 540) -> bytes:
    """A PNG (bytes) of ``series`` = [(label, [(x, y), ...], color), ...]."""
    canvas = Canvas(width, height)
    left, right, top, bottom = 110, 30, 80, 70
    pw, ph = width - left - right, height - top - bottom
    xs = [x for _, pts, _ in series for x, _ in pts] or [0.0, 1.0]
    ys = [y for _, pts, _ in series for _, y in pts] or [0.0, 1.0]
    xmin, xmax = min(0.0, min(xs)), max(xs) if max(xs) > 0 else 1.0
    ystep = nice_step(max(ys) * 1.1 if max(ys) > 0 else 1.0)
    ymax = math.ceil(max(ys) * 1.1 / ystep) * ystep if max(ys) > 0 else 1.0
    xstep = nice_step(xmax - xmin, 8)

    def px(x: float) -> float:
        return left + (x - xmin) / (xmax - xmin) * pw

    def py(y: float) -> float:
        return top + ph - y / ymax * ph

    # grid, ticks and numbers
    y = 0.0
    while y <= ymax + 1e-9:
        yy = round(py(y))
        canvas.line(left, yy, left + pw, yy, GREY)
        label = _fmt(y)
        canvas.text(left - 10 - Canvas.text_width(label), yy - 7, label)
        y += ystep
    x = 0.0
    while x <= xmax + 1e-9:
        xx = round(px(x))
        canvas.line(xx, top + ph, xx, top + ph + 6, BLACK)
        label = _fmt(x)
        canvas.text(xx - Canvas.text_width(label) // 2, top + ph + 12, label)
        x += xstep
    canvas.line(left, top, left, top + ph, BLACK, 2)
    canvas.line(left, top + ph, left + pw, top + ph, BLACK, 2)
    # labels and title
    canvas.text(left + (pw - Canvas.text_width(xlabel)) // 2, height - 28, xlabel)
    canvas.text(10, top - 28, ylabel)
    canvas.text((width - Canvas.text_width(title)) // 2, 12, title)
    # series
    for _, points, color in series:
        for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
            canvas.line(px(x0), py(y0), px(x1), py(y1), color, 3)
    # legend (top right, inside the plot)
    lx = left + pw - max(Canvas.text_width(lbl) for lbl, _, _ in series) - 60
    ly = top + 12
    box = (lx - 10, ly - 8, left + pw - 10, ly + 24 * len(series) - 2)
    canvas.rect(*box, WHITE)
    for x0, y0, x1, y1 in ((box[0], box[1], box[2], box[1]), (box[0], box[3], box[2], box[3]),
                           (box[0], box[1], box[0], box[3]), (box[2], box[1], box[2], box[3])):
        canvas.line(x0, y0, x1, y1, GREY)
    for label, _, color in series:
        canvas.rect(lx, ly + 5, lx + 30, ly + 8, color)
        canvas.text(lx + 40, ly, label)
        ly += 24
    return canvas.png()
