"""Grids on the 30x30 canvas: placement, EOS markers, decoding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline.augment import dihedral
from pipeline.canvas import (
    EOS,
    PAD,
    decode_canvas,
    grid_to_canvas,
    place_grids,
    ranges,
    segments,
)


@st.composite
def placed_grids(draw):
    h, w = draw(st.integers(1, 30)), draw(st.integers(1, 30))
    grid = draw(arrays(np.uint8, (h, w), elements=st.integers(0, 9)))
    return grid, draw(st.integers(0, 30 - h)), draw(st.integers(0, 30 - w))


def test_known_canvas():
    c = grid_to_canvas(np.array([[1, 2, 3], [4, 5, 6]], np.uint8), 1, 2)
    assert c[1, 2:5].tolist() == [3, 4, 5] and c[2, 2:5].tolist() == [6, 7, 8]
    assert c[3, 2:5].tolist() == [EOS] * 3  # row below
    assert c[1:3, 5].tolist() == [EOS] * 2  # column to the right
    assert c[3, 5] == PAD  # corner not marked
    assert (c != PAD).sum() == 6 + 3 + 2


@pytest.mark.slow
@settings(max_examples=150, deadline=None)
@given(placed_grids())
def test_decode_round_trip(case):
    grid, r0, c0 = case
    assert np.array_equal(decode_canvas(grid_to_canvas(grid, r0, c0), r0, c0), grid)


def test_full_canvas_grid_has_no_eos():
    g = np.full((30, 30), 3, np.uint8)
    c = grid_to_canvas(g)
    assert (c == 5).all()
    assert np.array_equal(decode_canvas(c), g)


def test_decode_takes_largest_top_left_rectangle():
    t = np.zeros((30, 30), np.uint8)
    t[0, :4] = 2
    t[1, :3] = 3
    t[2, :3] = 4
    t[3, :1] = 5
    assert decode_canvas(t).shape == (3, 3)
    assert decode_canvas(np.zeros((30, 30), np.uint8)).shape == (0, 0)


def test_place_many_with_dihedral_matches_transformed_grid():
    rng = np.random.default_rng(1)
    gs = [rng.integers(0, 10, tuple(rng.integers(1, 8, 2))).astype(np.uint8) for _ in range(6)]
    out = np.zeros((6, 30, 30), np.uint8)
    ds = np.arange(6) + 1
    place_grids(out, np.arange(6), np.concatenate([g.ravel() for g in gs]), np.array([g.shape[0] for g in gs]),
                np.array([g.shape[1] for g in gs]), np.full(6, 2), np.full(6, 3), dihedral=ds)
    for k, (g, d) in enumerate(zip(gs, ds)):
        assert np.array_equal(out[k], grid_to_canvas(dihedral(g, d), 2, 3))


def test_grid_must_fit():
    with pytest.raises(ValueError, match="does not fit"):
        grid_to_canvas(np.ones((5, 5), np.uint8), 26, 0)


def test_segments_and_ranges():
    seg, k = segments(np.array([2, 0, 3]))
    assert seg.tolist() == [0, 0, 2, 2, 2] and k.tolist() == [0, 1, 0, 1, 2]
    assert ranges(np.array([2000, 1])).tolist() == list(range(2000)) + [0]
