"""app/ uses only what FastAPI, Starlette, uvicorn, SQLAlchemy and asyncpg document: an
import of one of their private modules (a `_`-prefixed name anywhere in its path) or of a
module their documentation does not name for users fails the suite, as does a `_`-prefixed
name imported from them or read off one of their modules. Such internals change in any
release without notice, and pyproject.toml's ranges say only what the documented surface
was tested at."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[1] / "app"

# The modules each library's documentation names for its users' imports; a module not
# listed here may be added once its documentation is found to name it.
DOCUMENTED = {
    "fastapi": {
        "fastapi",
        "fastapi.encoders",
        "fastapi.exceptions",
        "fastapi.responses",
        "fastapi.routing",  # APIRoute: "Custom Request and APIRoute class"
        "fastapi.security",
    },
    "starlette": {
        "starlette.applications",
        "starlette.exceptions",
        "starlette.requests",
        "starlette.responses",
        "starlette.routing",
        "starlette.types",  # "Pure ASGI Middleware"
    },
    "uvicorn": {"uvicorn"},  # uvicorn.run, Config, Server
    "sqlalchemy": {
        "sqlalchemy",
        "sqlalchemy.dialects",
        "sqlalchemy.dialects.postgresql",
        "sqlalchemy.dialects.sqlite",
        "sqlalchemy.engine",
        "sqlalchemy.exc",
        "sqlalchemy.ext.asyncio",
        "sqlalchemy.orm",
    },
    "asyncpg": {"asyncpg"},
}


def problems(source: str) -> list[str]:
    """What `source` imports or reads of the libraries beyond their documented surface."""
    found: list[str] = []
    modules: set[str] = set()  # local names bound to a guarded module
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found += _module_problems(alias.name)
                if _guarded(alias.name):
                    modules.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += _module_problems(node.module)
            if _guarded(node.module):
                for alias in node.names:
                    if alias.name.startswith("_"):
                        found.append(f"{node.module}.{alias.name}: a private name")
                    elif f"{node.module}.{alias.name}" in _all_documented():
                        modules.add(alias.asname or alias.name)
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.append(f"{node.value.id}.{node.attr}: a private name")
    return found


def _guarded(module: str) -> bool:
    return module.split(".")[0] in DOCUMENTED


def _all_documented() -> set[str]:
    return set().union(*DOCUMENTED.values())


def _module_problems(module: str) -> list[str]:
    if not _guarded(module):
        return []
    if any(part.startswith("_") for part in module.split(".")):
        return [f"{module}: a private module"]
    if module not in DOCUMENTED[module.split(".")[0]]:
        return [f"{module}: not a module the library documents"]
    return []


@pytest.mark.parametrize(
    "path", sorted(APP.rglob("*.py")), ids=lambda path: str(path.relative_to(APP.parent))
)
def test_the_module_uses_only_the_libraries_documented_surface(path: Path) -> None:
    assert problems(path.read_text()) == []


class TestTheCheckItself:
    @pytest.mark.parametrize(
        "source",
        [
            "from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol",
            "import asyncpg.protocol",
            "from asyncpg import _testbase",
            "from sqlalchemy.engine import _py_row",
            "import starlette._utils",
            "from fastapi import _compat",
            "from fastapi.dependencies.utils import solve_dependencies",
            "import sqlalchemy as sa\nsa._some_internal",
            "from sqlalchemy import orm\norm._private",
        ],
    )
    def test_an_internal_is_caught(self, source: str) -> None:
        assert problems(source)

    def test_documented_imports_pass(self) -> None:
        source = (
            "import asyncpg\nimport sqlalchemy as sa\nfrom fastapi import FastAPI\n"
            "from sqlalchemy.ext.asyncio import AsyncEngine\nfrom starlette.types import Scope\n"
            "sa.__version__\n"
        )
        assert problems(source) == []
