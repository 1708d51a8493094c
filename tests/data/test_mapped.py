"""Store directories: written in blocks, mapped on open, equal to the in-RAM store; bad files get one line."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch

from lvm.data import mapped
from lvm.data.convert import synthetic_blocks, write_npz
from lvm.data.loaders import load_splits
from lvm.data.mapped import StoreWriter, open_store
from lvm.data.store import ArticleStore
from lvm.data.synthetic import synthetic_corpus
from lvm.runtime.errors import DataError
from tests.helpers import P6

SYN = {"dim": 16, "articles": 40, "min_chunks": 8, "max_chunks": 20, "topic_weight": 1.0, "drift_weight": 1.0,
       "drift_step": 0.5, "noise": 1.2, "seed": 3, "common_weight": 0.0}  # fmt: skip


def write(path, dtype="float32", block_articles=40, settings=SYN):
    with StoreWriter(path, settings["dim"], dtype) as w:
        for block in synthetic_blocks(settings, block_articles):
            w.add(*block)
    return path


def data_cfg(**over):
    return {"source": "synthetic", "path": None, "normalize": "error", "split": {"val": 0.2, "ood": 0.1, "seed": 0, "ranges": None},
            "synthetic": SYN, **over}  # fmt: skip


def test_one_block_store_is_the_in_ram_corpus(tmp_path):
    path = write(tmp_path / "s")
    store = open_store(path)
    vectors, art, chunk = synthetic_corpus(**SYN)
    assert torch.equal(store.take(np.arange(len(store))), torch.from_numpy(vectors))
    assert np.array_equal(store.article_ids, art) and np.array_equal(store.chunk_indices, chunk)
    ram, disk = load_splits(data_cfg(), P6), load_splits(data_cfg(source="store", path=str(path), memory="map"), P6)
    for name in ram:
        assert len(ram[name]) == len(disk[name]) > 0
        idx = torch.arange(len(ram[name]))
        for key, value in ram[name].gather(idx).items():
            assert torch.equal(value, disk[name].gather(idx)[key])


def test_blocks_add_articles_and_runs_not_windows(tmp_path):
    store = open_store(write(tmp_path / "s", block_articles=7))
    assert store.num_articles == 40 and len(store.run_start) == 41  # O(articles) layout
    assert store.unique_articles().tolist() == list(range(40))
    lengths = [len(v) for v, _, _ in synthetic_blocks(SYN, 7)]
    assert len(store) == sum(lengths)
    maps = open("/proc/self/maps").read()
    assert str(tmp_path / "s" / "vectors.bin") in maps  # mapped, not read into anonymous memory


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_storage_reads_as_float32_close_to_the_original(tmp_path, dtype):
    store = open_store(write(tmp_path / "s", dtype))
    full = synthetic_corpus(**SYN)[0]
    got = store.take(np.arange(len(store)))
    assert got.dtype == torch.float32 and store.vectors.element_size() == 2
    assert (tmp_path / "s" / "vectors.bin").stat().st_size == len(store) * 16 * 2
    assert np.abs(got.numpy() - full).max() < (1e-3 if dtype == "float16" else 8e-3)
    assert store.windows(P6).gather([0, 1])["context"].dtype == torch.float32


def test_npz_and_back(tmp_path):
    path = write(tmp_path / "s")
    write_npz(path, tmp_path / "back.npz")
    z = np.load(tmp_path / "back.npz")
    again = ArticleStore(z["vectors"], z["article_indices"], z["chunk_indices"])
    store = open_store(path)
    assert torch.equal(again.vectors, store.take(np.arange(len(store))))
    assert np.array_equal(again.run_start, store.run_start)


def test_gaps_survive_as_runs(tmp_path):
    v = np.eye(8, dtype=np.float32)[:7]
    with StoreWriter(tmp_path / "g", 8) as w:
        w.add(v, [5, 5, 5, 5, 5, 9, 9], [0, 1, 2, 4, 5, 0, 1])
    store = open_store(tmp_path / "g")
    assert store.chunk_indices.tolist() == [0, 1, 2, 4, 5, 0, 1] and store.num_articles == 2 and len(store.run_start) == 4


def test_unfinished_build_is_refused_then_started_over(tmp_path):
    path = tmp_path / "s"
    with pytest.raises(RuntimeError):
        with StoreWriter(path, SYN["dim"]) as w:
            w.add(*next(synthetic_blocks(SYN, 5)))
            raise RuntimeError("killed")
    assert (path / "vectors.bin").exists() and not (path / "manifest.json").exists()
    with pytest.raises(DataError, match=r"no manifest.json: not a complete store"):
        open_store(path)
    write(path)  # starts over
    assert len(open_store(path)) == len(synthetic_corpus(**SYN)[0])
    with pytest.raises(DataError, match="a complete store is already here"):
        StoreWriter(path, SYN["dim"])


def test_writer_rejects_bad_rows(tmp_path):
    with StoreWriter(tmp_path / "a", 4) as w:
        with pytest.raises(DataError, match=r"row 1 .* does not follow"):
            w.add(np.eye(4, dtype=np.float32)[:2], [1, 1], [3, 3])
        bad = np.eye(4, dtype=np.float32)[:2].copy()
        bad[1, 0] = np.nan
        with pytest.raises(DataError, match="row 1 holds NaN"):
            w.add(bad, [0, 0], [0, 1])
        w.add(np.eye(4, dtype=np.float32)[:2], [0, 0], [0, 1])
    with pytest.raises(DataError, match="vectors are identical"):
        with StoreWriter(tmp_path / "b", 4) as w:
            w.add(np.tile(np.eye(4, dtype=np.float32)[:1], (3, 1)), [0, 0, 0], [0, 1, 2])


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda p: p.joinpath("vectors.bin").write_bytes(p.joinpath("vectors.bin").read_bytes()[:-4]),
            r"vectors.bin: truncated: \d+ bytes, expected",
        ),
        (lambda p: p.joinpath("vectors.bin").open("ab").write(b"\0" * 64), "vectors.bin: larger than the manifest says"),
        (
            lambda p: p.joinpath("offsets.bin").write_bytes(np.array([0, 5, 3, 9] + [0] * 37, np.int64).tobytes()),
            "offsets.bin: must start at 0 and end",
        ),
        (lambda p: _edit(p, dtype="float64"), "dtype 'float64' is not one of"),
        (lambda p: _edit(p, format=0), "store format 0, this lvm reads format 1"),
        (lambda p: p.joinpath("manifest.json").write_text("{"), "manifest.json: not valid JSON"),
        (lambda p: _flip(p), "content differs from its manifest"),
    ],
    ids=["truncated", "longer", "offsets", "dtype", "format", "json", "changed"],
)
def test_bad_store_files_get_one_line(tmp_path, damage, message):
    path = write(tmp_path / "s")
    damage(path)
    with pytest.raises(DataError, match=message):
        open_store(path)


def _edit(path, **keys):
    m = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**m, **keys}))


def _flip(path):
    data = bytearray((path / "vectors.bin").read_bytes())
    data[100] ^= 1
    (path / "vectors.bin").write_bytes(bytes(data))


def test_a_copy_with_new_mtimes_is_checked_once(tmp_path, caplog):
    path = write(tmp_path / "s")
    (path / "vectors.bin").touch()
    caplog.set_level("INFO", logger=mapped.__name__)
    open_store(path)
    assert "checking their fingerprint" in caplog.text
    caplog.clear()
    open_store(path)
    assert "checking" not in caplog.text


def test_a_loaded_store_equals_the_mapped_one_and_a_bad_memory_setting_is_one_line(tmp_path):
    path = write(tmp_path / "s", "float16")
    mapped_store, loaded = open_store(path), open_store(path, "load")
    rows = np.arange(len(loaded))
    assert torch.equal(loaded.take(rows), mapped_store.take(rows)) and loaded.vectors.dtype == torch.float16
    with pytest.raises(DataError, match=r"data.memory must be one of \['map', 'load'\] \(got 'ram'\)"):
        open_store(path, "ram")


def test_the_data_files_reach_the_disk_before_the_manifest_is_written(tmp_path, monkeypatch):
    synced = []
    fsync = mapped.os.fsync

    def record(fd):
        name = re.sub(r"^\.(.*)\.tmp\d+$", r"\1", os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))  # an atomic write's temporary
        synced.append((name, (tmp_path / "s" / "manifest.json").exists()))
        fsync(fd)

    monkeypatch.setattr(mapped.os, "fsync", record)
    write(tmp_path / "s")
    data = [(name, manifest_there) for name, manifest_there in synced if name in mapped.FILES]
    assert sorted(name for name, _ in data) == sorted(mapped.FILES) and not any(there for _, there in data)
