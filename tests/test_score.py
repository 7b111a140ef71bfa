"""The scoring engine: METHOD.md identities, determinism, box geometry, encoder pass counts, mechanics."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pipeline.config import LGCA_GLOBAL_WEIGHT, SALIENCY_RULES, ScoringConfig
from pipeline.scoring.regions import box_iou, sample_crops
from pipeline.scoring.scorer import Scorer
from pipeline.scoring.text import class_vectors

from .analytic import COLOURS, PALETTE, VIEW, ColourEncoder, encode_colour_text, make_scene
from .tiny import CLASSES, random_images, scorer_for, tiny_model

SMALL = dict(crops=8, steps=2, regions=2, crop_scale=(0.5, 0.9))  # one crop scale: wca and lgca cut the same crops
ALL = dict(region_pool="all", global_weight_rule="fixed")  # revision 2's region term: every crop and grown box, WCA's weights
WCA_CROPS = dict(crop_scale=(0.5, 0.9))  # lgca cutting wca's crops, for the identities between them


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def images():
    return random_images(6)


def _probabilities(model, config, images, **kwargs):
    scorer = scorer_for(model, config, **kwargs)
    keys = [f"img-{i}" for i in range(len(images))]
    return np.stack([r.probabilities for r in scorer.score(images, keys)])


# ---------------------------------------------------------------- identities (METHOD.md)


@pytest.mark.parametrize("global_weight", [0.0, LGCA_GLOBAL_WEIGHT, 0.7])
def test_lgca_all_regions_without_regions_equals_wca(model, images, global_weight):
    lgca = _probabilities(
        model, ScoringConfig(method="lgca", crops=8, regions=0, steps=3, global_weight=global_weight, **ALL, **WCA_CROPS), images
    )
    wca = _probabilities(model, ScoringConfig(method="wca", crops=8, global_weight=global_weight), images)
    np.testing.assert_array_equal(lgca, wca)


@pytest.mark.parametrize("global_weight", [0.0, LGCA_GLOBAL_WEIGHT, 0.7])
def test_lgca_all_regions_without_steps_equals_wca(model, images, global_weight):
    lgca = _probabilities(
        model, ScoringConfig(method="lgca", crops=8, regions=2, steps=0, global_weight=global_weight, **ALL, **WCA_CROPS), images
    )
    wca = _probabilities(model, ScoringConfig(method="wca", crops=8, global_weight=global_weight), images)
    np.testing.assert_array_equal(lgca, wca)


@pytest.mark.parametrize("shape", [dict(regions=0, steps=3), dict(regions=2, steps=0), dict(crops=0, regions=0)])
def test_lgca_lineages_without_lineages_equal_descriptors(model, images, shape):
    """K = 0, T = 0 or no crops: nothing is selected, so S = <k0, T_c> whatever lambda (METHOD.md step 5)."""
    lgca = _probabilities(model, ScoringConfig(method="lgca", **{"crops": 8, **shape}), images)
    descriptors = _probabilities(model, ScoringConfig(method="descriptors"), images)
    np.testing.assert_allclose(lgca, descriptors, rtol=0, atol=1e-6)


def test_lgca_and_wca_default_to_other_global_weights(model, images):
    """lgca's lambda defaults to LGCA_GLOBAL_WEIGHT, wca's to 0 (crops only, as WCA's code): with no regions
    grown they differ by lambda alone."""
    lgca = _probabilities(model, ScoringConfig(method="lgca", crops=8, regions=0, **ALL, **WCA_CROPS), images)
    wca = _probabilities(model, ScoringConfig(method="wca", crops=8), images)
    same_lambda = _probabilities(model, ScoringConfig(method="wca", crops=8, global_weight=LGCA_GLOBAL_WEIGHT), images)
    np.testing.assert_array_equal(lgca, same_lambda)
    assert not np.allclose(lgca, wca, atol=1e-6)


@pytest.mark.parametrize("global_weight", [None, 0.5])
def test_wca_without_crops_equals_descriptors(model, images, global_weight):
    wca = _probabilities(model, ScoringConfig(method="wca", crops=0, global_weight=global_weight), images)
    descriptors = _probabilities(model, ScoringConfig(method="descriptors"), images)
    np.testing.assert_allclose(wca, descriptors, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["wca", "lgca"])
def test_global_weight_one_gives_descriptors(model, images, method):
    """lambda = 1: the regions carry no weight and the score is the global view's, as for descriptors."""
    alone = _probabilities(model, ScoringConfig(method=method, global_weight=1.0, **SMALL), images)
    descriptors = _probabilities(model, ScoringConfig(method="descriptors"), images)
    np.testing.assert_allclose(alone, descriptors, rtol=0, atol=1e-6)


def test_expand_weight_zero_equals_wca_with_the_same_crops(model, images):
    """m = 0 gives the grown boxes zero weight: lgca scores as wca over the same crops, at the same lambda."""
    keys = [f"z{i}" for i in range(len(images))]
    lgca = scorer_for(model, ScoringConfig(method="lgca", expand_weight=0.0, global_weight=0.3, **SMALL, **ALL)).score(images, keys)
    wca = scorer_for(model, ScoringConfig(method="wca", global_weight=0.3, **SMALL)).score(images, keys)
    for a, b in zip(lgca, wca):
        np.testing.assert_allclose(a.probabilities, b.probabilities, rtol=0, atol=1e-6)
        assert a.view_shares[2] == 0.0 and len([box for box in a.boxes if box.level > 0]) == 4  # grown, unweighted


def test_descriptors_with_one_description_equal_clip_with_that_prompt(model, images):
    one_each = {name: (f"a photo of a {name}.",) for name in CLASSES}
    descriptors = _probabilities(model, ScoringConfig(method="descriptors"), images, descriptions=one_each)
    clip = _probabilities(model, ScoringConfig(method="clip"), images)
    np.testing.assert_allclose(descriptors, clip, rtol=0, atol=1e-6)


def test_methods_differ_from_each_other(model, images):
    """The identities above are not vacuous: with crops and expansion the methods give other scores."""
    results = {
        method: _probabilities(model, ScoringConfig(method=method, **SMALL), images)
        for method in ("clip", "ensemble", "descriptors", "wca", "lgca")
    }
    for first in results:
        for second in results:
            if first < second:
                assert not np.allclose(results[first], results[second], atol=1e-6), (first, second)


@pytest.mark.parametrize(
    "config",
    [
        ScoringConfig(method="wca", crops=8),
        ScoringConfig(method="wca", crops=8, global_weight=0.4),
        ScoringConfig(method="lgca", global_weight_rule="fixed", **SMALL),
        ScoringConfig(method="lgca", global_weight=0.0, global_weight_rule="fixed", **SMALL),
        ScoringConfig(method="lgca", global_weight=0.9, expand_weight=5.0, global_weight_rule="fixed", **SMALL),
    ],
    ids=lambda c: f"{c.method}-lambda{c.global_weight}-m{c.expand_weight}",
)
def test_global_share_equals_lambda(model, images, config):
    """view_shares = (lambda, (1 - lambda) * crop weight, (1 - lambda) * grown weight): the global view carries
    exactly lambda, whatever the region weights; the shares sum to 1."""
    for result in scorer_for(model, config).score(images, [f"w{i}" for i in range(len(images))]):
        global_share, crop_share, grown_share = result.view_shares
        assert global_share == pytest.approx(config.view_global_weight)
        assert global_share + crop_share + grown_share == pytest.approx(1.0, abs=1e-5)
        assert crop_share >= 0 and grown_share >= 0
        assert (grown_share > 0) == (config.method == "lgca" and config.view_global_weight < 1)


def test_view_shares_of_global_only_scores(model, images):
    for config in (ScoringConfig(method="clip"), ScoringConfig(method="descriptors"), ScoringConfig(method="wca", crops=0)):
        for result in scorer_for(model, config).score(images[:2], ["a", "b"]):
            assert result.view_shares == (1.0, 0.0, 0.0)


def test_expand_weight_moves_weight_between_crops_and_grown_boxes(model, images):
    keys = [f"m{i}" for i in range(len(images))]
    shares = {
        m: [r.view_shares for r in scorer_for(model, ScoringConfig(method="lgca", expand_weight=m, **SMALL, **ALL)).score(images, keys)]
        for m in (0.5, 1.0, 20.0)
    }
    for low, plain, high in zip(shares[0.5], shares[1.0], shares[20.0]):
        assert low[0] == plain[0] == high[0] == LGCA_GLOBAL_WEIGHT  # m never touches the global view
        assert low[2] < plain[2] < high[2]


def test_description_weights_follow_text_scale():
    """T_c is the softmax(exp(text_scale) * <t_cj, g(p_c)>)-weighted mean: a huge scale picks the closest sentence."""
    descriptions = {"red": ("red", "red and a bit of blue")}
    sharp = class_vectors("descriptors", ["red"], encode_colour_text, descriptions, (), "a {}", text_scale=10.0)
    flat = class_vectors("descriptors", ["red"], encode_colour_text, descriptions, (), "a {}", text_scale=-20.0)
    red_only = torch.nn.functional.normalize(encode_colour_text(["red"]), dim=-1)
    assert torch.allclose(sharp, red_only, atol=1e-4)
    mean = torch.nn.functional.normalize(
        torch.nn.functional.normalize(encode_colour_text(list(descriptions["red"])), dim=-1).mean(0), dim=0
    )
    assert torch.allclose(flat[0], mean, atol=1e-4)


# ---------------------------------------------------------------- determinism


def test_same_seed_and_key_give_identical_outputs(model, images):
    config = ScoringConfig(method="lgca", **SMALL)
    first = scorer_for(model, config).score(images, [f"k{i}" for i in range(len(images))])
    second = scorer_for(model, config).score(images, [f"k{i}" for i in range(len(images))])
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.probabilities, b.probabilities)
        assert a.boxes == b.boxes


