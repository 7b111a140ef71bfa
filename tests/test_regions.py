"""Region geometry: seeded crops, grid layout, IoU, box growth and salient-region selection."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.scoring.regions import box_iou, grow_boxes, growth_to_target, image_seed, sample_crops, select_salient

SIZES = [(640, 480), (300, 900), (50, 50), (1000, 3)]

# ---------------------------------------------------------------- image_seed


def test_image_seed_is_pinned():
    """Regression pin: these values were computed once. If they change, every resumed job samples other crops."""
    assert image_seed(0, "images/cat.jpg") == 17785735838478707266
    assert image_seed(7, "s3://bucket/a/b.png") == 10641326507294025658
    assert image_seed(0, "é") == 2952272102594307324


@pytest.mark.integration
def test_image_seed_is_stable_across_processes():
    """Python's `hash` is salted per process; the seed must not be. A child with another PYTHONHASHSEED agrees."""
    code = "from pipeline.scoring.regions import image_seed; print(image_seed(3, 'k/ey.jpg'))"
    child = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "12345", "PATH": ""}
    )
    assert int(child.stdout) == image_seed(3, "k/ey.jpg")


def test_image_seed_differs_by_key_and_seed():
    seeds = {image_seed(seed, key) for seed in range(5) for key in ("a", "b", "a.jpg", "dir/a", "")}
    assert len(seeds) == 25
    assert image_seed(1, "0") != image_seed(10, "")  # the separator keeps "1"+"0" apart from "10"+""
    assert all(0 <= s < 2**64 for s in seeds)


# ---------------------------------------------------------------- sample_crops (random)


def test_sample_crops_deterministic_per_key_and_seed():
    first = sample_crops("img/1.jpg", 640, 480, 20, (0.5, 0.9), seed=3)
    again = sample_crops("img/1.jpg", 640, 480, 20, (0.5, 0.9), seed=3)
    np.testing.assert_array_equal(first, again)
    assert first.shape == (20, 4) and first.dtype == np.float64
    assert not np.allclose(first, sample_crops("img/2.jpg", 640, 480, 20, (0.5, 0.9), seed=3))
    assert not np.allclose(first, sample_crops("img/1.jpg", 640, 480, 20, (0.5, 0.9), seed=4))


def test_sample_crops_ignore_global_random_state():
    """Only key, seed and size matter: NumPy's, Python's and torch's global generators do not leak in."""
    import torch

    np.random.seed(1)
    random.seed(1)
    torch.manual_seed(1)
    first = sample_crops("k", 400, 300, 12, (0.5, 0.9), seed=0)
    np.random.seed(2)
    random.seed(2)
    torch.manual_seed(2)
    np.random.rand(100)
    assert np.array_equal(first, sample_crops("k", 400, 300, 12, (0.5, 0.9), seed=0))


@pytest.mark.integration
def test_sample_crops_same_in_another_process():
    code = (
        "import json; from pipeline.scoring.regions import sample_crops; "
        "print(json.dumps(sample_crops('x/y.png', 321, 123, 3, (0.5, 0.9), 9).tolist()))"
    )
    child = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "99", "PATH": ""}
    )
    assert json.loads(child.stdout) == sample_crops("x/y.png", 321, 123, 3, (0.5, 0.9), 9).tolist()


@pytest.mark.parametrize("width, height", SIZES)
@pytest.mark.parametrize("scale", [(0.5, 0.9), (0.2, 0.3), (1.0, 1.0)])
def test_random_crops_are_square_inside_and_sized(width, height, scale):
    boxes = sample_crops(f"{width}x{height}", width, height, 200, scale, seed=1)
    assert boxes.min() >= 0.0 and boxes.max() <= 1.0
    assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])
    side_w = (boxes[:, 2] - boxes[:, 0]) * width
    side_h = (boxes[:, 3] - boxes[:, 1]) * height
    np.testing.assert_allclose(side_w, side_h, rtol=1e-9)  # square in pixels, not in normalised units
    short = min(width, height)
    assert side_w.min() >= scale[0] * short * (1 - 1e-9)
    assert side_w.max() <= scale[1] * short * (1 + 1e-9)
    if scale[0] < scale[1]:
        assert side_w.max() - side_w.min() > 0.5 * (scale[1] - scale[0]) * short  # sides spread over the range


