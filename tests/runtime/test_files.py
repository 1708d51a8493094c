"""The run's file helpers: atomic writes, JSON-lines records, strict JSON."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch

from lvm.runtime.errors import DataError
from lvm.runtime.files import atomic_write_text, read_jsonl, strict_json


def test_jsonl_rows_in_order_and_a_missing_file_has_none(tmp_path):
    path = tmp_path / "events.jsonl"
    assert read_jsonl(path) == []
    path.write_text('{"step": 1}\n\n{"step": 2, "kind": "rollback"}\n')
    assert read_jsonl(path) == [{"step": 1}, {"step": 2, "kind": "rollback"}]


def test_jsonl_last_line_cut_by_a_kill_is_left_out_with_a_warning(tmp_path, caplog):
    path = tmp_path / "events.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "ki')
    with caplog.at_level(logging.WARNING):
        assert read_jsonl(path) == [{"step": 1}]
    assert "events.jsonl" in caplog.text and "cut short" in caplog.text


@pytest.mark.parametrize("bad", ['{"step": 2, "ki', "[1, 2]", "3"])
def test_jsonl_bad_line_before_the_end_names_file_and_line(tmp_path, bad):
    path = tmp_path / "events.jsonl"
    path.write_text(f'{{"step": 1}}\n{bad}\n{{"step": 3}}\n')
    with pytest.raises(DataError, match=r"events\.jsonl: line 2 is not a JSON object"):
        read_jsonl(path)


def test_jsonl_complete_last_line_that_is_not_an_object_is_an_error(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "ki\n')  # ends with its newline: written whole, not cut
    with pytest.raises(DataError, match="line 2"):
        read_jsonl(path)


def test_strict_json_nan_and_inf_are_null_and_scalars_are_python_numbers():
    obj = {"a": float("nan"), "b": [np.float32(0.5), torch.tensor(2), -math.inf], 3: (1, "x")}
    out = strict_json(obj)
    assert out == {"a": None, "b": [0.5, 2, None], "3": [1, "x"]}
    json.dumps(out, allow_nan=False)


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
