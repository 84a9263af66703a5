"""The safety checker end to end: every policy through every dialect, on real servers whose tiny
classifier always says nsfw (or never does), built by ``kleinserve make-tiny --classifier``."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from kleinserve.safety import blurred
from tests.api.conftest import OpsServer, ServerProcess, running_together

SMALL = {"prompt": "a safety test", "width": 64, "height": 64, "seed": 11}


@dataclass
class Case:
    policy: str
    allow_disable: bool
    server: ServerProcess
    headers: dict[str, str]
    flagged: bool = True  # every server here runs the tiny classifier that always says nsfw

    @property
    def refused(self) -> bool:
        return self.policy == "refuse"


@pytest.fixture(scope="module")
def policy_servers(
    tiny_distilled: Path, classifiers: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, ServerProcess]]:
    """The blur and the refuse server, started side by side; clients may skip the blur server's
    checker, not the refuse one's."""
    servers = {
        policy: ServerProcess(
            tmp_path_factory.mktemp(f"safety-{policy}"),
            [f"flux-2-klein-4b={tiny_distilled}"],
            "--dtype",
            "float32",
            "--safety-checker",
            str(classifiers["nsfw"]),
            "--safety-policy",
            policy,
            *(["--safety-allow-disable"] if policy == "blur" else []),
        )
        for policy in ("blur", "refuse")
    }
    with running_together(servers.values()):
        yield servers


@pytest.fixture(scope="module", params=["flag", "blur", "refuse"])
def case(request: pytest.FixtureRequest, ops_server: OpsServer) -> Case:
    """A server per policy; ``flag`` is the shared operations server (which has an API key)."""
    if request.param == "flag":
        return Case("flag", False, ops_server.server, {"Authorization": f"Bearer {ops_server.secret}"})
    servers: dict[str, ServerProcess] = request.getfixturevalue("policy_servers")
    return Case(request.param, request.param == "blur", servers[request.param], {})


def url(case: Case) -> str:
    return case.server.url


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image.convert("RGB")


def verda(case: Case, **body: Any) -> httpx.Response:
    return httpx.post(f"{url(case)}/flux2-klein-4b/generate", json={**SMALL, **body}, headers=case.headers, timeout=120)


def assert_scores(safety: dict[str, Any], case: Case) -> None:
    assert safety["policy"] == case.policy and safety["threshold"] == 0.85
    assert safety["flagged"] == [case.flagged]
    assert safety["scores"][0] > 0.99


def test_oxen_job_view_carries_the_verdict(case: Case) -> None:
    body = {"model": "flux-2-klein-4b", "prompt": "queued", "image_size": {"width": 64, "height": 64}}
    queued = httpx.post(f"{url(case)}/api/ai/queue", json=body, headers=case.headers, timeout=60)
    generation_id = queued.json()["generations"][0]["generation_id"]
    deadline = time.monotonic() + 120
    while (item := httpx.get(f"{url(case)}/api/ai/queue/{generation_id}", headers=case.headers).json())["status"] in (
        "queued",
        "processing",
    ):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert_scores(item["safety"], case)
    if case.refused:
        assert item["status"] == "failed" and item["result_url"] is None
        assert "safety checker flagged 1 of 1 image" in item["error_message"]
    else:
        assert item["status"] == "succeeded" and item["result_url"]


def test_openai_refuses_in_its_shape_or_returns_the_policy_image(case: Case) -> None:
    response = httpx.post(
        f"{url(case)}/v1/images/generations",
        json={"model": "flux-2-klein-4b", "prompt": "openai", "size": "64x64", "response_format": "b64_json"},
        headers=case.headers,
        timeout=120,
    )
    if case.refused:
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "content_policy_violation" and "safety checker" in error["message"]
        return
    assert response.status_code == 200, response.text
    image = png(base64.b64decode(response.json()["data"][0]["b64_json"]))
    # Blurred output is smooth: blurring it again changes little; raw tiny-model output is noise.
    again = blurred(image)
    change = sum(abs(a - b) for a, b in zip(image.tobytes(), again.tobytes(), strict=True)) / len(image.tobytes())
    assert (change < 8) if (case.flagged and case.policy == "blur") else (change > 8), change


def test_onemin_reports_the_verdict_or_refuses(case: Case) -> None:
    body = {
        "type": "IMAGE_GENERATOR",
        "model": "black-forest-labs/flux-2-klein-4b",
        "promptObject": {"prompt": "onemin", "megapixels": "0.25", "num_inference_steps": 1},
    }
    response = httpx.post(f"{url(case)}/api/features", json=body, headers=case.headers, timeout=120)
    if case.refused:
        assert response.status_code == 400, response.text
        assert response.json()["code"] == "content_policy_violation" and response.json()["statusCode"] == 400
        return
    assert response.status_code == 200, response.text
    assert_scores(response.json()["aiRecord"]["kleinserve"]["safety"], case)
    skipped = httpx.post(
        f"{url(case)}/api/features",
        json={**body, "promptObject": {**body["promptObject"], "disable_safety_checker": True}},
        headers=case.headers,
        timeout=120,
    )
    record = skipped.json()["aiRecord"]["kleinserve"]
    assert ("safety" not in record) if case.allow_disable else (record["safety"]["flagged"] == [case.flagged])


