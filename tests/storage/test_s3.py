"""S3Storage specifics against a real SeaweedFS server: the settings that choose it, its key layout
under a prefix, and that the store really checks credentials. The shared rules are in test_contract.py.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from botocore.exceptions import ClientError

from kleinserve.errors import ServiceUnavailableError
from kleinserve.settings import Settings
from kleinserve.storage import LocalStorage, storage_from_settings
from kleinserve.storage.s3 import MAX_PRESIGN_SECONDS, S3Storage
from tests.services.seaweed import S3Server


def s3_settings(server: S3Server, prefix: str, tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path,
        storage_url=server.storage_url(prefix),
        s3_endpoint_url=server.endpoint_url,
        s3_region=server.region,
        s3_path_style=True,
        url_expiry=120,
    )


def test_settings_choose_s3_with_aws_credentials_from_the_environment(
    seaweed: S3Server, s3_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    storage = storage_from_settings(s3_settings(seaweed, s3_prefix, tmp_path))
    assert isinstance(storage, S3Storage)
    assert (storage.bucket, storage.prefix, storage.default_expiry) == (seaweed.bucket, s3_prefix, 120)
    storage.put("job/0.png", b"png", "image/png")
    # The object sits under the prefix, with its media type.
    head = seaweed.client().head_object(Bucket=seaweed.bucket, Key=f"{s3_prefix}job/0.png")
    assert head["ContentType"] == "image/png"
    url = storage.url("job/0.png")
    assert url.startswith(f"{seaweed.endpoint_url}/{seaweed.bucket}/{s3_prefix}job/0.png?")
    assert "X-Amz-Expires=120" in url and "X-Amz-Signature=" in url
    assert httpx.get(url).content == b"png"
    assert not (tmp_path / "files").exists()  # nothing on local disk


def test_default_is_local_disk(tmp_path: Path) -> None:
    storage = storage_from_settings(Settings(data_dir=tmp_path, port=8123))
    assert isinstance(storage, LocalStorage)
    assert storage.url("a/0.png").startswith("http://127.0.0.1:8123/files/a/0.png?")


@pytest.mark.parametrize("bad", ["bucket/prefix", "s3://", "s3:///prefix", "file:///tmp/x", "https://s3.example.com/b"])
def test_storage_url_must_name_an_s3_bucket(bad: str) -> None:
    with pytest.raises(ValueError, match="storage_url"):
        Settings(storage_url=bad)


def test_prefixes_parse() -> None:
    assert Settings(storage_url="s3://b").s3_location() == ("b", "")
    assert Settings(storage_url="s3://b/one/two/").s3_location() == ("b", "one/two")
    assert Settings().s3_location() is None


def test_wrong_credentials_are_refused(seaweed: S3Server, s3_prefix: str) -> None:
    wrong = S3Storage(seaweed.client(aws_secret_access_key="not-the-secret"), seaweed.bucket, s3_prefix)
    with pytest.raises(ClientError):
        wrong.put("job/0.png", b"x", "image/png")
    right = seaweed.storage(s3_prefix)
    right.put("job/0.png", b"x", "image/png")
    # A link signed with the wrong secret looks like any other, and the store refuses it.
    assert httpx.get(wrong.url("job/0.png")).status_code == 403
    assert httpx.get(right.url("job/0.png")).status_code == 200


def test_stores_are_confined_to_their_prefix(seaweed: S3Server, s3_prefix: str) -> None:
    one = seaweed.storage(f"{s3_prefix}one")
    two = seaweed.storage(f"{s3_prefix}two")
    one.put("job/0.png", b"1", "image/png")
    two.put("job/0.png", b"2", "image/png")
    assert one.read("job/0.png") == b"1" and two.read("job/0.png") == b"2"
    assert one.delete_prefix("job/") == 1
    assert two.read("job/0.png") == b"2"


def test_link_life_is_bounded_by_sigv4(seaweed: S3Server) -> None:
    with pytest.raises(ValueError):
        S3Storage(seaweed.client(), seaweed.bucket, default_expiry=MAX_PRESIGN_SECONDS + 1)
    with pytest.raises(ValueError):
        seaweed.storage("p").url("a/0.png", expires_in=MAX_PRESIGN_SECONDS + 1)


def test_retention_sweep_removes_objects_from_s3(
    seaweed: S3Server, s3_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kleinserve.jobs.job import Job, JobOutput, JobResult, JobStatus
    from kleinserve.request import GenerationRequest
    from kleinserve.runtime import UPLOADS, Runtime

    for name, value in seaweed.env(s3_prefix).items():
        monkeypatch.setenv(name, value)
    runtime = Runtime(Settings(data_dir=tmp_path, retention_seconds=3600))
    try:
        assert isinstance(runtime.storage, S3Storage)
        jobs = []
        for age in (7200, 60):
            job = Job(request=GenerationRequest.parse({"prompt": "x"}), status=JobStatus.SUCCEEDED)
            job.completed_at = job.created_at - age
            runtime.storage.put(f"{job.id}/0.png", b"png", "image/png")
            output = JobOutput(key=f"{job.id}/0.png", media_type="image/png", seed=0, width=64, height=64, size_bytes=3)
            job.result = JobResult(outputs=[output], steps=4, guidance=1.0)
            runtime.store.add(job)
            jobs.append(job)
        runtime.storage.put(f"{UPLOADS}/fresh/image.png", b"png", "image/png")

        assert runtime.sweep() == 1

        old, recent = jobs
        assert not runtime.storage.exists(f"{old.id}/0.png")
        assert runtime.storage.exists(f"{recent.id}/0.png")
        assert runtime.storage.exists(f"{UPLOADS}/fresh/image.png")  # younger than the retention time
        listed = seaweed.client().list_objects_v2(Bucket=seaweed.bucket, Prefix=s3_prefix)
        assert sorted(o["Key"] for o in listed["Contents"]) == sorted(
            [f"{s3_prefix}{recent.id}/0.png", f"{s3_prefix}{UPLOADS}/fresh/image.png"]
        )
    finally:
        runtime.store.close()


def test_start_stops_with_a_clear_error_for_a_missing_bucket_or_wrong_credentials(
    seaweed: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    settings = s3_settings(seaweed, "", tmp_path)
    missing = settings.model_copy(update={"storage_url": "s3://no-such-bucket-here"})
    with pytest.raises(ServiceUnavailableError, match=r"'no-such-bucket-here' .* does not exist"):
        storage_from_settings(missing)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(ServiceUnavailableError, match="refuses these credentials"):
        storage_from_settings(settings)
    unreachable = settings.model_copy(update={"s3_endpoint_url": "http://127.0.0.1:9"})
    with pytest.raises(ServiceUnavailableError, match="cannot be reached"):
        storage_from_settings(unreachable)
