"""Default answerer: a deterministic keyword search over the packaged catalogue.

It needs no network, model or API key, so the service always has a working
assistant and tests get stable, reproducible answers.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import Any, Protocol

# Filler words of shopping requests; matching on them would rank everything.
_STOP_TEXT = """a an and any anything are below can do find for get i in is looking me my need of on
or please show some something than the to under want with"""
_STOP_WORDS = frozenset(_STOP_TEXT.split())
_WORD = re.compile(r"[^\W_]+")
# "under 100", "below €50", "less than 80 eur", "<100", "<= 99.5"
_PRICE_CAP = re.compile(
    r"(?:\b(?:under|below|less\s+than|cheaper\s+than|up\s+to)|<=?)\s*"
    r"(?:€\s*|eur(?:os?)?\s*)?(\d{1,9}(?:\.\d+)?)(?:\s*(?:€|eur(?:os?)?\b))?"
)
_WEIGHTS = {"name": 3, "tags": 2, "category": 2, "description": 1}
_ECHO_LIMIT = 80


class Answerer(Protocol):
    """Seam between the API and whatever produces answers (catalogue, LLM, ...)."""

    async def answer(self, query: str, context: dict[str, Any]) -> dict[str, Any]:
        """Return ``{"answer": str, "products": list[dict]}``; may raise on failure."""
        ...


@dataclass(frozen=True, slots=True)
class Product:
    """Immutable so the cached catalogue can be shared safely between answerers."""

    id: str
    name: str
    category: str
    price: float
    tags: tuple[str, ...] = ()
    description: str = ""

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Product:
        return cls(
            id=str(raw["id"]),
            name=str(raw["name"]),
            category=str(raw["category"]),
            price=float(raw["price"]),
            tags=tuple(str(t) for t in raw.get("tags", ())),
            description=str(raw.get("description", "")),
        )

    def to_dict(self) -> dict[str, Any]:
        """Only the fields clients display; tags are a search aid, not content."""
        return {
            "id": self.id,
            "name": self.name,
            "category": self.category,
            "price": self.price,
            "description": self.description,
        }


@cache
def load_catalogue() -> tuple[Product, ...]:
    """Read once per process: the file ships with the package and never changes."""
    text = files("app.assistant").joinpath("catalogue.json").read_text(encoding="utf-8")
    return tuple(Product.from_dict(item) for item in json.loads(text))


def _stem(word: str) -> str:
    """Crude plural folding, applied to both sides, so "shoes" meets "shoe"."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("ches", "shes", "sses", "xes", "zes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def _stems(text: str, *, drop_stop_words: bool = False) -> frozenset[str]:
    words = _WORD.findall(unicodedata.normalize("NFKC", text).casefold())
    if drop_stop_words:
        words = [w for w in words if w not in _STOP_WORDS]
    return frozenset(_stem(w) for w in words)


def _number(value: Any) -> float | None:
    """Context comes from clients: anything but a finite real number is ignored."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _text(value: Any) -> str | None:
    """Blank or non-string filters mean "no filter", never an error."""
    if not isinstance(value, str) or not value.strip():
        return None
    return value.strip().casefold()


class CatalogueAnswerer:
    """Deterministic keyword search over the packaged catalogue."""

    def __init__(self, products: list[Product] | None = None, max_results: int = 5) -> None:
        self._products = tuple(load_catalogue() if products is None else products)
        self._max_results = max(0, max_results)
        self._index = [
            (
                product,
                {
                    "name": _stems(product.name),
                    "tags": _stems(" ".join(product.tags)),
                    "category": _stems(product.category),
                    "description": _stems(product.description),
                },
            )
            for product in self._products
        ]

    async def answer(self, query: str, context: dict[str, Any]) -> dict[str, Any]:
        query = query if isinstance(query, str) else ""
        context = context if isinstance(context, dict) else {}
        products = self.search(query, context)
        return {"answer": _describe(query, products), "products": [p.to_dict() for p in products]}

    def search(self, query: str, context: dict[str, Any]) -> list[Product]:
        """Synchronous core, kept public so non-async callers can reuse the ranking."""
        caps = [float(m) for m in _PRICE_CAP.findall(query.casefold())]
        max_price = _number(context.get("max_price"))
        if max_price is None and caps:
            max_price = min(caps)
        min_price = _number(context.get("min_price"))
        category = _text(context.get("category"))
        terms = _stems(_PRICE_CAP.sub(" ", query), drop_stop_words=True)
        filtered = max_price is not None or min_price is not None or category is not None

        ranked: list[tuple[int, float, str, Product]] = []
        for product, fields in self._index:
            if max_price is not None and product.price > max_price:
                continue
            if min_price is not None and product.price < min_price:
                continue
            if category is not None and product.category.casefold() != category:
                continue
            score = sum(weight * len(terms & fields[field]) for field, weight in _WEIGHTS.items())
            # A filter-only query ("under 50") browses instead of matching nothing.
            if score > 0 or (not terms and filtered):
                ranked.append((-score, product.price, product.id, product))
        ranked.sort(key=lambda row: row[:3])
        return [row[3] for row in ranked[: self._max_results]]


def _describe(query: str, products: list[Product]) -> str:
    shown = " ".join(query.split())
    if len(shown) > _ECHO_LIMIT:
        shown = shown[: _ECHO_LIMIT - 1] + "…"
    if not products:
        return f"No products matched '{shown}'. Try a broader search."
    noun = "product" if len(products) == 1 else "products"
    listing = ", ".join(f"{p.name} (€{p.price:.2f})" for p in products)
    return f"Found {len(products)} {noun} for '{shown}': {listing}"
