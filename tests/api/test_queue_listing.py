"""``GET /api/ai/queue`` with many queued jobs: every queue position comes from one store query,
computed off the event loop (in-process app; its lifespan is not run, so no worker takes the jobs)."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from kleinserve.api.app import create_app
from kleinserve.jobs.job import Job
from kleinserve.request import GenerationRequest
from kleinserve.settings import Settings


def test_queue_lists_many_items_with_positions(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path))
    store = app.state.runtime.store
    request = GenerationRequest.parse({"prompt": "p", "model": "flux-2-klein-4b", "seed": 1})
    jobs = [Job(request=request, created_at=1000.0 + i) for i in range(120)]
    for job in jobs:
        store.add(job)
    client = TestClient(app, base_url="http://localhost")
    body = client.get("/api/ai/queue").json()
    listed = body["generations"]
    assert body["count"] == len(listed) == 100  # newest first, the default page
    expected = {job.id: index for index, job in enumerate(jobs)}
    assert [item["queue_position"] for item in listed] == [expected[item["generation_id"]] for item in listed]
    assert listed[0]["queue_position"] == 119
    one = client.get(f"/api/ai/queue/{jobs[5].id}").json()
    assert one["queue_position"] == 5
    app.state.runtime.store.close()
