"""Reference inputs as requests bring them: checked, fetched and stored before a job is queued.

Every reference of a request becomes an ``asset:`` reference to a file in storage before its job
enters the queue (``JobService.prepare`` calls :meth:`InputStager.stage`). So:

- **job rows stay small**: a queued job holds short references, never megabytes of base64, and
  reading the queue costs what it should;
- **byte caps hold at submission**, before anything is stored: each image at most
  ``KLEINSERVE_MAX_IMAGE_BYTES``, all images of a request at most
  ``KLEINSERVE_MAX_REQUEST_IMAGE_BYTES``, judged on base64's length before decoding it and while a
  URL's body streams in;
- **URLs are fetched in the submitting request**, within ``KLEINSERVE_FETCH_DEADLINE`` seconds in
  all (engine/fetch.py): a slow host delays only its own request and never holds the GPU worker;
- **``asset:`` references are scoped to their owner**: an upload belongs to the key that uploaded
  it (its folder is ``uploads/<key id>-<uuid>``, ``open-`` on an open server), a result to the
  owner of its job. Anyone else's asset is refused with the very error a missing one gets, so
  references reveal nothing about other keys.

Before any fetching or decoding, :meth:`InputStager.precheck` refuses a key whose concurrency or
credits could not admit the work anyway (the binding check is still the admission inside the
store's enqueue); decoding an upload runs off the event loop under a semaphore
(``KLEINSERVE_MAX_CONCURRENT_DECODES``) and with a memory bound that depends on the image's
mode (engine/images.py, ``KLEINSERVE_MAX_DECODE_BYTES``).
"""

from __future__ import annotations

import builtins
import io
import threading
import uuid
from collections.abc import Sequence
from dataclasses import replace

from PIL import Image

from kleinserve.engine.images import (
    ASSET_PREFIX,
    InputPolicy,
    check_header,
    decode_image,
    encode_image,
    read_source,
)
from kleinserve.engine.masks import FIELD as MASK_FIELD
from kleinserve.engine.masks import check_mask_size, decode_mask
from kleinserve.engine.variants import find_variant
from kleinserve.errors import (
    InsufficientCreditsError,
    InvalidImageError,
    InvalidParameterError,
    KleinserveError,
    RateLimitedError,
)
from kleinserve.jobs.job import JobStatus
from kleinserve.jobs.store.base import JobStore
from kleinserve.keys import ApiKey, ApiKeyStore
from kleinserve.request import GenerationRequest, OutputFormat
from kleinserve.settings import Settings
from kleinserve.storage.base import Storage

UPLOADS = "uploads"  # storage folder of images clients upload or send inline
OPEN_OWNER = "open"  # the owner tag of uploads on an open server
_ACTIVE = (JobStatus.QUEUED, JobStatus.PROCESSING)
_KEPT_AS_IS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}  # other formats are stored as PNG
_CONCURRENCY_RETRY = 5


def _oriented_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of an image as decoding gives it (EXIF rotations swap the sides); None if unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except Exception:
        return None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def owner_tag(owner: str | None) -> str:
    return owner or OPEN_OWNER


def upload_key(owner: str | None, name: str) -> str:
    """A fresh storage key for an upload of ``owner``: ``uploads/<owner>-<uuid>/<name>``."""
    return f"{UPLOADS}/{owner_tag(owner)}-{uuid.uuid4()}/{name}"


