"""Revision 3 of the score: the salient lineages carry the region term, and the confidence cascade."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pipeline.config import LGCA_GLOBAL_WEIGHT, ScoringConfig
from pipeline.scoring.scorer import Scorer
from pipeline.scoring.text import class_vectors

from .analytic import COLOURS, VIEW, ColourEncoder, encode_colour_text, make_scene
from .tiny import random_images, scorer_for, tiny_model

SMALL = dict(crops=12, steps=2, regions=2)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def images():
    return random_images(6)


def _colour_scorer(config: ScoringConfig, encoder: ColourEncoder | None = None) -> Scorer:
    descriptions = {c: (f"a {c} thing", f"something {c}") for c in COLOURS}
    vectors = class_vectors(config.method, COLOURS, encode_colour_text, descriptions, ("a {} thing",), "a {} thing", config.text_scale)
    return Scorer(encoder or ColourEncoder(), COLOURS, vectors, 10.0, VIEW, config)


def _scenes(count: int = 6) -> tuple[list[torch.Tensor], list[str]]:
    rng = np.random.default_rng(3)
    images = [make_scene(rng, side=(24, 36, 50, 80)[index % 4]).pixels for index in range(count)]
    return images, [f"scene-{i}" for i in range(count)]


def _unselected_crops(views) -> list[list[int]]:
    return [[i for i in range(views.crops) if i not in set(selected)] for selected in views.selected]


# ---------------------------------------------------------------- a crop that is not selected has no say


@pytest.mark.parametrize("aggregation", ["embedding", "similarity"])
@pytest.mark.parametrize("weights", ["uniform", "saliency"])
def test_an_unselected_crop_has_no_influence_under_lineages(aggregation, weights):
    """Change the embedding of every crop LGCA did not select: S is unchanged under `lineages`."""
    images, keys = _scenes()
    config = ScoringConfig(method="lgca", level_aggregation=aggregation, lineage_weights=weights, **SMALL)
    scorer = _colour_scorer(config)
    views = scorer.embed(images, keys)
    before = np.stack([s.probabilities for s in scorer.combine(views)])
    changed = dataclasses.replace(views, region_emb=views.region_emb.clone())
    for b, unselected in enumerate(_unselected_crops(views)):
        assert unselected, "every crop was selected: the test would prove nothing"
        changed.region_emb[b, unselected] = torch.flip(changed.region_emb[b, unselected], dims=[-1])
    after = np.stack([s.probabilities for s in scorer.combine(changed)])
    np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("changes", [dict(region_pool="all"), dict(level0="all")])
def test_an_unselected_crop_counts_under_all(changes):
    """The same change moves S where every crop is in the region term: revision 2's `all`, or level 0 of all crops."""
    images, keys = _scenes()
    scorer = _colour_scorer(ScoringConfig(method="lgca", **changes, **SMALL))
    views = scorer.embed(images, keys)
    before = np.stack([s.probabilities for s in scorer.combine(views)])
    changed = dataclasses.replace(views, region_emb=views.region_emb.clone())
    for b, unselected in enumerate(_unselected_crops(views)):
        changed.region_emb[b, unselected] = torch.flip(changed.region_emb[b, unselected], dims=[-1])
    after = np.stack([s.probabilities for s in scorer.combine(changed)])
    assert np.abs(before - after).max() > 1e-4


def test_the_lineage_term_averages_the_levels_by_hand(model, images):
    """S = lambda <k0, T_c> + (1 - lambda) mean_t <normalise(mean of level t's lineage boxes), T_c>, recomputed
    from the views with plain numpy."""
    config = ScoringConfig(method="lgca", global_weight=0.4, global_weight_rule="fixed", lineage_weights="uniform", **SMALL)
    scorer = scorer_for(model, config)
    keys = [f"h{i}" for i in range(len(images))]
    views = scorer.embed(images, keys)
    got = scorer.combine(views)
    vectors = scorer.vectors.numpy()
    for b, result in enumerate(got):
        regions = views.region_emb[b].numpy()
        members = np.array(views.selected[b])
        levels = views.levels[b][members]
        term = []
        for level in sorted(set(levels)):
            pooled = regions[members[levels == level]].mean(axis=0)
            term.append(pooled / np.linalg.norm(pooled) @ vectors.T)
        similarity = 0.4 * (views.global_emb[b].numpy() @ vectors.T) + 0.6 * np.mean(term, axis=0)
        expected = np.exp(scorer.logit_scale * similarity - np.max(scorer.logit_scale * similarity))
        np.testing.assert_allclose(result.probabilities, expected / expected.sum(), rtol=1e-5, atol=1e-6)
        depth = len(set(levels))
        assert result.view_shares == pytest.approx((0.4, 0.6 / depth, 0.6 * (depth - 1) / depth))


def test_lambda_one_and_the_default_lambda_under_lineages(model, images):
    keys = [f"l{i}" for i in range(len(images))]
    one = scorer_for(model, ScoringConfig(method="lgca", global_weight=1.0, **SMALL)).score(images, keys)
    descriptors = scorer_for(model, ScoringConfig(method="descriptors")).score(images, keys)
    for a, b in zip(one, descriptors):
        np.testing.assert_allclose(a.probabilities, b.probabilities, rtol=0, atol=1e-6)
    fixed = scorer_for(model, ScoringConfig(method="lgca", global_weight_rule="fixed", **SMALL)).score(images, keys)
    assert all(r.view_shares[0] == LGCA_GLOBAL_WEIGHT for r in fixed)


