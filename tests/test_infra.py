"""Static checks of infra/ and jobs/specs/: they parse, validate against their schemas, and agree with each other and the code."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

import pipeline
from pipeline.run.submit import ENTRYPOINT_SCRIPT, entrypoint, load_spec

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
DOCKERFILE = INFRA / "Dockerfile"
DOCKERIGNORE = INFRA / "Dockerfile.dockerignore"
RAYJOB = INFRA / "kuberay" / "rayjob.yaml"
RAYCLUSTER = INFRA / "kuberay" / "raycluster.yaml"
SERVICE_ACCOUNT = INFRA / "kuberay" / "serviceaccount.yaml"
LAUNCHER = INFRA / "aws" / "cluster.yaml"
CONSTRAINTS = REPO / "constraints.txt"
OPERATIONS = REPO / "docs" / "OPERATIONS.md"
SPECS = sorted((REPO / "jobs" / "specs").glob("*.yaml"))
YAML_FILES = sorted(INFRA.rglob("*.yaml")) + SPECS
GPU = "nvidia.com/gpu"

# The KubeRay v1 fields these manifests use, from ray-operator/apis/ray/v1/{raycluster,rayjob}_types.go.
# Closed objects (additionalProperties: false) catch misspelt fields, which the API server would prune silently.
_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_POD_TEMPLATE = {"type": "object", "required": ["spec"], "properties": {"metadata": {"type": "object"}, "spec": {"type": "object"}}}
_HEAD_GROUP = {
    "type": "object",
    "required": ["rayStartParams", "template"],
    "additionalProperties": False,
    "properties": {
        "serviceType": {"type": "string"},
        "headService": {"type": "object"},
        "enableIngress": {"type": "boolean"},
        "rayStartParams": _STRING_MAP,  # values must be strings: num-cpus: "0", not 0
        "template": _POD_TEMPLATE,
    },
}
_WORKER_GROUP = {
    "type": "object",
    "required": ["groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"],
    "additionalProperties": False,
    "properties": {
        "groupName": {"type": "string", "minLength": 1},
        "replicas": _INT32,
        "minReplicas": _INT32,
        "maxReplicas": _INT32,
        "numOfHosts": _INT32,
        "rayStartParams": _STRING_MAP,
        "template": _POD_TEMPLATE,
        "scaleStrategy": {"type": "object"},
    },
}
_CLUSTER_SPEC = {
    "type": "object",
    "required": ["headGroupSpec"],
    "additionalProperties": False,
    "properties": {
        "headGroupSpec": _HEAD_GROUP,
        "workerGroupSpecs": {"type": "array", "items": _WORKER_GROUP},
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "resources": {"type": "object"},
                "image": {"type": "string"},
                "imagePullPolicy": {"type": "string"},
                "env": {"type": "array"},
                "envFrom": {"type": "array"},
                "volumeMounts": {"type": "array"},
                "securityContext": {"type": "object"},
                "idleTimeoutSeconds": _INT32,
                "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
            },
        },
        "headServiceAnnotations": _STRING_MAP,
        "suspend": {"type": "boolean"},
    },
}
_DNS_LABEL = {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}
_METADATA = {"type": "object", "required": ["name"], "properties": {"name": _DNS_LABEL}}
RAYCLUSTER_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayCluster"},
        "metadata": _METADATA,
        "spec": _CLUSTER_SPEC,
    },
}
RAYJOB_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayJob"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                "backoffLimit": _INT32,
                "rayClusterSpec": _CLUSTER_SPEC,
                "submitterPodTemplate": _POD_TEMPLATE,
                "metadata": _STRING_MAP,
                "clusterSelector": _STRING_MAP,
                "submitterConfig": {"type": "object"},
                "managedBy": {"type": "string"},
                "deletionStrategy": {"type": "object"},
                "entrypoint": {"type": "string"},
                "runtimeEnvYAML": {"type": "string"},
                "jobId": {"type": "string"},
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                "entrypointResources": {"type": "string"},
                "entrypointNumCpus": {"type": "number"},
                "entrypointNumGpus": {"type": "number"},
                "ttlSecondsAfterFinished": _INT32,
                "shutdownAfterJobFinishes": {"type": "boolean"},
                "suspend": {"type": "boolean"},
            },
        },
    },
}


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _one(path: Path, kind: str) -> dict[str, Any]:
    (document,) = [doc for doc in _documents(path) if doc.get("kind") == kind]
    return document


def _cluster_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]


def _pod_specs(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    spec = _cluster_spec(manifest)
    return [spec["headGroupSpec"]["template"]["spec"]] + [group["template"]["spec"] for group in spec.get("workerGroupSpecs", [])]


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def _dockerfile_image_tag() -> str:
    (tag,) = re.findall(r"docker build -f infra/Dockerfile -t (\S+) \.", DOCKERFILE.read_text())
    return tag


def _dockerfile_arg(name: str) -> str:
    (value,) = [args.split("=", 1)[1] for instruction, args in _dockerfile() if instruction == "ARG" and args.startswith(f"{name}=")]
    return value


# ---------------------------------------------------------------- every file


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_yaml_parses(path: Path) -> None:
    assert _documents(path), f"{path} holds no YAML document"


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_job_specs_validate(path: Path) -> None:
    config, storage_options = load_spec(path)
    assert config.inputs and config.output
    assert all("secret" not in key.lower() for key in storage_options)


def test_every_infra_file_is_documented() -> None:
    text = OPERATIONS.read_text()
    for path in sorted(p for p in INFRA.rglob("*") if p.is_file()):
        assert str(path.relative_to(REPO)) in text, f"docs/OPERATIONS.md does not explain {path.relative_to(REPO)}"


def test_no_credentials_in_infra_or_specs() -> None:
    patterns = [
        r"AKIA[0-9A-Z]{16}",  # AWS access key ids
        r"(?i)aws_secret_access_key|aws_session_token",
        r"(?i)\b(password|secret|token)\b\s*[:=]\s*['\"]?[A-Za-z0-9/+]{8,}",
        r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    ]
    for path in sorted(p for p in INFRA.rglob("*") if p.is_file()) + SPECS:
        text = path.read_text()
        for pattern in patterns:
            assert not re.search(pattern, text), f"{path.relative_to(REPO)} looks like it holds a credential ({pattern})"


# ---------------------------------------------------------------- the image


def test_dockerfile_builds_the_image_every_manifest_runs() -> None:
    tag = _dockerfile_image_tag()
    assert tag.endswith(f"/lgca-label:{pipeline.__version__}"), "the image tag follows the package version"
    images = []
    for path in (RAYJOB, RAYCLUSTER):
        for manifest in _documents(path):
            if manifest["kind"] in ("RayJob", "RayCluster"):
                images += [c["image"] for pod in _pod_specs(manifest) for c in pod["containers"]]
    images.append(yaml.safe_load(LAUNCHER.read_text())["docker"]["image"])
    assert images and set(images) == {tag}
    assert tag in OPERATIONS.read_text()


def test_dockerfile_parses_with_dockers_parser() -> None:
    dockerfile = pytest.importorskip("dockerfile", reason="pip install dockerfile (Docker's own parser, via Go)")
    parsed = dockerfile.parse_file(str(DOCKERFILE))
    assert [command.cmd.upper() for command in parsed] == [instruction for instruction, _ in _dockerfile()]


def test_dockerfile_contents() -> None:
    instructions = _dockerfile()
    assert _dockerfile_arg("RAY_VERSION") == __import__("ray").__version__, "cluster and client must run the same Ray"
    assert _dockerfile_arg("BASE_IMAGE").startswith("rayproject/ray:${RAY_VERSION}-py311-")
    users = [args for instruction, args in instructions if instruction == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    (workdir,) = [args for instruction, args in instructions if instruction == "WORKDIR"]
    copies = [shlex.split(args) for instruction, args in instructions if instruction == "COPY"]
    destinations = {}
    for words in copies:
        sources, destination = [w for w in words if not w.startswith("--")][:-1], words[-1]
        for source in sources:
            matches = list(REPO.glob(source))
            assert matches or "*" in source, f"COPY source {source} does not exist in the repository"
            destinations[source] = destination
    assert destinations.get("jobs") == "./jobs" and destinations.get("pipeline") == "./pipeline"
    assert Path(workdir, ENTRYPOINT_SCRIPT).as_posix() == f"{workdir}/{ENTRYPOINT_SCRIPT}"
    ignore = DOCKERIGNORE.read_text().splitlines()
    for kept in ("!pipeline/**", "!jobs/**", "!pyproject.toml"):
        assert kept in ignore, f"{DOCKERIGNORE.name} must keep {kept[1:]} in the build context"
    for manifest in (_one(RAYJOB, "RayJob"), _one(RAYCLUSTER, "RayCluster")):
        assert _cluster_spec(manifest)["rayVersion"] == _dockerfile_arg("RAY_VERSION")
        for pod in _pod_specs(manifest):
            assert {c["workingDir"] for c in pod["containers"]} == {workdir}, "the entrypoint's relative path needs the image's WORKDIR"


def _pins() -> dict[str, str]:
    """constraints.txt as {normalised name: version}."""
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[re.sub(r"[-_.]+", "-", name.lower())] = version
    return pins


def test_dockerfile_installs_the_pinned_versions() -> None:
    """A clean resolve fails on boto3 (s3fs pins botocore) or drifts to another torch and CUDA: every install is pinned."""
    instructions = _dockerfile()
    runs = [args for instruction, args in instructions if instruction == "RUN"]
    installs = [command for run in runs for command in run.split("&&") if "pip install" in command]
    assert installs, "the Dockerfile installs the package with pip"
    pins = _pins()
    for command in installs:
        words = shlex.split(command)
        assert "--constraint" in words or "-c" in words, f"unconstrained pip install: {command}"
        constraint = words[words.index("--constraint" if "--constraint" in words else "-c") + 1]
        assert constraint == "constraints.txt", f"pip installs with {constraint}, not the repository's constraints.txt"
        for requirement in words[words.index("install") + 1 :]:
            if requirement.startswith("-") or requirement == constraint or requirement == ".":
                continue
            assert re.sub(r"[-_.]+", "-", requirement.lower()) in pins, f"{requirement} is installed but not pinned in constraints.txt"
    copied = [shlex.split(args) for instruction, args in instructions if instruction == "COPY"]
    assert any("constraints.txt" in words for words in copied), "the image must hold constraints.txt to install with it"
    assert "!constraints.txt" in DOCKERIGNORE.read_text().splitlines(), "the build context must keep constraints.txt"
    assert pins["ray"] == _dockerfile_arg("RAY_VERSION"), "constraints.txt and the base image must agree on Ray"
    for name in ("boto3", "botocore", "s3fs", "aiobotocore", "torch", "open-clip-torch"):
        assert name in pins, f"constraints.txt must pin {name}"


# ---------------------------------------------------------------- KubeRay


@pytest.mark.parametrize(("path", "kind", "schema"), [(RAYJOB, "RayJob", RAYJOB_SCHEMA), (RAYCLUSTER, "RayCluster", RAYCLUSTER_SCHEMA)])
def test_kuberay_manifest_matches_crd_fields(path: Path, kind: str, schema: dict[str, Any]) -> None:
    manifest = _one(path, kind)
    jsonschema.validate(manifest, schema)
    broken = copy.deepcopy(manifest)
    _cluster_spec(broken)["workerGroupSpecs"][0]["minReplica"] = 1
    with pytest.raises(jsonschema.ValidationError, match="minReplica"):
        jsonschema.validate(broken, schema)
    for group in _cluster_spec(manifest)["workerGroupSpecs"]:
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]


@pytest.mark.parametrize("path", [RAYJOB, RAYCLUSTER, SERVICE_ACCOUNT], ids=lambda p: p.name)
def test_kubernetes_core_objects_validate(path: Path) -> None:
    """Core objects, and every pod template of the Ray manifests as a Pod, against Kubernetes' own schemas."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    version = kubernetes_validate.latest_version()
    for document in _documents(path):
        if document["kind"] in ("RayJob", "RayCluster"):
            for index, pod_spec in enumerate(_pod_specs(document)):
                pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"template-{index}"}, "spec": pod_spec}
                kubernetes_validate.validate(pod, version, strict=True)
        else:
            kubernetes_validate.validate(document, version, strict=True)