def test_other_seed_or_key_moves_the_crops(model, images):
    config = ScoringConfig(method="lgca", **SMALL)
    base = scorer_for(model, config).score(images[:1], ["k0"])[0]
    other_key = scorer_for(model, config).score(images[:1], ["k1"])[0]
    other_seed = scorer_for(model, dataclasses.replace(config, seed=7)).score(images[:1], ["k0"])[0]
    assert base.boxes != other_key.boxes
    assert base.boxes != other_seed.boxes


@pytest.mark.parametrize("method", ["clip", "wca", "lgca"])
def test_an_image_scores_the_same_alone_and_in_a_batch(model, method):
    images = random_images(8, seed=3)
    keys = [f"batch-{i}" for i in range(8)]
    config = ScoringConfig(method=method, **SMALL, micro_batch=7)  # micro-batches straddle images
    scorer = scorer_for(model, config)
    together = scorer.score(images, keys)
    for index in (0, 5):
        alone = scorer.score([images[index]], [keys[index]])[0]
        np.testing.assert_allclose(alone.probabilities, together[index].probabilities, atol=1e-5)
        assert [b.level for b in alone.boxes] == [b.level for b in together[index].boxes]
        np.testing.assert_allclose(
            [(b.x0, b.y0, b.x1, b.y1) for b in alone.boxes], [(b.x0, b.y0, b.x1, b.y1) for b in together[index].boxes]
        )


