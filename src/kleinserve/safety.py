"""The safety policy: which outputs are checked, what a flagged one becomes, and the stored verdict.

With ``--safety-checker MODEL`` (default ``off``) every output image is scored by an image
classifier (``engine/classifier.py``) before it is stored; an image whose ``nsfw`` score is at least
``--safety-threshold`` (default 0.85) is *flagged*, and ``--safety-policy`` decides what happens:

- ``flag``: the image is returned unchanged; the verdict is reported (Verda's
  ``X-Has-Nsfw-Content``, the job view's ``safety``);
- ``blur``: a flagged image is replaced by a heavily blurred version (pixelated to 1/32 of its size,
  then Gaussian-blurred) in the same format; the verdict is reported;
- ``refuse``: if any image of a job is flagged, the job fails with ``content_policy_violation``
  and no image is returned (a job's images are all or nothing, so no dialect has to describe a
  partial result).

Per request, a client may ask to skip the check (Verda ``enable_safety_checker: false``, 1min.ai
``disable_safety_checker: true``; canonically ``GenerationRequest.safety_check``); that is honoured
only with ``--safety-allow-disable``, so by default the operator's checker always runs. The scores
are stored with the job (:class:`SafetyReport`) whether it succeeded or was refused.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

from PIL import Image, ImageFilter
from pydantic import BaseModel, Field

from kleinserve.errors import ContentPolicyError

if TYPE_CHECKING:
    from kleinserve.generation import GenerationResult
    from kleinserve.request import GenerationRequest


class SafetyPolicy(StrEnum):
    """What happens to a flagged image."""

    FLAG = "flag"
    BLUR = "blur"
    REFUSE = "refuse"


class SafetyReport(BaseModel):
    """The safety checker's verdict on one job's images, stored with the job."""

    checker: str = Field(description="The classifier that scored the images.")
    policy: SafetyPolicy
    threshold: float
    scores: list[float] = Field(description="nsfw score of each image, 0 to 1, in output order.")
    flagged: list[bool] = Field(description="Whether each image scored at or over the threshold.")

    @property
    def any_flagged(self) -> bool:
        return any(self.flagged)


class Scorer(Protocol):
    """An image classifier: the ``nsfw`` probability of each image."""

    name: str

    def scores(self, images: Sequence[Image.Image]) -> list[float]: ...


def blurred(image: Image.Image) -> Image.Image:
    """``image`` made unrecognisable: pixelated to 1/32 of its size, scaled back, then blurred."""
    width, height = image.size
    small = image.convert("RGB").resize((max(1, width // 32), max(1, height // 32)), Image.Resampling.BOX)
    return small.resize((width, height), Image.Resampling.BILINEAR).filter(
        ImageFilter.GaussianBlur(radius=max(2, max(width, height) // 64))
    )


class SafetyChecker:
    """Applies the operator's safety policy to a finished generation (see the module docstring)."""

    def __init__(self, scorer: Scorer, policy: SafetyPolicy, threshold: float, *, allow_disable: bool = False) -> None:
        self.scorer = scorer
        self.policy = policy
        self.threshold = threshold
        self.allow_disable = allow_disable

    def wanted(self, request: GenerationRequest) -> bool:
        """Whether ``request``'s images are checked (a client may opt out only if the operator allows)."""
        return request.safety_check or not self.allow_disable

    def threshold_for(self, request: GenerationRequest) -> float:
        """The nsfw score at which ``request``'s images are flagged: the operator's threshold, moved by
        the request's ``safety_tolerance`` (BFL's 0-5 scale, 2 = the operator's threshold).

        0 and 1 are stricter (the threshold times 0.5 and 0.75); 3-5 are looser (a quarter, half and
        three quarters of the way from the threshold to 1), honoured only where the operator lets
        clients skip the checker altogether (``--safety-allow-disable``): else 3-5 mean 2.
        """
        tolerance = request.safety_tolerance
        if tolerance is None or tolerance == 2:
            return self.threshold
        if tolerance < 2:
            return self.threshold * (0.5, 0.75)[tolerance]
        if not self.allow_disable:
            return self.threshold
        return self.threshold + (1.0 - self.threshold) * (tolerance - 2) / 4

    def review(self, request: GenerationRequest, result: GenerationResult) -> SafetyReport | None:
        """Score ``result``'s images; blur flagged ones in place, or raise :class:`SafetyRefusal`."""
        if not self.wanted(request):
            return None
        from kleinserve.engine.images import encode_image  # late: keeps this module light to import

        images = [Image.open(io.BytesIO(encoded.data)) for encoded in result.images]
        scores = self.scorer.scores(images)
        threshold = self.threshold_for(request)
        report = SafetyReport(
            checker=self.scorer.name,
            policy=self.policy,
            threshold=threshold,
            scores=[round(score, 6) for score in scores],
            flagged=[score >= threshold for score in scores],
        )
        if self.policy is SafetyPolicy.REFUSE and report.any_flagged:
            raise SafetyRefusal(report)
        if self.policy is SafetyPolicy.BLUR:
            for index, flagged in enumerate(report.flagged):
                if flagged:
                    result.images[index] = encode_image(
                        blurred(images[index]),
                        request.output_format,
                        request.quality,
                        result.metadata(index, request.prompt),
                    )
        return report


class SafetyRefusal(ContentPolicyError):
    """A job's output was refused; carries the report so the scores are stored with the failed job."""

    def __init__(self, report: SafetyReport) -> None:
        worst = max(report.scores)
        count = sum(report.flagged)
        super().__init__(
            f"the safety checker flagged {count} of {len(report.scores)} image(s) (highest nsfw score "
            f"{worst:.3f}, threshold {report.threshold:g}); no image is returned"
        )
        self.report = report