def test_random_crops_spread_over_the_image():
    """Placement is uniform: with 400 crops both the left and right, top and bottom parts get some."""
    boxes = sample_crops("spread", 1000, 1000, 400, (0.2, 0.2), seed=0)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    assert centres.min() < 0.15 and centres.max() > 0.85
    assert 0.4 < centres.mean() < 0.6


@pytest.mark.parametrize("width, height", SIZES)
def test_random_crops_are_nested_in_n(width, height):
    """Crop i is the same box for every N > i, so a sweep over N compares nested crop sets."""
    largest = sample_crops("nested.jpg", width, height, 60, (0.5, 0.9), seed=4)
    for count in (1, 2, 7, 30, 59):
        np.testing.assert_array_equal(sample_crops("nested.jpg", width, height, count, (0.5, 0.9), seed=4), largest[:count])


def test_random_crops_draw_each_crop_from_its_own_row():
    """Pin of the sampling order: row i of uniform(size=(N, 3)) is (side fraction, fx, fy) of crop i."""
    draws = np.random.default_rng(image_seed(2, "row")).uniform(size=(5, 3))
    boxes = sample_crops("row", 400, 200, 5, (0.4, 0.8), seed=2)
    side = (0.4 + 0.4 * draws[:, 0]) * 200
    np.testing.assert_allclose((boxes[:, 2] - boxes[:, 0]) * 400, side)
    np.testing.assert_allclose(boxes[:, 0], draws[:, 1] * (1 - side / 400))
    np.testing.assert_allclose(boxes[:, 1], draws[:, 2] * (1 - side / 200))


def test_zero_crops():
    assert sample_crops("k", 10, 10, 0, (0.5, 0.9), 0).shape == (0, 4)
    assert sample_crops("k", 10, 10, 0, (0.5, 0.9), 0, layout="grid").shape == (0, 4)


# ---------------------------------------------------------------- sample_crops (grid)


def test_grid_covers_corners_evenly_spaced():
    boxes = sample_crops("ignored", 100, 100, 9, (0.4, 0.6), seed=0, layout="grid")
    np.testing.assert_allclose(boxes[:, 2] - boxes[:, 0], 0.5)  # side (alpha + beta) / 2 of the short side
    np.testing.assert_allclose(boxes[:, 3] - boxes[:, 1], 0.5)
    np.testing.assert_allclose(np.unique(boxes[:, 0].round(12)), [0.0, 0.25, 0.5])
    np.testing.assert_allclose(np.unique(boxes[:, 1].round(12)), [0.0, 0.25, 0.5])
    corners = {tuple(np.round(b, 12)) for b in boxes}
    for corner in [(0.0, 0.0, 0.5, 0.5), (0.5, 0.0, 1.0, 0.5), (0.0, 0.5, 0.5, 1.0), (0.5, 0.5, 1.0, 1.0)]:
        assert corner in corners
    assert len(corners) == 9  # every tile is a different place


def test_grid_on_a_wide_image_is_square_in_pixels():
    boxes = sample_crops("k", 200, 100, 4, (0.5, 0.5), seed=0, layout="grid")
    np.testing.assert_allclose(boxes[:, 2] - boxes[:, 0], 0.25)  # 50 px of 200
    np.testing.assert_allclose(boxes[:, 3] - boxes[:, 1], 0.5)  # 50 px of 100
    np.testing.assert_allclose(sorted(set(boxes[:, 0].round(12))), [0.0, 0.75])
    np.testing.assert_allclose(sorted(set(boxes[:, 1].round(12))), [0.0, 0.5])


def test_grid_of_one_is_centred_and_ignores_key_and_seed():
    one = sample_crops("a", 100, 100, 1, (0.5, 0.5), seed=0, layout="grid")
    np.testing.assert_allclose(one, [[0.25, 0.25, 0.75, 0.75]])
    np.testing.assert_array_equal(
        sample_crops("a", 300, 200, 16, (0.5, 0.9), 0, "grid"), sample_crops("b", 300, 200, 16, (0.5, 0.9), 7, "grid")
    )