def test_rayjob_runs_the_submitted_command_on_its_spec() -> None:
    documents = _documents(RAYJOB)
    rayjob = _one(RAYJOB, "RayJob")
    spec = rayjob["spec"]
    words = shlex.split(spec["entrypoint"])
    spec_path = words[words.index("--spec") + 1]
    assert spec["entrypoint"] == entrypoint(["--spec", spec_path]), "the RayJob must run what `lgca submit` sends"
    assert (REPO / words[1]).is_file() and words[1] == ENTRYPOINT_SCRIPT
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0

    # the spec file is a ConfigMap key mounted into the head, where the entrypoint runs
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (mount,) = [m for c in head["containers"] for m in c.get("volumeMounts", []) if spec_path.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in head["volumes"] if v["name"] == mount["name"]]
    (config_map,) = [d for d in documents if d["kind"] == "ConfigMap" and d["metadata"]["name"] == volume["configMap"]["name"]]
    key = spec_path[len(mount["mountPath"]) + 1 :]
    job_spec = yaml.safe_load(config_map["data"][key])
    assert job_spec == yaml.safe_load((REPO / "jobs" / "specs" / "gpu-fleet.yaml").read_text()), (
        "the RayJob's ConfigMap holds jobs/specs/gpu-fleet.yaml; update both together"
    )
    config, _ = load_spec(REPO / "jobs" / "specs" / "gpu-fleet.yaml")

    # enough GPUs for the spec's scoring actors, requested and limited alike
    gpus = 0
    for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            resources = container["resources"]
            assert resources["requests"].get(GPU) == resources["limits"].get(GPU)
            gpus += group["maxReplicas"] * int(resources["limits"].get(GPU, 0))
    assert gpus >= config.execution.concurrency * config.execution.num_gpus
    assert spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_raycluster_autoscales_gpu_workers() -> None:
    spec = _one(RAYCLUSTER, "RayCluster")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    gpu_groups = [g for g in spec["workerGroupSpecs"] if any(GPU in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])]
    assert gpu_groups and all(g["minReplicas"] < g["maxReplicas"] for g in gpu_groups)


