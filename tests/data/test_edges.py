"""Edge targets: OpenCV-style Laplacian (reflect-101) and Guo-Hall thinning, re-implemented in numpy."""

from __future__ import annotations

import numpy as np

from mtlora_dist.data.ingest.edges import label_edges, laplacian_nonzero, thin


def test_straight_boundary_becomes_one_pixel_line():
    labels = np.zeros((10, 12), np.int32)
    labels[:, 6:] = 4
    raw = laplacian_nonzero(labels)
    assert raw[:, 5].all() and raw[:, 6].all() and raw.sum() == 20  # both sides of the boundary
    edges = label_edges(labels)
    assert edges.dtype == np.uint8 and set(np.unique(edges)) == {0, 1}
    cols = np.nonzero(edges.any(axis=0))[0]
    assert len(cols) == 1 and cols[0] in (5, 6)
    assert edges[1:-1].sum(axis=1).tolist() == [1] * 8  # one pixel per row away from the ends


def test_closed_region_gives_closed_thin_contour():
    labels = np.zeros((20, 20), np.int32)
    labels[5:15, 4:16] = 7
    edges = label_edges(labels).astype(bool)
    interior = np.zeros_like(edges)
    interior[7:13, 6:14] = True
    assert not (edges & interior).any() and edges.sum() >= 2 * (8 + 10)
    # one pixel wide: no 2x2 block of edge pixels anywhere
    blocks = edges[:-1, :-1] & edges[1:, :-1] & edges[:-1, 1:] & edges[1:, 1:]
    assert not blocks.any()
    # closed: the outside does not reach the inside through the contour (4-connected flood fill)
    reach = np.zeros_like(edges)
    reach[0, 0] = True
    for _ in range(60):
        grown = reach.copy()
        grown[1:] |= reach[:-1]
        grown[:-1] |= reach[1:]
        grown[:, 1:] |= reach[:, :-1]
        grown[:, :-1] |= reach[:, 1:]
        reach = grown & ~edges
    assert not reach[10, 10]


def test_uniform_map_has_no_edges_even_at_the_border():
    assert not label_edges(np.full((6, 7), 3)).any()


def test_laplacian_is_exact_like_opencv_so_balanced_neighbours_cancel():
    # middle column: 4*2 - (2 + 2 + 1 + 3) = 0 -> no edge there although its left/right neighbours differ
    labels = np.tile(np.array([1, 2, 3], np.int32), (3, 1))
    assert not laplacian_nonzero(labels)[:, 1].any()
    assert laplacian_nonzero(labels)[:, 0].all()


def test_thinning_is_idempotent_and_keeps_thin_lines():
    mask = np.zeros((12, 12), bool)
    mask[2:10, 3:7] = True
    once = thin(mask)
    np.testing.assert_array_equal(thin(once), once)
    diagonal = np.eye(8, dtype=bool)
    np.testing.assert_array_equal(thin(diagonal), diagonal)
