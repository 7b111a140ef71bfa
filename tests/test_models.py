"""Model sources: architecture and tag errors, random weights, weights files and URIs, safe loading, devices."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline.config import ModelConfig, ScoringConfig
from pipeline.models.errors import ModelError
from pipeline.models.load import _autocast_dtype, load_model, resolve_device
from pipeline.models.spec import RANDOM_WEIGHTS_WARNING, WeightsSource, architecture_name, parse_weights_source, resolve_model
from pipeline.models.weights import fetch_weights, file_sha256, read_state_dict

from .tiny import TINY_MODEL, random_images, scorer_for

SMALL = ScoringConfig(method="lgca", crops=4, regions=1, steps=1)
REFERENCE_SEED = 1  # the saved weights; loading them into a model built with seed 0 must give seed 1's scores


def _load(**kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the random-weights warning has its own test
        return load_model(ModelConfig(name=TINY_MODEL, device="cpu", **kwargs))


def _scores(model) -> np.ndarray:
    scorer = scorer_for(model, SMALL)
    images = random_images(3)
    return np.stack([r.probabilities for r in scorer.score(images, [f"k{i}" for i in range(3)])])


@pytest.fixture(scope="module")
def reference():
    return _load(pretrained="random", random_seed=REFERENCE_SEED)


@pytest.fixture(scope="module")
def reference_scores(reference):
    return _scores(reference)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.model.state_dict().items()}


# ---------------------------------------------------------------- architectures and tags


def test_unknown_architecture_suggests_close_names():
    with pytest.raises(ModelError) as error:
        architecture_name("ViT-B-33")
    message = str(error.value)
    assert "unknown open_clip architecture 'ViT-B-33'" in message
    assert "Did you mean ViT-B-32" in message
    assert "Valid names:" in message and "RN50" in message.split("Valid names:")[1]


def test_unknown_architecture_without_close_names_still_lists_valid_ones():
    with pytest.raises(ModelError) as error:
        architecture_name("zzzzzzzz")
    assert "Did you mean" not in str(error.value)
    assert "ViT-B-32" in str(error.value)


def test_model_config_json_registers():
    import open_clip

    assert architecture_name(TINY_MODEL) == "lgca-tiny-vit"
    assert "lgca-tiny-vit" in open_clip.list_models()
    assert resolve_model(ModelConfig(name=TINY_MODEL, pretrained="random")).image_size == 32


def test_missing_model_config_json(tmp_path):
    with pytest.raises(ModelError, match="model config file .*nope.json does not exist"):
        architecture_name(str(tmp_path / "nope.json"))


def test_unknown_tag_lists_valid_tags():
    with pytest.raises(ModelError) as error:
        parse_weights_source("ViT-B-32", "laion2b_s34b_b80k")
    message = str(error.value)
    assert "'laion2b_s34b_b80k' is not a weights file, a URI, 'random' or an open_clip tag of ViT-B-32" in message
    assert "laion2b_s34b_b79k" in message and "openai" in message


def test_architecture_without_tags_says_so():
    with pytest.raises(ModelError, match="valid tags: none \\(pass a weights file, an s3:// URI or 'random'\\)"):
        parse_weights_source(architecture_name(TINY_MODEL), "openai")


@pytest.mark.parametrize("pretrained", ["/nowhere/weights.safetensors", "weights.pt", "sub/dir/w", "ckpt.bin"])
def test_missing_weights_file(pretrained):
    """Anything that looks like a path (a separator or a weights suffix) is a missing file, not an unknown tag."""
    with pytest.raises(ModelError, match=f"weights file {pretrained} does not exist; check the path"):
        parse_weights_source("ViT-B-32", pretrained)


def test_weights_source_kinds(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    assert parse_weights_source("ViT-B-32", "random") == WeightsSource("random", "random")
    assert parse_weights_source("ViT-B-32", "openai") == WeightsSource("tag", "openai")
    assert parse_weights_source("ViT-B-32", "s3://b/w.safetensors") == WeightsSource("uri", "s3://b/w.safetensors")
    assert parse_weights_source("ViT-B-32", str(weights)) == WeightsSource("file", str(weights.resolve()))
    assert parse_weights_source("ViT-B-32", f"file://{weights}") == WeightsSource("file", str(weights.resolve()))


def test_check_model_builds_nothing(monkeypatch, tmp_path):
    """The fast pre-flight check classifies the source without a model in memory or touching the network.

    A model-config JSON is built on the meta device only (shapes, no storage) to check its values.
    """
    import open_clip

    create_model = open_clip.create_model

    def refuse(*args, **kwargs):
        if kwargs.get("device") == "meta" and kwargs.get("pretrained") is None:
            return create_model(*args, **kwargs)
        raise AssertionError("check_model must not build a model")

    monkeypatch.setattr(open_clip, "create_model", refuse)
    monkeypatch.setattr(open_clip, "create_model_and_transforms", refuse)
    assert resolve_model(ModelConfig(name="ViT-B-32", pretrained="openai")).source.kind == "tag"
    assert resolve_model(ModelConfig(name=TINY_MODEL, pretrained="random")).source.kind == "random"
    assert resolve_model(ModelConfig(name="ViT-B-32", pretrained="s3://bucket/w.pt")).source.kind == "uri"
    with pytest.raises(ModelError, match="Did you mean"):
        resolve_model(ModelConfig(name="ViT-B-3", pretrained="openai"))
    with pytest.raises(ModelError, match="valid tags"):
        resolve_model(ModelConfig(name="ViT-B-32", pretrained="nonsense"))


@pytest.mark.timeout(60)
def test_tag_offline_says_to_pass_a_file_or_uri(monkeypatch, tmp_path):
    """Without internet a real tag fails fast with the fix in the message (HF offline mode, empty cache)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time; patch the live value
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "5")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "5")
    with pytest.raises(ModelError) as error:
        load_model(ModelConfig(name="ViT-B-32", pretrained="openai", device="cpu", cache_dir=str(tmp_path)))
    message = str(error.value)
    assert "cannot fetch open_clip weights ViT-B-32/openai" in message
    assert "pass --pretrained /path/to/weights.safetensors or an s3:// URI" in message


