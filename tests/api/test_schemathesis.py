"""Schemathesis against the session server's own OpenAPI document: every route, a bounded fuzz.

Each operation of ``/openapi.json`` gets Hypothesis-generated requests, valid (positive) and invalid
(negative) by the document's own schemas, and every response must pass three checks:

- ``not_a_server_error``: no 5xx, whatever the input;
- ``response_schema_conformance``: a documented status carries a body matching its schema;
- ``content_type_conformance``: a documented status carries a documented media type.

Checks left out, and why:

- ``status_code_conformance``: every route documents FastAPI's 422, but the server answers invalid
  input with 400 (and 404/403/503) in each dialect's own error shape, so it would fail on nearly
  every negative case. A bug: ``test_validation_errors_are_documented`` pins it.
- ``positive_data_acceptance``: the document is looser than the server (1min's promptObject is
  either feature's shape whatever ``type`` says; models, sizes and references are checked past the
  schema), so most schema-valid bodies are still refused with a 400.
- ``negative_data_rejection``: pydantic's lax mode takes ``"2"`` or ``2.0`` for an integer, which
  the document calls invalid, so schema-invalid bodies are sometimes served.
- ``max_response_time``: generation time depends on the machine.

``GET /api/events`` is not fuzzed: a Server-Sent Events stream never ends, so a plain request never
returns. Its only input, ``Last-Event-ID``, is tested by ``test_events_last_event_id``.

Budgets: the tiny model still takes about a second per image on two busy CPU cores, so generation
routes get few examples, each generated body is made cheap before it is sent (at most 2 steps, one
image, 64x64 where the dialect allows a size: the ``cheap_*`` functions), and a valid model id is
swapped in now and then so that generation paths run at all. Hypothesis is derandomized and does not
shrink (shrinking would replay generations), so a failure reproduces on every run and reports the
first failing request. Routes not listed in ``OPERATIONS`` (added after this file) are still fuzzed,
with a default budget.

Schemathesis never draws lone surrogates, damaged images, deeply nested JSON or non-ASCII header
bytes; the bugs those inputs found (all fixed) stay below the fuzzing as explicit cases through
the same checks.

Requests only ever go to the server on 127.0.0.1; URLs inside bodies (which the server would fetch)
are rewritten to a closed port on 127.0.0.1 first.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from kleinserve.request import ASPECT_RATIOS
from tests.api.conftest import ServerProcess
from tests.conftest import png_bytes
from tests.test_fuzz import encoded, exif_with_mistyped_gps_tag, tiff_with_rational_strip_offsets

CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]
TIMEOUT = 60  # seconds per request; the server cancels a sync job whose client went away
CLOSED_URL = "http://127.0.0.1:9/fuzz.png"  # discard port: nothing listens, refused at once
CHEAP_SIDE = 64
MAX_STEPS = 2

# --------------------------------------------------------------------------------------------------
# Making generated bodies cheap (in place): the cost of a generation is steps x images x pixels.


def _number(value: Any) -> float | None:
    """The number a lax validator would read from ``value`` (JSON number or numeric text), if any."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _cap(body: dict[str, Any], key: str, limit: int, *, default: bool = False) -> None:
    """Lower ``body[key]`` to ``limit`` when it is a larger number; set it when missing and ``default``."""
    if key not in body:
        if default:
            body[key] = limit
        return
    number = _number(body[key])
    if number is not None and number > limit:
        body[key] = limit


def _valid_side(value: Any) -> bool:
    number = _number(value)
    return number is not None and 64 <= number <= 4096 and number == int(number) and int(number) % 16 == 0


_PRESETS = ("square_hd", "square", "portrait_4_3", "portrait_16_9", "landscape_4_3", "landscape_16_9")


