"""The Replicate predictions dialect for the four klein models Replicate hosts.

Compatibility notes: docs/api/replicate.md. ``POST /v1/models/black-forest-labs/<name>/predictions``
with ``{"input": {...}}`` queues a job and answers the prediction object (201); with ``Prefer: wait``
(or ``wait=N``, 1-60 s) it first waits up to that long for the job to finish. ``GET
/v1/predictions/<id>`` and ``POST /v1/predictions/<id>/cancel`` read and cancel it. The official
``replicate`` package works against it with ``Client(base_url=<server>)``. Choices (README):

- Models: ``flux-2-klein-4b``, ``flux-2-klein-9b``, ``flux-2-klein-4b-base``, ``flux-2-klein-9b-base``
  under the owner ``black-forest-labs`` (Replicate's names); any other is a 404.
- Statuses: queued is ``starting``, running ``processing``, then ``succeeded``, ``failed`` or
  ``canceled``. ``output`` is a list of signed, expiring image URLs; ``logs`` says which step ran;
  ``metrics`` has ``predict_time`` and ``image_count``; ``version`` is ``kleinserve``.
- ``aspect_ratio`` (default ``1:1``) x ``output_megapixels`` (0.25, 0.5, 1, 2, 4; default 1) map
  through kleinserve's size table; ``match_input_image`` keeps the first image's size (at most
  1 MP, multiples of 16: the engine's reference rule), so ``output_megapixels`` has no effect then;
  without images it is ``1:1``.
- ``images``: up to 5 at Replicate; kleinserve's ``KLEINSERVE_MAX_REFERENCES`` (default 4) applies.
- ``output_format`` ``webp``/``jpg``/``png`` (default ``jpg``), ``output_quality`` 0-100 (0 is sent
  as 1; png ignores it).
- ``guidance`` (1-10, default 4) only on the Base models, as Replicate's schemas have it; sent to a
  distilled model it is a 422 naming it. ``go_fast`` is accepted and changes nothing (kleinserve has
  one code path, already its fastest exact one). ``disable_safety_checker: true`` skips the output
  safety checker where the operator runs one and lets clients skip it (``--safety-allow-disable``);
  a job the checker refused fails with the checker's reason.
- Unknown ``input`` fields are refused naming them; errors are Replicate's problem details
  ``{"title", "detail", "status"}`` (plus ``invalid_fields`` for input errors). The status follows
  kleinserve's one error table: bad input is 400 where Replicate answers 422 (its client raises
  ``ReplicateError`` for either).
- ``Prefer: wait`` that runs out answers the prediction as ``starting``, as Replicate does (its
  client then polls ``urls.get``). A malformed wait (``wait=abc``) is ignored, as RFC 7240 requires
  of preferences a server cannot comply with, and a wait over 60 s waits 60 s (:func:`wait_seconds`);
  ``Preference-Applied: wait=N`` says when a wait was applied.
- ``webhook``: delivered by kleinserve's webhook machinery when the prediction ends (kleinserve's
  signed job payload, Standard Webhooks, not Replicate's prediction body); ``webhook_events_filter``
  must include ``completed`` (the only event sent), else a 400.
"""

from __future__ import annotations

import asyncio
import math
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from kleinserve.api.auth import CallerDep
from kleinserve.api.dialects.base import (
    Example,
    FieldNames,
    client_image_error,
    example_request,
    output_size,
    parse_body,
    to_request,
    unsaid,
    unsaid_note,
)
from kleinserve.api.jobs_http import ReadyRuntime, outputs_of, result_url, runtime_of
from kleinserve.api.webhooks_http import checked_webhook, webhook_from_header
from kleinserve.engine.variants import Variant
from kleinserve.errors import InvalidParameterError, InvalidRequestError, KleinserveError, NotFoundError
from kleinserve.jobs.job import Job, JobStatus
from kleinserve.request import ASPECT_RATIOS, MAX_SEED, MEGAPIXELS, GenerationRequest, size_for_aspect_ratio
from kleinserve.runtime import Runtime