# ---------------------------------------------------------------- box_iou


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ([0.1, 0.2, 0.5, 0.6], [0.1, 0.2, 0.5, 0.6], 1.0),  # identical
        ([0.0, 0.0, 0.4, 0.4], [0.6, 0.6, 1.0, 1.0], 0.0),  # disjoint
        ([0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0], 0.0),  # touching edges
        ([0.0, 0.0, 0.5, 0.5], [0.25, 0.0, 0.75, 0.5], 1 / 3),  # shifted by half a side: 0.5 / 1.5
        ([0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5, 0.5], 0.25),  # nested
        ([0.0, 0.0, 0.2, 0.2], [0.0, 0.0, 0.0, 0.0], 0.0),  # degenerate box, no division by zero
    ],
)
def test_box_iou_known_values(a, b, expected):
    iou = box_iou(np.array([a]), np.array([b]))
    assert iou.shape == (1, 1)
    assert iou[0, 0] == pytest.approx(expected, abs=1e-12)
    assert box_iou(np.array([b]), np.array([a]))[0, 0] == pytest.approx(expected, abs=1e-12)  # symmetric


def test_box_iou_is_pairwise():
    a = np.array([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1], [0, 0, 1, 1]], dtype=float)
    b = np.array([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]], dtype=float)
    np.testing.assert_allclose(box_iou(a, b), [[1, 0], [0, 1], [0.25, 0.25]])


# ---------------------------------------------------------------- grow_boxes


@st.composite
def _boxes(draw, max_count=6):
    count = draw(st.integers(1, max_count))
    unit = st.floats(0.0, 1.0, allow_nan=False)
    rows = []
    for _ in range(count):
        xs = sorted(draw(st.lists(unit, min_size=2, max_size=2)))
        ys = sorted(draw(st.lists(unit, min_size=2, max_size=2)))
        if xs[1] - xs[0] < 1e-6:
            xs = [min(xs[0], 1 - 1e-3), min(xs[0], 1 - 1e-3) + 1e-3]
        if ys[1] - ys[0] < 1e-6:
            ys = [min(ys[0], 1 - 1e-3), min(ys[0], 1 - 1e-3) + 1e-3]
        rows.append([xs[0], ys[0], xs[1], ys[1]])
    return np.array(rows, dtype=np.float64)


EPS = 1e-9


@st.composite
def _squares(draw, max_count=6):
    """Boxes square in pixels with side at most min(W, H), as crops and grown boxes are; with the image size."""
    width, height = draw(st.integers(8, 2000)), draw(st.integers(8, 2000))
    count = draw(st.integers(1, max_count))
    unit = st.floats(0.0, 1.0, allow_nan=False)
    rows = []
    for _ in range(count):
        side = draw(st.floats(0.02, 1.0)) * min(width, height)
        x0 = draw(unit) * (width - side) / width
        y0 = draw(unit) * (height - side) / height
        rows.append([x0, y0, x0 + side / width, y0 + side / height])
    return np.array(rows, dtype=np.float64), width, height


def _pixel_sides(boxes, width, height):
    return (boxes[:, 2] - boxes[:, 0]) * width, (boxes[:, 3] - boxes[:, 1]) * height


@settings(max_examples=300, deadline=None)
@given(boxes=_boxes(), growth=st.floats(1.0, 4.0), width=st.integers(1, 3000), height=st.integers(1, 3000))
def test_grown_boxes_contain_parent_and_stay_inside(boxes, growth, width, height):
    """Any parent, square or not: the grown box lies inside the image and contains it."""
    grown = grow_boxes(boxes, growth, width, height)
    assert grown.shape == boxes.shape
    assert grown.min() >= 0.0 and grown.max() <= 1.0 + EPS
    assert np.all(grown[:, :2] <= boxes[:, :2] + EPS)
    assert np.all(grown[:, 2:] >= boxes[:, 2:] - EPS)


