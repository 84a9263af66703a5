"""How a batching worker groups the jobs it claimed (jobs/worker.py runs the groups).

A claimed job becomes a :class:`Run`: its engine inputs and the key of the batch it may join
(:func:`~kleinserve.engine.batch.batch_key`; ``None``: it runs alone). :func:`batch_groups` keeps the
queue's order: groups go in the order of their oldest job, each at most ``max_batch`` jobs.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

from kleinserve.engine.engine import Engine, EngineInputs
from kleinserve.jobs.job import Job

CUDA_MAX_BATCH = 4  # jobs per batch when the operator did not choose, on a CUDA device


def auto_max_batch(engines: Mapping[str, Engine]) -> int:
    """Jobs per batch when the operator did not choose: 4 on CUDA, where a batch fills the device
    better than one image; 1 on CPU and MPS, where a batch gained no throughput (README "Speed") and
    each of its jobs waits for the whole batch."""
    return CUDA_MAX_BATCH if any(engine.device.type == "cuda" for engine in engines.values()) else 1


@dataclass
class Run:
    """A claimed job ready for the engine: its inputs and the key of the batch it may join."""

    job: Job
    engine: Engine
    inputs: EngineInputs
    key: Hashable | None  # None: runs alone


def batch_groups(runs: Sequence[Run], max_batch: int) -> list[list[Run]]:
    """``runs`` grouped by batch key (at most ``max_batch`` a group), in order of each group's oldest
    job; a run without a key is a group of its own."""
    groups: list[list[Run]] = []
    open_groups: dict[Hashable, list[Run]] = {}
    for run in runs:
        group = open_groups.get(run.key) if run.key is not None else None
        if group is None or len(group) >= max_batch:
            group = []
            groups.append(group)
            if run.key is not None:
                open_groups[run.key] = group
        group.append(run)
    return groups