NAME = "replicate"
PREFIX = "/v1"
OWNER = "black-forest-labs"
# Replicate's model name -> kleinserve's variant.
MODELS: dict[str, str] = {
    "flux-2-klein-4b": "flux-2-klein-4b",
    "flux-2-klein-9b": "flux-2-klein-9b",
    "flux-2-klein-4b-base": "flux-2-klein-base-4b",
    "flux-2-klein-9b-base": "flux-2-klein-base-9b",
}
MATCH_INPUT = "match_input_image"
MAX_WAIT = 60  # seconds: Replicate's bound on Prefer: wait=N
_DELTA_SECONDS = re.compile(r"^\d+$")  # RFC 7240's delta-seconds (RFC 9111 § 1.2.2)
NAMES = FieldNames({"quality": "output_quality", "size": "aspect_ratio", "width": "aspect_ratio"}, prefix="input.")
_STATUS = {
    JobStatus.QUEUED: "starting",
    JobStatus.PROCESSING: "processing",
    JobStatus.SUCCEEDED: "succeeded",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELLED: "canceled",
}
_TITLES = {
    401: "Unauthenticated",
    402: "Payment required",
    404: "Not found",
    409: "Conflict",
    413: "Request too large",
    429: "Too many requests",
    503: "Service unavailable",
}


class KleinInput(BaseModel):
    """``input`` of a klein prediction (the union of the distilled and Base schemas)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., description="Text prompt for image generation.")
    images: list[str] = Field(default_factory=list, description="Input images (URLs or data URIs).")
    aspect_ratio: Literal[(*ASPECT_RATIOS, MATCH_INPUT)] = Field(  # type: ignore[valid-type]
        "1:1", description="Aspect ratio, or match_input_image."
    )
    output_megapixels: float = Field(1.0, description="Output size in megapixels: 0.25, 0.5, 1, 2 or 4.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Random seed; default random.")
    go_fast: bool = Field(False, description="Accepted; changes nothing here.")
    output_format: Literal["webp", "jpg", "png"] = Field("jpg", description="Format of the output images.")
    output_quality: int = Field(95, ge=0, le=100, description="JPEG/WebP quality 0-100.")
    disable_safety_checker: bool = Field(False, description="Skip the safety checker, where the operator allows.")
    guidance: float | None = Field(None, ge=1, le=10, allow_inf_nan=False, description="Base models only.")

    @field_validator("output_megapixels", mode="before")
    @classmethod
    def _megapixels(cls, value: Any) -> Any:
        number = float(value) if isinstance(value, str) and value.strip() else value
        if isinstance(number, int | float) and not any(math.isclose(number, m) for m in MEGAPIXELS):
            raise ValueError(f"must be one of {', '.join(f'{m:g}' for m in MEGAPIXELS)}; got {value!r}")
        return number


class PredictionRequest(BaseModel):
    """Body of ``POST /v1/models/<owner>/<name>/predictions``."""

    model_config = ConfigDict(extra="forbid")

    input: dict[str, Any] = Field(..., description="The model's inputs.")
    webhook: str | None = Field(None, description="POSTed (signed, kleinserve's job payload) when it ends.")
    webhook_events_filter: list[str] | None = Field(None, description="Must include completed.")
    stream: bool | None = Field(None, description="Accepted; the model does not stream.")


def to_generation_request(name: str, inputs: KleinInput, runtime: Runtime) -> GenerationRequest:
    """The canonical request for one prediction of model ``name``."""
    variant_id = runtime.service.check_model(MODELS[name])
    if inputs.guidance is not None and name in ("flux-2-klein-4b", "flux-2-klein-9b"):
        raise InvalidParameterError("input.guidance", f"{OWNER}/{name} is guidance-distilled and takes no guidance")
    if inputs.aspect_ratio == MATCH_INPUT and inputs.images:
        width, height = None, None
    else:
        ratio = "1:1" if inputs.aspect_ratio == MATCH_INPUT else inputs.aspect_ratio
        width, height = size_for_aspect_ratio(ratio, inputs.output_megapixels)
    return to_request(
        {
            "model": variant_id,
            "prompt": inputs.prompt,
            "images": inputs.images,
            "width": width,
            "height": height,
            "guidance": inputs.guidance,
            "seed": inputs.seed,
            "output_format": inputs.output_format,
            "quality": max(1, inputs.output_quality),
            "safety_check": not inputs.disable_safety_checker,
        },
        runtime.settings,
        NAMES,
    )


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def prediction(runtime: Runtime, job: Job) -> dict[str, Any]:
    """A job as Replicate's prediction object (blocking: signing URLs may call the storage)."""
    status = _STATUS[job.status]
    base = f"{runtime.settings.link_base_url()}{PREFIX}/predictions/{job.id}"
    outputs = outputs_of(job)
    metrics: dict[str, Any] = {}
    if job.started_at is not None and job.completed_at is not None:
        metrics["predict_time"] = round(job.completed_at - job.started_at, 3)
    if job.completed_at is not None:
        metrics["total_time"] = round(job.completed_at - job.created_at, 3)
    if outputs:
        metrics["image_count"] = len(outputs)
    logs = ""
    if job.progress_total:
        logs = f"denoising step {job.progress_step}/{job.progress_total}\n"
    return {
        "id": job.id,
        "model": str(job.extra.get("model", "")),
        "version": "kleinserve",
        "input": job.extra.get("input", {}),
        "logs": logs,
        "output": [result_url(runtime, o) for o in outputs] if status == "succeeded" else None,
        "data_removed": False,
        "error": job.error_message if status == "failed" else None,
        "status": status,
        "source": "api",
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "completed_at": _iso(job.completed_at),
        "urls": {"get": base, "cancel": f"{base}/cancel"},
        "metrics": metrics,
    }