# ---------------------------------------------------------------- random weights


def test_random_weights_warn_loudly_once(caplog):
    caplog.set_level(logging.WARNING, logger="pipeline.models")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one message, through logging only: a warnings.warn as well printed it twice
        model = load_model(ModelConfig(name=TINY_MODEL, pretrained="random", device="cpu", random_seed=4))
    records = [r for r in caplog.records if r.name.startswith("pipeline.models") and r.levelno == logging.WARNING]
    assert [r.getMessage() for r in records] == [RANDOM_WEIGHTS_WARNING]
    assert model.identity == {"model": "lgca-tiny-vit", "pretrained": "random(seed=4)", "weights_sha256": ""}


def test_random_weights_are_deterministic_per_seed(reference):
    same = _load(pretrained="random", random_seed=REFERENCE_SEED)
    other = _load(pretrained="random", random_seed=REFERENCE_SEED + 1)
    ref_state, same_state, other_state = _state(reference), _state(same), _state(other)
    assert ref_state.keys() == same_state.keys() == other_state.keys()
    assert all(torch.equal(ref_state[k], same_state[k]) for k in ref_state)
    different = {k for k in ref_state if not torch.equal(ref_state[k], other_state[k])}
    # every randomly initialised tensor differs (biases and norms start as constants and may not)
    assert {"visual.conv1.weight", "visual.proj", "text_projection", "token_embedding.weight"} <= different


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="torch.compile on the CPU needs a C compiler")
@pytest.mark.integration
def test_compiled_encoder_scores_like_the_eager_one(reference, reference_scores):
    compiled = _load(pretrained="random", random_seed=REFERENCE_SEED, compile=True)
    for batch in (5, 3, 7):  # a smaller last micro-batch must not recompile or fail
        views = torch.randn(batch, 3, 32, 32)
        torch.testing.assert_close(compiled.encode_image(views), reference.encode_image(views), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(_scores(compiled), reference_scores, atol=1e-4)


def test_random_weights_leave_the_callers_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _load(pretrained="random", random_seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_loaded_model_facts(reference):
    assert reference.image_size == 32
    assert reference.device == torch.device("cpu")
    assert reference.logit_scale == pytest.approx(1 / 0.07, rel=1e-4)  # open_clip's initial temperature
    embeddings = reference.encode_image(torch.randn(2, 3, 32, 32))
    assert embeddings.shape == (2, 32) and embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(2))
    text = reference.encode_text(["a cat", "a dog", "a cup"])
    assert text.shape == (3, 32)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(3))


# ---------------------------------------------------------------- weights files


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth", ".bin"])
def test_weights_file_gives_the_same_scores(tmp_path, reference, reference_scores, suffix):
    """Weights of seed 1 loaded into a model built with seed 0 give seed 1's scores exactly."""
    path = _save(_state(reference), tmp_path / f"weights{suffix}")
    loaded = _load(pretrained=str(path))
    np.testing.assert_array_equal(_scores(loaded), reference_scores)
    assert loaded.identity == {"model": "lgca-tiny-vit", "pretrained": str(path), "weights_sha256": file_sha256(path)}
    assert not np.allclose(_scores(_load(pretrained="random")), reference_scores)  # seed 0 alone would differ


