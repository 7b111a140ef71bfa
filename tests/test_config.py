"""Configuration: every validation error names the value and the fix; job specs parse, refuse and round-trip."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from pipeline.config import (
    LGCA_GLOBAL_WEIGHT,
    METHODS,
    ConfigError,
    DecodeConfig,
    ExecutionConfig,
    JobConfig,
    ModelConfig,
    ScoringConfig,
    VocabularyConfig,
)
from pipeline.job_spec import job_from_spec

# ---------------------------------------------------------------- ScoringConfig


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "clipp"}, "method 'clipp' is unknown; choose one of clip, ensemble, descriptors, wca, lgca"),
        ({"saliency": "max"}, "saliency 'max' is unknown; choose one of class, global, margin, agreement"),
        ({"crop_layout": "spiral"}, "crop layout 'spiral' is unknown; choose random or grid"),
        ({"crops": -1}, "crops must be >= 0, got -1"),
        ({"steps": -2}, "steps must be >= 0, got -2"),
        ({"regions": -3}, "regions must be >= 0, got -3"),
        ({"crop_scale": (0.9, 0.5)}, "crop scale must be two numbers 0 < alpha <= beta <= 1, got (0.9, 0.5)"),
        ({"crop_scale": (0.0, 0.5)}, "got (0.0, 0.5)"),
        ({"crop_scale": (0.5, 1.2)}, "got (0.5, 1.2)"),
        ({"crop_scale": (0.5,)}, "got (0.5,)"),
        ({"crop_scale": (0.2, 0.5, 0.9)}, "got (0.2, 0.5, 0.9)"),
        ({"growth": 0.9}, "growth must be >= 1 (a grown region contains its parent), got 0.9"),
        ({"overlap_iou": 1.5}, "overlap IoU must lie in [0, 1], got 1.5"),
        ({"overlap_iou": -0.1}, "overlap IoU must lie in [0, 1], got -0.1"),
        ({"expand_weight": -1.0}, "expand weight must be >= 0, got -1.0"),
        ({"global_weight": 1.5}, "global weight must lie in [0, 1], got 1.5"),
        ({"global_weight": -0.1}, "global weight must lie in [0, 1], got -0.1"),
        ({"global_weight": float("nan")}, "global weight must lie in [0, 1], got nan"),
        ({"global_weight": "0.3"}, "global weight must be a number or None, got '0.3'"),
        ({"growth_target": "0.8"}, "growth target must be a number or None, got '0.8'"),
        ({"growth_target": 0.0}, "growth target must lie in (0, 1] (a fraction of the shorter side), got 0.0"),
        ({"growth_target": 1.2}, "growth target must lie in (0, 1] (a fraction of the shorter side), got 1.2"),
        ({"image_scale": float("inf")}, "image scale must lie in [-20, 20]"),
        ({"text_scale": float("nan")}, "text scale must lie in [-20, 20]"),
        # exp(89) overflows float32: region weights would be NaN and every label the first class
        ({"image_scale": 89.0}, "image scale must lie in [-20, 20] (it is used as exp(scale); WCA's value is 4.0), got 89.0"),
        ({"text_scale": -25.0}, "text scale must lie in [-20, 20] (it is used as exp(scale); WCA's value is 2.0), got -25.0"),
        ({"descriptor_weights": "median"}, "descriptor weights 'median' are unknown; choose one of softmax, mean"),
        ({"topk": 0}, "topk must be >= 1, got 0"),
        ({"micro_batch": 0}, "micro batch must be >= 1, got 0"),
        ({"crop_layout": "grid", "crops": 10}, "the grid layout needs a square number of crops (e.g. 49, 64), got 10"),
        (
            {"method": "lgca", "crops": 1, "regions": 2},
            "lgca grows 2 regions a step but has only 1 crops; use --crops >= --regions",
        ),
    ],
)
def test_scoring_config_errors_name_value_and_fix(kwargs, message):
    with pytest.raises(ConfigError) as error:
        ScoringConfig(**kwargs)
    assert message in str(error.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"crop_layout": "grid", "crops": 49},
        {"crop_layout": "grid", "crops": 1, "method": "wca"},
        {"crop_layout": "grid", "crops": 0, "method": "wca"},  # no crops: the grid has nothing to lay out
        {"method": "lgca", "crops": 1, "regions": 2, "steps": 0},  # no expansion: regions are never grown
        {"method": "lgca", "crops": 0, "regions": 0},
        {"method": "wca", "crops": 1, "regions": 5},  # regions only matter to lgca
        {"method": "clip", "crops": 0, "expand_weight": 0.0},
        {"method": "wca", "crops": 0, "expand_weight": 0.0},  # revision 2: m weighs grown boxes only, never the global view
        {"method": "lgca", "expand_weight": 0.0, "global_weight": 0.0},  # the local crops alone
        {"global_weight": 1.0, "growth_target": 1.0},  # the global view alone; lineages grow to the shorter side
        {"saliency": "margin"},
        {"saliency": "agreement"},
        {"crop_scale": (1.0, 1.0), "growth": 1.0, "overlap_iou": 0.0},
    ],
)
def test_scoring_config_boundary_values_are_valid(kwargs):
    """The rules above are not stricter than they need to be: edge values that make sense are accepted."""
    config = ScoringConfig(**kwargs)
    for name, value in kwargs.items():
        assert getattr(config, name) == value


def test_crop_scale_list_becomes_float_tuple():
    config = ScoringConfig(crop_scale=[1, 1])
    assert config.crop_scale == (1.0, 1.0)
    assert all(isinstance(v, float) for v in config.crop_scale)
    assert config.to_dict()["crop_scale"] == [1.0, 1.0]


@pytest.mark.parametrize(
    "method, given, resolved",
    [
        ("clip", None, 1.0),
        ("descriptors", 0.3, 1.0),
        ("wca", None, 0.0),
        ("lgca", None, LGCA_GLOBAL_WEIGHT),
        ("wca", 0.3, 0.3),
        ("lgca", 0.0, 0.0),
        ("lgca", 1.0, 1.0),
    ],
)
def test_global_weight_resolves_to_the_method_default(method, given, resolved):
    """None means the method's default: 0 for wca (WCA's code), LGCA_GLOBAL_WEIGHT for lgca; the global-only
    methods are the global view alone, whatever is given."""
    config = ScoringConfig(method=method, global_weight=given)
    assert config.view_global_weight == resolved
    assert config.global_weight_for(method) == resolved
    assert 0.0 < LGCA_GLOBAL_WEIGHT < 1.0


def test_scoring_to_dict_is_json_and_rebuilds_the_config():
    config = ScoringConfig(method="wca", crops=16, crop_layout="grid", seed=7, crop_scale=(0.3, 0.6), global_weight=0.2)
    rebuilt = ScoringConfig(**json.loads(json.dumps(config.to_dict())))
    assert rebuilt == config


@pytest.mark.parametrize("method, applied", [("lgca", LGCA_GLOBAL_WEIGHT), ("wca", 0.0), ("clip", 1.0)])
def test_scoring_to_dict_records_the_lambda_applied(method, applied):
    """Provenance says which lambda scored, never None; rebuilt from it, the config scores the same."""
    config = ScoringConfig(method=method)
    recorded = config.to_dict()
    assert recorded["global_weight"] == applied
    assert ScoringConfig(**recorded).view_global_weight == config.view_global_weight


@pytest.mark.parametrize(
    "values, named",
    [
        ({"region_pool": "some"}, "region pool"),
        ({"selection": "best"}, "selection"),
        ({"level_aggregation": "max"}, "level aggregation"),
        ({"lineage_weights": "wca"}, "lineage weights"),
        ({"level0": "none"}, "level0"),
        ({"global_weight_rule": "auto"}, "global weight rule"),
        ({"saliency_scale": -1.0}, "saliency scale"),
        ({"cascade_margin": -0.1}, "cascade margin"),
        ({"cascade_margin": 0.2, "method": "wca"}, "--method lgca"),
    ],
)
def test_revision_3_choices_are_validated(values, named):
    with pytest.raises(ConfigError, match=named):
        ScoringConfig(**values)


@pytest.mark.parametrize(
    "method, passes, grown",
    [("clip", 1, 0), ("ensemble", 1, 0), ("descriptors", 1, 0), ("wca", 1 + 10, 0), ("lgca", 1 + 10 + 3 * 2, 6)],
)
def test_encoder_passes_per_method(method, passes, grown):
    """1 + N + K*T for lgca, 1 + N for wca, 1 for the global-only methods, whatever crops/regions/steps say."""
    config = ScoringConfig(method=method, crops=10, regions=3, steps=2)
    assert config.encoder_passes == passes
    assert config.grown_views == grown
    assert config.uses_crops == (method in ("wca", "lgca"))


def test_methods_tuple_is_the_documented_set():
    assert set(METHODS) == {"clip", "ensemble", "descriptors", "wca", "lgca"}


def test_configs_are_frozen():
    config = ScoringConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.crops = 3  # type: ignore[misc]


# ---------------------------------------------------------------- the other sections


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": ""}, "model name is empty; pass --model, e.g. ViT-B-32"),
        ({"pretrained": ""}, "pretrained is empty; pass an open_clip tag, a weights file, a URI or 'random'"),
        ({"precision": "fp8"}, "precision 'fp8' is unknown; choose one of auto, fp32, fp16, bf16"),
        ({"device": "tpu"}, "device 'tpu' is unknown; use auto, cpu, cuda or cuda:N"),
        ({"device": "mps"}, "device 'mps' is unknown"),
    ],
)
def test_model_config_errors(kwargs, message):
    with pytest.raises(ConfigError) as error:
        ModelConfig(**kwargs)
    assert message in str(error.value)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1"])
def test_model_config_accepts_devices(device):
    """Validation is syntactic only: cuda:1 is accepted here even without CUDA (models.resolve_device checks)."""
    assert ModelConfig(device=device).device == device


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"labels": ""}, "no labels given; pass --labels FILE"),
        ({"labels": "l.txt", "prompt": "a photo of a"}, "prompt 'a photo of a' needs a {} where the class name goes"),
    ],
)
def test_vocabulary_config_errors(kwargs, message):
    with pytest.raises(ConfigError) as error:
        VocabularyConfig(**kwargs)
    assert message in str(error.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_pixels": 0}, "max pixels must be > 0, got 0"),
        ({"min_short_side": -5}, "min short side must be > 0, got -5"),
        ({"timeout_s": 0.0}, "decode timeout must be > 0, got 0.0"),
    ],
)
def test_decode_config_errors(kwargs, message):
    with pytest.raises(ConfigError) as error:
        DecodeConfig(**kwargs)
    assert message in str(error.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
        ({"concurrency": 0}, "concurrency must be >= 1, got 0"),
        ({"num_gpus": -0.5}, "num_gpus must be >= 0, got -0.5"),
        ({"num_cpus_per_actor": 0}, "num_cpus_per_actor must be > 0, got 0"),
        ({"decode_batch_size": 0}, "decode_batch_size must be >= 1, got 0"),
        ({"rows_per_file": 0}, "rows_per_file must be >= 1, got 0"),
    ],
)
def test_execution_config_errors(kwargs, message):
    with pytest.raises(ConfigError) as error:
        ExecutionConfig(**kwargs)
    assert message in str(error.value)


def test_execution_config_accepts_fractional_gpus_and_defaults():
    config = ExecutionConfig(num_gpus=0.25, concurrency=3)
    assert (config.num_gpus, config.concurrency) == (0.25, 3)
    assert ExecutionConfig(num_gpus=0).num_gpus == 0


VOCAB = VocabularyConfig(labels="labels.txt")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"inputs": (), "output": "out"}, "no inputs given"),
        ({"inputs": ("in",), "output": ""}, "no output given; pass --output DIR"),
        ({"inputs": ("in",), "output": "out", "resume": True, "overwrite": True}, "--resume and --overwrite exclude each other"),
    ],
)
def test_job_config_errors(kwargs, message):
    with pytest.raises(ConfigError) as error:
        JobConfig(vocabulary=VOCAB, **kwargs)
    assert message in str(error.value)


def test_job_config_inputs_list_becomes_tuple():
    job = JobConfig(inputs=["a", "b"], output="out", vocabulary=VOCAB)
    assert job.inputs == ("a", "b")
    hash(job)  # frozen and hashable all the way down: a list would make this raise


# ---------------------------------------------------------------- job_from_spec


def _spec(**overrides):
    spec = {"inputs": ["s3://bucket/images/"], "output": "s3://bucket/out/", "vocabulary": {"labels": "labels.txt"}}
    spec.update(overrides)
    return spec


def _spec_error(spec) -> str:
    with pytest.raises(ConfigError) as error:
        job_from_spec(spec)
    return str(error.value)


def test_minimal_spec_uses_defaults():
    job, storage = job_from_spec(_spec())
    assert job.inputs == ("s3://bucket/images/",)
    assert job.scoring == ScoringConfig() and job.model == ModelConfig() and job.execution == ExecutionConfig()
    assert storage == {}


def test_unknown_top_level_key_is_named_with_valid_keys():
    message = _spec_error(_spec(ouput="x"))
    assert "unknown key(s) in job spec: ouput" in message
    assert "output" in message.split("valid keys:")[1]


@pytest.mark.parametrize(
    "section, key, valid",
    [
        ("scoring", "crop", "crops"),
        ("model", "arch", "name"),
        ("execution", "gpus", "num_gpus"),
        ("vocabulary", "label", "labels"),
    ],
)
def test_unknown_section_key_is_named_with_its_section(section, key, valid):
    spec = _spec()
    spec[section] = {**spec.get(section, {}), key: 1}
    message = _spec_error(spec)
    assert f"unknown key(s) in job spec `{section}`: {key}" in message
    assert valid in message.split("valid keys:")[1]


@pytest.mark.parametrize(
    "section, values, message",
    [
        ("scoring", {"crops": "60"}, "job spec `scoring`: `crops` must be int, got str '60'"),
        ("scoring", {"crops": 60.0}, "`crops` must be int, got float 60.0"),
        ("scoring", {"crops": True}, "`crops` must be int, got bool True"),  # YAML `yes` is no number
        ("scoring", {"crops": None}, "`crops` must be int, got NoneType None"),
        ("scoring", {"growth": "1.4"}, "`growth` must be float, got str '1.4'"),
        ("scoring", {"method": 3}, "`method` must be str, got int 3"),
        ("model", {"name": ["ViT-B-32"]}, "job spec `model`: `name` must be str"),
        ("model", {"cache_dir": 5}, "job spec `model`: `cache_dir` must be str or null, got int 5"),
        ("execution", {"batch_size": 1.5}, "job spec `execution`: `batch_size` must be int, got float 1.5"),
        ("execution", {"concurrency": "4"}, "job spec `execution`: `concurrency` must be int or null, got str '4'"),
        ("execution", {"num_gpus": "1"}, "`num_gpus` must be float or null, got str '1'"),
        ("execution", {"address": 8265}, "`address` must be str or null, got int 8265"),
        ("vocabulary", {"templates": ["a {}"]}, "job spec `vocabulary`: `templates` must be str or null"),
        ("decode", {"timeout_s": "30"}, "job spec `decode`: `timeout_s` must be float, got str '30'"),
    ],
)
def test_wrong_types_are_named(section, values, message):
    """Optional fields (`int | None`, ...) are type-checked too, not only fields with a scalar default."""
    spec = _spec()
    spec[section] = {**spec.get(section, {}), **values}
    assert message in _spec_error(spec)


def test_invalid_values_in_a_section_name_the_section():
    assert "job spec `scoring`: crops must be >= 0, got -1" in _spec_error(_spec(scoring={"crops": -1}))


@pytest.mark.parametrize(
    "values",
    [
        {"model": {"cache_dir": None}, "execution": {"concurrency": None, "num_gpus": None, "address": None}},
        {"scoring": {"growth": 2}, "execution": {"num_gpus": 1}},  # an int where a float is expected
    ],
)
def test_nulls_for_optional_fields_and_ints_for_floats_are_accepted(values):
    job, _ = job_from_spec(_spec(**values))
    for section, fields in values.items():
        for name, value in fields.items():
            assert getattr(getattr(job, section), name) == value


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"scoring": [1, 2]}, "job spec: `scoring` must be a mapping, got list"),
        ({"inputs": []}, "`inputs` must be a non-empty list of paths or URIs"),
        ({"inputs": [3]}, "`inputs` must be a non-empty list of paths or URIs"),
        ({"inputs": None}, "`inputs` must be a non-empty list of paths or URIs"),
        ({"output": None}, "`output` must be a path or URI"),
        ({"output": ""}, "`output` must be a path or URI"),
        ({"resume": "yes"}, "`resume` must be true or false"),
        ({"overwrite": 1}, "`overwrite` must be true or false"),
        ({"storage_options": ["anon"]}, "`storage_options` must be a mapping"),
        ({"resume": True, "overwrite": True}, "--resume and --overwrite exclude each other"),
        ({"vocabulary": {}}, "no labels given"),
    ],
)
def test_spec_shape_errors(overrides, message):
    assert message in _spec_error(_spec(**overrides))


def test_spec_must_be_a_mapping():
    with pytest.raises(ConfigError, match="job spec must be a mapping of keys to values, got list"):
        job_from_spec(["inputs"])


def test_single_input_string_becomes_a_one_tuple():
    job, _ = job_from_spec(_spec(inputs="s3://bucket/one/"))
    assert job.inputs == ("s3://bucket/one/",)


@pytest.mark.parametrize(
    "storage, named",
    [
        ({"key": "AKIA..."}, "key"),
        ({"secret": "s"}, "secret"),
        ({"token": "t"}, "token"),
        ({"aws_secret_access_key": "s"}, "aws_secret_access_key"),
        ({"Password": "p"}, "Password"),
        ({"anon": False, "session_token": "t", "secret": "s"}, "secret, session_token"),
        # s3fs passes client_kwargs straight to botocore, so a secret there is as real as one at the top
        ({"client_kwargs": {"region_name": "us-east-1", "aws_secret_access_key": "s"}}, "client_kwargs.aws_secret_access_key"),
    ],
)
def test_secrets_in_storage_options_are_refused(storage, named):
    message = _spec_error(_spec(storage_options=storage))
    assert f"`storage_options` must not hold secrets ({named})" in message
    assert "AWS environment variables" in message
    for value in ("AKIA...", "'s'", "'t'", "'p'"):
        assert value not in message  # the secret values themselves never reach the error message


def test_plain_storage_options_are_returned():
    storage = {"anon": False, "endpoint_url": "http://minio:9000", "client_kwargs": {"region_name": "eu-west-1"}}
    job, returned = job_from_spec(_spec(storage_options=storage))
    assert returned == storage
    assert "minio" not in json.dumps(dataclasses.asdict(job))  # options travel beside the job, not inside it


def test_crop_scale_list_is_accepted_from_a_spec():
    job, _ = job_from_spec(_spec(scoring={"crop_scale": [0.4, 0.8]}))
    assert job.scoring.crop_scale == (0.4, 0.8)


def test_where_prefix_is_used_in_messages():
    with pytest.raises(ConfigError, match=r"^unknown key\(s\) in job spec jobs/a\.yaml `scoring`: nope;"):
        job_from_spec(_spec(scoring={"nope": 1}), where="job spec jobs/a.yaml")


FULL_JOB = JobConfig(
    inputs=("s3://bucket/a/", "/data/manifest.parquet"),
    output="s3://bucket/out/",
    vocabulary=VocabularyConfig(labels="s3://bucket/labels.json", templates="templates.txt", prompt="an image of a {}."),
    model=ModelConfig(
        name="ViT-L-14",
        pretrained="s3://bucket/w.safetensors",
        device="cuda:0",
        precision="fp16",
        cache_dir="/cache",
        random_seed=3,
        compile=True,
        weights_tag="openai",
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.25, 0.25, 0.25),
        interpolation="bilinear",
        resize_mode="squash",
        quick_gelu=False,
    ),
    scoring=ScoringConfig(
        method="lgca",
        crops=16,
        crop_scale=(0.3, 0.7),
        crop_layout="grid",
        letterbox="detect",
        saliency="global",
        steps=2,
        regions=3,
        growth=1.6,
        overlap_iou=0.4,
        image_scale=3.0,
        text_scale=1.5,
        expand_weight=0.5,
        seed=11,
        topk=3,
        micro_batch=64,
        global_weight=0.4,
        growth_target=0.8,
        descriptor_weights="mean",
        region_pool="all",
        selection="lineages",
        level_aggregation="similarity",
        lineage_weights="uniform",
        saliency_scale=5.0,
        level0="all",
        global_weight_rule="fixed",
        cascade_margin=0.25,
    ),
    decode=DecodeConfig(
        max_bytes=10_000,
        read_timeout_s=9.0,
        allowed_schemes=("file", "s3", "gs"),
        max_pixels=1000,
        min_short_side=128,
        timeout_s=5.0,
        device="gpu",
    ),
    execution=ExecutionConfig(
        address="auto", batch_size=8, concurrency=2, num_gpus=0.5, num_cpus_per_actor=2.0, decode_batch_size=4, rows_per_file=100
    ),
    resume=True,
    retry_failed=True,
    embeddings=True,
    image_column="jpg",
)


@pytest.mark.parametrize("dump, load", [(json.dumps, json.loads), (yaml.safe_dump, yaml.safe_load)])
def test_full_spec_round_trips(dump, load):
    """Every field differs from its default, goes out as JSON/YAML text and comes back equal."""
    for field in dataclasses.fields(FULL_JOB):
        value = getattr(FULL_JOB, field.name)
        if field.default is not dataclasses.MISSING and dataclasses.is_dataclass(value):
            changed = [f.name for f in dataclasses.fields(value) if getattr(value, f.name) == getattr(field.default, f.name)]
            if field.name == "scoring":
                changed.remove("method")  # the cascade, set here, needs lgca, the default method
            assert changed == [], f"{field.name} keeps defaults {changed}; the round trip would not test them"
    spec = dataclasses.asdict(FULL_JOB)
    spec["inputs"] = list(spec["inputs"])
    spec["scoring"]["crop_scale"] = list(spec["scoring"]["crop_scale"])
    spec["storage_options"] = {"endpoint_url": "http://minio:9000"}
    job, storage = job_from_spec(load(dump(spec)))
    assert job == FULL_JOB
    assert storage == {"endpoint_url": "http://minio:9000"}