def cheap_oxen(body: dict[str, Any]) -> None:
    _cap(body, "num_inference_steps", MAX_STEPS, default=True)  # Base defaults to 50 steps
    _cap(body, "num_generations", 1)
    ratio, size = body.get("aspect_ratio"), body.get("image_size")
    if ratio is not None and ratio not in ASPECT_RATIOS:
        return  # refused before any work: keep it
    if isinstance(size, dict):
        if not (_valid_side(size.get("width")) and _valid_side(size.get("height"))):
            return
    elif size is not None and size not in _PRESETS:
        return
    body.pop("aspect_ratio", None)  # left out, text-to-image is 16:9 at ~1 MP
    body["image_size"] = {"width": CHEAP_SIDE, "height": CHEAP_SIDE}


_WXH = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def cheap_openai(body: dict[str, Any]) -> None:
    _cap(body, "num_inference_steps", MAX_STEPS, default=True)
    _cap(body, "n", 1)
    if body.get("aspect_ratio") in ASPECT_RATIOS:
        body.pop("aspect_ratio")  # our extension: its smallest size is 512 x 512
        body.pop("megapixels", None)
    size = body.get("size", "auto")
    match = _WXH.match(size) if isinstance(size, str) else None
    if size == "auto" or (match and _valid_side(match[1]) and _valid_side(match[2])):
        body["size"] = f"{CHEAP_SIDE}x{CHEAP_SIDE}"


def cheap_onemin(body: dict[str, Any]) -> None:
    prompt = body.get("promptObject")
    if isinstance(prompt, dict):
        # The document's promptObject is either feature's shape whatever `type` says, so most
        # generator requests would carry the editor's imageUrl and stop at a 400: drop it.
        if body.get("type") == "IMAGE_GENERATOR" and "imageUrl" in prompt:
            prompt.pop("imageUrl")
            if prompt.get("aspect_ratio") == "match_input_image":
                prompt["aspect_ratio"] = "1:1"
        _cap(prompt, "num_inference_steps", MAX_STEPS, default=True)
        if prompt.get("megapixels", "1") in ("1", 1, 1.0):
            prompt["megapixels"] = "0.25"  # 1min's smallest size: 512 x 512


def cheap_verda(body: dict[str, Any]) -> None:
    _cap(body, "num_steps", MAX_STEPS)  # distilled: must be 4 or left out (the default 4 is cheap)
    if all(_valid_side(body.get(side, 1024)) for side in ("width", "height")):
        body["width"] = body["height"] = CHEAP_SIDE  # left out, Verda's default is 1024 x 768


def cheap_verda_base(body: dict[str, Any]) -> None:
    cheap_verda(body)
    _cap(body, "num_steps", MAX_STEPS, default=True)  # Base defaults to 50 steps


def _local_urls(value: Any) -> Any:
    """``value`` with every string holding a URL replaced by one on 127.0.0.1 (the server fetches them)."""
    if isinstance(value, str):
        return CLOSED_URL if "://" in value else value
    if isinstance(value, list):
        return [_local_urls(item) for item in value]
    if isinstance(value, dict):
        return {key: _local_urls(item) for key, item in value.items()}
    return value


# --------------------------------------------------------------------------------------------------
# Budgets per operation


@dataclass(frozen=True)
class Budget:
    """How hard to fuzz one operation."""

    examples: int
    cheap: Callable[[dict[str, Any]], None] | None = None
    # Valid model ids sometimes swapped into body["model"], so that generation really runs.
    models: tuple[str, ...] = ()
    # E.g. pytest.mark.xfail(strict=True, reason="bug: ...") for an operation that fails today.
    marks: tuple[pytest.MarkDecorator, ...] = field(default=())


OXEN_MODELS = ("black-forest-labs-flux-2-klein-4b", "black-forest-labs-flux-2-klein-base-9b")
ONEMIN_MODELS = ("black-forest-labs/flux-2-klein-4b", "black-forest-labs/flux-2-klein-base-4b")
OPENAI_MODELS = ("black-forest-labs/flux-2-klein-9b", "flux-2-klein-base-4b")  # left out: the first served
GENERATION = 10
VERDA = 6
READ = 25

