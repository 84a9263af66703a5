"""The README's published tables and commands agree with the code."""

from __future__ import annotations

import re
from pathlib import Path

from kleinserve.engine.variants import VARIANTS
from kleinserve.request import ASPECT_RATIOS, MEGAPIXELS, size_for_aspect_ratio

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_aspect_ratio_table_matches_the_code() -> None:
    rows = dict(re.findall(r"^\| (\d+:\d+) \| (\d+x\d+ \|.*)$", README, re.M))
    assert set(rows) == set(ASPECT_RATIOS)
    for ratio, cells in rows.items():
        published = [cell.strip() for cell in cells.strip(" |").split("|")]
        assert published == ["{}x{}".format(*size_for_aspect_ratio(ratio, m)) for m in MEGAPIXELS], ratio


def test_model_table_matches_the_registry() -> None:
    for variant in VARIANTS:
        row = re.search(rf"^\| `{variant.id}` \| `{re.escape(variant.repo_id)}` \| (\d+) / ([\d.]+)", README, re.M)
        assert row, variant.id
        assert (int(row.group(1)), float(row.group(2))) == (variant.default_steps, variant.default_guidance)


def test_names_the_two_commands() -> None:
    assert "./scripts/serve" in README and "./scripts/test" in README


def test_python_examples_import_what_they_name() -> None:
    """Each ``from X import Y`` in the README's Python blocks works with the installed clients."""
    import importlib
    import importlib.util

    blocks = re.findall(r"^```python\n(.*?)^```", README, re.M | re.S)
    imports = [m for block in blocks for m in re.findall(r"^from ([\w.]+) import (\w+)", block, re.M)]
    assert imports
    for module, name in imports:
        if importlib.util.find_spec(module.split(".")[0]) is None:
            continue  # e.g. flask in the webhook receiver: not a test dependency
        assert hasattr(importlib.import_module(module), name), f"from {module} import {name}"
