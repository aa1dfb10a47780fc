"""Behaviour of the default catalogue answerer."""

from __future__ import annotations

import json
from typing import Any

import pytest

from app.assistant.answerer import Answerer, CatalogueAnswerer, Product, load_catalogue


def _ids(result: dict[str, Any]) -> list[str]:
    return [p["id"] for p in result["products"]]


@pytest.fixture
def answerer() -> CatalogueAnswerer:
    return CatalogueAnswerer()


@pytest.fixture
def tiny() -> CatalogueAnswerer:
    products = [
        Product("sku-b", "Red Shoe", "shoes", 50.0, ("red",), "A red shoe."),
        Product("sku-a", "Red Shoe", "shoes", 50.0, ("red",), "A red shoe."),
        Product("sku-c", "Red Shoe", "shoes", 20.0, ("red",), "A red shoe."),
        Product("sku-d", "Blue Hat", "hats", 10.0, ("blue",), "Has no red at all? It does."),
    ]
    return CatalogueAnswerer(products, max_results=10)


class TestPackagedCatalogue:
    def test_it_loads_dozens_of_products_across_many_categories(self) -> None:
        products = load_catalogue()
        assert len(products) >= 30
        assert len({p.category for p in products}) >= 6

    def test_every_product_has_a_unique_sku_id(self) -> None:
        ids = [p.id for p in load_catalogue()]
        assert len(ids) == len(set(ids))
        assert all(i.startswith("sku-") for i in ids)

    def test_every_product_has_a_positive_price_and_a_description(self) -> None:
        for product in load_catalogue():
            assert product.price > 0
            assert product.name and product.description and product.tags

    def test_the_default_answerer_satisfies_the_answerer_protocol(self) -> None:
        default: Answerer = CatalogueAnswerer()
        assert callable(default.answer)


class TestRanking:
    @pytest.mark.asyncio
    async def test_the_best_matching_product_comes_first(self, answerer: CatalogueAnswerer) -> None:
        result = await answerer.answer("red running shoes", {})
        assert _ids(result)[0] == "sku-sh-001"

    @pytest.mark.asyncio
    async def test_name_matches_outrank_description_only_matches(
        self, answerer: CatalogueAnswerer
    ) -> None:
        result = await answerer.answer("rain jacket", {})
        assert _ids(result)[0] == "sku-jk-001"

    @pytest.mark.asyncio
    async def test_results_are_capped_at_max_results(self) -> None:
        result = await CatalogueAnswerer(max_results=2).answer("red", {})
        assert len(result["products"]) == 2

    @pytest.mark.asyncio
    async def test_ties_are_broken_by_price_then_id(self, tiny: CatalogueAnswerer) -> None:
        result = await tiny.answer("red shoe", {})
        assert _ids(result) == ["sku-c", "sku-a", "sku-b", "sku-d"]

    @pytest.mark.asyncio
    async def test_products_expose_only_display_fields(self, answerer: CatalogueAnswerer) -> None:
        result = await answerer.answer("coffee", {})
        assert result["products"]
        for product in result["products"]:
            assert set(product) == {"id", "name", "category", "price", "description"}

    @pytest.mark.asyncio
    async def test_the_result_is_json_serialisable(self, answerer: CatalogueAnswerer) -> None:
        result = await answerer.answer("wireless headphones", {})
        assert json.loads(json.dumps(result)) == result

    @pytest.mark.asyncio
    async def test_the_answer_lists_product_names_with_euro_prices(
        self, answerer: CatalogueAnswerer
    ) -> None:
        result = await answerer.answer("red running shoes", {})
        assert result["answer"].startswith("Found 5 products for 'red running shoes': ")
        assert "Red Trail Running Shoes (€89.00)" in result["answer"]


class TestNormalisation:
    @pytest.mark.asyncio
    async def test_singular_and_plural_queries_find_the_same_products(
        self, answerer: CatalogueAnswerer
    ) -> None:
        singular = await answerer.answer("shoe", {})
        plural = await answerer.answer("shoes", {})
        assert _ids(singular) == _ids(plural) != []

    @pytest.mark.asyncio
    async def test_case_does_not_matter(self, answerer: CatalogueAnswerer) -> None:
        lower = await answerer.answer("wireless headphones", {})
        upper = await answerer.answer("WIRELESS HeadPhones", {})
        assert _ids(lower) == _ids(upper) != []

    @pytest.mark.asyncio
    async def test_stop_words_do_not_change_the_ranking(self, answerer: CatalogueAnswerer) -> None:
        bare = await answerer.answer("camping tent", {})
        chatty = await answerer.answer("I want to find a camping tent for me", {})
        assert _ids(bare) == _ids(chatty) != []

    @pytest.mark.asyncio
    async def test_the_same_query_twice_gives_an_identical_result(
        self, answerer: CatalogueAnswerer
    ) -> None:
        first = await answerer.answer("red", {"max_price": 100})
        second = await CatalogueAnswerer().answer("red", {"max_price": 100})
        assert first == second