OPERATIONS: dict[str, Budget] = {
    "GET /healthz": Budget(5),
    "GET /readyz": Budget(5),
    "GET /files/{key}": Budget(READ),
    # Oxen
    "POST /api/ai/images/generate": Budget(GENERATION, cheap_oxen, OXEN_MODELS),
    "POST /api/ai/images/edit": Budget(GENERATION, cheap_oxen, OXEN_MODELS),
    "POST /api/ai/queue": Budget(GENERATION, cheap_oxen, OXEN_MODELS),
    "GET /api/ai/queue": Budget(READ),
    "GET /api/ai/queue/{generation_id}": Budget(READ),
    "DELETE /api/ai/queue/{generation_id}": Budget(READ),
    "GET /api/ai/models": Budget(5),
    "GET /api/ai/models/search": Budget(READ),
    "GET /api/ai/models/{model_id}": Budget(READ),
    # OpenAI
    "POST /v1/images/generations": Budget(GENERATION, cheap_openai, OPENAI_MODELS),
    "POST /v1/images/edits": Budget(GENERATION, cheap_openai, OPENAI_MODELS),
    "GET /v1/models": Budget(5),
    "GET /v1/models/{model_id}": Budget(READ),
    # 1min.ai
    "POST /api/features": Budget(GENERATION, cheap_onemin, ONEMIN_MODELS),
    "POST /api/assets": Budget(10),
    # Verda
    "POST /flux2-klein-4b/generate": Budget(VERDA, cheap_verda),
    "POST /flux2-klein-9b/generate": Budget(VERDA, cheap_verda),
    "POST /flux2-klein-base-4b/generate": Budget(VERDA, cheap_verda_base),
    "POST /flux2-klein-base-9b/generate": Budget(VERDA, cheap_verda_base),
}
SKIPPED = {
    # An SSE stream never ends while the server runs: a plain request would wait for ever.
    # test_oxen.py covers it with a streaming client, test_events_last_event_id below its header.
    "GET /api/events": "Server-Sent Events stream forever; covered by test_oxen.py",
}
DEFAULT_READ = Budget(READ)
DEFAULT_WRITE = Budget(GENERATION)  # an unknown POST might generate: keep it short


# --------------------------------------------------------------------------------------------------
# Fixtures and the fuzz loop


@pytest.fixture(scope="module")
def api_schema(server: ServerProcess) -> schemathesis.BaseSchema:
    """The server's own OpenAPI document, loaded lazily from the running session server."""
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", config=schemathesis.Config(), timeout=30)
    assert urlsplit(schema.get_base_url()).hostname == "127.0.0.1"
    return schema


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as http:
        yield http


def _with_model(pair: tuple[Any, str | None]) -> Any:
    case, model = pair
    if model is not None and isinstance(case.body, dict):
        case.body["model"] = model
    return case


def _cancel_queued(server: ServerProcess, label: str, response: schemathesis.Response) -> None:
    """Queued generations would keep the single worker busy after this test: cancel them."""
    if label != "POST /api/ai/queue" or response.status_code != 200:
        return
    for item in response.json().get("generations", []):
        httpx.delete(f"{server.url}/api/ai/queue/{item['generation_id']}", timeout=30)


def fuzz(
    server: ServerProcess, schema: schemathesis.BaseSchema, http: requests.Session, label: str, budget: Budget
) -> None:
    operation = schema.find_operation_by_label(label)
    assert operation is not None, f"{label} is gone from /openapi.json: update OPERATIONS"
    strategy = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))
    if budget.models:
        strategy = st.tuples(strategy, st.sampled_from([None, None, *budget.models])).map(_with_model)

    @settings(
        max_examples=budget.examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: it would replay slow requests
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case: schemathesis.Case[Any]) -> None:
        if isinstance(case.body, dict):
            body: dict[str, Any] = _local_urls(case.body)
            if budget.cheap is not None:
                budget.cheap(body)
            case.body = body
        sent = case.as_transport_kwargs(base_url=server.url)
        assert urlsplit(sent["url"]).hostname == "127.0.0.1", sent["url"]
        response = case.call(base_url=server.url, session=http, timeout=TIMEOUT)
        _cancel_queued(server, label, response)
        case.validate_response(response, checks=CHECKS)

    run()