@settings(max_examples=300, deadline=None)
@given(squares=_squares(), growth=st.floats(1.0, 4.0))
def test_grown_box_is_a_square_gamma_times_its_parent_capped_at_the_shorter_side(squares, growth):
    boxes, width, height = squares
    grown = grow_boxes(boxes, growth, width, height)
    side_w, side_h = _pixel_sides(grown, width, height)
    np.testing.assert_allclose(side_w, side_h, rtol=1e-9)  # square in pixels
    parent = _pixel_sides(boxes, width, height)[0]
    np.testing.assert_allclose(side_w, np.minimum(parent * growth, min(width, height)), rtol=1e-9)
    assert np.all(side_w <= min(width, height) * (1 + 1e-9))  # never the whole image squashed


@settings(max_examples=300, deadline=None)
@given(squares=_squares(), growth=st.floats(1.0, 4.0))
def test_grown_box_keeps_its_centre_when_there_is_room(squares, growth):
    """Growth is about the centre; only a box that would cross an edge is moved, and then it touches that edge."""
    boxes, width, height = squares
    grown = grow_boxes(boxes, growth, width, height)
    for axis in (0, 1):
        centre = (boxes[:, axis] + boxes[:, axis + 2]) / 2
        half = (grown[:, axis + 2] - grown[:, axis]) / 2
        room = (centre - half >= 0) & (centre + half <= 1)
        new_centre = (grown[:, axis] + grown[:, axis + 2]) / 2
        np.testing.assert_allclose(new_centre[room], centre[room], atol=1e-12)
        moved = ~room
        touches = np.isclose(grown[moved, axis], 0.0, atol=1e-12) | np.isclose(grown[moved, axis + 2], 1.0, atol=1e-12)
        assert np.all(touches)


def test_grow_known_values():
    boxes = np.array(
        [
            [0.4, 0.4, 0.6, 0.6],  # room: grows about its centre
            [0.0, 0.4, 0.2, 0.6],  # at the left edge: shifted right, not clipped
            [0.85, 0.85, 1.0, 1.0],  # in the bottom-right corner
            [0.1, 0.1, 0.9, 0.9],  # larger than the image once grown: capped at it
        ]
    )
    np.testing.assert_allclose(
        grow_boxes(boxes, 2.0, 100, 100),
        [[0.3, 0.3, 0.7, 0.7], [0.0, 0.3, 0.4, 0.7], [0.7, 0.7, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]],
        atol=1e-12,
    )
    np.testing.assert_allclose(grow_boxes(boxes, 1.0, 100, 100), boxes, atol=1e-12)  # gamma 1 changes nothing


def test_grow_on_a_wide_image_stays_square_and_stops_at_the_height():
    """200 x 100: a 40 px square grows to 80 px, then to 100 px (the height), never to the full width."""
    box = np.array([[0.4, 0.3, 0.6, 0.7]])
    np.testing.assert_allclose(grow_boxes(box, 2.0, 200, 100), [[0.3, 0.1, 0.7, 0.9]], atol=1e-12)
    np.testing.assert_allclose(grow_boxes(box, 4.0, 200, 100), [[0.25, 0.0, 0.75, 1.0]], atol=1e-12)
    capped = grow_boxes(grow_boxes(box, 4.0, 200, 100), 1.4, 200, 100)
    np.testing.assert_allclose(capped, [[0.25, 0.0, 0.75, 1.0]], atol=1e-12)  # at the cap it stays put


def test_grow_takes_sizes_and_growth_per_box():
    boxes = np.array([[0.4, 0.3, 0.6, 0.7], [0.4, 0.4, 0.6, 0.6]])
    grown = grow_boxes(boxes, np.array([2.0, 1.0]), np.array([200, 100]), np.array([100, 100]))
    np.testing.assert_allclose(grown, [[0.3, 0.1, 0.7, 0.9], [0.4, 0.4, 0.6, 0.6]], atol=1e-12)


def test_grow_empty():
    assert grow_boxes(np.zeros((0, 4)), 1.4, 10, 10).shape == (0, 4)