@pytest.mark.parametrize(
    "wrap",
    [
        lambda state: {"state_dict": state},  # Lightning-style checkpoint
        lambda state: {f"module.{k}": v for k, v in state.items()},  # saved from DistributedDataParallel
    ],
    ids=["state_dict-key", "module-prefix"],
)
def test_wrapped_checkpoints_load(tmp_path, reference, reference_scores, wrap):
    path = tmp_path / "wrapped.pt"
    torch.save(wrap(_state(reference)), path)
    np.testing.assert_array_equal(_scores(_load(pretrained=str(path))), reference_scores)


def test_scalar_logit_scale_is_reshaped(tmp_path, reference, reference_scores):
    """Some exports store logit_scale as a 0-d tensor; open_clip's parameter is 0-d or (1,) by version."""
    state = _state(reference)
    state["logit_scale"] = state["logit_scale"].reshape(1) if state["logit_scale"].ndim == 0 else state["logit_scale"].reshape(())
    path = _save(state, tmp_path / "w.safetensors")
    np.testing.assert_array_equal(_scores(_load(pretrained=str(path))), reference_scores)


class _Evil:
    """Unpickling this runs `touch MARKER`: what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"visual.proj": torch.zeros(2), "x": _Evil(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))  # torch's safe unpickler warns on newer protocols
    with pytest.raises(ModelError, match="refusing to load .*evil.pt: it holds pickled objects other than tensors"):
        _load(pretrained=str(path))
    assert not marker.exists()
    with pytest.raises(ModelError, match="refusing"):
        read_state_dict(path)
    assert not marker.exists()


@pytest.mark.integration
def test_the_malicious_payload_is_live(tmp_path):
    """Control for the test above: an unrestricted unpickler does run the payload, so its absence means something."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_Evil(marker)))
    assert marker.exists()


def test_wrong_architecture_names_missing_and_unexpected_keys(tmp_path, reference):
    """A 3-layer text tower's weights for the 2-layer tiny model: the extra layer is unexpected, nothing fits."""
    config = json.loads(Path(TINY_MODEL).read_text())
    config["text_cfg"]["layers"] = 3
    deeper = tmp_path / "lgca-tiny-vit-deep3.json"
    deeper.write_text(json.dumps(config))
    deep_model = _load_architecture(str(deeper))
    deep_path = _save(_state(deep_model), tmp_path / "deep.safetensors")
    with pytest.raises(ModelError) as error:
        _load(pretrained=str(deep_path))
    message = str(error.value)
    assert "do not fit architecture lgca-tiny-vit" in message
    assert "0 missing keys" in message and "unexpected" in message and "transformer.resblocks.2." in message
    assert "check --model" in message

    # the other way round: the 2-layer weights lack the third layer
    small_path = _save(_state(reference), tmp_path / "small.safetensors")
    with pytest.raises(ModelError) as error:
        load_model(ModelConfig(name=str(deeper), pretrained=str(small_path), device="cpu"))
    assert "missing keys (e.g. ['transformer.resblocks.2." in str(error.value)
    assert "0 unexpected" in str(error.value)


def _load_architecture(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return load_model(ModelConfig(name=name, pretrained="random", device="cpu"))


def test_shape_mismatch_is_a_model_error(tmp_path, reference):
    state = _state(reference)
    state["visual.proj"] = torch.zeros(3, 3)
    path = _save(state, tmp_path / "bad-shape.safetensors")
    with pytest.raises(ModelError) as error:
        _load(pretrained=str(path))
    assert "do not fit architecture lgca-tiny-vit" in str(error.value)
    assert "size mismatch for visual.proj" in str(error.value) and "check --model" in str(error.value)


@pytest.mark.parametrize(
    "name, content",
    [("garbage.safetensors", b"not a safetensors file at all"), ("garbage.pt", b"\x00\x01 nonsense"), ("empty.pt", b"")],
)
def test_corrupt_weights_files(tmp_path, name, content):
    """A corrupt file is a ModelError naming the file (for a .pt, torch's safe unpickler refuses it first)."""
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ModelError, match=f"(cannot read weights|refusing to load) {path}"):
        read_state_dict(path)


@pytest.mark.parametrize("payload", [[torch.zeros(2)], {"a": torch.zeros(2), "b": 3}], ids=["list", "non-tensor"])
def test_not_a_state_dict(tmp_path, payload):
    path = tmp_path / "odd.pt"
    torch.save(payload, path)
    with pytest.raises(ModelError, match="is not a state dict of tensors"):
        read_state_dict(path)