def test_crops_do_not_depend_on_the_decode_scale(model):
    """Boxes are laid out in the original size, so a half-scale decode samples the same regions."""
    full = random_images(1)[0]
    half = torch.nn.functional.interpolate(full[None].float(), scale_factor=0.5, mode="area")[0].round().to(torch.uint8)
    size = (full.shape[2], full.shape[1])
    scorer = scorer_for(model, ScoringConfig(method="lgca", crops=6, steps=1, regions=1, saliency="global"))
    a = scorer.score([full], ["same"], sizes=[size])[0]
    b = scorer.score([half], ["same"], sizes=[size])[0]
    sampled = sample_crops("same", size[0], size[1], 6, scorer.config.view_crop_scale, 0)
    assert [box for box in a.boxes if box.level == 0]
    for result in (a, b):
        for box in result.boxes:
            if box.level == 0:
                assert np.isclose(sampled, [box.x0, box.y0, box.x1, box.y1]).all(axis=1).any()


def test_crops_are_nested_across_n(model, images):
    """A sweep over N compares nested crop sets: the first 4 of 8 crops are the 4 crops of N = 4."""
    keys = [f"n{i}" for i in range(len(images))]
    four = scorer_for(model, ScoringConfig(method="wca", crops=4)).embed(images, keys)
    eight = scorer_for(model, ScoringConfig(method="wca", crops=8)).embed(images, keys)
    np.testing.assert_array_equal(eight.boxes[:, :4], four.boxes)
    torch.testing.assert_close(eight.region_emb[:, :4], four.region_emb)


