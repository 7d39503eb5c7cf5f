"""A grid of equally sized panels with a title above each column, as one RGB image.

Layout (pixels): a ``header`` band for the column titles, then ``rows`` x ``cols`` panels of
``panel_h`` x ``panel_w`` separated (and framed) by ``gap`` white pixels::

    width  = cols * panel_w + (cols + 1) * gap
    height = header + rows * panel_h + (rows + 1) * gap
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["GridLayout", "compose_grid", "panel_size"]

PANEL_SIDE = 160  # long side of a panel
GAP = 2
HEADER = 14


def panel_size(img_size: Sequence[int], side: int = PANEL_SIDE) -> tuple[int, int]:
    """(h, w) of a panel: the model's input size scaled so its long side is ``side``."""
    h, w = int(img_size[0]), int(img_size[1])
    scale = side / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


@dataclass(frozen=True)
class GridLayout:
    rows: int
    cols: int
    panel_h: int
    panel_w: int
    gap: int = GAP
    header: int = HEADER

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels, PIL's order."""
        return (
            self.cols * self.panel_w + (self.cols + 1) * self.gap,
            self.header + self.rows * self.panel_h + (self.rows + 1) * self.gap,
        )

    def origin(self, row: int, col: int) -> tuple[int, int]:
        """(x, y) of the top-left pixel of a panel."""
        return (self.gap + col * (self.panel_w + self.gap), self.header + self.gap + row * (self.panel_h + self.gap))


def compose_grid(
    panels: Sequence[Sequence[np.ndarray]],
    titles: Sequence[str],
    layout: GridLayout,
    nearest: Sequence[bool] | None = None,
) -> Image.Image:
    """``panels[row][col]``: (H, W, 3) uint8 images, each resized to the panel size (nearest-neighbour
    where ``nearest[col]``, e.g. class maps; bilinear otherwise)."""
    if len(panels) != layout.rows or any(len(row) != layout.cols for row in panels) or len(titles) != layout.cols:
        raise ValueError(f"expected {layout.rows} rows of {layout.cols} panels and {layout.cols} titles")
    canvas = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(canvas)
    for col, title in enumerate(titles):
        x, _ = layout.origin(0, col)
        draw.text((x + 2, 1), title, fill="black")
    for r, row in enumerate(panels):
        for c, panel in enumerate(row):
            resample = Image.NEAREST if nearest is not None and nearest[c] else Image.BILINEAR
            tile = Image.fromarray(np.ascontiguousarray(panel)).resize((layout.panel_w, layout.panel_h), resample)
            canvas.paste(tile, layout.origin(r, c))
    return canvas
