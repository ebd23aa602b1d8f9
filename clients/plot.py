"""A small Pillow line chart for `mone profile` (no plotting dependency)."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw

Series = tuple[str, Sequence[float], Sequence[float | None], tuple[int, int, int]]
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]


def line_panels(
    title: str, xlabel: str, panels: list[tuple[str, list[Series]]], width: int = 360
) -> Image.Image:
    """Panels side by side, each a titled chart of one or more (label, x, y, colour) series."""
    height, top = 300, 28
    img = Image.new("RGB", (width * len(panels), height + top), "white")
    draw = ImageDraw.Draw(img)
    draw.text((8, 8), title, fill="black")
    for i, (name, series) in enumerate(panels):
        _panel(draw, (i * width, top, (i + 1) * width, top + height), name, xlabel, series)
    return img


def _panel(
    draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], name: str, xlabel: str, series: list[Series]
) -> None:
    x0, y0, x1, y1 = box[0] + 56, box[1] + 24, box[2] - 16, box[3] - 40
    draw.text((box[0] + 56, box[1] + 4), name, fill="black")
    points = [(x, y) for _, xs, ys, _ in series for x, y in zip(xs, ys, strict=True) if y is not None]
    if not points:
        draw.text((x0, (y0 + y1) // 2), "no data", fill="gray")
        return
    all_x = [x for _, xs, _, _ in series for x in xs]  # every panel spans all of x
    xmin, xmax = min(all_x), max(all_x)
    ymin, ymax = 0.0, max(p[1] for p in points) * 1.1 or 1.0
    xmax = xmax if xmax > xmin else xmin + 1

    def at(x: float, y: float) -> tuple[float, float]:
        return x0 + (x - xmin) / (xmax - xmin) * (x1 - x0), y1 - (y - ymin) / (ymax - ymin) * (y1 - y0)

    draw.rectangle((x0, y0, x1, y1), outline=(160, 160, 160))
    for k in range(5):
        yv = ymin + k * (ymax - ymin) / 4
        _, yy = at(xmin, yv)
        draw.line((x0, yy, x1, yy), fill=(230, 230, 230))
        draw.text((box[0] + 4, yy - 6), f"{yv:.3g}", fill=(90, 90, 90))
        xv = xmin + k * (xmax - xmin) / 4
        xx, _ = at(xv, ymin)
        draw.text((xx - 10, y1 + 4), f"{xv:.3g}", fill=(90, 90, 90))
    draw.text(((x0 + x1) // 2 - 20, y1 + 20), xlabel, fill="black")
    for j, (label, xs, ys, colour) in enumerate(series):
        pts = [at(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for px, py in pts:
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=colour)
        draw.text((x0 + 6, y0 + 6 + 14 * j), label, fill=colour)
