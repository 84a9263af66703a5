"""Result-file storage: a protocol, its key rules, and the local-disk backend."""

from kleinserve.storage.base import SignatureError, Storage, StoredFile, validate_key
from kleinserve.storage.local import LocalStorage

__all__ = ["LocalStorage", "SignatureError", "Storage", "StoredFile", "validate_key"]