class TestPriceFilters:
    @pytest.mark.asyncio
    async def test_max_price_from_context_excludes_dearer_products(
        self, answerer: CatalogueAnswerer
    ) -> None:
        result = await answerer.answer("laptop", {"max_price": 500})
        assert result["products"]
        assert all(p["price"] <= 500 for p in result["products"])

    @pytest.mark.asyncio
    async def test_min_price_from_context_excludes_cheaper_products(
        self, answerer: CatalogueAnswerer
    ) -> None:
        result = await answerer.answer("headphones", {"min_price": 100.0})
        assert result["products"]
        assert all(p["price"] >= 100 for p in result["products"])

    @pytest.mark.asyncio
    @pytest.mark.parametrize(
        "query", ["laptop under 500", "laptop below 500", "laptop <500", "laptop under €500"]
    )
    async def test_a_price_cap_in_the_query_is_honoured(
        self, answerer: CatalogueAnswerer, query: str
    ) -> None:
        result = await answerer.answer(query, {})
        assert _ids(result) == ["sku-lp-003", "sku-lp-004"]

    @pytest.mark.asyncio
    async def test_context_max_price_wins_over_the_query(self, answerer: CatalogueAnswerer) -> None:
        result = await answerer.answer("laptop under 500", {"max_price": 2000})
        assert len(result["products"]) == 5

    @pytest.mark.asyncio
    async def test_a_filter_only_query_browses_cheapest_first(
        self, answerer: CatalogueAnswerer
    ) -> None:
        result = await answerer.answer("show me something under 20", {"category": "phones"})
        assert _ids(result) == ["sku-ph-005"]

    @pytest.mark.asyncio
    async def test_a_filter_only_query_lists_all_cheap_products(
        self, answerer: CatalogueAnswerer
    ) -> None:
        result = await answerer.answer("under 20", {})
        prices = [p["price"] for p in result["products"]]
        assert prices and prices == sorted(prices) and max(prices) <= 20


class TestCategoryFilter:
    @pytest.mark.asyncio
    async def test_only_products_in_the_category_are_returned(
        self, answerer: CatalogueAnswerer
    ) -> None:
        result = await answerer.answer("red", {"category": "Kitchen"})
        assert _ids(result) == ["sku-kt-005"]

    @pytest.mark.asyncio
    async def test_an_unknown_category_matches_nothing(self, answerer: CatalogueAnswerer) -> None:
        result = await answerer.answer("red", {"category": "spaceships"})
        assert result["products"] == []


class TestNoMatch:
    @pytest.mark.asyncio
    async def test_an_unknown_word_returns_no_products_and_suggests_broadening(
        self, answerer: CatalogueAnswerer
    ) -> None:
        result = await answerer.answer("xyz", {})
        assert result == {
            "answer": "No products matched 'xyz'. Try a broader search.",
            "products": [],
        }

    @pytest.mark.asyncio
    async def test_a_too_strict_price_returns_no_products(
        self, answerer: CatalogueAnswerer
    ) -> None:
        result = await answerer.answer("laptop", {"max_price": 1})
        assert result["products"] == []
        assert result["answer"].startswith("No products matched 'laptop'")


class TestRobustness:
    @pytest.mark.asyncio
    @pytest.mark.parametrize(
        "query",
        [
            "",
            "   ",
            "👟🔥",
            "the a an for me",
            "x" * 2000,
            "red shoes " * 200,
            "under 99999999999999999999999",
            "<<<>>> %s {} \\ \x00",
            "ÇAFÉ ΣΊΣΥΦΟΣ 咖啡",
        ],
    )
    async def test_odd_queries_do_not_raise(self, answerer: CatalogueAnswerer, query: str) -> None:
        result = await answerer.answer(query, {})
        assert isinstance(result["answer"], str)
        assert isinstance(result["products"], list)
        json.dumps(result)

    @pytest.mark.asyncio
    async def test_a_long_query_is_shortened_in_the_answer(
        self, answerer: CatalogueAnswerer
    ) -> None:
        result = await answerer.answer("x" * 2000, {})
        assert len(result["answer"]) < 200

    @pytest.mark.asyncio
    @pytest.mark.parametrize(
        "context",
        [
            {"max_price": "100"},
            {"max_price": None, "min_price": [1]},
            {"max_price": True},
            {"max_price": float("nan"), "min_price": float("inf")},
            {"max_price": 10**400},
            {"category": 42},
            {"category": "   "},
            {"unrelated": object()},
        ],
    )
    async def test_context_values_of_the_wrong_type_are_ignored(
        self, answerer: CatalogueAnswerer, context: dict[str, Any]
    ) -> None:
        baseline = await answerer.answer("red shoes", {})
        result = await answerer.answer("red shoes", context)
        assert result == baseline

    @pytest.mark.asyncio
    async def test_a_non_dict_context_is_treated_as_empty(
        self, answerer: CatalogueAnswerer
    ) -> None:
        result = await answerer.answer("red shoes", None)  # type: ignore[arg-type]
        assert result == await answerer.answer("red shoes", {})
