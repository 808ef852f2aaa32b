"""The one size parser and number formatter (model/sizes.py)."""

from __future__ import annotations

import pytest

from model.sizes import format_bytes, format_number, format_significant, parse_size, size_arg


@pytest.mark.parametrize(
    "text, value",
    [("12GB", 12 * 10**9), ("800MB", 800 * 10**6), ("1.5GiB", int(1.5 * 2**30)), ("4096", 4096),
     (" 2 gb ", 2 * 10**9), ("512M", 512 * 10**6), ("200KiB", 200 * 1024), ("1,5GB", 15 * 10**8)],
)  # fmt: skip
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "lots", "12XB", "-1GB", "0", "GB", "1e9", "auto"])
def test_parse_size_rejects_garbage(text):
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


@pytest.mark.parametrize(
    "n, en, fr",
    [(26.3e9, "26.3 GB", "26,3 Go"), (281e6, "281 MB", "281 Mo"), (4100, "4.10 KB", "4,10 Ko"),
     (512, "512 B", "512 o"), (1.5e12, "1.50 TB", "1,50 To"), (999_999, "1.00 MB", "1,00 Mo")],
)  # fmt: skip
def test_format_bytes_three_significant_figures(n, en, fr):
    assert format_bytes(n) == en
    assert format_bytes(n, "fr") == fr


def test_numbers_follow_the_language():
    assert format_number(8192) == "8,192"
    assert format_number(8192, lang="fr") == "8\u202f192"
    assert format_number(6.75, 1, "fr") == "6,8"
    assert format_significant(0.05234) == "0.052"
    assert format_significant(153.2) == "150"
    assert format_significant(6.71, 2, "fr") == "6,7"


def test_size_arg_rounds_up():
    assert size_arg(7.31e9) == "7.4GB"
    assert parse_size(size_arg(7.31e9)) >= 7.31e9
