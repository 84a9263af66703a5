"""Which storage backend a server uses, decided from its settings alone.

``KLEINSERVE_STORAGE_URL`` unset: local disk under the data dir, with signed ``/files`` links on
``Settings.link_base_url()``. ``s3://bucket/prefix``: :class:`~kleinserve.storage.s3.S3Storage` with a
boto3 client for ``KLEINSERVE_S3_ENDPOINT_URL`` / ``_REGION`` / ``_PATH_STYLE``; credentials come from
boto3's usual chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, instance
roles), which kleinserve never reads itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kleinserve.settings import Settings
from kleinserve.storage.base import Storage
from kleinserve.storage.local import LocalStorage

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

DEFAULT_REGION = "us-east-1"


def storage_from_settings(settings: Settings) -> Storage:
    """The storage ``settings`` ask for (see the module docstring)."""
    location = settings.s3_location()
    if location is None:
        return LocalStorage.in_data_dir(settings.data_dir, settings.link_base_url(), default_expiry=settings.url_expiry)
    from kleinserve.storage.s3 import S3Storage  # boto3 loads only when S3 is used

    bucket, prefix = location
    storage = S3Storage(s3_client(settings), bucket, prefix, default_expiry=settings.url_expiry)
    storage.check()  # a missing bucket or wrong credentials stop the start, not every job later
    return storage


def s3_client(settings: Settings) -> S3Client:
    """A boto3 S3 client as the settings describe (SigV4, so presigned URLs carry their expiry)."""
    import boto3
    from botocore.config import Config

    session = boto3.session.Session()
    config = Config(
        signature_version="s3v4",
        s3={"addressing_style": "path" if settings.s3_path_style else "auto"},
        retries={"max_attempts": 3, "mode": "standard"},
    )
    client: S3Client = session.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region or session.region_name or DEFAULT_REGION,
        config=config,
    )
    return client
