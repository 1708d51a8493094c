"""Markdown tables and number formatting (lvm/runtime/tables.py), shared by every report lvm writes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lvm.runtime.tables import fmt, md_header, md_row, md_table


@pytest.mark.parametrize(
    ("value", "digits", "text"),
    [
        (0.5, 3, "0.500"),
        (12.0, 3, "12.000"),
        (1 / 3, 4, "0.3333"),
        (2 / 3, 3, "0.667"),
        (-0.25, 3, "-0.250"),
        (-2 / 3, 2, "-0.67"),
        (0.987654, 1, "1.0"),
        (np.float64(0.75), 2, "0.75"),  # a numpy float64 is a float
        (3, 3, "3"),  # integers as they are: counts, epochs, peak offsets
        (-4, 3, "-4"),
        ("ok", 3, "ok"),
    ],
)
def test_fmt_numbers(value, digits, text):
    assert fmt(value, digits) == text


def test_fmt_default_digits_is_three():
    assert fmt(0.1) == "0.100" and fmt(-1.23456) == "-1.235"


@pytest.mark.parametrize("missing", [None, math.nan, float("nan"), np.float64("nan")])
def test_fmt_missing_is_na(missing):
    assert fmt(missing) == "n/a" and fmt(missing, 5) == "n/a"


def test_fmt_booleans_read_yes_no():
    # bool is an int subclass: it must not come out as "True" or "1".
    assert (fmt(True), fmt(False)) == ("yes", "no")


def test_md_row():
    assert md_row(["a", "b"]) == "| a | b |"
    assert md_row(["only"]) == "| only |"
    assert md_row(["", "x", ""]) == "|  | x |  |"


def test_md_header():
    assert md_header(["x", "y", "z"]) == ["| x | y | z |", "| --- | --- | --- |"]
    assert md_header(["a"]) == ["| a |", "| --- |"]
    assert md_header(("p", "q")) == ["| p | q |", "| --- | --- |"]  # any sequence


def test_md_table_lines():
    rows = [["val", fmt(0.123456), fmt(7)], ["ood", fmt(None), fmt(-0.5, 2)]]
    assert md_table(["split", "cos", "n"], rows) == [
        "| split | cos | n |",
        "| --- | --- | --- |",
        "| val | 0.123 | 7 |",
        "| ood | n/a | -0.50 |",
    ]


def test_md_table_without_rows_is_its_header():
    assert md_table(["a", "b"], []) == ["| a | b |", "| --- | --- |"]


def test_every_line_of_a_table_has_the_same_columns():
    columns = ["metric", "model", "oracle", "copy-last"]
    rows = [[f"m{i}", *(fmt(i / 7 - j) for j in range(3))] for i in range(5)]
    lines = md_table(columns, rows)
    assert len(lines) == 2 + len(rows)
    assert {line.count("|") for line in lines} == {len(columns) + 1}
    cells = [line.strip("|").split("|") for line in lines]
    assert [c.strip() for c in cells[2]] == ["m0", "0.000", "-1.000", "-2.000"]
    assert [c.strip() for c in cells[-1]] == ["m4", "0.571", "-0.429", "-1.429"]
