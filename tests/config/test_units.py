"""Durations and sizes: parsing, rejection and the shortest-unit formatting used by `explain`."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from proxy.config.units import ByteSize, Duration, format_duration, format_size, parse_duration, parse_size

# --- durations ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("2s", 2.0),
        ("1m", 60.0),
        ("1h", 3600.0),
        ("0ms", 0.0),
        ("1.5s", 1.5),
        ("90m", 5400.0),
        (" 2s ", 2.0),
        ("2 s", 2.0),
        (2, 2.0),
        (0.5, 0.5),
        (0, 0.0),
    ],
)
def test_parse_duration_accepts_units_and_bare_numbers(text: object, seconds: float) -> None:
    parsed = parse_duration(text)
    assert isinstance(parsed, float)
    assert parsed == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [
        "5x",
        "1d",
        "2S",  # units are case-sensitive
        "1 hour",
        "ms",
        "",
        "2",  # a string needs a unit; only a YAML number may be bare
        "1e3s",
        "-1s",
        "--1s",
        None,
        [1],
        {"seconds": 1},
    ],
)
def test_parse_duration_rejects_bad_units(value: object) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(value)


@pytest.mark.parametrize("value", [-1, -0.25])
def test_parse_duration_rejects_negative_numbers(value: float) -> None:
    with pytest.raises(ValueError, match="cannot be negative"):
        parse_duration(value)


@pytest.mark.parametrize("value", [True, False])
def test_parse_duration_rejects_booleans(value: bool) -> None:
    # bool is an int subclass: `timeout: yes` in YAML must not become 1 second
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 10**400], ids=["nan", "inf", "huge-int"])
def test_parse_duration_rejects_non_finite_values(value: float) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.25, "250ms"),
        (2.0, "2s"),
        (60.0, "1m"),
        (3600.0, "1h"),
        (90.0, "90s"),
        (1.5, "1500ms"),
        (7200.0, "2h"),
        (25 * 3600.0, "25h"),
        (0.0, "0ms"),
    ],
)
def test_format_duration_uses_the_largest_exact_unit(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(millis=st.integers(min_value=0, max_value=10**10))
def test_duration_round_trip(millis: int) -> None:
    text = format_duration(millis / 1000)
    parsed = parse_duration(text)
    assert round(parsed * 1000) == millis
    assert parsed == pytest.approx(millis / 1000, rel=1e-12, abs=1e-12)
    assert format_duration(parsed) == text


@given(
    amount=st.integers(min_value=0, max_value=10**6),
    unit=st.sampled_from([("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)]),
)
def test_every_unit_parses_to_seconds(amount: int, unit: tuple[str, float]) -> None:
    suffix, factor = unit
    assert parse_duration(f"{amount}{suffix}") == pytest.approx(amount * factor)


# --- sizes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512KiB", 512 * 1024),
        ("1MiB", 1024**2),
        ("1GiB", 1024**3),
        ("10B", 10),
        ("0B", 0),
        (" 64KiB ", 64 * 1024),
        (4096, 4096),
        (0, 0),
    ],
)
def test_parse_size_accepts_units_and_bare_ints(text: object, size: int) -> None:
    parsed = parse_size(text)
    assert isinstance(parsed, int)
    assert parsed == size


@pytest.mark.parametrize(
    "value",
    ["10XB", "1MB", "1KB", "1mib", "1.5MiB", "1 TiB", "", "1024", "-1KiB", 1.5, None, [1]],
)
def test_parse_size_rejects_bad_units(value: object) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(value)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_parse_size_rejects_non_finite_values(value: float) -> None:
    # sizes are integers, so YAML's .nan/.inf (floats) never reach arithmetic
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(value)


def test_parse_size_rejects_negative_ints() -> None:
    with pytest.raises(ValueError, match="cannot be negative"):
        parse_size(-5)


@pytest.mark.parametrize("value", [True, False])
def test_parse_size_rejects_booleans(value: bool) -> None:
    with pytest.raises(ValueError, match="expected a size"):
        parse_size(value)


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0B"),
        (1, "1B"),
        (1536, "1536B"),
        (1024, "1KiB"),
        (1024 * 1024, "1MiB"),
        (1024 * 1024 * 3, "3MiB"),
        (1024**3 * 2, "2GiB"),
        (1024**3 + 1024, "1048577KiB"),
    ],
)
def test_format_size_uses_the_largest_exact_unit(size: int, text: str) -> None:
    assert format_size(size) == text


@given(size=st.integers(min_value=0, max_value=2**63))
def test_size_round_trip(size: int) -> None:
    text = format_size(size)
    assert parse_size(text) == size
    assert format_size(parse_size(text)) == text


# --- the pydantic annotated types used by the models --------------------------------------------


class _Sample(BaseModel):
    timeout: Duration
    limit: ByteSize


def test_annotated_types_parse_and_serialise_back_to_units() -> None:
    sample = _Sample.model_validate({"timeout": "1500ms", "limit": "2MiB"})
    assert sample.timeout == pytest.approx(1.5)
    assert sample.limit == 2 * 1024 * 1024
    assert sample.model_dump() == {"timeout": pytest.approx(1.5), "limit": 2 * 1024 * 1024}
    assert sample.model_dump(mode="json") == {"timeout": "1500ms", "limit": "2MiB"}


def test_annotated_types_report_unit_errors_as_validation_errors() -> None:
    with pytest.raises(ValidationError) as caught:
        _Sample.model_validate({"timeout": "5x", "limit": "1MB"})
    errors = {err["loc"]: err["msg"] for err in caught.value.errors()}
    assert set(errors) == {("timeout",), ("limit",)}
    assert "invalid duration '5x'" in errors[("timeout",)]
    assert "invalid size '1MB'" in errors[("limit",)]