def wait_seconds(prefer: str | None) -> int:
    """Seconds ``Prefer: wait`` asks for, at most :data:`MAX_WAIT` (``wait`` alone is Replicate's
    60); 0 without a usable one.

    RFC 7240 § 2: a server that does not recognize, or cannot comply with, a preference MUST ignore it
    and continue processing instead of signaling an error; so a malformed wait (``wait=abc``,
    ``wait=-1``, ``wait=1.5``) is ignored as if absent (the prediction is answered at once), never a
    400, and only the first ``wait`` counts (§ 2: later occurrences are ignored). ``wait`` is an upper
    bound (§ 4.3): ``wait=0`` answers at once, and a wait over 60 s is honoured by waiting at most 60
    s, Replicate's limit. The answer says which wait applied in ``Preference-Applied`` (§ 3), so a
    client can tell an ignored preference from a wait that ran out."""
    for preference in (prefer or "").split(","):
        token, equals, value = preference.split(";")[0].partition("=")  # parameters after ";" are unused
        if token.strip().lower() != "wait":
            continue
        if not equals:
            return MAX_WAIT  # "wait" alone: Replicate's 60 s
        value = value.strip().strip('"')
        return min(int(value), MAX_WAIT) if _DELTA_SECONDS.match(value) else 0
    return 0


router = APIRouter(prefix=PREFIX, tags=["replicate"])


