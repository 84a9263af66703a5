"""S3-compatible object storage (AWS S3, SeaweedFS, MinIO, Ceph RGW, R2...) on boto3.

Layout: key ``"<job-id>/0.png"`` is the object ``<prefix><job-id>/0.png`` in one bucket, stored with
its media type as ``Content-Type``. Links are SigV4 **presigned GET URLs** (the store checks the
signature and the expiry, so no kleinserve process serves the bytes); SigV4 caps their life at
7 days. Retention lists the prefix and deletes in batches of 1,000 (the S3 maximum per request),
using each object's ``LastModified``.

Decisions:
- The client is passed in (built by :func:`kleinserve.storage.factory.storage_from_settings` from
  the settings and the usual AWS credential chain), so tests and other tools can hand over their own.
- S3 PUTs are atomic (readers see the old or the new object), which is the contract's rule.
- Missing objects (``NoSuchKey``/404) are :class:`NotFoundError`; any other S3 error propagates as
  is, so a misconfigured bucket or credentials fail loudly rather than look like a missing file.
- :meth:`S3Storage.check` (called at start by the factory) asks for the bucket once, so a missing
  bucket, wrong credentials or an unreachable endpoint stop the process at start with a sentence that
  says which, instead of failing every job later.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from kleinserve.errors import NotFoundError, ServiceUnavailableError
from kleinserve.storage.base import check_media_type, validate_key, validate_prefix

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

MAX_PRESIGN_SECONDS = 7 * 24 * 3600  # SigV4's limit on a presigned URL's life
_DELETE_BATCH = 1000  # most keys one DeleteObjects request takes
_MISSING = frozenset({"NoSuchKey", "404", "NotFound"})


class S3Storage:
    """Files as objects under ``prefix`` in ``bucket``, handed out as presigned GET URLs.

    ``prefix`` is ``""`` or a directory-like ``"a/b/"``; ``default_expiry`` is how many seconds a
    link stays valid unless :meth:`url` is told otherwise.
    """

    def __init__(self, client: S3Client, bucket: str, prefix: str = "", default_expiry: float = 3600.0) -> None:
        if not bucket:
            raise ValueError("an S3 bucket name is needed")
        if not (0 < default_expiry <= MAX_PRESIGN_SECONDS):
            raise ValueError(f"S3 link validity must be between 1 and {MAX_PRESIGN_SECONDS} seconds (SigV4 limit)")
        self.client = client
        self.bucket = bucket
        self.prefix = validate_prefix(prefix) if prefix.strip("/") else ""
        self.default_expiry = default_expiry

    def check(self) -> None:
        """Raise :class:`ServiceUnavailableError` naming the cause unless the bucket can be reached."""
        where = f"S3 bucket {self.bucket!r} at {self.client.meta.endpoint_url}"
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            if code in {"404", "NoSuchBucket", "NotFound"}:
                reason = "does not exist; create it first (kleinserve does not create buckets)"
            elif code in {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}:
                reason = "refuses these credentials (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the profile)"
            else:
                reason = f"answered {code or 'an error'}: {err}"
            raise ServiceUnavailableError(f"{where} {reason}") from None
        except BotoCoreError as err:  # no endpoint, no credentials at all, TLS...
            raise ServiceUnavailableError(f"{where} cannot be reached: {err}") from None

    def put(self, key: str, data: bytes, media_type: str) -> None:
        name = self._name(key)
        content_type = check_media_type(key, media_type)
        self.client.put_object(Bucket=self.bucket, Key=name, Body=data, ContentType=content_type)

    def read(self, key: str) -> bytes:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._name(key))
        except ClientError as err:
            if _is_missing(err):
                raise NotFoundError(f"no such file: {key}") from None
            raise
        with response["Body"] as body:
            return body.read()

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._name(key))
        except ClientError as err:
            if _is_missing(err):
                return False
            raise
        return True

    def url(self, key: str, expires_in: float | None = None) -> str:
        """A presigned GET URL of ``key``, valid for ``expires_in`` seconds (rounded up)."""
        name = self._name(key)
        seconds = self.default_expiry if expires_in is None else expires_in
        if not (0 < seconds <= MAX_PRESIGN_SECONDS and math.isfinite(seconds)):
            raise ValueError(f"expires_in must be between 1 and {MAX_PRESIGN_SECONDS} seconds")
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": name}, ExpiresIn=math.ceil(seconds)
        )

    def delete_prefix(self, prefix: str) -> int:
        return self._delete(self._objects(validate_prefix(prefix)))

    def delete_older_than(self, prefix: str, cutoff: float) -> int:
        old = [o for o in self._objects(validate_prefix(prefix)) if o["LastModified"].timestamp() < cutoff]
        return self._delete(old)

    # -- internals -----------------------------------------------------------------------------

    def _name(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def _objects(self, prefix: str) -> list[Any]:
        """Every object under ``prefix`` (relative to the store's own prefix)."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + prefix)
        return [obj for page in pages for obj in page.get("Contents", [])]

    def _delete(self, objects: list[Any]) -> int:
        deleted = 0
        for start in range(0, len(objects), _DELETE_BATCH):
            batch: list[Any] = [{"Key": obj["Key"]} for obj in objects[start : start + _DELETE_BATCH]]
            response = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            errors = response.get("Errors", [])
            if errors:
                first = errors[0]
                example = f"{first.get('Key')}: {first.get('Message')}"
                raise OSError(f"S3 refused to delete {len(errors)} object(s), e.g. {example}")
            deleted += len(batch)
        return deleted


def _is_missing(err: ClientError) -> bool:
    return str(err.response.get("Error", {}).get("Code", "")) in _MISSING
