"""The LoRA adapters an operator offers, and how requests name them (torch-free).

``--lora NAME=PATH_OR_HUB_ID`` offers one adapter; ``--lora DIR`` offers every ``.safetensors`` file in a
directory under its file name (without the suffix); ``--lora FILE.safetensors`` offers one file under its
stem. A hub id may name a file inside the repo as ``owner/repo/file.safetensors``. Loading, caching and
activating them is engine/lora.py's business; this module only knows names and sources, so the API
process can list them and refuse unknown ones without importing torch.

Requests name adapters with scales: ``loras: [{"name": ..., "scale": 0.8}]`` in the Oxen and OpenAI
bodies (OpenAI clients pass it through ``extra_body``), or the ``X-Kleinserve-Loras`` header
(``name=0.8, other``; a missing scale is 1.0) for every dialect.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from kleinserve.errors import InvalidParameterError

LORA_HEADER = "X-Kleinserve-Loras"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass(frozen=True)
class LoraSource:
    """One offered adapter: the name requests use and where its weights are."""

    name: str
    source: str  # a local file or directory, or a hub repo id (optionally /file.safetensors)

    @property
    def local(self) -> bool:
        return Path(self.source).expanduser().exists()


def _checked_name(name: str, origin: str) -> str:
    if not _NAME.match(name):
        raise InvalidParameterError(
            "lora", f"{name!r} (from {origin}) is not a usable adapter name: letters, digits, '.', '_', '-'"
        )
    return name


def parse_lora_options(values: Iterable[str]) -> dict[str, LoraSource]:
    """The adapters ``--lora`` values offer, by name; a clear error for anything unusable."""
    offered: dict[str, LoraSource] = {}

    def add(name: str, source: str, origin: str) -> None:
        if name in offered:
            raise InvalidParameterError("lora", f"adapter name {name!r} is given twice ({origin})")
        offered[name] = LoraSource(_checked_name(name, origin), source)

    for raw in values:
        text = raw.strip()
        if not text:
            continue
        name, sep, source = text.partition("=")
        if sep:
            if not source.strip():
                raise InvalidParameterError("lora", f"{text!r} has nothing after '='")
            add(name.strip(), source.strip(), text)
            continue
        path = Path(text).expanduser()
        if path.is_dir():
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise InvalidParameterError("lora", f"{path} holds no .safetensors files")
            for file in files:
                add(file.stem, str(file), str(path))
        elif path.is_file():
            add(path.stem, str(path), text)
        else:
            raise InvalidParameterError(
                "lora", f"{text!r} is neither NAME=PATH_OR_HUB_ID, an existing directory nor a .safetensors file"
            )
    return offered


def parse_lora_header(text: str) -> list[dict[str, object]]:
    """``name=0.8, other`` -> ``[{"name": "name", "scale": 0.8}, {"name": "other", "scale": 1.0}]``."""
    choices: list[dict[str, object]] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, scale = item.partition("=")
        value: object = 1.0
        if sep:
            try:
                value = float(scale)
            except ValueError:
                raise InvalidParameterError(
                    "loras", f"scale {scale.strip()!r} of {name.strip()!r} is not a number"
                ) from None
        choices.append({"name": name.strip(), "scale": value})
    return choices


def check_choices(names: Iterable[str], offered: Iterable[str]) -> None:
    """Refuse (400) an adapter this server does not offer, naming it and what is offered."""
    known = sorted(offered)
    for name in names:
        if name not in known:
            listing = ", ".join(known) if known else "none are configured (start with --lora NAME=PATH)"
            raise InvalidParameterError("loras", f"unknown LoRA adapter {name!r}; this server offers: {listing}")