# ---------------------------------------------------------------- boxes


@pytest.mark.parametrize("crops,regions,steps", [(8, 2, 2), (6, 1, 3), (10, 3, 1), (4, 2, 3)])
def test_salient_boxes_are_consistent(model, images, crops, regions, steps):
    config = ScoringConfig(method="lgca", crops=crops, regions=regions, steps=steps)
    for result in scorer_for(model, config).score(images, [f"b{i}" for i in range(len(images))]):
        grown = [b for b in result.boxes if b.level > 0]
        assert len(grown) == regions * steps
        for index, box in enumerate(result.boxes):
            assert 0.0 <= box.x0 < box.x1 <= 1.0 and 0.0 <= box.y0 < box.y1 <= 1.0
            if box.level == 0:
                assert box.parent == -1
            else:
                parent = result.boxes[box.parent]
                assert box.parent < index and parent.level == box.level - 1
                # a grown box contains its parent
                assert box.x0 <= parent.x0 + 1e-9 and box.y0 <= parent.y0 + 1e-9
                assert box.x1 >= parent.x1 - 1e-9 and box.y1 >= parent.y1 - 1e-9
            assert box.label in CLASSES and 0.0 < box.score <= 1.0
        assert sum(b.level == 0 for b in result.boxes) <= regions * steps


def _pixel_box(box, width, height):
    return (box.x1 - box.x0) * width, (box.y1 - box.y0) * height


@pytest.mark.parametrize("growth", [1.4, 3.0])
def test_grown_boxes_are_square_and_never_exceed_the_shorter_side(model, images, growth):
    config = ScoringConfig(method="lgca", crops=8, regions=2, steps=3, growth=growth)
    for image, result in zip(images, scorer_for(model, config).score(images, [f"q{i}" for i in range(len(images))])):
        height, width = image.shape[-2:]
        short = min(width, height)
        for box in result.boxes:
            side_w, side_h = _pixel_box(box, width, height)
            assert side_w == pytest.approx(side_h, rel=1e-6)
            assert side_w <= short * (1 + 1e-9)
            if box.level > 0:
                parent = _pixel_box(result.boxes[box.parent], width, height)[0]
                assert side_w == pytest.approx(min(parent * growth, short), rel=1e-6)


@pytest.mark.parametrize("target", [None, 0.6])
def test_capped_regions_are_not_grown_into_copies_of_themselves(model, target):
    """Crops up to the whole shorter side with strong growth: a region at its cap (the shorter side, or the
    growth target) would grow into an identical box, so the step grows another region instead."""
    images = random_images(5, seed=3)
    config = ScoringConfig(method="lgca", crops=12, crop_scale=(0.3, 1.0), regions=2, steps=3, growth=2.0, growth_target=target)
    for image, result in zip(images, scorer_for(model, config).score(images, [f"c{i}" for i in range(len(images))])):
        height, width = image.shape[-2:]
        grown = [box for box in result.boxes if box.level > 0]
        assert len(grown) == config.regions * config.steps
        for box in grown:
            assert _as_array(box).tolist() != _as_array(result.boxes[box.parent]).tolist()


def _selections(boxes):
    """Output indices of the regions selected for expansion (the level-0 boxes and every grown box that was
    grown again), each with its lineage's root."""

    def root(index):
        while boxes[index].parent >= 0:
            index = boxes[index].parent
        return index

    selected = [i for i, b in enumerate(boxes) if b.level == 0] + sorted({b.parent for b in boxes if b.level > 1})
    return [(i, root(i)) for i in selected]


def _as_array(box):
    return np.array([[box.x0, box.y0, box.x1, box.y1]])


