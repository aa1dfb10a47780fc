"""`.env.example` documents every setting the service reads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from app.config import Settings

EXAMPLE = (Path(__file__).resolve().parent.parent / ".env.example").read_text()


@pytest.mark.parametrize("name", [name.upper() for name in Settings.model_fields])
def test_every_setting_is_documented_in_the_env_example(name: str) -> None:
    assert re.search(rf"^#? ?{name}=", EXAMPLE, re.MULTILINE), f"{name} is not in .env.example"
