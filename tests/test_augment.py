"""Dihedral transforms, colour maps, version names and their inverses."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline.augment import (
    DIHEDRAL_INVERSE,
    IDENTITY_CMAP,
    augment_grid,
    check_cmap,
    dihedral,
    dihedral_index,
    dihedral_shape,
    format_name,
    inverse_cmap,
    inverse_grid,
    parse_name,
    random_cmaps,
)
from pipeline.canvas import transformed_coords

grids = st.tuples(st.integers(1, 30), st.integers(1, 30)).flatmap(
    lambda hw: arrays(np.uint8, hw, elements=st.integers(0, 9)))
cmaps = st.permutations(list(range(1, 10))).map(lambda p: np.array([0, *p], np.uint8))
dihedrals = st.integers(0, 7)

G = np.array([[1, 2, 3], [4, 5, 6]], np.uint8)


@pytest.mark.parametrize(
    "d, expected",
    [
        (0, [[1, 2, 3], [4, 5, 6]]),
        (1, [[3, 6], [2, 5], [1, 4]]),  # rot90 counter-clockwise
        (2, [[6, 5, 4], [3, 2, 1]]),
        (3, [[4, 1], [5, 2], [6, 3]]),
        (4, [[3, 2, 1], [6, 5, 4]]),  # flip left-right
        (5, [[4, 5, 6], [1, 2, 3]]),  # flip up-down
        (6, [[1, 4], [2, 5], [3, 6]]),  # transpose
        (7, [[6, 3], [5, 2], [4, 1]]),  # anti-transpose
    ],
)
def test_dihedral_known_answers(d, expected):
    out = dihedral(G, d)
    assert out.tolist() == expected
    assert out.shape == dihedral_shape(2, 3, d)


def test_dihedral_is_the_whole_group():
    forms = {dihedral(G, d).tobytes() + bytes(dihedral(G, d).shape) for d in range(8)}
    assert len(forms) == 8
    # closed under composition, and DIHEDRAL_INVERSE inverts
    for a in range(8):
        for b in range(8):
            assert (dihedral(dihedral(G, a), b).tobytes() + bytes(dihedral(dihedral(G, a), b).shape)) in forms
        assert np.array_equal(dihedral(dihedral(G, a), DIHEDRAL_INVERSE[a]), G)


def test_bad_dihedral_id():
    with pytest.raises(ValueError, match="0..7"):
        dihedral(G, 8)


@pytest.mark.slow
@settings(max_examples=150, deadline=None)
@given(grid=grids, d=dihedrals, cmap=cmaps)
def test_inverse_of_augment_is_identity(grid, d, cmap):
    aug = augment_grid(grid, d, cmap)
    assert aug.shape == dihedral_shape(*grid.shape, d)
    assert np.array_equal(inverse_grid(aug, d, cmap), grid)
    assert np.array_equal(aug == 0, dihedral(grid == 0, d))  # background stays background


@pytest.mark.slow
@settings(max_examples=100, deadline=None)
@given(grid=grids, d=dihedrals)
def test_dihedral_index_matches_dihedral(grid, d):
    h, w = grid.shape
    assert np.array_equal(grid.ravel()[dihedral_index(h, w, d)], dihedral(grid, d).ravel())


@pytest.mark.slow
@settings(max_examples=100, deadline=None)
@given(grid=grids, d=dihedrals)
def test_transformed_coords_match_dihedral(grid, d):
    h, w = grid.shape
    i, j = np.indices((h, w))
    i2, j2 = transformed_coords(i.ravel(), j.ravel(), h, w, np.full(h * w, d))
    out = np.zeros(dihedral_shape(h, w, d), np.uint8)
    out[i2, j2] = grid.ravel()
    assert np.array_equal(out, dihedral(grid, d))


@pytest.mark.slow
@settings(max_examples=100, deadline=None)
@given(d=dihedrals, cmap=cmaps, task=st.from_regex(r"[A-Za-z0-9_.-]{1,20}", fullmatch=True))
def test_name_round_trip(d, cmap, task):
    name = format_name(task, d, cmap)
    t2, d2, c2 = parse_name(name)
    assert (t2, d2) == (task, d) and np.array_equal(c2, cmap)


def test_name_is_trm_format():
    cmap = np.array([0, 1, 3, 9, 2, 6, 7, 8, 4, 5], np.uint8)
    assert format_name("007bbfb7", 5, cmap) == "007bbfb7|||t5|||0139267845"


@pytest.mark.parametrize("name", ["abc", "abc|||t8|||0123456789", "abc|||t1|||012345678", "abc|||t1|||1023456789",
                                  "abc|||t1|||0113456789", "|||t1|||0123456789"])
def test_malformed_names_rejected(name):
    with pytest.raises(ValueError):
        parse_name(name)


def test_colour_maps_keep_background_fixed():
    with pytest.raises(ValueError, match="keeps 0 fixed"):
        check_cmap(np.array([1, 0, 2, 3, 4, 5, 6, 7, 8, 9]))
    rng = np.random.default_rng(0)
    maps = random_cmaps(rng, 500, 1.0)
    assert (maps[:, 0] == 0).all() and (np.sort(maps, 1) == np.arange(10)).all()
    assert len({m.tobytes() for m in maps}) > 450  # permutations are varied
    assert (random_cmaps(rng, 50, 0.0) == IDENTITY_CMAP).all()
    some = random_cmaps(rng, 2000, 0.5)
    share = (some == IDENTITY_CMAP).all(1).mean()
    assert 0.4 < share < 0.6
    for m in maps[:20]:
        assert np.array_equal(inverse_cmap(m)[m], IDENTITY_CMAP)