@pytest.mark.parametrize(
    "label", [pytest.param(label, marks=budget.marks, id=label) for label, budget in OPERATIONS.items()]
)
def test_operation(
    server: ServerProcess, api_schema: schemathesis.BaseSchema, session: requests.Session, label: str
) -> None:
    fuzz(server, api_schema, session, label, OPERATIONS[label])


def test_operations_not_listed_here(
    server: ServerProcess, api_schema: schemathesis.BaseSchema, session: requests.Session
) -> None:
    """Routes added since this file was written are fuzzed too, with a default budget."""
    methods = ("get", "put", "post", "delete", "patch", "head", "options")
    paths: dict[str, dict[str, Any]] = api_schema.raw_schema["paths"]
    labels = [f"{method.upper()} {path}" for path, item in paths.items() for method in item if method in methods]
    others = [label for label in labels if label not in OPERATIONS and label not in SKIPPED]
    for label in others:
        budget = DEFAULT_READ if label.startswith(("GET ", "HEAD ")) else DEFAULT_WRITE
        fuzz(server, api_schema, session, label, budget)
        if budget is DEFAULT_WRITE:
            _cancel_active(server)


def _cancel_active(server: ServerProcess) -> None:
    """Cancel every queued or running job. Routes fuzzed with the default budget (fal's, BFL's and
    Replicate's among them) queue generations at their dialects' default sizes and steps, which kept the
    session server's single worker busy for many seconds after this test (and the next tests waited)."""
    for _ in range(3):  # queued ones end at once; a running one at its next step
        active = httpx.get(f"{server.url}/api/ai/queue", timeout=30).json()["generations"]
        for item in active:
            httpx.delete(f"{server.url}/api/ai/queue/{item['generation_id']}", timeout=30)
        if all(item["status"] == "processing" for item in active):
            return


def test_skipped_operations_exist(api_schema: schemathesis.BaseSchema) -> None:
    """Every skip names a real route, so a renamed route cannot hide behind a stale skip."""
    for label in SKIPPED:
        assert api_schema.find_operation_by_label(label) is not None, label


# --------------------------------------------------------------------------------------------------
# Inputs Schemathesis does not generate, run through the same checks. Schemathesis draws strings
# without lone surrogates and never builds a damaged image; both crash the server today.

SURROGATE_PROMPT = "a cat \ud800"  # what the JSON text "a cat \\ud800" decodes to


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def cheap_request(label: str, prompt: str, image: bytes | None = None) -> tuple[dict[str, Any], str]:
    """A small valid request for a generation route (body, media type); ``image`` as its reference."""
    reference = data_uri(image) if image is not None else None
    oxen: dict[str, Any] = {"model": OXEN_MODELS[0], "prompt": prompt, "image_size": {"width": 64, "height": 64}}
    oxen["num_inference_steps"] = 1
    verda: dict[str, Any] = {"prompt": prompt, "width": 64, "height": 64}
    if image is not None:
        oxen["input_image"] = reference
        verda["input_images"] = [base64.b64encode(image).decode()]
    if "base" in label:
        verda["num_steps"] = 1
    openai: dict[str, Any] = {"prompt": prompt, "size": "64x64", "num_inference_steps": 1}
    onemin_prompt: dict[str, Any] = {"prompt": prompt, "megapixels": "0.25", "num_inference_steps": 1}
    if label == "POST /v1/images/edits":
        openai["image_url"] = reference or data_uri(png_bytes(64, 64))
    if label == "POST /api/features" and image is not None:
        onemin_prompt.update(imageUrl=reference, aspect_ratio="1:1")
    onemin = {
        "type": "IMAGE_EDITOR" if image is not None else "IMAGE_GENERATOR",
        "model": ONEMIN_MODELS[0],
        "promptObject": onemin_prompt,
    }
    bodies = {
        "POST /api/ai/images/generate": oxen,
        "POST /api/ai/images/edit": oxen,
        "POST /api/ai/queue": oxen,
        "POST /v1/images/generations": openai,
        "POST /v1/images/edits": openai,
        "POST /api/features": onemin,
    }
    return bodies.get(label, verda), "application/json"