@router.post(
    "/models/{owner}/{name}/predictions",
    status_code=201,
    summary="Create a prediction of a klein model (Prefer: wait to wait for it).",
)
async def create_prediction(
    request: Request,
    owner: str,
    name: str,
    body: PredictionRequest,
    runtime: ReadyRuntime,
    caller: CallerDep,
    prefer: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    if owner != OWNER or name not in MODELS:
        raise NotFoundError(f"model {owner}/{name} not found; this server runs {', '.join(_model_names())}")
    if body.webhook_events_filter is not None and "completed" not in body.webhook_events_filter:
        raise InvalidParameterError(
            "webhook_events_filter", "only the completed event is sent; include completed (or leave it out)"
        )
    wait = wait_seconds(prefer)
    inputs = parse_body(KleinInput, body.input, prefix="input.")
    gen = to_generation_request(name, inputs, runtime)
    extra = {"model": f"{OWNER}/{name}", "input": body.input}
    webhook_url = await checked_webhook(runtime, body.webhook, "webhook") or await webhook_from_header(request, runtime)
    try:  # submitting checks the references: name them as the client did
        (job,) = await asyncio.to_thread(
            runtime.service.submit, [gen], key=caller.key, dialect=NAME, extra=extra, webhook_url=webhook_url
        )
    except InvalidRequestError as err:
        raise client_image_error(err, "input.images") from None
    if wait:
        try:
            job = await runtime.service.wait(job.id, timeout=wait)
        except TimeoutError:
            job = await asyncio.to_thread(runtime.service.get, job.id)
    body_out = await asyncio.to_thread(prediction, runtime, job)
    if wait and not job.terminal:
        body_out["status"] = "starting"  # Replicate's answer to a wait that ran out
    headers = {"Location": body_out["urls"]["get"]}
    if wait:
        headers["Preference-Applied"] = f"wait={wait}"  # RFC 7240 § 3
    return JSONResponse(body_out, status_code=201, headers=headers)


@router.get("/predictions/{prediction_id}", summary="A prediction's state and output.")
async def get_prediction(request: Request, prediction_id: str, caller: CallerDep) -> dict[str, Any]:
    runtime = runtime_of(request)

    def found() -> dict[str, Any]:
        return prediction(runtime, runtime.service.get(prediction_id, **caller.scope))

    return await asyncio.to_thread(found)


@router.post("/predictions/{prediction_id}/cancel", summary="Cancel a starting or processing prediction.")
async def cancel_prediction(request: Request, prediction_id: str, caller: CallerDep) -> dict[str, Any]:
    runtime = runtime_of(request)

    def cancelled() -> dict[str, Any]:
        return prediction(runtime, runtime.service.cancel(prediction_id, **caller.scope))

    return await asyncio.to_thread(cancelled)


def _model_names() -> list[str]:
    return [f"{OWNER}/{name}" for name in MODELS]


class ReplicateDialect:
    """Replicate's predictions API for the klein models, under /v1."""

    name = NAME
    prefixes: tuple[str, ...] = (f"{PREFIX}/models/{OWNER}", f"{PREFIX}/predictions")

    def router(self) -> APIRouter:
        return router

    def error_body(self, error: KleinserveError, status: int) -> dict[str, Any]:
        body: dict[str, Any] = {"title": _TITLES.get(status, "Error"), "detail": error.message, "status": status}
        if isinstance(error, InvalidParameterError):
            body["title"] = "Input validation failed" if error.field.startswith("input.") else "Invalid request"
            body["invalid_fields"] = [{"type": "invalid", "field": error.field, "description": error.detail}]
        return body

    def model_id(self, variant: Variant) -> str:
        return replicate_name(variant)

    def example(self, variant: Variant, request: GenerationRequest | None = None) -> Example:
        req = example_request(variant, request)
        inputs: dict[str, Any] = {"prompt": req.prompt}
        carried = {"model", "prompt", "images", "seed", "output_format", "quality", "safety_check"}
        if req.images:
            inputs["images"] = list(req.images)
        size = output_size(req)
        if size is None:
            inputs["aspect_ratio"] = MATCH_INPUT
            carried |= {"width", "height"}
        else:
            found = [(r, mp) for r in ASPECT_RATIOS for mp in MEGAPIXELS if size_for_aspect_ratio(r, mp) == size]
            if found:
                inputs["aspect_ratio"], megapixels = found[0]
                if megapixels != 1.0:
                    inputs["output_megapixels"] = megapixels
                carried |= {"width", "height"}
        if req.seed is not None:
            inputs["seed"] = req.seed
        inputs["output_format"] = "jpg" if req.output_format.value == "jpeg" else req.output_format.value
        if req.output_format.value != "png":
            inputs["output_quality"] = req.quality
        if not req.safety_check:
            inputs["disable_safety_checker"] = True
        if req.guidance is not None and not variant.distilled:
            inputs["guidance"] = req.guidance
            carried.add("guidance")
        dropped = unsaid(req, carried)
        notes = ["The replicate package: Client(api_token=<key>, base_url=<server>).run(...)."]
        if "width" in dropped:
            notes.append("Replicate sizes are aspect_ratio x output_megapixels: this size is not one of them.")
        name = replicate_name(variant)
        return Example(
            dialect=NAME,
            title="Replicate: create a prediction and wait",
            method="POST",
            path=f"{PREFIX}/models/{name}/predictions",
            body={"input": inputs},
            headers={"Prefer": "wait"},
            notes=(*notes, *unsaid_note("Replicate", dropped)),
            unsaid=dropped,
            served=name.removeprefix(f"{OWNER}/") in MODELS,
        )


def model_fields(runtime: Runtime, variant: Variant) -> dict[str, Any]:
    """Replicate's model object for ``variant``. ``GET /v1/models/{owner}/{name}`` is also OpenAI's model
    route (same path, same ids): that route adds these fields, so both clients parse its answer."""
    owner, _, name = replicate_name(variant).partition("/")
    return {
        "url": f"{runtime.settings.link_base_url()}{PREFIX}/models/{owner}/{name}",
        "owner": owner,
        "name": name,
        "description": variant.display_name,
        "visibility": "public",
        "github_url": None,
        "paper_url": None,
        "license_url": None,
        "run_count": 0,
        "cover_image_url": None,
        "default_example": None,
        "latest_version": None,
    }


def replicate_name(variant: Variant) -> str:
    """``owner/name`` of ``variant`` at Replicate (the Base models are ``...-4b-base`` there)."""
    for name, variant_id in MODELS.items():
        if variant_id == variant.id:
            return f"{OWNER}/{name}"
    return f"{OWNER}/{variant.id}"
