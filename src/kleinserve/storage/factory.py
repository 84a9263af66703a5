"""Which storage backend a server uses, decided from its settings alone."""

from __future__ import annotations

from kleinserve.settings import Settings
from kleinserve.storage.base import Storage
from kleinserve.storage.local import LocalStorage


def storage_from_settings(settings: Settings) -> Storage:
    """The storage ``settings`` ask for: local disk under the data dir (links on
    ``settings.link_base_url()``)."""
    return LocalStorage.in_data_dir(settings.data_dir, settings.link_base_url(), default_expiry=settings.url_expiry)