def call_checked(
    server: ServerProcess,
    schema: schemathesis.BaseSchema,
    http: requests.Session,
    label: str,
    body: dict[str, Any],
    media_type: str,
    checks: list[Any] = CHECKS,
) -> schemathesis.Response:
    operation = schema.find_operation_by_label(label)
    assert operation is not None, label
    case = operation.Case(body=body, media_type=media_type)
    response = case.call(base_url=server.url, session=http, timeout=TIMEOUT)
    _cancel_queued(server, label, response)
    case.validate_response(response, checks=checks)
    return response


GENERATION_ROUTES = [label for label, budget in OPERATIONS.items() if budget.cheap is not None]


@pytest.mark.parametrize("label", GENERATION_ROUTES)
def test_lone_surrogate_in_prompt(
    server: ServerProcess, api_schema: schemathesis.BaseSchema, session: requests.Session, label: str
) -> None:
    body, media_type = cheap_request(label, SURROGATE_PROMPT)
    call_checked(server, api_schema, session, label, body, media_type)


def test_cheap_requests_are_valid(
    server: ServerProcess, api_schema: schemathesis.BaseSchema, session: requests.Session
) -> None:
    """The bodies above are valid as they stand, so the surrogate is what the server trips on."""
    for label in (
        "POST /api/ai/images/generate",
        "POST /v1/images/edits",
        "POST /api/features",
        "POST /flux2-klein-base-4b/generate",
    ):
        body, media_type = cheap_request(label, "a cat")
        assert call_checked(server, api_schema, session, label, body, media_type).status_code == 200, label


def exif_png() -> bytes:
    return encoded(Image.new("RGB", (64, 64), (200, 30, 30)), "PNG", exif=exif_with_mistyped_gps_tag())


DAMAGED = [
    pytest.param(
        tiff_with_rational_strip_offsets,
        id="tiff",
    ),
    pytest.param(
        exif_png,
        id="exif",
    ),
]
REFERENCE_ROUTES = [
    "POST /api/ai/images/edit",
    "POST /v1/images/edits",
    "POST /api/features",
    "POST /flux2-klein-4b/generate",
]


@pytest.mark.parametrize("make_image", DAMAGED)
@pytest.mark.parametrize("label", REFERENCE_ROUTES)
def test_damaged_reference_image(
    server: ServerProcess,
    api_schema: schemathesis.BaseSchema,
    session: requests.Session,
    label: str,
    make_image: Callable[[], bytes],
) -> None:
    body, media_type = cheap_request(label, "a cat", make_image())
    call_checked(server, api_schema, session, label, body, media_type)


@pytest.mark.parametrize("make_image", DAMAGED)
@pytest.mark.parametrize(
    ("label", "form"),
    [("POST /api/assets", {}), ("POST /v1/images/edits", {"prompt": "a cat", "size": "64x64"})],
    ids=["assets", "openai-edits"],
)
def test_damaged_upload(
    server: ServerProcess,
    api_schema: schemathesis.BaseSchema,
    session: requests.Session,
    label: str,
    form: dict[str, str],
    make_image: Callable[[], bytes],
) -> None:
    field = "asset" if label == "POST /api/assets" else "image"
    call_checked(server, api_schema, session, label, {**form, field: make_image()}, "multipart/form-data")


DEEP_JSON = b"[" * 3000 + b"]" * 3000  # past Python's recursion limit for json.loads