def test_lineages_stay_distinct_places_across_steps():
    """A region selected at any step overlaps no region selected before (or beside it) at IoU > overlap_iou,
    except its own ancestors. On one-object scenes the most salient crops crowd the object: revision 1
    (overlap checked within a step only) re-expanded its place at later steps and fails this."""
    scenes = [make_scene(np.random.default_rng(i)) for i in range(12)]
    config = ScoringConfig(method="lgca", crops=40, crop_scale=(0.25, 0.45), regions=2, steps=3)
    results = _colour_scorer(config, ColourEncoder()).score([s.pixels for s in scenes], [f"d{i}" for i in range(12)])
    for result in results:
        assert sum(b.level > 0 for b in result.boxes) == 6  # still K per step
        selections = _selections(result.boxes)
        assert len(selections) == 6  # a lineage's last box is never selected
        for a, root_a in selections:
            for b, root_b in selections:
                if a < b and root_a != root_b:
                    iou = box_iou(_as_array(result.boxes[a]), _as_array(result.boxes[b]))[0, 0]
                    assert iou <= config.overlap_iou, (result.key, a, b, iou)


@pytest.mark.parametrize("target", [0.6, 1.0])
def test_growth_target_is_reached_at_step_t(model, images, target):
    """With growth_target F every box grown at the last step has side F * min(W, H) (its parents are smaller),
    and a lineage started at step 1 grows by one factor, (F / s0) ** (1 / T), per step."""
    config = ScoringConfig(method="lgca", crops=8, crop_scale=(0.3, 0.5), regions=2, steps=3, growth_target=target)
    full_lineages = 0
    for image, result in zip(images, scorer_for(model, config).score(images, [f"t{i}" for i in range(len(images))])):
        height, width = image.shape[-2:]
        short = min(width, height)
        last_step = result.boxes[-config.regions :]
        assert all(box.level > 0 for box in last_step)
        for box in last_step:
            assert _pixel_box(box, width, height)[0] == pytest.approx(target * short, rel=1e-6)
        for box in result.boxes:
            if box.level == config.steps:  # started at step 1
                chain = [box]
                while chain[-1].parent >= 0:
                    chain.append(result.boxes[chain[-1].parent])
                sides = [_pixel_box(b, width, height)[0] for b in reversed(chain)]
                factor = (target * short / sides[0]) ** (1 / config.steps)
                np.testing.assert_allclose(np.array(sides[1:]) / np.array(sides[:-1]), factor, rtol=1e-6)
                full_lineages += 1
    assert full_lineages > 0


def test_result_fields(model, images):
    config = ScoringConfig(method="lgca", topk=3, **SMALL)
    for result in scorer_for(model, config).score(images, [f"r{i}" for i in range(len(images))]):
        assert result.probabilities.shape == (len(CLASSES),)
        assert abs(result.probabilities.sum() - 1.0) < 1e-5
        assert result.label == result.topk_labels[0] and result.score == result.topk_scores[0]
        assert len(result.topk_labels) == 3 and result.topk_scores == sorted(result.topk_scores, reverse=True)
        ranked = np.sort(result.probabilities)[::-1]
        assert result.margin == pytest.approx(ranked[0] - ranked[1])


def test_margin_uses_second_class_even_with_topk_one(model, images):
    result = scorer_for(model, ScoringConfig(method="clip", topk=1)).score(images[:1], ["m"])[0]
    ranked = np.sort(result.probabilities)[::-1]
    assert len(result.topk_labels) == 1 and result.margin == pytest.approx(ranked[0] - ranked[1])


# ---------------------------------------------------------------- encoder passes


@pytest.mark.parametrize(
    "config",
    [
        ScoringConfig(method="clip"),
        ScoringConfig(method="ensemble"),
        ScoringConfig(method="descriptors"),
        ScoringConfig(method="wca", crops=9),
        ScoringConfig(method="lgca", crops=8, regions=2, steps=3),
        ScoringConfig(method="lgca", crops=5, regions=1, steps=4, micro_batch=3),
        ScoringConfig(method="lgca", crops=16, regions=4, steps=2, crop_layout="grid"),
    ],
    ids=lambda c: f"{c.method}-N{c.crops}-K{c.regions}-T{c.steps}",
)
def test_encoder_passes_per_image_are_exactly_one_plus_n_plus_kt(model, images, config):
    counting = _CountingEncoder(model.encode_image)
    scorer = scorer_for(model, config, encode_image=counting)
    scorer.score(images, [f"p{i}" for i in range(len(images))])
    expected = 1 + (config.crops if config.method in ("wca", "lgca") else 0)
    expected += config.regions * config.steps if config.method == "lgca" else 0
    assert counting.rows == expected * len(images)
    assert max(counting.batch_sizes) <= config.micro_batch