def test_file_sha256_matches_hashlib(tmp_path):
    data = np.random.default_rng(0).bytes((5 << 20) + 123)  # crosses the 4 MiB read block
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert file_sha256(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


# ---------------------------------------------------------------- weights from S3


def test_weights_from_s3_are_fetched_once_and_cached(tmp_path, s3_server, s3_bucket, reference, reference_scores, caplog):
    path = _save(_state(reference), tmp_path / "ViT-tiny.safetensors")
    bucket = s3_bucket.removeprefix("s3://")
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="weights/ViT-tiny.safetensors", Body=path.read_bytes())
    uri = f"{s3_bucket}/weights/ViT-tiny.safetensors"
    cache = tmp_path / "cache"

    config = ModelConfig(name=TINY_MODEL, pretrained=uri, device="cpu", cache_dir=str(cache))
    first = load_model(config, s3_server.storage_options)
    np.testing.assert_array_equal(_scores(first), reference_scores)
    assert first.identity["weights_sha256"] == file_sha256(path)
    cached = list((cache / "weights").rglob("*"))
    cached_files = [p for p in cached if p.is_file()]
    assert [p.name for p in cached_files] == ["ViT-tiny.safetensors"]  # the name keeps its suffix; no partial left

    # second load: the remote object is gone, the cached copy serves and is not fetched again
    client.delete_object(Bucket=bucket, Key="weights/ViT-tiny.safetensors")
    caplog.set_level(logging.WARNING, logger="pipeline.models.load")
    second = load_model(config, s3_server.storage_options)
    np.testing.assert_array_equal(_scores(second), reference_scores)
    assert any("using the cached copy" in r.getMessage() for r in caplog.records)


def test_cached_weights_are_not_downloaded_again(tmp_path, s3_server, s3_bucket, monkeypatch):
    """With the remote present and unchanged, the second fetch copies nothing; a changed size re-fetches."""
    import s3fs

    bucket = s3_bucket.removeprefix("s3://")
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="w.pt", Body=b"0123456789")
    fetched = []
    original = s3fs.S3FileSystem.get_file

    def counting(self, *args, **kwargs):
        fetched.append(args[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "get_file", counting)
    first = fetch_weights(f"{s3_bucket}/w.pt", tmp_path, s3_server.storage_options)
    second = fetch_weights(f"{s3_bucket}/w.pt", tmp_path, s3_server.storage_options)
    assert first == second and first.read_bytes() == b"0123456789"
    assert len(fetched) == 1
    client.put_object(Bucket=bucket, Key="w.pt", Body=b"new weights, longer")
    s3fs.S3FileSystem.clear_instance_cache()
    third = fetch_weights(f"{s3_bucket}/w.pt", tmp_path, s3_server.storage_options)
    assert third == first and third.read_bytes() == b"new weights, longer"
    assert len(fetched) == 2


def test_missing_s3_weights(tmp_path, s3_server, s3_bucket):
    with pytest.raises(ModelError, match=r"weights s3://.*/absent.safetensors do not exist; check the URI"):
        fetch_weights(f"{s3_bucket}/absent.safetensors", tmp_path, s3_server.storage_options)
    assert not (tmp_path / "weights").exists() or not any(p.is_file() for p in (tmp_path / "weights").rglob("*"))


# ---------------------------------------------------------------- devices and precision


def test_resolve_device_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ModelError) as error:
            resolve_device(device)
        assert f"device {device} asked for but CUDA is not available here; use --device cpu or auto" in str(error.value)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_resolve_device_auto_prefers_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


def test_load_model_refuses_cuda_without_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelError, match="CUDA is not available"):
        load_model(ModelConfig(name=TINY_MODEL, pretrained="random", device="cuda"))


@pytest.mark.parametrize(
    "precision, device, dtype",
    [
        ("auto", "cpu", None),
        ("fp32", "cpu", None),
        ("fp16", "cpu", torch.float16),
        ("bf16", "cpu", torch.bfloat16),
        ("auto", "cuda", torch.bfloat16),
        ("fp32", "cuda", None),
        ("fp16", "cuda", torch.float16),
        ("bf16", "cuda", torch.bfloat16),
    ],
)
def test_precision_to_autocast(precision, device, dtype):
    assert _autocast_dtype(precision, torch.device(device)) is dtype


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_encoders_run_under_each_precision_on_cpu(reference, precision):
    """Autocast changes the compute dtype, never the float32 unit-norm output; bf16/fp16 stay close to fp32."""
    model = _load(pretrained="random", random_seed=REFERENCE_SEED, precision=precision)
    assert model.autocast_dtype is _autocast_dtype(precision, torch.device("cpu"))
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = model.encode_image(pixels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))
    cosine = (out * reference.encode_image(pixels)).sum(dim=-1)
    assert cosine.min() > 0.98