@pytest.mark.parametrize(
    "label",
    [label for label in GENERATION_ROUTES if "/flux2-klein-" not in label or label == "POST /flux2-klein-4b/generate"],
)
def test_deeply_nested_json(
    server: ServerProcess, api_schema: schemathesis.BaseSchema, session: requests.Session, label: str
) -> None:
    operation = api_schema.find_operation_by_label(label)
    assert operation is not None
    case = operation.Case(body=DEEP_JSON, media_type="application/json")
    response = case.call(base_url=server.url, session=session, timeout=TIMEOUT)
    case.validate_response(response, checks=CHECKS)
    assert response.status_code == 400


def first_event_chunk(server: ServerProcess, last_event_id: bytes) -> tuple[int, str]:
    """Status and first chunk of /api/events (the session server sends a keep-alive every second)."""
    headers = [(b"Last-Event-ID", last_event_id)]
    with httpx.stream("GET", f"{server.url}/api/events", headers=headers, timeout=TIMEOUT) as response:
        if response.status_code != 200:
            return response.status_code, response.read().decode(errors="replace")
        return response.status_code, next(response.iter_text())


@pytest.mark.parametrize(
    "last_event_id",
    [
        b"1",
        b"not-a-number",
        str(2**63 - 1).encode(),
        pytest.param(
            str(2**63).encode(),
            id="2**63",
        ),
        pytest.param(
            b"\xb2",  # Latin-1 superscript two: str.isdigit() is true, int() refuses it
            id="superscript-digit",
        ),
    ],
)
def test_events_last_event_id(server: ServerProcess, last_event_id: bytes) -> None:
    # /api/events is left out of the fuzzing above (it never ends); its one input is this header.
    status, chunk = first_event_chunk(server, last_event_id)
    assert status == 200, (status, chunk)
    assert chunk


# --------------------------------------------------------------------------------------------------
# Where the document itself is wrong (found while writing the checks above).


def test_result_file_content_type(
    server: ServerProcess, api_schema: schemathesis.BaseSchema, session: requests.Session
) -> None:
    body, media_type = cheap_request("POST /v1/images/generations", "a cat")
    made = call_checked(server, api_schema, session, "POST /v1/images/generations", body, media_type)
    url = urlsplit(made.json()["data"][0]["url"])
    assert url.hostname == "127.0.0.1"
    query = dict(part.split("=", 1) for part in url.query.split("&"))
    operation = api_schema.find_operation_by_label("GET /files/{key}")
    assert operation is not None
    case = operation.Case(path_parameters={"key": url.path.removeprefix("/files/")}, query=query)
    response = case.call(base_url=server.url, session=session, timeout=TIMEOUT)
    assert response.status_code == 200
    case.validate_response(response, checks=CHECKS)


def test_events_content_type(server: ServerProcess, api_schema: schemathesis.BaseSchema) -> None:
    # Not through Schemathesis: it would read the never-ending body. The headers are enough.
    documented = api_schema.raw_schema["paths"]["/api/events"]["get"]["responses"]["200"]["content"]
    with httpx.stream("GET", f"{server.url}/api/events", timeout=TIMEOUT) as response:
        assert response.status_code == 200
        media_type = response.headers["content-type"].split(";")[0].strip()
    assert media_type in documented, (media_type, list(documented))


@pytest.mark.parametrize(
    ("label", "body"),
    [
        ("POST /api/ai/images/generate", {"prompt": "a cat"}),
        ("POST /v1/images/generations", {"prompt": "a cat", "n": 0}),
        ("POST /api/features", {"type": "IMAGE_GENERATOR"}),
        ("POST /flux2-klein-4b/generate", {"prompt": "a cat", "width": 17}),
    ],
    ids=["oxen", "openai", "onemin", "verda"],
)
def test_validation_errors_are_documented(
    server: ServerProcess,
    api_schema: schemathesis.BaseSchema,
    session: requests.Session,
    label: str,
    body: dict[str, Any],
) -> None:
    response = call_checked(
        server, api_schema, session, label, body, "application/json", [*CHECKS, status_code_conformance]
    )
    assert 400 <= response.status_code < 500
