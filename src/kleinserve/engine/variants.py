"""The FLUX.2 [klein] variants kleinserve knows, their defaults, and every provider's name for them.

A variant is what a request names; which weights serve it is decided separately (weights.py), so a
local directory can serve ``flux-2-klein-4b`` under that variant's defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kleinserve.errors import UnknownModelError


@dataclass(frozen=True)
class Variant:
    """One FLUX.2 [klein] model: identity, defaults and the facts a user needs to run it."""

    id: str
    display_name: str
    repo_id: str
    distilled: bool
    default_steps: int
    default_guidance: float
    parameters: str
    text_encoder: str
    license: str
    license_url: str
    gated: bool
    vram_note: str
    # Hidden-state layers of the text encoder that make the prompt embedding (klein taps 9, 18, 27).
    text_encoder_layers: tuple[int, ...] = (9, 18, 27)
    aliases: tuple[str, ...] = field(default=())
    # Reference tokens' keys/values computed at step 0 and reused (only klein 9B-KV was trained for it).
    kv_cache: bool = False

    @property
    def uses_cfg(self) -> bool:
        """Whether guidance means true classifier-free guidance (undistilled Base variants)."""
        return not self.distilled

    def all_names(self) -> tuple[str, ...]:
        """The id followed by every alias."""
        return (self.id, *self.aliases)


_APACHE = ("Apache-2.0", "https://www.apache.org/licenses/LICENSE-2.0")
_NONCOMMERCIAL = (
    "FLUX Non-Commercial License",
    "https://huggingface.co/black-forest-labs/FLUX.2-klein-9B/blob/main/LICENSE.md",
)


def _aliases(size: str, base: bool, suffix: str = "") -> tuple[str, ...]:
    """Every provider spelling of one variant (Oxen, 1min.ai/AIgateway, Verda, the hub repo)."""
    stem = f"flux-2-klein-{'base-' if base else ''}{size.lower()}{suffix}"
    verda = f"flux2-klein-{'base-' if base else ''}{size.lower()}{suffix}"
    repo = f"black-forest-labs/FLUX.2-klein-{'base-' if base else ''}{size}{suffix}"
    return (f"black-forest-labs-{stem}", f"black-forest-labs/{stem}", verda, repo)


VARIANTS: tuple[Variant, ...] = (
    Variant(
        id="flux-2-klein-4b",
        display_name="FLUX.2 [klein] 4B",
        repo_id="black-forest-labs/FLUX.2-klein-4B",
        distilled=True,
        default_steps=4,
        default_guidance=1.0,
        parameters="4B",
        text_encoder="Qwen3-4B",
        license=_APACHE[0],
        license_url=_APACHE[1],
        gated=False,
        vram_note="about 17.6 GB in bf16 (computed; kleinserve models --plan); 8.3 GB with model offload",
        aliases=_aliases("4B", base=False),
    ),
    Variant(
        id="flux-2-klein-9b",
        display_name="FLUX.2 [klein] 9B",
        repo_id="black-forest-labs/FLUX.2-klein-9B",
        distilled=True,
        default_steps=4,
        default_guidance=1.0,
        parameters="9B",
        text_encoder="Qwen3-8B",
        license=_NONCOMMERCIAL[0],
        license_url=_NONCOMMERCIAL[1],
        gated=True,
        vram_note="about 36.3 GB in bf16 (computed; kleinserve models --plan); 18.9 GB with model offload",
        aliases=_aliases("9B", base=False),
    ),
    Variant(
        id="flux-2-klein-base-4b",
        display_name="FLUX.2 [klein] Base 4B",
        repo_id="black-forest-labs/FLUX.2-klein-base-4B",
        distilled=False,
        default_steps=50,
        default_guidance=4.0,
        parameters="4B",
        text_encoder="Qwen3-4B",
        license=_APACHE[0],
        license_url=_APACHE[1],
        gated=False,
        vram_note="about 17.6 GB in bf16 (computed); CFG doubles the transformer work per step",
        aliases=_aliases("4B", base=True),
    ),
    Variant(
        id="flux-2-klein-base-9b",
        display_name="FLUX.2 [klein] Base 9B",
        repo_id="black-forest-labs/FLUX.2-klein-base-9B",
        distilled=False,
        default_steps=50,
        default_guidance=4.0,
        parameters="9B",
        text_encoder="Qwen3-8B",
        license=_NONCOMMERCIAL[0],
        license_url=_NONCOMMERCIAL[1].replace("klein-9B", "klein-base-9B"),
        gated=True,
        vram_note="about 36.3 GB in bf16 (computed); CFG doubles the transformer work per step",
        aliases=_aliases("9B", base=True),
    ),
    Variant(
        id="flux-2-klein-9b-kv",
        display_name="FLUX.2 [klein] 9B-KV",
        repo_id="black-forest-labs/FLUX.2-klein-9b-kv",
        distilled=True,
        default_steps=4,
        default_guidance=1.0,
        parameters="9B",
        text_encoder="Qwen3-8B",
        license=_NONCOMMERCIAL[0],
        license_url=_NONCOMMERCIAL[1].replace("klein-9B", "klein-9b-kv"),
        gated=True,
        vram_note="about 29 GB in bf16, plus the cached reference keys/values; less with CPU offload",
        # The hub spells this repo in lower case; lookups ignore case, so FLUX.2-klein-9B-KV works too.
        aliases=tuple(alias.replace("9B-kv", "9b-kv") for alias in _aliases("9B", base=False, suffix="-kv")),
        kv_cache=True,
    ),
)

DEFAULT_VARIANT_ID = "flux-2-klein-4b"

_BY_NAME: dict[str, Variant] = {name.lower(): variant for variant in VARIANTS for name in variant.all_names()}


def variant_ids() -> list[str]:
    """The canonical ids of all known variants."""
    return [v.id for v in VARIANTS]


def find_variant(name: str) -> Variant:
    """The variant called ``name`` in any provider's spelling (case-insensitive).

    Raises :class:`UnknownModelError`, listing the known ids, for anything else.
    """
    variant = _BY_NAME.get(name.strip().lower())
    if variant is None:
        raise UnknownModelError(name, variant_ids())
    return variant