def test_verda_headers_and_base64_carry_the_real_verdict(case: Case) -> None:
    raw = verda(case, output_format="png")
    if case.refused:
        assert raw.status_code == 400, raw.text
        assert raw.json()["code"] == "content_policy_violation" and "safety checker" in raw.json()["detail"]
        # The operator forces the checker: a client cannot opt out.
        assert verda(case, enable_safety_checker=False).status_code == 400
        return
    assert raw.status_code == 200, raw.text
    assert raw.headers["X-Has-Nsfw-Content"] == str(case.flagged).lower()
    assert "X-Kleinserve-Safety-Checker" not in raw.headers  # a checker ran
    as_json = verda(case, enable_base64_output=True, output_format="png")
    assert as_json.json()["has_nsfw_content"] is case.flagged
    assert as_json.headers["X-Has-Nsfw-Content"] == str(case.flagged).lower()
    assert base64.b64decode(as_json.json()["image"]) == raw.content

    unchecked = verda(case, enable_safety_checker=False, output_format="png")
    if not case.allow_disable:
        assert unchecked.headers["X-Has-Nsfw-Content"] == str(case.flagged).lower()
        return
    # Allowed to skip: nothing checked, so the unavailable marker; and the blurred image is exactly
    # the policy's blur of the unchecked one.
    assert unchecked.headers["X-Has-Nsfw-Content"] == "false"
    assert unchecked.headers["X-Kleinserve-Safety-Checker"] == "unavailable"
    original = png(unchecked.content)
    assert png(raw.content).tobytes() == blurred(original).tobytes() != original.tobytes()


def test_a_normal_verdict_changes_nothing_under_any_policy(classifiers: dict[str, Path]) -> None:
    """The classifier that never says nsfw, through the policy code the worker runs (in process)."""
    import torch

    from kleinserve.engine.classifier import ImageClassifier
    from kleinserve.engine.images import encode_image
    from kleinserve.generation import GenerationResult
    from kleinserve.request import GenerationRequest, OutputFormat
    from kleinserve.safety import SafetyChecker, SafetyPolicy

    scorer = ImageClassifier(str(classifiers["normal"]), torch.device("cpu"))
    image = Image.effect_noise((64, 64), 80).convert("RGB")
    request = GenerationRequest(prompt="p", width=64, height=64, safety_check=False)
    for policy in SafetyPolicy:
        encoded = encode_image(image, OutputFormat.PNG, 95)
        result = GenerationResult("flux-2-klein-4b", [encoded], [1], 64, 64, 4, 1.0)
        report = SafetyChecker(scorer, policy, 0.85).review(request, result)  # clients cannot opt out
        assert report is not None and report.flagged == [False] and report.scores[0] < 0.01
        assert result.images == [encoded]
        skipped = SafetyChecker(scorer, policy, 0.85, allow_disable=True).review(request, result)
        assert skipped is None  # the operator lets clients skip, and this one did


def test_bfl_content_moderated_and_fal_verdict(case: Case) -> None:
    """BFL answers a refused job as ``Content Moderated``; fal's ``has_nsfw_concepts`` is the verdict."""
    headers = {"x-key": case.headers["Authorization"].split()[1]} if case.headers else {}
    body = {"prompt": "p", "width": 64, "height": 64, "seed": 3, "safety_tolerance": 0}
    submitted = httpx.post(f"{url(case)}/v1/flux-2-klein-4b", json=body, headers=headers, timeout=60).json()
    deadline = time.monotonic() + 120
    while (result := httpx.get(submitted["polling_url"], headers=headers, timeout=10).json())["status"] == "Pending":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert result["status"] == ("Content Moderated" if case.refused else "Ready"), result
    fal = httpx.post(
        f"{url(case)}/fal-ai/flux-2/klein/4b",
        json={"prompt": "p", "image_size": {"width": 64, "height": 64}},
        headers=headers,
        timeout=60,
    ).json()
    while httpx.get(fal["status_url"], headers=headers, timeout=10).json()["status"] != "COMPLETED":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    answer = httpx.get(fal["response_url"], headers=headers, timeout=30)
    if case.refused:
        assert answer.status_code == 400 and answer.json()["error_type"] == "content_policy_violation"
    else:
        assert answer.json()["has_nsfw_concepts"] == [True]


def test_safety_tolerance_moves_the_threshold() -> None:
    from kleinserve.request import GenerationRequest
    from kleinserve.safety import SafetyChecker, SafetyPolicy

    def threshold(tolerance: int | None, allow_disable: bool) -> float:
        checker = SafetyChecker(None, SafetyPolicy.FLAG, 0.8, allow_disable=allow_disable)  # type: ignore[arg-type]
        return checker.threshold_for(GenerationRequest(prompt="p", safety_tolerance=tolerance))

    assert [threshold(t, False) for t in (None, 0, 1, 2, 3, 4, 5)] == pytest.approx([0.8, 0.4, 0.6, 0.8, 0.8, 0.8, 0.8])
    assert [threshold(t, True) for t in (2, 3, 4, 5)] == pytest.approx([0.8, 0.85, 0.9, 0.95])
