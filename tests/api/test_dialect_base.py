"""The dialect toolkit's pydantic-error mapper names the client's parameter, not pydantic's internals."""

from __future__ import annotations

import pytest

from kleinserve.api.dialects.base import parse_body
from kleinserve.api.dialects.openai import EditParams
from kleinserve.api.dialects.oxen_schema import OxenImageRequest
from kleinserve.errors import InvalidParameterError


@pytest.mark.parametrize(
    ("model", "body", "field"),
    [
        (EditParams, {"prompt": "x", "mask": 5}, "mask"),
        (EditParams, {"prompt": "x", "image_url": 5}, "image_url"),
        (OxenImageRequest, {"model": "m", "prompt": "x", "input_image": 5}, "input_image"),
        (OxenImageRequest, {"model": "m", "prompt": "x", "input_image": [5]}, "input_image"),
    ],
)
def test_a_wrong_type_in_a_union_field_names_the_field(model: type, body: dict, field: str) -> None:
    with pytest.raises(InvalidParameterError) as caught:
        parse_body(model, body)
    assert caught.value.field == field


def test_an_unknown_field_keeps_its_name_even_if_it_looks_like_a_type() -> None:
    with pytest.raises(InvalidParameterError) as caught:
        parse_body(EditParams, {"prompt": "x", "str": 1})
    assert caught.value.field == "str"