def test_the_pooling_choices_change_the_score(model, images):
    """The named choices of step 5 are not vacuous: each gives other probabilities than the default."""
    keys = [f"c{i}" for i in range(len(images))]
    base = ScoringConfig(method="lgca", **SMALL)
    default = np.stack([r.probabilities for r in scorer_for(model, base).score(images, keys)])
    for changes in (
        dict(level_aggregation="similarity"),
        dict(lineage_weights="uniform"),
        dict(level0="all"),
        dict(region_pool="all"),
        dict(global_weight_rule="fixed"),
        dict(selection="lineages"),
    ):
        other = np.stack([r.probabilities for r in scorer_for(model, dataclasses.replace(base, **changes)).score(images, keys)])
        assert np.abs(other - default).max() > 1e-6, changes


def test_the_confidence_rule_gives_each_image_its_own_lambda(model, images):
    """lambda_i = lambda + (1 - lambda) * m_i, with m_i the descriptors margin of the image's global view."""
    keys = [f"r{i}" for i in range(len(images))]
    lgca = scorer_for(model, ScoringConfig(method="lgca", global_weight_rule="confidence", global_weight=0.2, **SMALL)).score(images, keys)
    first = scorer_for(model, ScoringConfig(method="descriptors")).score(images, keys)
    for result, plain in zip(lgca, first):
        assert result.view_shares[0] == pytest.approx(0.2 + 0.8 * plain.margin, abs=1e-5)
        assert sum(result.view_shares) == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------- selection


def test_lineage_selection_grows_the_same_k_places_every_step():
    """`selection = lineages`: K crops chosen once, each grown T times; K * T encoder passes as for `pool`."""
    images, keys = _scenes(4)
    for selection in ("pool", "lineages"):
        encoder = ColourEncoder()
        config = ScoringConfig(method="lgca", crops=12, regions=2, steps=3, selection=selection)
        views = _colour_scorer(config, encoder).embed(images, keys)
        assert encoder.rows == len(images) * (1 + 12 + 2 * 3)
        if selection == "lineages":
            for b in range(len(images)):
                grown = views.selected[b][2:]
                assert sorted(views.levels[b][grown].tolist()) == [1, 1, 2, 2, 3, 3]
                for index in grown:  # each grown box's parent is the box its lineage grew one step before
                    parent = views.parents[b][index]
                    assert views.levels[b][parent] == views.levels[b][index] - 1


# ---------------------------------------------------------------- the confidence cascade


def _fields(result):
    return (result.label, result.probabilities.tolist(), result.boxes, result.view_shares, result.method)


def test_cascade_at_threshold_zero_equals_descriptors():
    images, keys = _scenes(8)
    encoder = ColourEncoder()
    cascade = _colour_scorer(ScoringConfig(method="lgca", cascade_margin=0.0, **SMALL), encoder).score(images, keys)
    descriptors = _colour_scorer(ScoringConfig(method="descriptors")).score(images, keys)
    for a, b in zip(cascade, descriptors):
        np.testing.assert_allclose(a.probabilities, b.probabilities, rtol=0, atol=1e-6)
        assert a.label == b.label and a.boxes == [] and a.method == "descriptors"
    assert encoder.rows == len(images)  # one pass per image: no crops for anyone


def test_cascade_above_one_equals_lgca():
    images, keys = _scenes(8)
    cascade = _colour_scorer(ScoringConfig(method="lgca", cascade_margin=1.01, **SMALL)).score(images, keys)
    lgca = _colour_scorer(ScoringConfig(method="lgca", **SMALL)).score(images, keys)
    for a, b in zip(cascade, lgca):
        np.testing.assert_allclose(a.probabilities, b.probabilities, rtol=0, atol=1e-6)
        assert a.boxes == b.boxes and a.method == b.method == "lgca"


def test_cascade_rows_equal_their_scoring_alone_and_only_escalated_images_get_crops():
    """In one batch, a kept row equals descriptors on that image alone and an escalated row lgca on it alone;
    encoder passes are one per image plus N + K*T per escalated image, in batched calls."""
    images, keys = _scenes(8)
    first = _colour_scorer(ScoringConfig(method="descriptors")).score(images, keys)
    margins = sorted(r.margin for r in first)
    threshold = (margins[3] + margins[4]) / 2  # half the batch escalates
    encoder = ColourEncoder()
    config = ScoringConfig(method="lgca", cascade_margin=threshold, **SMALL)
    batch = _colour_scorer(config, encoder).score(images, keys)
    escalated = [r.method == "lgca" for r in batch]
    assert sum(escalated) == 4
    assert encoder.rows == len(images) + 4 * (12 + 2 * 2)
    assert encoder.calls <= 1 + 1 + 2  # global views, crops, one call per step: never one per image
    for image, key, result, plain in zip(images, keys, batch, first):
        if result.method == "lgca":
            alone = _colour_scorer(dataclasses.replace(config, cascade_margin=None)).score([image], [key])[0]
            assert plain.margin < threshold and result.boxes
        else:
            alone = _colour_scorer(ScoringConfig(method="descriptors")).score([image], [key])[0]
            assert plain.margin >= threshold and result.boxes == [] and result.method == "descriptors"
        assert result.label == alone.label and len(result.boxes) == len(alone.boxes)
        for mine, single in zip(result.boxes, alone.boxes):  # the same boxes; float sums of a batch may differ in the last bit
            assert (mine.x0, mine.y0, mine.x1, mine.y1, mine.level, mine.parent, mine.label) == (
                single.x0,
                single.y0,
                single.x1,
                single.y1,
                single.level,
                single.parent,
                single.label,
            )
            assert mine.saliency == pytest.approx(single.saliency, abs=1e-5) and mine.score == pytest.approx(single.score, abs=1e-5)
        np.testing.assert_allclose(result.probabilities, alone.probabilities, rtol=0, atol=1e-6)