class _CountingEncoder:
    def __init__(self, encode):
        self.encode, self.rows, self.batch_sizes = encode, 0, []

    def __call__(self, views):
        self.rows += views.shape[0]
        self.batch_sizes.append(views.shape[0])
        return self.encode(views)


# ---------------------------------------------------------------- mechanics against known ground truth


def _colour_scorer(config: ScoringConfig, encoder: ColourEncoder) -> Scorer:
    vectors = class_vectors(config.method, COLOURS, encode_colour_text, {}, ("a {} object",), "a photo of a {}.", config.text_scale)
    return Scorer(encoder, COLOURS, vectors, logit_scale=20.0, view=VIEW, config=config)


def test_salient_regions_find_the_object_on_synthetic_scenes():
    """Mechanics check, not accuracy: with an analytic colour encoder on one-object scenes, `class`
    saliency must pick a level-0 crop that contains the object's centre in at least 90% of scenes,
    and every grown box must contain its parent. Real-photo accuracy needs real weights."""
    rng = np.random.default_rng(0)
    scenes = [make_scene(rng) for _ in range(60)]
    config = ScoringConfig(method="lgca", crops=40, crop_scale=(0.25, 0.45), regions=2, steps=2, saliency="class")
    results = _colour_scorer(config, ColourEncoder()).score([s.pixels for s in scenes], [f"s{i}" for i in range(60)])
    hits = 0
    for scene, result in zip(scenes, results):
        level0 = [b for b in result.boxes if b.level == 0]
        top = max(level0, key=lambda b: b.saliency)
        cx, cy = scene.centre
        hits += top.x0 <= cx <= top.x1 and top.y0 <= cy <= top.y1
        for box in result.boxes:
            if box.level > 0:
                parent = result.boxes[box.parent]
                assert (
                    box_iou(np.array([[box.x0, box.y0, box.x1, box.y1]]), np.array([[parent.x0, parent.y0, parent.x1, parent.y1]]))[0, 0]
                    > 0
                )
                assert box.x0 <= parent.x0 + 1e-9 and box.x1 >= parent.x1 - 1e-9
                assert box.y0 <= parent.y0 + 1e-9 and box.y1 >= parent.y1 - 1e-9
    assert hits / len(scenes) >= 0.9, f"the most salient crop held the object centre in only {hits}/{len(scenes)} scenes"


def test_report_method_accuracy_on_synthetic_scenes(capsys):
    """Reported, not asserted: how clip, wca and lgca classify the synthetic scenes with the analytic encoder."""
    rng = np.random.default_rng(1)
    scenes = [make_scene(rng) for _ in range(40)]
    rows = []
    for method in ("clip", "wca", "lgca"):
        config = ScoringConfig(method=method, crops=40, crop_scale=(0.25, 0.45), regions=2, steps=2)
        results = _colour_scorer(config, ColourEncoder()).score([s.pixels for s in scenes], [f"a{i}" for i in range(40)])
        correct = sum(r.label == s.colour for r, s in zip(results, scenes))
        confidence = float(np.mean([r.probabilities[COLOURS.index(s.colour)] for r, s in zip(results, scenes)]))
        rows.append((method, correct, confidence))
    with capsys.disabled():
        print("\nanalytic scenes (mechanics only, not accuracy):")
        for method, correct, confidence in rows:
            print(f"  {method:5s} correct {correct}/{len(scenes)}  mean p(true colour) {confidence:.3f}")
    assert len(rows) == 3


def test_global_saliency_rule_uses_the_global_view():
    """With `global` saliency a region is salient when it resembles the whole image, not a class."""
    rng = np.random.default_rng(2)
    scene = make_scene(rng)
    config = ScoringConfig(method="lgca", crops=12, crop_scale=(0.2, 0.4), regions=1, steps=1, saliency="global")
    encoder = ColourEncoder()
    result = _colour_scorer(config, encoder).score([scene.pixels], ["g"])[0]
    assert encoder.rows == 1 + 12 + 1
    assert len(result.boxes) == 2 and result.boxes[1].parent == 0


