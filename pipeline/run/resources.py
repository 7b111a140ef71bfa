"""Whether the cluster can ever run the job's tasks and actors: checked once Ray is up, before any work is submitted.

Ray waits, silently and forever, for resources that no node has: an actor asking for a GPU on a CPU-only
cluster, or for more CPUs than any node holds. The shapes considered are the live nodes and, on an
autoscaling cluster, the node types the autoscaler may add (from the cluster config it publishes).
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.config import ConfigError, ExecutionConfig, decodes_on_device
from pipeline.models.spec import ModelSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeShape:
    """Resources of one node, or of each node of an autoscaler node type (`count` of them at most; -1: unbounded)."""

    cpus: float
    gpus: float
    memory: float  # bytes
    count: int = 1
    live: bool = True


def cluster_shapes(ray: Any) -> list[NodeShape]:
    """The live nodes, and the node types an autoscaler may still add (none when the cluster does not autoscale)."""
    shapes = [
        NodeShape(r.get("CPU", 0.0), r.get("GPU", 0.0), r.get("memory", 0.0))
        for r in (node["Resources"] for node in ray.nodes() if node.get("Alive"))
    ]
    try:  # the autoscaler's published config: a private API of Ray, hence the guard
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception as error:
        log.debug("no autoscaler config readable (%s)", error)
        config = None
    for group in getattr(config, "node_group_configs", None) or []:
        if group.max_count:
            resources = dict(group.resources)
            shapes.append(
                NodeShape(resources.get("CPU", 0), resources.get("GPU", 0), resources.get("memory", 0), count=group.max_count, live=False)
            )
    return shapes


def check_resources(
    shapes: Sequence[NodeShape],
    *,
    gpus_per_actor: float | None,
    cpus_per_actor: float,
    actors: int | None,
    device: str,
    decode_device: str,
    decode_memory: float,
) -> None:
    """Fail when no node can hold a scoring actor or a decode task, or `actors` actors can never all run.

    Args:
        gpus_per_actor: --num-gpus; None picks 1 when the cluster has a GPU, else 0.
        cpus_per_actor: --num-cpus-per-actor.
        actors: --concurrency; None for the default (one per GPU, else 1).
        device: the model's --device (cuda needs a GPU somewhere).
        decode_device: --decode (gpu decodes on the scoring actors' GPUs).
        decode_memory: bytes a decode task reserves (it needs 1 CPU too).

    Raises:
        ConfigError: naming the request, what the nodes hold, and the flag to change.
    """
    has_gpu = any(shape.gpus > 0 for shape in shapes)
    described = _describe(shapes)
    if device.startswith("cuda") and not has_gpu:
        raise ConfigError(f"--device {device} needs a GPU, but no node of this cluster has one ({described}); use --device auto or cpu")
    gpus = _gpus_per_actor(shapes, gpus_per_actor)
    decodes_on_device(decode_device, _scoring_device(device, gpus) if gpus > 0 else "cpu")  # `--decode gpu` needs a GPU here
    fits = [shape for shape in shapes if shape.gpus >= gpus and shape.cpus >= cpus_per_actor]
    if not fits:
        asked = f"{gpus:g} GPU and {cpus_per_actor:g} CPU per scoring actor"
        fix = "--num-gpus 0 to score on CPUs, " if gpus > 0 and not has_gpu else ""
        raise ConfigError(
            f"no node of this cluster can hold a scoring actor: it asks for {asked}, and the nodes offer {described}; "
            f"use {fix}a smaller --num-gpus or --num-cpus-per-actor, or add nodes that large"
        )
    if not any(shape.cpus >= 1 and shape.memory >= decode_memory for shape in shapes):
        raise ConfigError(
            f"no node of this cluster can run a decode task (1 CPU and {decode_memory / 2**30:.1f} GiB of memory); "
            f"the nodes offer {described}: add a node with a CPU and memory to spare"
        )
    capacity = sum(_actors_per_node(shape, gpus, cpus_per_actor) * (math.inf if shape.count < 0 else shape.count) for shape in fits)
    if actors is not None and actors > capacity:
        raise ConfigError(
            f"--concurrency {actors} scoring actors of {gpus:g} GPU and {cpus_per_actor:g} CPU each can never all run: "
            f"the cluster holds at most {capacity:g} ({described}); lower --concurrency"
        )


@dataclass(frozen=True)
class Placement:
    """Where scoring runs, decided once after Ray starts: the scoring actors, their resources and device."""

    actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    model: ModelSpec  # on the device the actors score on
    decode_on_device: bool  # JPEGs travel as bytes and the scoring stage decodes them on its GPU

    @property
    def cpu_threads(self) -> int | None:
        """Torch threads per CPU actor: the machine's cores shared among the actors; GPU actors keep torch's default."""
        return max(1, (os.cpu_count() or 1) // self.actors) if self.gpus_per_actor == 0 else None


def place_scoring(
    shapes: Sequence[NodeShape], execution: ExecutionConfig, model: ModelSpec, decode_device: str, decode_memory: float
) -> Placement:
    """Check that the cluster (`cluster_shapes`) can run the job and decide the scoring actors' placement.

    One actor per live GPU by default (or one CPU actor without GPUs), `--num-gpus` 1 where any node has a GPU,
    and the model on `cuda` for GPU actors when `--device auto`.

    Raises:
        ConfigError: as `check_resources`.
    """
    check_resources(
        shapes,
        gpus_per_actor=execution.num_gpus,
        cpus_per_actor=execution.num_cpus_per_actor,
        actors=execution.concurrency,
        device=model.config.device,
        decode_device=decode_device,
        decode_memory=decode_memory,
    )
    gpus = _gpus_per_actor(shapes, execution.num_gpus)
    total_gpus = sum(shape.gpus for shape in shapes if shape.live)
    actors = execution.concurrency or (max(1, int(total_gpus // gpus)) if gpus else 1)
    device = _scoring_device(model.config.device, gpus)
    return Placement(actors, gpus, execution.num_cpus_per_actor, model.on_device(device), decodes_on_device(decode_device, device))


def _gpus_per_actor(shapes: Sequence[NodeShape], asked: float | None) -> float:
    """--num-gpus, or 1 where any node has a GPU, else 0."""
    if asked is not None:
        return asked
    return 1.0 if any(shape.gpus > 0 for shape in shapes) else 0.0


def _scoring_device(device: str, gpus_per_actor: float) -> str:
    """The device the scoring actors load the model on: `--device`, with `auto` resolved by their GPUs."""
    if device != "auto":
        return device
    return "cuda" if gpus_per_actor > 0 else "cpu"


def _actors_per_node(shape: NodeShape, gpus: float, cpus: float) -> float:
    by_gpu = math.floor(shape.gpus / gpus + 1e-9) if gpus > 0 else math.inf
    return min(by_gpu, math.floor(shape.cpus / cpus + 1e-9))


def _describe(shapes: Sequence[NodeShape]) -> str:
    def one(shape: NodeShape) -> str:
        size = f"{shape.cpus:g} CPU, {shape.gpus:g} GPU, {shape.memory / 2**30:.3g} GiB"
        if shape.live:
            return size
        return f"up to {'any number' if shape.count < 0 else shape.count} more of {size} from the autoscaler"

    counted = Counter(map(one, shapes))
    return "; ".join(f"{n} x {text}" if n > 1 else text for text, n in counted.items()) or "no nodes"