class InputStager:
    """Turns a request's references into owner-scoped stored assets (see the module docstring)."""

    def __init__(self, settings: Settings, storage: Storage, store: JobStore, keys: ApiKeyStore) -> None:
        self.settings = settings
        self.storage = storage
        self.store = store
        self.keys = keys
        self._decodes = threading.BoundedSemaphore(settings.max_concurrent_decodes)

    # -- limits before work ---------------------------------------------------------------------

    def precheck(self, key: ApiKey | None, cost: float = 0.0, jobs: int = 0) -> None:
        """Refuse at once (429/402) what the key's concurrency or credits could not admit anyway."""
        if key is None or (key.concurrency is None and key.credits is None):
            return
        active = self.store.list(owner=key.id, any_owner=False, statuses=_ACTIVE, limit=100_000)
        if key.concurrency is not None and jobs and len(active) + jobs > key.concurrency:
            raise RateLimitedError(
                f"key {key.name!r} may have {key.concurrency} jobs queued or running at once and has "
                f"{len(active)}; retry when one finishes",
                retry_after=_CONCURRENCY_RETRY,
            )
        if key.credits is not None:
            left = key.credits - self.keys.spent(key.id) - sum(job.cost for job in active)
            if cost > left + 1e-9 or left <= 1e-9:
                raise InsufficientCreditsError(
                    f"this request costs {cost:g} credits; key {key.name!r} has {max(left, 0):g} left"
                )

    def price(self, request: GenerationRequest) -> float:
        return self.price_of(request.model, request.num_images)

    def price_of(self, model: str | None, images: int) -> float:
        """What ``images`` of ``model`` cost (an unknown model 0: it is refused elsewhere)."""
        try:
            variant = find_variant(model).id if model else None
        except KleinserveError:
            variant = None
        return self.settings.price_per_image.get(variant or "", 0.0) * images

    # -- staging --------------------------------------------------------------------------------

    def stage(self, requests: Sequence[GenerationRequest], key: ApiKey | None) -> builtins.list[GenerationRequest]:
        """``requests`` with every reference stored and replaced by its ``asset:`` reference."""
        owner = key.id if key else None
        if any(request.images for request in requests):  # work to do before admission: check first
            cost = sum(self.price(request) for request in requests)
            self.precheck(key, cost, len(requests))
        policy = InputPolicy.from_settings(self.settings, read_asset=None)
        sources = list(dict.fromkeys(source for request in requests for source in request.images))
        # Everything is read and checked before anything is stored: a refused request leaves nothing.
        budget = self.settings.max_request_image_bytes
        inline = [len(s) * 3 // 4 - 64 for s in sources if not s.strip().startswith(("http://", "https://", "asset:"))]
        if sum(inline) > budget:
            self._over_budget(len(sources) - 1)
        read: dict[str, bytes | str] = {}
        for index, source in enumerate(sources):
            text = source.strip()
            if text.startswith(ASSET_PREFIX):
                self.check_asset(text.removeprefix(ASSET_PREFIX), index, owner, policy.field)
                read[source] = text
                continue
            data = read_source(text, index, policy)  # the per-image cap, checked before decoding base64
            _check_header(data, index, policy)  # PNG, JPEG and WebP are stored undecoded: refuse by size now
            budget -= len(data)
            if budget < 0:
                self._over_budget(index)
            read[source] = data
        masks: dict[str, bytes | str] = {}
        for request in requests:
            if request.mask is not None and request.mask not in masks:
                masks[request.mask], size = self._read_mask(request.mask, owner, policy)
                budget -= size
                if budget < 0:
                    limit = self.settings.max_request_image_bytes
                    raise InvalidParameterError(
                        "mask", f"the request's images are over the limit of {limit} bytes in all"
                    )
            if request.mask is not None:
                self._check_mask_fits(masks[request.mask], read[request.images[0]])
        staged = {
            source: value if isinstance(value, str) else ASSET_PREFIX + self._store(value, index, owner, policy.field)
            for index, (source, value) in enumerate(read.items())
        }
        for source, value in masks.items():
            if not isinstance(value, str):
                stored = upload_key(owner, "mask.png")
                self.storage.put(stored, value, "image/png")
                staged_mask = ASSET_PREFIX + stored
            else:
                staged_mask = value
            masks[source] = staged_mask
        return [
            request.model_copy(
                update={
                    "images": [staged[s] for s in request.images],
                    **({"mask": masks[request.mask]} if request.mask is not None else {}),
                }
            )
            if request.images
            else request
            for request in requests
        ]

    def _read_mask(self, source: str, owner: str | None, policy: InputPolicy) -> tuple[bytes | str, int]:
        """A request's mask, checked (engine/masks.py): its bytes, or its ``asset:`` reference; and its size."""
        text = source.strip()
        if text.startswith(ASSET_PREFIX):
            key = text.removeprefix(ASSET_PREFIX)
            self.check_asset(key, None, owner, MASK_FIELD)
            data = self.storage.read(key)
            value: bytes | str = text
        else:
            data = read_source(text, None, replace(policy, field=MASK_FIELD))  # type: ignore[arg-type]
            value = data
        with self._decodes:
            decode_mask(data, policy)
        return value, len(data) if isinstance(value, bytes) else 0

    def _check_mask_fits(self, mask: bytes | str, image: bytes | str) -> None:
        """The mask must have the first image's size (as decoded: EXIF orientation applied)."""
        mask_size = _oriented_size(self._bytes_of(mask))
        image_size = _oriented_size(self._bytes_of(image))
        if mask_size is not None and image_size is not None:
            check_mask_size(mask_size, image_size)

    def _bytes_of(self, value: bytes | str) -> bytes:
        return value if isinstance(value, bytes) else self.storage.read(value.removeprefix(ASSET_PREFIX))

    def _over_budget(self, index: int) -> None:
        limit = self.settings.max_request_image_bytes
        raise InvalidParameterError(
            f"images[{index}]", f"the request's images are over the limit of {limit} bytes in all"
        )

    def _store(self, data: bytes, index: int, owner: str | None, field: str) -> str:
        """Keep ``data`` as it is when its header says PNG, JPEG or WebP; else decode it to PNG."""
        try:
            kind = Image.open(io.BytesIO(data)).format
        except Exception:
            kind = None
        suffix = _KEPT_AS_IS.get(kind or "")
        if suffix is None:  # another format, or not an image: decoding names the problem
            return self.store_upload(data, index, owner, field)
        key = upload_key(owner, "input" + suffix)
        self.storage.put(key, data, {".png": "image/png", ".jpg": "image/jpeg", ".webp": "image/webp"}[suffix])
        return key

    def store_upload(
        self, data: bytes, index: int | None, owner: str | None, field: str, size: tuple[int, int] | None = None
    ) -> str:
        """Check an uploaded image, decode it (bounded), resize it to ``size`` (width, height) if given,
        and keep it as PNG; return its storage key."""
        policy = InputPolicy.from_settings(self.settings, field=field)
        if len(data) > policy.max_bytes:
            raise InvalidImageError(
                index, f"is {len(data)} bytes, over the limit of {policy.max_bytes} bytes", field=field
            )
        with self._decodes:
            image = decode_image(data, index, policy)
            if size is not None and image.size != size:
                image = image.resize(size, Image.Resampling.LANCZOS)
            encoded = encode_image(image, OutputFormat.PNG, 100)
        key = upload_key(owner, "image.png")
        self.storage.put(key, encoded.data, encoded.media_type)
        return key

    # -- ownership ------------------------------------------------------------------------------

    def owns(self, key: str, owner: str | None) -> bool:
        """Whether ``key`` is a stored upload or result of ``owner`` (``None``: an open server's)."""
        parts = key.split("/")
        if len(parts) < 2:
            return False
        if parts[0] == UPLOADS:
            if parts[1].partition("-")[0] != owner_tag(owner):
                return False
        else:
            job = self.store.get(parts[0])
            if job is None or job.owner != owner:
                return False
        try:
            return self.storage.exists(key)
        except (KleinserveError, ValueError):  # not even a well-formed key
            return False

    def check_asset(self, key: str, index: int | None, owner: str | None, field: str = "images") -> None:
        """:class:`InvalidImageError` unless ``owner`` may use the asset ``key``: another key's asset
        gets the same answer as a missing one."""
        if not self.owns(key, owner):
            raise InvalidImageError(index, f"no such asset: {key}", field=field)


def _check_header(data: bytes, index: int, policy: InputPolicy) -> None:
    """Refuse an image too large to decode by its header (a file that does not open is left to decoding)."""
    try:
        opened = Image.open(io.BytesIO(data))
    except Exception:
        return
    check_header(opened, index, policy)
