"""Real-weights correctness: preprocessing and activation follow the weights, views follow the preprocessing,
text vectors are fp32 and honestly cached, temperatures are bounded, non-finite scores never become labels,
every door decodes the same pixels, and the WCA preset aggregates as WCA's code does."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN as OPENAI_MEAN
from open_clip.constants import OPENAI_DATASET_STD as OPENAI_STD
from PIL import Image

from pipeline.cli.args import job_config
from pipeline.cli.main import build_parser
from pipeline.config import DecodeConfig, ModelConfig, ScoringConfig
from pipeline.models.errors import ModelError
from pipeline.models.load import load_model
from pipeline.models.preprocess import resolve_preprocessing
from pipeline.models.spec import resolve_model
from pipeline.models.text_vectors import text_vectors
from pipeline.run.labeler import to_pixels
from pipeline.scoring.combine import image_scores
from pipeline.scoring.views import ViewFormat
from pipeline.stages.decode import decode_for_views, decode_image
from pipeline.vocab import Vocabulary
from tests.tiny import CLASSES, TINY_MODEL, scorer_for, tiny_model

REPO = Path(__file__).resolve().parents[1]


def _file_config(name: str, tmp_path: Path, **hints) -> ModelConfig:
    from safetensors.torch import save

    weights = tmp_path / "w.safetensors"
    weights.write_bytes(save({}))  # a valid header and no tensors: resolving the preprocessing reads no weights
    return ModelConfig(name=name, pretrained=str(weights), **hints)


def _photo(width: int = 160, height: int = 96) -> Image.Image:
    """A smooth, non-square RGB picture: resize modes and interpolations give visibly different views of it."""
    y, x = np.mgrid[0:height, 0:width]
    wave = 127.5 + 127.5 * np.sin(x / 9.0) * np.cos(y / 7.0)
    pixels = np.stack([x * 255 // width, y * 255 // height, wave], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels)


def _encoder_input(view: ViewFormat, picture: Image.Image) -> torch.Tensor:
    """The global view a scorer hands its encoder for `picture`."""
    received = []

    def encode(batch: torch.Tensor) -> torch.Tensor:
        received.append(batch.clone())
        return torch.ones(batch.shape[0], 4)

    from pipeline.scoring.scorer import Scorer

    scorer = Scorer(encode, ["a", "b"], torch.eye(2, 4), 100.0, view, ScoringConfig(method="clip"))
    pixels = torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1)
    scorer.score([pixels], ["k"])
    return received[0][0]


@pytest.mark.parametrize(
    ("architecture", "tag", "mean", "resize_mode", "quick_gelu"),
    [
        ("ViT-B-16-SigLIP", "webli", (0.5, 0.5, 0.5), "squash", False),  # SigLIP: 0.5/0.5, squash
        ("ViT-B-32", "openai", OPENAI_MEAN, "shortest", True),  # OpenAI: its own mean/std, QuickGELU
    ],
)
def test_file_weights_take_their_tags_preprocessing_and_the_encoder_sees_it(tmp_path, architecture, tag, mean, resize_mode, quick_gelu):
    preprocessing = resolve_preprocessing(architecture, "file", _file_config(architecture, tmp_path, weights_tag=tag))
    assert preprocessing.mean == pytest.approx(mean)
    assert preprocessing.resize_mode == resize_mode and preprocessing.interpolation == "bicubic"
    assert preprocessing.quick_gelu is quick_gelu
    assert tag in preprocessing.origin

    view = ViewFormat(224, preprocessing.mean, preprocessing.std, preprocessing.interpolation, preprocessing.resize_mode)
    picture = _photo()
    received = _encoder_input(view, picture)
    # open_clip's own inference transform for the same configuration (PIL resize, then normalise)
    reference = open_clip.image_transform(
        224, is_train=False, mean=preprocessing.mean, std=preprocessing.std, resize_mode=resize_mode, interpolation="bicubic"
    )(picture)
    assert received.shape == reference.shape == (3, 224, 224)
    assert (received - reference).abs().mean() < 0.02, "the global view departs from open_clip's preprocessing"
    # and the other configuration's view is clearly different: the test can tell them apart
    other = ViewFormat(224, OPENAI_MEAN, OPENAI_STD, "bicubic", "shortest" if resize_mode == "squash" else "squash")
    assert (_encoder_input(other, picture) - reference).abs().mean() > 0.2


def test_explicit_values_win_over_the_tag(tmp_path):
    config = _file_config("ViT-B-32", tmp_path, weights_tag="openai", interpolation="bilinear", image_mean=(0.1, 0.2, 0.3))
    preprocessing = resolve_preprocessing("ViT-B-32", "file", config)
    assert preprocessing.interpolation == "bilinear" and preprocessing.mean == (0.1, 0.2, 0.3)
    assert preprocessing.std == pytest.approx(OPENAI_STD) and preprocessing.quick_gelu
    assert "given explicitly" in preprocessing.origin


def test_a_file_without_a_hint_warns_where_the_tags_disagree(tmp_path):
    with pytest.warns(UserWarning, match=r"no preprocessing hint, and the tags of ViT-B-32 disagree.*--weights-tag"):
        resolve_model(_file_config("ViT-B-32", tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with a hint, or where every tag agrees (RN50), nothing to warn about
        resolve_model(_file_config("ViT-B-32", tmp_path, weights_tag="laion2b_s34b_b79k"))
        assert resolve_preprocessing("RN50", "file", _file_config("RN50", tmp_path)).quick_gelu  # its tags' shared setting


def test_a_wrong_weights_tag_fails_fast_with_the_valid_tags(tmp_path):
    with pytest.raises(ModelError, match=r"'webli' is not an open_clip tag of ViT-B-32; valid tags: openai, laion400m_e31"):
        resolve_model(_file_config("ViT-B-32", tmp_path, weights_tag="webli"))
    with pytest.raises(ModelError, match="is a tag already"):
        resolve_model(ModelConfig(name="ViT-B-32", pretrained="openai", weights_tag="openai"))


def test_the_openai_tag_builds_quickgelu(monkeypatch):
    """open_clip 3.3 builds plain GELU for `--pretrained openai` and only warns; we ask for QuickGELU."""
    asked = {}

    def create_model(name, **kwargs):
        asked.update(kwargs, name=name)
        raise RuntimeError("no internet")

    monkeypatch.setattr(open_clip, "create_model", create_model)
    with pytest.raises(ModelError, match="cannot fetch open_clip weights ViT-B-32/openai"):
        load_model(ModelConfig(name="ViT-B-32", pretrained="openai", device="cpu"))
    assert asked["pretrained"] == "openai" and asked["force_quick_gelu"] is True
    assert asked["force_preprocess_cfg"]["mean"] == pytest.approx(OPENAI_MEAN)


def test_file_weights_exported_from_openai_load_with_quickgelu(tmp_path):
    from safetensors.torch import save_file

    source = open_clip.create_model("ViT-B-32", pretrained=None)
    weights = tmp_path / "openai.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    del source
    hinted = load_model(ModelConfig(name="ViT-B-32", pretrained=str(weights), weights_tag="openai", device="cpu"))
    assert isinstance(hinted.model.visual.transformer.resblocks[0].mlp.gelu, open_clip.model.QuickGELU)
    assert hinted.view.mean == pytest.approx(OPENAI_MEAN) and hinted.view.resize_mode == "shortest"


# ---------------------------------------------------------------- views: resize modes, bounded memory


def test_longest_pads_with_the_fill_and_squash_equals_shortest_on_a_square():
    picture = _photo(160, 80)
    longest = _encoder_input(ViewFormat(64, (0.0,) * 3, (1 / 255,) * 3, "bilinear", "longest"), picture)
    assert torch.all(longest[:, :8, :] == 0) and torch.all(longest[:, -8:, :] == 0)  # 64 x 32 content, padded above and below
    assert longest[:, 24:40, :].abs().sum() > 0
    square = _photo(96, 96)
    views = [_encoder_input(ViewFormat(64, OPENAI_MEAN, OPENAI_STD, "bicubic", mode), square) for mode in ("shortest", "squash")]
    torch.testing.assert_close(views[0], views[1])


EXTREME = """
import re, sys, torch
sys.path.insert(0, {repo!r})
from pipeline.config import ScoringConfig
from pipeline.scoring.scorer import Scorer
from pipeline.scoring.views import ViewFormat
# ViT-B's input side, and a cheap encoder: the views' memory is what is measured
encode = lambda views: torch.nn.functional.normalize(views.mean(dim=(2, 3)), dim=-1)
config = ScoringConfig(method="lgca", crops=4, regions=1, steps=1, micro_batch=8)
scorer = Scorer(encode, ["a", "b", "c"], torch.eye(3), 100.0, ViewFormat(224, (0.5,) * 3, (0.5,) * 3), config)
images = [torch.full((3, 20, 10000), 90, dtype=torch.uint8), torch.full((3, 10, 100000), 150, dtype=torch.uint8)]
before = int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
results = scorer.score(images, ["wide", "wider"])
peak = int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))  # this process's own peak
print(len(results), all(r.error is None for r in results), (peak - before) // 1024)
"""


@pytest.mark.integration
def test_extreme_aspect_ratios_score_with_bounded_memory():
    """10000 x 20 and 100000 x 10 at S = 224: resizing the whole image before the centre crop took ~0.3 and ~6 GB."""
    done = subprocess.run([sys.executable, "-c", EXTREME.format(repo=str(REPO))], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    count, ok, growth_mib = done.stdout.split()
    assert count == "2" and ok == "True"
    assert int(growth_mib) < 200, f"scoring grew the process by {growth_mib} MiB"


# ---------------------------------------------------------------- text side


def test_text_vectors_are_fp32_whatever_the_image_precision():
    fp32 = tiny_model().encode_text(["a photo of a cat.", "a dog"])
    bf16 = tiny_model(precision="bf16").encode_text(["a photo of a cat.", "a dog"])
    torch.testing.assert_close(bf16, fp32, rtol=0, atol=0)


def test_the_text_cache_key_holds_the_model_config_content(tmp_path):
    vocabulary = Vocabulary(classes=CLASSES)
    scoring = ScoringConfig(method="clip")
    first, second = tmp_path / "a" / "model.json", tmp_path / "b" / "model.json"  # one stem, two architectures
    for path, width in ((first, 32), (second, 48)):
        path.parent.mkdir()
        config = json.loads(Path(TINY_MODEL).read_text())
        config["embed_dim"] = width
        path.write_text(json.dumps(config))
    cache = tmp_path / "cache"
    widths = []
    for path in (first, second):
        model = load_model(ModelConfig(name=str(path), pretrained="random", device="cpu"))
        widths.append(text_vectors(model, vocabulary, scoring, cache).shape[1])
    assert widths == [32, 48]
    assert len(list((cache / "text").glob("*.safetensors"))) == 2


def test_plain_mean_descriptors_differ_from_weighted_ones():
    model = tiny_model()
    descriptions = {"cat": ("a cat", "a small furry pet with whiskers", "whiskers"), "dog": ("a dog", "barks")}
    vocabulary = Vocabulary(classes=("cat", "dog"), descriptions=descriptions)
    weighted = text_vectors(model, vocabulary, ScoringConfig(method="descriptors", text_scale=8.0))
    mean = text_vectors(model, vocabulary, ScoringConfig(method="descriptors", text_scale=8.0, descriptor_weights="mean"))
    encoded = F.normalize(model.encode_text(list(descriptions["cat"])), dim=-1)
    torch.testing.assert_close(mean[0], F.normalize(encoded.mean(dim=0), dim=0))
    assert not torch.allclose(weighted[0], mean[0])
    # wca and lgca keep the weighted vectors whatever the descriptors method uses
    torch.testing.assert_close(
        text_vectors(model, vocabulary, ScoringConfig(method="wca", text_scale=8.0, descriptor_weights="mean")), weighted
    )


# ---------------------------------------------------------------- non-finite scores


def test_non_finite_scores_become_errors_not_labels():
    similarity = torch.tensor([[0.2, 0.1, 0.3], [float("nan"), 0.1, 0.2]])
    good, bad = image_scores(["ok", "nan"], similarity, ["a", "b", "c"], 100.0, 2, [[], []], [(1.0, 0.0, 0.0)] * 2)
    assert good.error is None and good.label == "c"
    assert bad.label == "" and bad.topk_labels == [] and "not finite" in bad.error and "--precision fp32" in bad.error

    model = tiny_model()
    width = model.encode_text(["x"]).shape[1]

    def encode(batch: torch.Tensor) -> torch.Tensor:  # the second image overflows in the encoder
        out = torch.ones(batch.shape[0], width)
        out[batch.mean(dim=(1, 2, 3)) > 0] = float("inf")
        return out

    scorer = scorer_for(model, ScoringConfig(method="clip"), encode_image=encode)
    results = scorer.score([torch.zeros(3, 40, 40, dtype=torch.uint8), torch.full((3, 40, 40), 255, dtype=torch.uint8)], ["a", "b"])
    assert results[0].error is None and results[0].label in CLASSES
    assert results[1].error and results[1].label == ""


# ---------------------------------------------------------------- one decoding path


def _rgba_png() -> bytes:
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, size=(300, 420, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(np.arange(420)[None, :] < 200, 0, 255)  # half transparent
    out = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(out, format="PNG")
    return out.getvalue()


def _sixteen_bit_png() -> bytes:
    values = (np.arange(300 * 420, dtype=np.uint32).reshape(300, 420) * 7 % 65536).astype(np.uint16)
    out = io.BytesIO()
    Image.fromarray(values).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize("make", [_rgba_png, _sixteen_bit_png], ids=["rgba", "16-bit"])
def test_a_file_gives_the_same_pixels_through_the_api_eval_and_run(tmp_path, make):
    data = make()
    path = tmp_path / "image.png"
    path.write_bytes(data)
    decode = decode_for_views(224, [ScoringConfig(method="lgca")])  # what `lgca run` and `lgca eval` decode at
    assert decode.min_short_side == 747  # ceil(224 / 0.3): lgca's smallest crop, 0.3 of the shorter side, is 224 pixels
    pipeline = decode_image(data, decode)  # the decoder of `lgca run` and `lgca eval`
    from_path, size = to_pixels(path, decode)
    from_pil, pil_size = to_pixels(Image.open(path), decode)
    expected = torch.from_numpy(pipeline.pixels).permute(2, 0, 1)
    assert torch.equal(from_path, expected) and torch.equal(from_pil, expected)
    assert size == pil_size == (pipeline.width, pipeline.height) == (420, 300)
    naive = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)
    assert not torch.equal(naive, expected)  # PIL's convert("RGB") alone gives other pixels (black, or clipped 16-bit)


def test_eval_decodes_with_the_labelers_settings():
    model = tiny_model()
    from pipeline.run.labeler import Labeler
    from pipeline.vocab import Vocabulary as V

    scoring = ScoringConfig(method="wca", crops=4, crop_scale=(0.25, 0.9))
    labeler = Labeler(model, V(classes=CLASSES), scoring, torch.randn(len(CLASSES), 32))
    assert labeler.decode == DecodeConfig(min_short_side=128)  # ceil(32 / 0.25), as `lgca run` computes it


# ---------------------------------------------------------------- the WCA preset


def test_the_wca_preset_sets_the_official_protocol(tmp_path):
    args = build_parser().parse_args(["run", "in/", "--labels", "l.txt", "--output", str(tmp_path / "o"), "--preset", "wca"])
    config = job_config(args)
    assert config.scoring.method == "wca" and config.scoring.crops == 60 and config.scoring.crop_scale == (0.1, 0.9)
    assert config.scoring.view_global_weight == 0.0 and config.scoring.descriptor_weights == "mean"
    assert (config.model.name, config.model.pretrained, config.model.precision, config.model.quick_gelu) == (
        "ViT-B-32",
        "openai",
        "fp16",
        True,
    )
    weights = tmp_path / "ViT-B-32.safetensors"
    weights.write_bytes(b"")
    args = build_parser().parse_args(
        ["run", "in/", "--labels", "l.txt", "--output", "o", "--preset", "wca", "--pretrained", str(weights), "--crops", "20"]
    )
    config = job_config(args)
    assert config.model.weights_tag == "openai" and config.scoring.crops == 20  # a flag given explicitly wins


def _official_wca_logits(global_emb: torch.Tensor, crop_emb: torch.Tensor, class_emb: torch.Tensor, image_scale: float) -> torch.Tensor:
    """WCA's released main.py, reimplemented: w = softmax_k(exp(image_scale) <f0, fk>), p = normalise(sum_k w_k f_k),
    logits = p @ z (z: its per-class weighted descriptor embeddings; no global term)."""
    weight_image = (global_emb[:, None, :] * crop_emb).sum(dim=-1)  # (B, N)
    w = (weight_image * torch.exp(torch.tensor(image_scale))).softmax(-1).unsqueeze(-1)
    patch = F.normalize((crop_emb * w).sum(dim=1), dim=-1)
    return patch @ class_emb.T


def test_the_wca_preset_aggregates_as_the_official_code():
    model = tiny_model()
    args = build_parser().parse_args(["run", "in/", "--labels", "l.txt", "--output", "o", "--preset", "wca", "--crops", "12"])
    scoring = job_config(args).scoring
    scorer = scorer_for(model, scoring)
    images = [torch.randint(0, 256, (3, 90, 140), dtype=torch.uint8) for _ in range(3)]
    views = scorer.embed(images, ["a", "b", "c"])
    ours = np.stack([result.probabilities for result in scorer.combine(views)])
    official = _official_wca_logits(views.global_emb, views.region_emb[:, : views.crops], scorer.vectors, scoring.image_scale)
    np.testing.assert_allclose(ours, torch.softmax(model.logit_scale * official, dim=-1).numpy(), rtol=1e-5, atol=1e-6)
    assert views.crops == 12 and (views.boxes[:, :, 2] - views.boxes[:, :, 0]).min() >= 0.1 * 90 / 140 - 1e-9


def test_cli_flags_reach_the_model_config(tmp_path):
    args = build_parser().parse_args(
        ["run", "in/", "--labels", "l.txt", "--output", "o", "--weights-tag", "webli", "--image-mean", "0.5", "0.5", "0.5"]
        + ["--resize-mode", "squash", "--interpolation", "bilinear", "--no-quick-gelu"]
    )
    model = job_config(args).model
    assert (model.weights_tag, model.image_mean, model.resize_mode, model.interpolation, model.quick_gelu) == (
        "webli",
        (0.5, 0.5, 0.5),
        "squash",
        "bilinear",
        False,
    )


def test_lgca_eval_keeps_its_embedding_method_under_the_preset():
    from pipeline.cli.args import scoring_config

    args = build_parser().parse_args(["eval", "--data", "d/", "--labels", "l.txt", "--preset", "wca", "--methods", "descriptors,wca,lgca"])
    import argparse

    scoring = scoring_config(argparse.Namespace(**{**vars(args), "method": "lgca"}), keep_method=True)
    assert scoring.method == "lgca" and scoring.crop_scale == (0.1, 0.9) and scoring.descriptor_weights == "mean"


def test_the_manifest_records_and_the_summary_shows_the_preprocessing(tmp_path):
    from pipeline.config import JobConfig, VocabularyConfig
    from pipeline.review.stats import _preprocessing

    config = JobConfig(
        inputs=("in/",),
        output=str(tmp_path / "out"),
        vocabulary=VocabularyConfig(labels="l.txt"),
        model=_file_config("ViT-B-16-SigLIP", tmp_path, weights_tag="webli"),
    )
    record = resolve_model(config.model).record["preprocess"]
    assert record["mean"] == [0.5, 0.5, 0.5] and record["resize_mode"] == "squash" and "webli" in record["origin"]
    shown = _preprocessing(json.loads(json.dumps(record)))  # as read back from _manifest.json
    assert "squash" in shown and "webli" in shown and "mean [0.5, 0.5, 0.5]" in shown
    assert _preprocessing(None) == "not recorded"


def test_a_model_config_json_declares_its_own_preprocessing(tmp_path):
    config = json.loads(Path(TINY_MODEL).read_text())
    config["preprocess_cfg"] = {"interpolation": "bilinear", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    path = tmp_path / "declared.json"
    path.write_text(json.dumps(config))
    model = load_model(ModelConfig(name=str(path), pretrained="random", device="cpu"))  # open_clip never sees the key
    assert (model.view.interpolation, model.view.mean, model.view.std) == ("bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert "preprocess_cfg of the declared model config" in model.preprocessing.origin