def _two_objects(seed: int = 0) -> torch.Tensor:
    """160 x 120: a large red square with 15% grey speckle (class similarity 0.98) and a smaller pure blue one
    (similarity 1). Red leads the image's score; a crop inside the blue one is the most class-salient."""
    rng = np.random.default_rng(seed)
    image = np.repeat(rng.normal(128, 18, size=(120, 160, 1)).clip(70, 190), 3, axis=2)
    red = np.tile(np.array(PALETTE["red"], dtype=float), (85, 85, 1))
    red[rng.random((85, 85)) < 0.15] = 128
    image[5:90, 5:90] = red
    image[65:120, 100:160] = PALETTE["blue"]
    return torch.from_numpy(image.astype(np.uint8)).permute(2, 0, 1).contiguous()


@pytest.mark.parametrize("rule", SALIENCY_RULES)
def test_every_saliency_rule_runs(rule):
    # every crop in the region term: the red square, the larger object, leads whichever regions are salient
    config = ScoringConfig(method="lgca", crops=60, crop_scale=(0.2, 0.3), regions=2, steps=2, saliency=rule, **ALL)
    encoder = ColourEncoder()
    result = _colour_scorer(config, encoder).score([_two_objects()], ["two"])[0]
    assert encoder.rows == 1 + 60 + 4
    assert len([b for b in result.boxes if b.level > 0]) == 4 and result.label == "red"
    if rule == "margin":
        assert all(0.0 <= b.saliency <= 1.0 for b in result.boxes)


def _selected_crops(rule: str) -> list[tuple[float, float, float, float, str]]:
    config = ScoringConfig(method="lgca", crops=60, crop_scale=(0.2, 0.3), regions=2, steps=2, growth=1.4, saliency=rule)
    result = _colour_scorer(config, ColourEncoder()).score([_two_objects()], ["two"])[0]
    return [(b.x0, b.y0, b.x1, b.y1, b.label) for b in result.boxes if b.level == 0]


def test_agreement_and_margin_select_other_regions_than_class():
    """class takes the purest crops, inside the blue square; agreement the ones of the image's leading class,
    red; margin the crops whose own class is the most certain, which are others again."""
    by_class, by_agreement, by_margin = (_selected_crops(rule) for rule in ("class", "agreement", "margin"))
    assert {box[-1] for box in by_class} == {"blue"}
    assert {box[-1] for box in by_agreement} == {"red"}
    assert by_margin != by_class and by_margin != by_agreement


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: compares CUDA scores with CPU scores")
def test_cuda_matches_cpu_within_half_precision():
    cpu_model, gpu_model = tiny_model(), tiny_model(device="cuda")
    images = random_images(8, seed=5)
    config = ScoringConfig(method="lgca", **SMALL)
    keys = [f"c{i}" for i in range(8)]
    cpu = scorer_for(cpu_model, config).score(images, keys)
    gpu = scorer_for(gpu_model, config).score(images, keys)
    for a, b in zip(cpu, gpu):
        np.testing.assert_allclose(a.probabilities, b.probabilities, atol=2e-2)


def test_one_lgca_embedding_serves_every_method(model, images):
    """`embed` once with lgca, `combine` per method: the same scores as scoring each method on its own,
    for 1 + N + K*T encoder passes in all (the basis of cheap multi-method evaluation)."""
    lgca_config = ScoringConfig(method="lgca", **SMALL)
    counting = _CountingEncoder(model.encode_image)
    lgca_scorer = scorer_for(model, lgca_config, encode_image=counting)
    keys = [f"v{i}" for i in range(len(images))]
    views = lgca_scorer.embed(images, keys)
    assert counting.rows == lgca_config.encoder_passes * len(images)
    for method in ("clip", "ensemble", "descriptors", "wca", "lgca"):
        own = scorer_for(model, dataclasses.replace(lgca_config, method=method))
        reused = lgca_scorer.combine(views, own.vectors, method)
        alone = own.score(images, keys)
        for a, b in zip(reused, alone):
            np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-6, err_msg=method)
            assert a.boxes == b.boxes
    assert counting.rows == lgca_config.encoder_passes * len(images)
