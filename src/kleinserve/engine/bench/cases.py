"""The bench's cases, and how each one runs on kleinserve and on diffusers over the same modules.

A case is a workload (prompts, references, images per request, requests at once, CFG). Each run of a
case gets its own prompts from a run counter, so "unique" prompts really are new to both sides, while
"repeat" sends the same prompt every time (where kleinserve's prompt cache helps and diffusers' text
encoder runs again). Outputs are PIL images encoded to PNG on both sides by the same encoder, as the
server does; diffusers' side gets exactly the generators kleinserve documents (image i: seed + i).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from kleinserve.engine.engine import Engine
from kleinserve.engine.images import encode_image
from kleinserve.engine.stepcache import StepCache
from kleinserve.generation import run_request
from kleinserve.jobs.job import Job
from kleinserve.request import GenerationRequest, OutputFormat
from kleinserve.settings import Settings


@dataclass(frozen=True)
class Case:
    """One workload of the bench."""

    name: str
    description: str
    references: int = 0
    num_images: int = 1
    requests: int = 1  # > 1: that many compatible requests at once (a throughput case)
    cfg: bool = False  # the Base twin of the model, with true classifier-free guidance
    kv: bool = False  # the 9B-KV path (reference K/V cached) against Flux2KleinKVPipeline
    unique_prompts: bool = True
    # Step-cache settings (engine/stepcache.py syntax, e.g. "taylorseer:5") timed as further
    # kleinserve sides against the uncached run; their pixels are compared by PSNR.
    step_caches: tuple[str, ...] = ()

    @property
    def images(self) -> int:
        return self.num_images * self.requests


# TaylorSeer at three intervals (5 is the default): every one changes pixels by a different amount.
# First Block Cache is not among them: diffusers 0.42's fails on Flux2 (engine/stepcache.py).
STEP_CACHE_SETTINGS = ("taylorseer:2", "taylorseer:3", "taylorseer:5")

CASES: dict[str, Case] = {
    case.name: case
    for case in (
        Case("unique", "text-to-image, a new prompt every run"),
        Case("repeat", "text-to-image, the same prompt every run", unique_prompts=False),
        Case("ref1", "edit with 1 reference image", references=1),
        Case("ref4", "edit with 4 reference images", references=4),
        Case("cfg", "Base with CFG (guidance 4), new prompts", cfg=True),
        Case(
            "stepcache",
            "Base with CFG, each step-cache setting against the uncached run (speed, PSNR)",
            cfg=True,
            step_caches=STEP_CACHE_SETTINGS,
        ),
        Case("n4", "4 images in one request (n=4)", num_images=4),
        Case("queue4", "4 compatible requests at once (throughput)", requests=4),
        Case("kv1", "9B-KV path, 1 reference, vs Flux2KleinKVPipeline", references=1, kv=True),
        Case("kv4", "9B-KV path, 4 references, vs Flux2KleinKVPipeline", references=4, kv=True),
    )
}
DEFAULT_CASES = tuple(CASES)
BENCH_GUIDANCE = 4.0


def prompts_for(case: Case, run: int, tag: str = "") -> list[str]:
    """The prompts of one run: new ones per case, run and request, or one fixed prompt.

    The case name is part of a unique prompt: with the run number alone, a later case met the
    prompts an earlier case had already put in the prompt cache, and timed cache hits as "unique".
    ``tag`` gives a side its own unique prompts where it shares the prompt cache with another side
    of the same run (the HTTP side, the step-cache sides).
    """
    if not case.unique_prompts:
        return ["a lighthouse on a cliff at dusk, oil painting"] * case.requests
    suffix = f"-{tag}" if tag else ""
    return [f"a red fox number {case.name}-{run}-{i}{suffix} in fresh snow, photo" for i in range(case.requests)]


def reference_images(count: int, size: int) -> list[Image.Image]:
    """Fixed, detailed reference images (a noisy colour gradient), the same on every run."""
    rng = np.random.default_rng(1234)
    images = []
    for index in range(count):
        ramp = np.linspace(0, 255, size, dtype=np.float32)
        planes = [ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1), np.full((size, size), 40.0 * index)]
        base = np.stack(planes)
        pixels = np.clip(base.transpose(1, 2, 0) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(pixels, "RGB"))
    return images


StageAdd = Callable[[str, float], None]  # adds seconds to a stage of the bench's clock


class Runner(Protocol):
    """How one side runs one run of a case: its images, for the same prompts and seeds."""

    def __call__(
        self,
        setup: Setup,
        case: Case,
        run: int,
        seed: int,
        references: Sequence[Image.Image],
        clock_add: StageAdd,
        tag: str = "",
    ) -> list[Image.Image]: ...


@dataclass
class Setup:
    """What every case runs on: engines and diffusers pipelines sharing one set of modules."""

    engine: Engine  # the served (distilled) model
    base_engine: Engine  # its undistilled twin on the same modules, for CFG
    pipeline: Any  # diffusers Flux2KleinPipeline over engine's modules
    base_pipeline: Any
    kv_engine: Engine | None  # the 9B-KV twin over the same modules (built on first use)
    kv_pipeline: Any
    size: int
    steps: int
    base_steps: int
    settings: Settings

    def steps_for(self, case: Case) -> int:
        return self.base_steps if case.cfg else self.steps


def engine_for(setup: Setup, case: Case) -> Engine:
    engine = setup.base_engine if case.cfg else setup.kv_engine if case.kv else setup.engine
    assert engine is not None
    return engine


def request_body(setup: Setup, case: Case, prompt: str, seed: int, references: int) -> dict[str, Any]:
    """The canonical request of one prompt of a run (step caching off unless a side asks for it)."""
    body: dict[str, Any] = {
        "model": engine_for(setup, case).variant.id,
        "prompt": prompt,
        # Names only: the images are passed loaded, as the worker passes them.
        "images": [f"bench-reference-{i}" for i in range(references)],
        "width": setup.size,
        "height": setup.size,
        "steps": setup.steps_for(case),
        "guidance": BENCH_GUIDANCE if case.cfg else 1.0,
        "seed": seed,
        "num_images": case.num_images,
    }
    if case.cfg:
        body["cache"] = {"type": "none"}
    return body


def run_kleinserve(
    setup: Setup,
    case: Case,
    run: int,
    seed: int,
    references: Sequence[Image.Image],
    clock_add: StageAdd,
    tag: str = "",
    step_cache: StepCache | None = None,
) -> list[Image.Image]:
    """One run through the path the server takes (``run_request``: engine, then PNG encoding); a case of
    several requests at once goes through a real queue and Worker (:func:`run_queued`)."""
    engine = engine_for(setup, case)
    images: list[Image.Image] = []
    requests = []
    for prompt in prompts_for(case, run, tag):
        body = request_body(setup, case, prompt, seed, len(references))
        if step_cache is not None:
            body["cache"] = {"type": step_cache.type, "threshold": step_cache.threshold}
        request = GenerationRequest.parse(body, setup.settings)
        if case.requests > 1:
            requests.append(request)
            continue
        result = run_request(request, engine, references)
        clock_add("encode_image", result.timings.get("encode", 0.0))
        images.extend(Image.open(io.BytesIO(encoded.data)) for encoded in result.images)
    if requests:
        images = run_queued(engine, requests, references, clock_add)
    return images


def run_queued(
    engine: Engine, requests: Sequence[GenerationRequest], references: Sequence[Image.Image], clock_add: StageAdd
) -> list[Image.Image]:
    """Requests submitted at once to a real job queue and run by a server's Worker (a throughput case):
    a SQLite store, its event bus, local result storage and a Worker batching up to all of them, as
    ``serve`` wires them; the images are read back from the storage. References go as data URIs."""
    import asyncio
    import base64
    import tempfile
    from pathlib import Path

    from kleinserve.engine.images import InputPolicy
    from kleinserve.jobs.events import StoreEventBus
    from kleinserve.jobs.job import JobStatus
    from kleinserve.jobs.service import JobService
    from kleinserve.jobs.store import SQLiteJobStore
    from kleinserve.jobs.worker import Worker
    from kleinserve.storage.local import LocalStorage

    uris = [
        "data:image/png;base64," + base64.b64encode(encode_image(image, OutputFormat.PNG, 95).data).decode()
        for image in references
    ]
    requests = [request.model_copy(update={"images": uris}) for request in requests]
    with tempfile.TemporaryDirectory(prefix="kleinserve-bench-") as tmp:
        store = SQLiteJobStore(Path(tmp) / "jobs.sqlite3")
        bus = StoreEventBus(store, poll_interval=0.05)
        storage = LocalStorage(Path(tmp) / "files", secret=b"b" * 32, base_url="http://127.0.0.1:8000")
        service = JobService(store, bus, [engine.variant.id], max_queue=len(requests) + 1)
        worker = Worker(
            store, bus, storage, {engine.variant.id: engine}, InputPolicy(), "bench", max_batch=len(requests)
        )
        service.on_queued.append(worker.wake)
        worker.start()
        try:
            jobs = service.submit(requests)  # at once: one transaction, one wake-up

            async def finished() -> list[Job]:
                return [await service.wait(job.id, 3600) for job in jobs]

            done = asyncio.run(finished())
        finally:
            worker.stop()
            bus.close()
        images = []
        for job in done:
            if job.status is not JobStatus.SUCCEEDED or job.result is None:
                raise RuntimeError(f"bench job {job.status.value}: {job.error_message}")
            clock_add("encode_image", job.result.timings.get("encode", 0.0))
            for output in job.result.outputs:
                with Image.open(io.BytesIO(storage.read(output.key))) as image:
                    images.append(image.copy())
        store.close()
    return images


def run_diffusers(
    setup: Setup,
    case: Case,
    run: int,
    seed: int,
    references: Sequence[Image.Image],
    clock_add: StageAdd,
    tag: str = "",
) -> list[Image.Image]:
    """The same run as a diffusers user writes it: one pipeline call per request, then PNG encoding."""
    pipeline = setup.base_pipeline if case.cfg else setup.kv_pipeline if case.kv else setup.pipeline
    images: list[Image.Image] = []
    for prompt in prompts_for(case, run, tag):
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(case.num_images)]
        extra = {} if case.kv else {"guidance_scale": BENCH_GUIDANCE if case.cfg else 1.0}
        output = pipeline(
            **extra,
            image=list(references) or None,
            prompt=prompt,
            height=setup.size,
            width=setup.size,
            num_inference_steps=setup.steps_for(case),
            num_images_per_prompt=case.num_images,
            generator=generators,
        ).images
        started = time.perf_counter()
        encoded = [encode_image(image, OutputFormat.PNG, 95) for image in output]
        clock_add("encode_image", time.perf_counter() - started)
        images.extend(Image.open(io.BytesIO(item.data)) for item in encoded)
    return images


def max_pixel_difference(ours: Sequence[Image.Image], theirs: Sequence[Image.Image]) -> int:
    """The largest difference of any uint8 pixel value between two runs' images."""
    worst = 0
    for a, b in zip(ours, theirs, strict=True):
        diff = np.abs(np.asarray(a.convert("RGB"), dtype=np.int16) - np.asarray(b.convert("RGB"), dtype=np.int16))
        worst = max(worst, int(diff.max()))
    return worst


def psnr(ours: Sequence[Image.Image], reference: Sequence[Image.Image]) -> float | None:
    """Peak signal-to-noise ratio (dB, uint8 pixels) of ``ours`` against ``reference``; None if equal."""
    errors = [
        np.mean((np.asarray(a.convert("RGB"), dtype=np.float64) - np.asarray(b.convert("RGB"), dtype=np.float64)) ** 2)
        for a, b in zip(ours, reference, strict=True)
    ]
    mse = float(np.mean(errors))
    return None if mse == 0 else float(10 * np.log10(255.0**2 / mse))
