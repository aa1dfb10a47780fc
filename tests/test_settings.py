"""`.env.example` documents every setting the service reads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from app.config import Settings
from app.db.engine import masked_url

EXAMPLE = (Path(__file__).resolve().parent.parent / ".env.example").read_text()


@pytest.mark.parametrize("name", [name.upper() for name in Settings.model_fields])
def test_every_setting_is_documented_in_the_env_example(name: str) -> None:
    assert re.search(rf"^#? ?{name}=", EXAMPLE, re.MULTILINE), f"{name} is not in .env.example"


def test_a_logged_database_url_shows_no_password_in_either_place() -> None:
    shown = masked_url("postgresql+asyncpg://app:s3cret@db/assistant?password=other&ssl=require")
    assert "s3cret" not in shown and "other" not in shown
    assert shown.startswith("postgresql+asyncpg://app:***@db/assistant?")
