"""Edge targets from a label map: nonzero Laplacian, thinned to one pixel (Part B §5, ``edge``).

The official loader runs OpenCV's 3x3 Laplacian (reflect-101 borders) on PASCAL-Context's
``LabelMap`` and thins the nonzero set with scikit-image's ``thin``. Both are re-implemented here in
numpy so the package needs neither OpenCV nor scikit-image: the Laplacian exactly, the thinning as
the two-subiteration algorithm of Guo and Hall (1989), which is what ``skimage.morphology.thin`` runs.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

__all__ = ["laplacian_nonzero", "thin", "label_edges"]


def laplacian_nonzero(labels: np.ndarray) -> np.ndarray:
    """``True`` where the 4-neighbour Laplacian of ``labels`` is nonzero (reflect-101 borders)."""
    lab = np.asarray(labels).astype(np.int64)
    p = np.pad(lab, 1, mode="reflect")  # numpy 'reflect' == OpenCV BORDER_REFLECT_101
    lap = p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4 * lab
    return lap != 0


def _bits(code: int) -> list[bool]:
    # bit i is neighbour x_{i+1} of Guo-Hall: x1 = E, then counter-clockwise (NE, N, NW, W, SW, S, SE)
    return [bool(code >> i & 1) for i in range(8)]


@lru_cache(maxsize=1)
def _deletion_tables() -> tuple[np.ndarray, np.ndarray]:
    """For each of the 256 neighbourhoods: may the centre be deleted in subiteration 1 / 2?"""
    first = np.zeros(256, dtype=bool)
    second = np.zeros(256, dtype=bool)
    for code in range(256):
        x = _bits(code)
        x9 = x + x[:1]
        crossings = sum(1 for i in (0, 2, 4, 6) if not x9[i] and (x9[i + 1] or x9[i + 2]))  # C(p) == 1
        n1 = sum(1 for k in (0, 2, 4, 6) if x9[k] or x9[k + 1])
        n2 = sum(1 for k in (0, 2, 4, 6) if x9[k + 1] or x9[k + 2])
        thin_ok = crossings == 1 and 2 <= min(n1, n2) <= 3
        first[code] = thin_ok and not ((x[1] or x[2] or not x[7]) and x[0])
        second[code] = thin_ok and not ((x[5] or x[6] or not x[3]) and x[4])
    return first, second


def _neighbour_codes(img: np.ndarray) -> np.ndarray:
    """8-bit neighbourhood code of every interior pixel of the zero-padded boolean ``img``."""
    c = img.astype(np.uint8)
    return (
        c[1:-1, 2:]  # E
        | c[:-2, 2:] << 1  # NE
        | c[:-2, 1:-1] << 2  # N
        | c[:-2, :-2] << 3  # NW
        | c[1:-1, :-2] << 4  # W
        | c[2:, :-2] << 5  # SW
        | c[2:, 1:-1] << 6  # S
        | c[2:, 2:] << 7  # SE
    )


def thin(mask: np.ndarray, max_iter: int | None = None) -> np.ndarray:
    """Thin a binary mask to 1-pixel-wide, 8-connected lines (Guo-Hall, two subiterations)."""
    img = np.pad(np.asarray(mask, dtype=bool), 1)
    first, second = _deletion_tables()
    it = 0
    while max_iter is None or it < max_iter:
        changed = False
        for table in (first, second):
            inner = img[1:-1, 1:-1]
            delete = inner & table[_neighbour_codes(img)]
            if delete.any():
                inner[delete] = False
                changed = True
        it += 1
        if not changed:
            break
    return img[1:-1, 1:-1].copy()


def label_edges(labels: np.ndarray) -> np.ndarray:
    """Binary (uint8 {0,1}) edge map of a label map: thinned nonzero Laplacian."""
    return thin(laplacian_nonzero(labels)).astype(np.uint8)
