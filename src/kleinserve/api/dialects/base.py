"""The dialect toolkit: what every provider API shares, so a new dialect is a thin module.

A dialect is one provider's wire format over kleinserve's one queue. It

1. validates its body with a pydantic model; :func:`parse_body` (and the app's handler for FastAPI's
   own validation) turn the first pydantic error into an :class:`InvalidParameterError` naming the
   client's field (:func:`parameter_error`, the one mapper);
2. translates the body to the canonical :class:`GenerationRequest` with :func:`to_request`, giving a
   :class:`FieldNames` table (canonical field -> the client's name), so an error the canonical model
   raises names the parameter the client sent: the error keeps that parameter as its ``field`` and the
   model's own ``detail``; no message is cut apart;
3. submits and waits with :func:`submit_and_wait` (sync endpoints are jobs too), whose reference-image
   errors from the worker are renamed the same way;
4. renders the job in its own shape, and errors with ``error_body``.

The :class:`Dialect` contract also names the dialect's model ids and gives an example request
(:class:`Example`), from which the Workbench's API tab shows snippets instead of re-encoding each
wire format in JavaScript. Routes live at module level in each dialect module; ``router()`` returns
that module's router.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from fastapi import APIRouter, Request
from pydantic import BaseModel, ValidationError

from kleinserve.api.auth import Caller
from kleinserve.api.jobs_http import wait_for_jobs, with_lora_header
from kleinserve.api.webhooks_http import webhook_from_header
from kleinserve.engine.variants import Variant, find_variant
from kleinserve.errors import (
    InvalidImageError,
    InvalidParameterError,
    InvalidRequestError,
    KleinserveError,
    UnknownModelError,
)
from kleinserve.jobs.job import Job
from kleinserve.loras import LORA_HEADER
from kleinserve.request import DEFAULT_SIZE, GenerationRequest
from kleinserve.runtime import Runtime
from kleinserve.settings import Settings

M = TypeVar("M", bound=BaseModel)
# FastAPI puts where a value came from first in its error locations; a client sent only the field.
_SOURCES = ("body", "query", "path", "header", "cookie", "form")
# The worker reports a bad reference as "images[<index>]: <detail>" (engine/images.py).
_WORKER_IMAGE_ERROR = re.compile(r"^images\[(\d+)\]: (.*)$", re.S)
# pydantic adds the member of a union that failed to an error's location ("mask.str",
# "image_size.literal['square',...]"); a client sent only the field.
_UNION_TAG = re.compile(r"^(str|int|float|bool|bytes|none|[a-z-]+\[.*\])$", re.S)


@dataclass(frozen=True)
class Example:
    """One ready-to-send request of a dialect, for documentation and the Workbench's API tab.

    ``auth_header`` / ``auth_scheme`` say how the dialect carries an API key (e.g. ``Authorization`` /
    ``Bearer ``); ``body`` is JSON; ``notes`` are short remarks a reader needs (what is fixed, ignored).
    ``unsaid`` names the canonical fields of the request it was made for that this wire format cannot
    carry (the server's default applies instead; a note says so); ``response`` is ``json`` or
    ``image`` (raw image bytes, as Verda answers).
    """

    dialect: str
    title: str
    method: str
    path: str
    body: dict[str, Any]
    auth_header: str = "Authorization"
    auth_scheme: str = "Bearer "
    headers: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    unsaid: tuple[str, ...] = ()
    response: str = "json"
    served: bool = True  # False: the provider has no id for this variant (the shape only; here a 404)

    def as_json(self) -> dict[str, Any]:
        return {
            "dialect": self.dialect,
            "title": self.title,
            "method": self.method,
            "path": self.path,
            "body": self.body,
            "auth_header": self.auth_header,
            "auth_scheme": self.auth_scheme,
            "headers": self.headers,
            "notes": list(self.notes),
            "unsaid": list(self.unsaid),
            "response": self.response,
            "served": self.served,
        }


class Dialect(Protocol):
    """One provider API: routes, owned path prefixes, error shape, model ids and an example."""

    name: str
    prefixes: tuple[str, ...]
    # Optional ``upload_paths``: routes that take multipart/form-data; every other body must be
    # JSON (api/guard.py answers 415 otherwise). Optional ``loose_prefixes``: path prefixes that
    # also match inside a segment, for the error shape of unknown routes (api/errors.py).

    def router(self) -> APIRouter:
        """The dialect's routes (its module-level router)."""

    def error_body(self, error: KleinserveError, status: int) -> dict[str, Any]:
        """The JSON body this provider sends for ``error`` with HTTP ``status``."""

    def model_id(self, variant: Variant) -> str:
        """How this provider names ``variant`` (a body's ``model`` field, or a path slug)."""

    def example(self, variant: Variant, request: GenerationRequest | None = None) -> Example:
        """``request`` (for ``variant``) in this wire format; None: a minimal text-to-image request.

        Sent to this server, the example means ``request`` (the same canonical request, but for the
        fields it lists as ``unsaid``): tests/api/test_examples.py holds every dialect to that.
        """


EXAMPLE_PROMPT = "a lighthouse at dusk, oil painting"


def example_request(variant: Variant, request: GenerationRequest | None) -> GenerationRequest:
    """The request an example encodes: ``request``, or the minimal one (a prompt) for ``variant``."""
    return request if request is not None else GenerationRequest(model=variant.id, prompt=EXAMPLE_PROMPT)


def output_size(request: GenerationRequest) -> tuple[int, int] | None:
    """The size ``request`` asks for: its own, 1024 x 1024 without references, None = the first image's."""
    if request.width is not None and request.height is not None:
        return request.width, request.height
    return None if request.images else DEFAULT_SIZE


def unsaid(request: GenerationRequest, carried: set[str] | frozenset[str]) -> tuple[str, ...]:
    """The fields of ``request`` set away from their defaults that a dialect carrying ``carried`` drops.

    ``quality`` of a PNG changes nothing and is never counted.
    """
    try:
        variant: Variant | None = find_variant(request.model)
    except UnknownModelError:
        variant = None
    # The variant's own steps and guidance are what a request without them gets.
    own = {"steps": variant.default_steps, "guidance": variant.default_guidance} if variant else {}
    dropped = []
    for name, info in GenerationRequest.model_fields.items():
        if name in carried or (name == "quality" and request.output_format.value == "png"):
            continue
        value = getattr(request, name)
        if value != info.get_default(call_default_factory=True) and not (name in own and value == own[name]):
            dropped.append(name)
    return tuple(dropped)


def unsaid_note(dialect: str, fields: Sequence[str]) -> tuple[str, ...]:
    """The note an example gives for the fields it cannot carry."""
    if not fields:
        return ()
    return (f"{dialect} cannot carry {', '.join(fields)}: the server's default applies.",)


def lora_header(request: GenerationRequest) -> dict[str, str]:
    """The ``X-Kleinserve-Loras`` header naming ``request``'s adapters, for dialects without a body field."""
    if not request.loras:
        return {}
    return {LORA_HEADER: ", ".join(f"{c.name}={c.scale!r}" for c in request.loras)}


class FieldNames(dict[str, str]):
    """Canonical field -> the name a client of one dialect sent, with an optional common prefix.

    ``FieldNames({"steps": "num_steps"}, prefix="promptObject.")`` names the canonical ``steps`` as
    ``promptObject.num_steps`` and an unmapped ``seed`` as ``promptObject.seed``.
    """

    def __init__(self, names: Mapping[str, str] | None = None, *, prefix: str = "") -> None:
        super().__init__(names or {})
        self.prefix = prefix

    def client_name(self, canonical: str) -> str:
        return self.prefix + self.get(canonical, canonical)

    def rename(self, error: InvalidParameterError) -> InvalidParameterError:
        """The same error, naming the client's parameter (the detail is kept whole)."""
        return InvalidParameterError(self.client_name(error.field), error.detail)


def parameter_error(
    errors: Sequence[Mapping[str, Any]], *, prefix: str = "", from_request: bool = False
) -> InvalidParameterError:
    """The one mapper from pydantic's error list to the error a client sees: its first error.

    Used by :func:`parse_body` and, with ``from_request`` (FastAPI's locations start with where the
    value came from: body, query, ...), by the app's handler for FastAPI's request validation.
    """
    if not errors:
        return InvalidParameterError("body", "invalid request")
    first = errors[0]
    kind = first.get("type")
    loc = list(first.get("loc", ()))
    source = "body"
    if from_request and loc and loc[0] in _SOURCES:
        source, loc = str(loc[0]), loc[1:]
    tags = loc[:-1] if kind == "extra_forbidden" else loc  # an unknown field's own name is kept
    loc = [part for part in tags if not (isinstance(part, str) and _UNION_TAG.match(part))] + loc[len(tags) :]
    where = ".".join(str(part) for part in loc)
    message = str(first.get("msg", "invalid value"))
    for lead in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(lead)
    if kind == "json_invalid":
        where, message = "", "request body is not valid JSON"  # its location is a character offset
    elif kind == "missing":
        message = "is required"
    elif kind == "extra_forbidden":
        message = "is not a known parameter"
    name = (prefix + where) if where else (prefix.rstrip(".") or "body")
    # A field name taken from the body may hold lone surrogates; the error must still encode.
    return InvalidParameterError(name.encode("utf-8", "replace").decode(), message, source=source)


def parse_body(model: type[M], data: Any, *, prefix: str = "") -> M:
    """Validate ``data`` against a dialect's model; the first problem becomes a 400 naming the field."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise parameter_error(err.errors(include_url=False), prefix=prefix) from None


def to_request(fields: Mapping[str, Any], settings: Settings, names: FieldNames) -> GenerationRequest:
    """The canonical request from canonical ``fields``; an invalid one names the client's parameter."""
    try:
        return GenerationRequest.parse(fields, settings)
    except InvalidParameterError as err:
        raise names.rename(err) from None


def client_image_error(
    error: InvalidRequestError, images_field: str | Callable[[int], str], *, single: bool = False
) -> InvalidRequestError:
    """A worker's reference-image error, naming the client's field (``single``: without an index;
    a callable names the field of each index, e.g. BFL's ``input_image_2``)."""
    found = _WORKER_IMAGE_ERROR.match(error.message)
    if found is None:
        return error
    index = int(found.group(1))
    if callable(images_field):
        renamed = InvalidImageError(None, found.group(2), field=images_field(index))
    else:
        renamed = InvalidImageError(None if single else index, found.group(2), field=images_field)
    renamed.code = error.code
    return renamed


async def submit_and_wait(
    request: Request,
    runtime: Runtime,
    caller: Caller,
    requests: list[GenerationRequest],
    *,
    dialect: str,
    extra: dict[str, Any],
    images_field: str = "images",
    single_image: bool = False,
) -> list[Job]:
    """Queue ``requests`` as the caller's jobs and wait for all of them (a sync endpoint).

    A client that disconnects cancels them; a failed job raises its error, with reference-image
    errors naming ``images_field`` as the client sent it.
    """
    requests = with_lora_header(request, requests, runtime.settings)  # adapters named in the header
    webhook_url = await webhook_from_header(request, runtime)
    try:
        # Submitting checks and stores the references (kleinserve.inputs), so its errors are renamed too.
        jobs = await asyncio.to_thread(
            runtime.service.submit, requests, key=caller.key, dialect=dialect, extra=extra, webhook_url=webhook_url
        )
        return await wait_for_jobs(request, runtime, jobs)
    except InvalidRequestError as err:
        if images_field == "images":
            raise
        raise client_image_error(err, images_field, single=single_image) from None
