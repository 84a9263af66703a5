"""Result-file storage: a protocol, its key rules, the local-disk backend, and the choice between backends."""

from kleinserve.storage.base import SignatureError, Storage, validate_key
from kleinserve.storage.factory import storage_from_settings
from kleinserve.storage.local import LocalStorage

__all__ = ["LocalStorage", "SignatureError", "Storage", "storage_from_settings", "validate_key"]
