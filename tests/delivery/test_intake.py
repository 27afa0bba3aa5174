"""Reading ``Prefer: respond-async`` (RFC 7240) and what is forwarded after honouring it."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from proxy.delivery.intake import drop_respond_async, wants_async


@pytest.mark.parametrize(
    "values",
    [
        ["respond-async"],
        ["Respond-Async"],
        ["wait=10, respond-async"],
        ["return=minimal", "respond-async; x=1"],
    ],
)
def test_respond_async_is_found_in_any_prefer_value(values: list[str]) -> None:
    assert wants_async(CIMultiDict(("Prefer", v) for v in values))


@pytest.mark.parametrize(
    "values", [[], ["return=minimal"], ["respond-asynchronously"], ["wait=respond-async"]]
)
def test_other_preferences_are_not_respond_async(values: list[str]) -> None:
    assert not wants_async(CIMultiDict(("Prefer", v) for v in values))


def test_only_respond_async_is_dropped_before_forwarding() -> None:
    headers = CIMultiDict([("Prefer", "respond-async, wait=10"), ("Prefer", "return=minimal")])

    drop_respond_async(headers)

    assert headers.getall("Prefer") == ["wait=10, return=minimal"]
    alone = CIMultiDict([("Prefer", "respond-async")])
    drop_respond_async(alone)
    assert "Prefer" not in alone
