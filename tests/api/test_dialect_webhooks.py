"""Webhooks through the BFL, Replicate and fal dialects: each one's own webhook field reaches the
webhook machinery (api/webhooks_http.py), and the delivery verifies with the caller's secret."""

from __future__ import annotations

import httpx

from tests.api.conftest import OpsServer
from tests.api.test_webhooks import Receiver, receiver, secret_of, verified

__all__ = ["receiver"]  # the fixture, shared with test_webhooks


def test_bfl_replicate_and_fal_webhooks_are_delivered(ops_server: OpsServer, receiver: Receiver) -> None:
    server, secret = ops_server.server, ops_server.secret
    bfl = httpx.post(
        f"{server.url}/v1/flux-2-klein-4b",
        json={"prompt": "b", "width": 64, "height": 64, "webhook_url": receiver.url},
        headers={"x-key": secret},
        timeout=60,
    )
    replicate = httpx.post(
        f"{server.url}/v1/models/black-forest-labs/flux-2-klein-4b/predictions",
        json={"input": {"prompt": "r", "output_megapixels": 0.25}, "webhook": receiver.url,
              "webhook_events_filter": ["start", "completed"]},
        headers={"Authorization": f"Bearer {secret}"},
        timeout=60,
    )  # fmt: skip
    fal = httpx.post(
        f"{server.url}/fal-ai/flux-2/klein/4b",
        params={"fal_webhook": receiver.url},
        json={"prompt": "f", "image_size": {"width": 64, "height": 64}},
        headers={"Authorization": f"Key {secret}"},
        timeout=60,
    )
    assert all(r.status_code in (200, 201) for r in (bfl, replicate, fal)), [bfl.text, replicate.text, fal.text]
    ids = {"bfl": bfl.json()["id"], "replicate": replicate.json()["id"], "fal": fal.json()["request_id"]}
    signing = secret_of(server, {"Authorization": f"Bearer {secret}"})
    payloads = [verified(signing, d) for d in receiver.wait(3)]
    by_dialect = {p["data"]["dialect"]: p for p in payloads}
    assert {d: p["data"]["id"] for d, p in by_dialect.items()} == ids
    assert all(p["type"] == "job.succeeded" for p in payloads)