@settings(max_examples=200, deadline=None)
@given(squares=_squares(), target=st.floats(0.05, 1.0), steps=st.integers(1, 5))
def test_growth_target_is_reached_at_the_last_step(squares, target, steps):
    """Growing with growth_to_target(steps left) every step ends at target * min(W, H), or at the parent's side
    if that is already larger; the factor is the same every step."""
    boxes, width, height = squares
    short = min(width, height)
    start = _pixel_sides(boxes, width, height)[0]
    factors = []
    for left in range(steps, 0, -1):
        factor = growth_to_target(boxes, width, height, target, left)
        assert np.all(factor >= 1.0)
        factors.append(factor)
        boxes = grow_boxes(boxes, factor, width, height)
    np.testing.assert_allclose(_pixel_sides(boxes, width, height)[0], np.maximum(start, target * short), rtol=1e-9)
    expected = np.maximum((target * short / start) ** (1 / steps), 1.0)
    for factor in factors:
        np.testing.assert_allclose(factor, expected, rtol=1e-9)  # geometric: (target / s0) ** (1 / T) per step


def test_growth_target_for_a_lineage_started_late():
    """A region first grown with 2 steps left reaches the target too, at a larger factor per step."""
    box = np.array([[0.4, 0.4, 0.5, 0.5]])  # 10 px of 100
    np.testing.assert_allclose(growth_to_target(box, 100, 100, 0.9, 3), [9 ** (1 / 3)])
    np.testing.assert_allclose(growth_to_target(box, 100, 100, 0.9, 2), [3.0])
    np.testing.assert_allclose(growth_to_target(box, 100, 100, 0.05, 2), [1.0])  # already larger: no shrinking


# ---------------------------------------------------------------- select_salient


def _disjoint(count):
    """`count` disjoint boxes in a row."""
    return np.array([[i / count, 0.0, (i + 0.9) / count, 1.0] for i in range(count)])


def test_select_picks_most_salient_first():
    saliency = np.array([0.1, 0.9, 0.5, 0.7, 0.3])
    chosen = select_salient(saliency, _disjoint(5), np.ones(5, bool), count=3, max_iou=0.5)
    assert chosen == [1, 3, 2]


def test_select_skips_overlapping_within_the_step():
    boxes = _disjoint(4)
    boxes[3] = boxes[1]  # the runner-up is the same place as the winner
    saliency = np.array([0.1, 0.9, 0.5, 0.7])
    assert select_salient(saliency, boxes, np.ones(4, bool), count=2, max_iou=0.5) == [1, 2]


def test_select_allows_overlap_at_exactly_the_threshold():
    boxes = np.array([[0.0, 0.0, 0.5, 0.5], [0.25, 0.0, 0.75, 0.5], [0.9, 0.9, 1.0, 1.0]])  # IoU(0, 1) = 1/3
    saliency = np.array([0.9, 0.8, 0.1])
    assert select_salient(saliency, boxes, np.ones(3, bool), count=2, max_iou=1 / 3 + 1e-12) == [0, 1]
    assert select_salient(saliency, boxes, np.ones(3, bool), count=2, max_iou=0.3) == [0, 2]


def test_select_fills_up_to_count_in_saliency_order():
    """All regions are one place: the filter keeps one, the rest are filled by saliency so K are always grown."""
    boxes = np.tile([[0.1, 0.1, 0.6, 0.6]], (4, 1))
    saliency = np.array([0.2, 0.9, 0.4, 0.7])
    assert select_salient(saliency, boxes, np.ones(4, bool), count=3, max_iou=0.5) == [1, 3, 2]


def test_select_never_picks_ineligible():
    saliency = np.array([0.1, 0.9, 0.5, 0.7, 0.3])
    eligible = np.array([True, False, True, False, True])
    assert select_salient(saliency, _disjoint(5), eligible, count=2, max_iou=0.5) == [2, 4]
    # fewer eligible than asked: only those, never an already expanded one
    assert select_salient(saliency, _disjoint(5), eligible, count=5, max_iou=0.5) == [2, 4, 0]