def test_pods_use_the_irsa_service_account() -> None:
    account = yaml.safe_load(SERVICE_ACCOUNT.read_text())
    assert account["kind"] == "ServiceAccount"
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    for manifest in (_one(RAYJOB, "RayJob"), _one(RAYCLUSTER, "RayCluster")):
        for pod in _pod_specs(manifest):
            assert pod["serviceAccountName"] == account["metadata"]["name"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            for container in pod["containers"]:
                assert not any(e.get("value") and re.search("(?i)secret|key|token", e["name"]) for e in container.get("env", []))


# ---------------------------------------------------------------- AWS cluster launcher


def test_launcher_config_validates_against_rays_schema() -> None:
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(LAUNCHER.read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(copy.deepcopy(config)))


def test_launcher_config_contents() -> None:
    config = yaml.safe_load(LAUNCHER.read_text())
    nodes = config["available_node_types"]
    workers = [node for name, node in nodes.items() if name != config["head_node_type"]]
    assert any(node["node_config"]["InstanceType"].startswith(("g5.", "g6.", "p4d.", "p5.")) for node in workers)
    assert all(0 <= node["min_workers"] <= node["max_workers"] <= config["max_workers"] for node in workers)
    for node in nodes.values():
        assert "Name" in node["node_config"]["IamInstanceProfile"] or "Arn" in node["node_config"]["IamInstanceProfile"]
    assert nodes[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert any("import ray, torch, pipeline.run.job" in command for command in config["setup_commands"])


def test_launcher_pins_an_ami_whose_driver_runs_cuda_13() -> None:
    """Without an ImageId Ray boots an Ubuntu 18.04 Deep Learning AMI, whose driver cannot run the image's CUDA 13 torch."""
    config = yaml.safe_load(LAUNCHER.read_text())
    for name, node in config["available_node_types"].items():
        image = node["node_config"].get("ImageId", "")
        assert image.lower() not in ("", "latest_dlami"), f"{name} sets no ImageId: Ray would pick its default AMI"
        assert image == "AMI_ID" or re.fullmatch(r"ami-[0-9a-f]{8,17}", image), f"{name}: ImageId {image!r} is no AMI id"
    text = LAUNCHER.read_text()
    assert "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id" in text, "say how to look it up"
    assert "driver >= 580" in text and "driver >= 580" in DOCKERFILE.read_text(), "name the driver CUDA 13.0 needs"
    assert _pins()["torch"].startswith("2.14."), "torch moved: check which CUDA its wheels need, and the driver above"
    assert "AMI_ID" in OPERATIONS.read_text()


def test_operations_say_which_commands_ship_code() -> None:
    text = " ".join(OPERATIONS.read_text().split())
    assert "`lgca run --address HEAD:6379` runs the driver here" in text and "**It ships no code**" in text
    assert "ships this repository's code as the job's `working_dir`" in text
