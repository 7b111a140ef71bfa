"""The scoring engine: METHOD.md identities, determinism, box geometry, encoder pass counts, mechanics."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pipeline.config import ScoringConfig
from pipeline.regions import box_iou, sample_crops
from pipeline.score import Scorer, class_vectors

from .analytic import COLOURS, VIEW, ColourEncoder, encode_colour_text, make_scene
from .tiny import CLASSES, random_images, scorer_for, tiny_model

SMALL = dict(crops=8, steps=2, regions=2)


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


def test_lgca_without_regions_equals_wca(model, images):
    lgca = _probabilities(model, ScoringConfig(method="lgca", crops=8, regions=0, steps=3), images)
    wca = _probabilities(model, ScoringConfig(method="wca", crops=8), images)
    np.testing.assert_array_equal(lgca, wca)


def test_lgca_without_steps_equals_wca(model, images):
    lgca = _probabilities(model, ScoringConfig(method="lgca", crops=8, regions=2, steps=0), images)
    wca = _probabilities(model, ScoringConfig(method="wca", crops=8), images)
    np.testing.assert_array_equal(lgca, wca)


def test_wca_without_crops_equals_descriptors(model, images):
    wca = _probabilities(model, ScoringConfig(method="wca", crops=0), images)
    descriptors = _probabilities(model, ScoringConfig(method="descriptors"), images)
    np.testing.assert_allclose(wca, descriptors, rtol=0, atol=1e-6)


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


def test_description_weights_follow_text_scale():
    """T_c is the softmax(exp(text_scale) * <t_cj, g(p_c)>)-weighted mean: a huge scale picks the closest sentence."""
    descriptions = {"red": ("red", "red and a bit of blue")}
    sharp = class_vectors("descriptors", ["red"], encode_colour_text, descriptions, (), "a {}", text_scale=10.0)
    flat = class_vectors("descriptors", ["red"], encode_colour_text, descriptions, (), "a {}", text_scale=-20.0)
    red_only = torch.nn.functional.normalize(encode_colour_text(["red"]), dim=-1)
    assert torch.allclose(sharp, red_only, atol=1e-4)
    mean = torch.nn.functional.normalize(torch.nn.functional.normalize(encode_colour_text(list(descriptions["red"])), dim=-1).mean(0), dim=0)
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
    sampled = sample_crops("same", size[0], size[1], 6, (0.5, 0.9), 0)
    assert [box for box in a.boxes if box.level == 0]
    for result in (a, b):
        for box in result.boxes:
            if box.level == 0:
                assert np.isclose(sampled, [box.x0, box.y0, box.x1, box.y1]).all(axis=1).any()


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
                assert box_iou(np.array([[box.x0, box.y0, box.x1, box.y1]]), np.array([[parent.x0, parent.y0, parent.x1, parent.y1]]))[0, 0] > 0
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


def test_expand_weight_zero_drops_global_and_grown_views():
    """expand_weight scales the global and grown views; 0 leaves only the local crops' weighted vote."""
    rng = np.random.default_rng(4)
    scene = make_scene(rng)
    base = ScoringConfig(method="lgca", crops=12, crop_scale=(0.2, 0.4), regions=1, steps=1)
    heavy = _colour_scorer(dataclasses.replace(base, expand_weight=50.0), ColourEncoder()).score([scene.pixels], ["e"])[0]
    none = _colour_scorer(dataclasses.replace(base, expand_weight=0.0), ColourEncoder()).score([scene.pixels], ["e"])[0]
    plain = _colour_scorer(base, ColourEncoder()).score([scene.pixels], ["e"])[0]
    assert not np.allclose(heavy.probabilities, plain.probabilities)
    assert not np.allclose(none.probabilities, plain.probabilities)


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