def test_select_skips_places_selected_at_earlier_steps():
    """Crop 2 is where crop 0 was selected at the previous step: it is passed over for the next place."""
    boxes = _disjoint(4)
    boxes[2] = boxes[0]
    saliency = np.array([0.0, 0.1, 0.9, 0.5])
    eligible = np.array([False, True, True, True])  # 0 was expanded
    parents = np.full(4, -1)
    assert select_salient(saliency, boxes, eligible, 1, 0.5, earlier=[0], parents=parents) == [3]
    assert select_salient(saliency, boxes, eligible, 1, 0.5) == [2]  # revision 1: only within the step


def test_select_lets_a_lineage_keep_growing():
    """A grown box overlaps its ancestors (IoU 1 / gamma^2) but not other selections: it may be selected."""
    parent = np.array([[0.3, 0.3, 0.5, 0.5]])
    child = grow_boxes(parent, 1.2, 100, 100)  # IoU 0.69 with its parent
    grandchild = grow_boxes(child, 1.2, 100, 100)
    other = np.array([[0.0, 0.0, 0.2, 0.2]])
    boxes = np.concatenate([parent, other, child, grandchild])
    parents = np.array([-1, -1, 0, 2])
    saliency = np.array([0.0, 0.5, 0.0, 0.9])
    eligible = np.array([False, True, False, True])
    assert select_salient(saliency, boxes, eligible, 1, 0.5, earlier=[0, 2], parents=parents) == [3]
    # the same box with no lineage overlaps earlier selections 0 and 2 and gives way to the other place
    assert select_salient(saliency, boxes, eligible, 1, 0.5, earlier=[0, 2], parents=np.full(4, -1)) == [1]


def test_select_fills_from_places_taken_earlier_when_nothing_else_is_left():
    boxes = np.tile([[0.1, 0.1, 0.6, 0.6]], (3, 1))
    saliency = np.array([0.9, 0.2, 0.4])
    eligible = np.array([False, True, True])
    assert select_salient(saliency, boxes, eligible, 2, 0.5, earlier=[0], parents=np.full(3, -1)) == [2, 1]


def test_select_zero_count():
    assert select_salient(np.array([0.5, 0.2]), _disjoint(2), np.ones(2, bool), count=0, max_iou=0.5) == []


def test_select_ties_are_broken_by_index():
    saliency = np.array([0.5, 0.5, 0.5])
    assert select_salient(saliency, _disjoint(3), np.ones(3, bool), count=2, max_iou=0.5) == [0, 1]


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    count=st.integers(0, 6),
    max_iou=st.floats(0.0, 1.0),
)
def test_select_properties(data, count, max_iou):
    boxes = data.draw(_boxes(max_count=8))
    size = len(boxes)
    saliency = np.array(data.draw(st.lists(st.floats(-1, 1), min_size=size, max_size=size)))
    eligible = np.array(data.draw(st.lists(st.booleans(), min_size=size, max_size=size)))
    earlier = sorted(data.draw(st.sets(st.integers(0, size - 1), max_size=3)))
    # each region's parent, if any, has a lower index: a forest as the pool builds it
    parents = np.array([data.draw(st.integers(-1, i - 1)) for i in range(size)])
    chosen = select_salient(saliency, boxes, eligible, count, max_iou, earlier, parents)
    assert len(chosen) == min(count, int(eligible.sum()))
    assert len(set(chosen)) == len(chosen)
    assert all(eligible[i] for i in chosen)

    def ancestors(i):
        found = set()
        while parents[i] >= 0:
            i = parents[i]
            found.add(i)
        return found

    # a plain reference: greedy by saliency (ties by index) under the IoU filter against this step's picks and
    # the earlier selections but the candidate's ancestors, then fill by saliency
    order = sorted((i for i in range(size) if eligible[i]), key=lambda i: (-saliency[i], i))
    picked: list[int] = []
    for i in order:
        others = picked + [j for j in earlier if j not in ancestors(i)]
        if len(picked) < count and all(box_iou(boxes[[i]], boxes[[j]])[0, 0] <= max_iou for j in others):
            picked.append(i)
    fill = [i for i in order if i not in picked][: count - len(picked)]
    assert chosen == picked + fill
