"""`python -m lvm.corpus.build`: real MediaWiki pages, a .txt folder and JSONL into store directories,
with the toy hashing encoder (no heavy extras); resumable; refuses to mix settings."""

from __future__ import annotations

import json
import logging
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from omegaconf import OmegaConf

import lvm.corpus.build as corpus_build
import lvm.corpus.encoders as encoders
from lvm.corpus.build import build
from lvm.corpus.encoders import hashed_bow
from lvm.corpus.text import Chunker, Document, read_documents
from lvm.data.mapped import FILES, MANIFEST, StoreWriter, open_store
from lvm.diagnosis.diagnose import run as diagnose_run
from lvm.runtime.errors import ConfigError, DataError
from tests.helpers import HAVE_TEXT, NEEDS_TEXT, WIKI_FIXTURE, compose_cfg, run_module

KEPT = ["Agricultural science", "Astronomer", "Arithmetic mean"]  # Alien (18 words) and Ada (0) are too short


def cfg_for(*overrides: str):
    return compose_cfg("build", "encoder=hashing", "progress=false", *overrides)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return run_module("lvm.corpus.build", *args, timeout=300)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def kept_docs() -> list[Document]:
    """The fixture's three kept articles, as plain-text documents."""
    return [d for d in read_documents(WIKI_FIXTURE) if isinstance(d, Document) and d.title in KEPT]


def write_jsonl(path: Path, docs: list[Document]) -> Path:
    path.write_text("".join(json.dumps({"id": d.id, "title": d.title, "text": d.text}) + "\n" for d in docs), encoding="utf-8")
    return path


def unit_hashed(texts: list[str]) -> np.ndarray:
    raw = hashed_bow(texts, dim=64)
    return raw / np.linalg.norm(raw, axis=1, keepdims=True)


def store_rows(out: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The vectors (float32), article ids and chunk indices of every row of out_dir's store."""
    store = open_store(out / "store")
    return store.take(np.arange(len(store))).numpy(), store.article_ids, store.chunk_indices


def articles(out: Path, key: str) -> list:
    """`key` of every article of out_dir's articles.jsonl, in store order."""
    return [a[key] for a in read_jsonl(out / "articles.jsonl")]


def store_manifest(out: Path) -> dict:
    """out_dir's store manifest without its files' stamps (mtimes differ from build to build)."""
    return {k: v for k, v in json.loads((out / "store" / MANIFEST).read_text()).items() if k != "files"}


def assert_same_build(a: Path, b: Path) -> None:
    """Two out_dirs hold byte-identical stores, articles.jsonl and chunks.jsonl."""
    for name in FILES:
        assert (a / "store" / name).read_bytes() == (b / "store" / name).read_bytes(), name
    assert store_manifest(a) == store_manifest(b)
    for name in ("articles.jsonl", "chunks.jsonl"):
        assert (a / name).read_text() == (b / name).read_text(), name


def test_mediawiki_build_end_to_end(tmp_path):
    out = tmp_path / "store"
    proc = run_cli(str(WIKI_FIXTURE), f"out_dir={out}", "encoder=hashing", "progress=false", "threads=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "built " in proc.stdout and "3 articles" in proc.stdout
    assert "torch threads: 1 (threads=1" in proc.stdout + proc.stderr  # the encoder's threads are set (they were not)

    assert sorted(p.name for p in (out / "store").iterdir()) == sorted([MANIFEST, *FILES])
    assert not (out / "store.npz").exists()  # one copy of the vectors
    assert articles(out, "title") == KEPT and articles(out, "doc_id") == ["572", "580", "612"]
    assert articles(out, "article_index") == [0, 1, 2]
    vectors, article_ids, chunk_indices = store_rows(out)
    chunks = read_jsonl(out / "chunks.jsonl")
    assert [c["row"] for c in chunks] == list(range(len(vectors)))
    # Independently: chunk the fixture's documents ourselves and embed them with the toy encoder.
    chunker = Chunker()
    docs = {d.title: d for d in read_documents(WIKI_FIXTURE) if isinstance(d, Document)}
    expected = [
        (a, i, text) for a, title in enumerate(KEPT) for i, text in enumerate(chunker.chunks(chunker.kept_paragraphs(docs[title].text)[0]))
    ]
    assert [(c["article_index"], c["chunk_index"], c["text"]) for c in chunks] == expected
    assert article_ids.tolist() == [a for a, _, _ in expected]
    assert chunk_indices.tolist() == [i for _, i, _ in expected]
    assert articles(out, "chunks") == np.bincount(article_ids).tolist()
    raw = hashed_bow([t for _, _, t in expected], dim=64)
    np.testing.assert_allclose(vectors, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)

    m = store_manifest(out)  # unit rows, written with normalize="error": none renormalised
    assert (m["dtype"], m["rows"], m["dim"], m["articles"], m["checked"]["renormalised"]) == ("float32", len(expected), 64, 3, 0)
    assert m["encoder"] == "hashed-bow (callable)" and m["source"] == str(WIKI_FIXTURE.resolve())

    info = json.loads((out / "build_info.json").read_text())
    assert info["dim"] == 64 and info["dtype"] == "float32" and info["encoder"]["name"] == "hashed-bow"
    c = info["counts"]
    assert c["skipped"] == {"redirect": 1, "namespace 4": 1, "fewer than 300 words": 2}
    assert (c["documents_read"], c["documents_kept"], c["articles"], c["chunks"]) == (5, 3, 3, len(expected))
    lengths = np.bincount(article_ids)
    assert c["windows_context5_next"] == int(np.clip(lengths - 5, 0, None).sum())
    assert info["throughput"]["chunks_embedded_this_run"] == len(expected) and info["throughput"]["chunks_per_second"] > 0
    assert info["outputs"] == {name: str(out / name) for name in ("store", "articles.jsonl", "chunks.jsonl", "build_info.json")}


def test_text_folder_and_jsonl_build(tmp_path):
    docs = [d for d in read_documents(WIKI_FIXTURE) if isinstance(d, Document) and d.title in KEPT]
    folder = tmp_path / "txt"
    folder.mkdir()
    for i, d in enumerate(docs):
        (folder / f"{i:02d}-{d.title}.txt").write_text(d.text, encoding="utf-8")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"id": d.id, "title": d.title, "text": d.text}) + "\n" for d in docs))
    info_txt = build(cfg_for(f"input={folder}", f"out_dir={tmp_path / 'a'}"))
    info_jsonl = build(cfg_for(f"input={jsonl}", f"out_dir={tmp_path / 'b'}"))
    a, b = tmp_path / "a", tmp_path / "b"
    assert articles(a, "title") == [f"{i:02d}-{d.title}" for i, d in enumerate(docs)] and articles(b, "title") == KEPT
    assert (a / "store" / "vectors.bin").read_bytes() == (b / "store" / "vectors.bin").read_bytes()  # same text, same vectors
    assert info_txt["counts"]["chunks"] == info_jsonl["counts"]["chunks"] == len(open_store(a / "store"))


def test_interrupted_build_resumes_and_matches_a_clean_one(tmp_path, monkeypatch):
    clean = build(cfg_for(f"input={WIKI_FIXTURE}", f"out_dir={tmp_path / 'clean'}", "part_chunks=5"))
    calls = []

    def dies_on_third_part(texts, **kw):
        calls.append(len(texts))
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a user's Ctrl-C in the middle of a build
        return hashed_bow(texts, **kw)

    monkeypatch.setattr(encoders, "hashed_bow", dies_on_third_part)
    with pytest.raises(KeyboardInterrupt):
        build(cfg_for(f"input={WIKI_FIXTURE}", f"out_dir={tmp_path / 'run'}", "part_chunks=5"))
    manifest = json.loads((tmp_path / "run" / "parts" / "manifest.json").read_text())
    assert len(manifest["parts"]) == 2 and not (tmp_path / "run" / "store").exists()
    monkeypatch.undo()

    resumed = build(cfg_for(f"input={WIKI_FIXTURE}", f"out_dir={tmp_path / 'run'}", "part_chunks=5"))
    done_before = sum(len(p["docs"]) for p in manifest["parts"])
    assert resumed["counts"]["documents_embedded_earlier"] == done_before
    assert resumed["counts"]["documents_embedded_this_run"] == 3 - done_before
    assert resumed["counts"]["chunks_embedded_this_run"] == clean["counts"]["chunks"] - sum(p["chunks"] for p in manifest["parts"])
    assert_same_build(tmp_path / "clean", tmp_path / "run")

    again = build(cfg_for(f"input={WIKI_FIXTURE}", f"out_dir={tmp_path / 'run'}", "part_chunks=5"))
    assert again["counts"]["chunks_embedded_this_run"] == 0 and again["counts"]["documents_embedded_earlier"] == 3


def edited(docs: list[Document]) -> list[Document]:
    """The same documents with the second one's text and the third one's title changed."""
    astronomer = Document(docs[1].id, docs[1].title, docs[1].text + "\n\nAstronomers also teach the history of their field to students.")
    mean = Document(docs[2].id, "Arithmetic mean (statistics)", docs[2].text)
    return [docs[0], astronomer, mean]


def test_changed_document_is_reembedded_and_replaces_its_old_rows(tmp_path, caplog):
    docs = kept_docs()
    source = write_jsonl(tmp_path / "docs.jsonl", docs)
    out = tmp_path / "run"
    build(cfg_for(f"input={source}", f"out_dir={out}", "part_chunks=5"))
    new = edited(docs)
    write_jsonl(source, new)  # same path, so the same settings: the build resumes
    with caplog.at_level(logging.INFO, logger="lvm.corpus.build"):
        info = build(cfg_for(f"input={source}", f"out_dir={out}", "part_chunks=5"))
    chunker = Chunker()
    new_chunks = [chunker.chunks(chunker.kept_paragraphs(d.text)[0]) for d in new]
    c = info["counts"]
    assert (c["documents_changed_reembedded"], c["documents_embedded_earlier"], c["documents_embedded_this_run"]) == (2, 1, 2)
    assert c["chunks_embedded_this_run"] == len(new_chunks[1]) + len(new_chunks[2])
    assert "re-embedded 2 documents whose title or text changed" in caplog.text

    assert articles(out, "doc_id") == [d.id for d in docs] and articles(out, "title") == [d.title for d in new]
    rows = [(a, i, t) for a, chunks in enumerate(new_chunks) for i, t in enumerate(chunks)]
    assert [(r["article_index"], r["chunk_index"], r["text"]) for r in read_jsonl(out / "chunks.jsonl")] == rows
    np.testing.assert_allclose(store_rows(out)[0], unit_hashed([t for _, _, t in rows]), atol=1e-6)
    build(cfg_for(f"input={source}", f"out_dir={tmp_path / 'clean'}"))
    assert_same_build(out, tmp_path / "clean")

    again = build(cfg_for(f"input={source}", f"out_dir={out}", "part_chunks=5"))
    assert again["counts"]["documents_changed_reembedded"] == 0 and again["counts"]["chunks_embedded_this_run"] == 0
    assert_same_build(out, tmp_path / "clean")


def test_manifest_without_content_hashes_is_refused(tmp_path):
    """A manifest whose documents lack the content hash (an earlier format) is one line, not a guess."""
    source = write_jsonl(tmp_path / "docs.jsonl", kept_docs())
    out = tmp_path / "run"
    build(cfg_for(f"input={source}", f"out_dir={out}"))
    path = out / "parts" / "manifest.json"
    manifest = json.loads(path.read_text())
    for part in manifest["parts"]:
        part["docs"] = [doc[:3] for doc in part["docs"]]  # [id, title, chunks]
    path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"manifest.json: build manifest without a content hash per document.*delete .*run"):
        build(cfg_for(f"input={source}", f"out_dir={out}"))


class StubSentenceTransformer:
    """Stands in for sentence_transformers.SentenceTransformer: hashed vectors, and float32 slower
    than bfloat16, so that encoder.dtype=auto measures and picks bfloat16."""

    dtypes: list[str] = []  # the model's dtype at each encode call

    def __init__(self, path: str, device: str) -> None:
        self.dtype = "float32"
        self.max_seq_length = 128

    def eval(self) -> None:
        pass

    def to(self, dtype) -> None:
        self.dtype = str(dtype).removeprefix("torch.")

    def get_embedding_dimension(self) -> int:
        return 64

    def encode(self, texts, **kwargs) -> np.ndarray:
        self.dtypes.append(self.dtype)
        time.sleep(0.02 if self.dtype == "float32" else 0.0)
        return hashed_bow(texts)


def test_resumed_build_keeps_the_dtype_measurement(tmp_path, monkeypatch):
    monkeypatch.setattr(encoders, "_import_extra", lambda module: SimpleNamespace(SentenceTransformer=StubSentenceTransformer))
    monkeypatch.setattr(StubSentenceTransformer, "dtypes", [])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    (tmp_path / "model").mkdir()
    source = write_jsonl(tmp_path / "docs.jsonl", kept_docs())
    args = (f"input={source}", f"out_dir={tmp_path / 'out'}", "encoder=sentence_transformers", f"encoder.path={tmp_path / 'model'}")
    first = build(compose_cfg("build", "progress=false", "max_documents=1", *args))
    measured = first["encoder"]["dtype_calibration"]
    assert first["encoder"]["dtype"] == measured["chosen"] == "bfloat16" and measured["seconds_float32"] > measured["seconds_bfloat16"]
    assert "float32" in StubSentenceTransformer.dtypes

    StubSentenceTransformer.dtypes.clear()
    resumed = build(compose_cfg("build", "progress=false", *args))
    assert resumed["counts"]["documents_embedded_this_run"] == 2
    assert set(StubSentenceTransformer.dtypes) == {"bfloat16"}  # the earlier choice, not measured again
    assert resumed["encoder"]["dtype"] == "bfloat16" and resumed["encoder"]["dtype_calibration"] == measured
    assert json.loads((tmp_path / "out" / "build_info.json").read_text())["encoder"]["dtype_calibration"] == measured
    manifest = json.loads((tmp_path / "out" / "parts" / "manifest.json").read_text())
    assert manifest["encoder"]["dtype_calibration"] == measured


def test_store_without_a_window_warns_and_says_why(tmp_path, caplog):
    source = write_jsonl(tmp_path / "docs.jsonl", kept_docs())
    ok = build(cfg_for(f"input={source}", f"out_dir={tmp_path / 'ok'}"))
    assert ok["counts"]["windows_context5_next"] > 0 and ok["warnings"] == []
    longest = max(articles(tmp_path / "ok", "chunks"))
    with caplog.at_level(logging.WARNING, logger="lvm.corpus.build"):
        info = build(cfg_for(f"input={source}", f"out_dir={tmp_path / 'none'}", f"windows_context={longest}"))
    assert info["counts"][f"windows_context{longest}_next"] == 0 and info["counts"]["longest_article_chunks"] == longest
    expected = f"no article has more than {longest} chunks (the longest has {longest})"
    assert len(info["warnings"]) == 1 and expected in info["warnings"][0]
    assert [r.getMessage() for r in caplog.records if r.name == "lvm.corpus.build" and r.levelno == logging.WARNING] == [
        f"WARNING: {w}" for w in info["warnings"]
    ]
    assert json.loads((tmp_path / "none" / "build_info.json").read_text())["warnings"] == info["warnings"]


def test_a_failed_write_keeps_the_old_texts_leaves_no_temporary_file_and_no_complete_store(tmp_path, monkeypatch):
    build(cfg_for(f"input={WIKI_FIXTURE}", f"out_dir={tmp_path}"))
    before = {name: (tmp_path / name).read_bytes() for name in ("articles.jsonl", "chunks.jsonl")}
    listing = sorted(p.name for p in tmp_path.iterdir())

    def disk_full(self, *rows):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(StoreWriter, "add", disk_full)
    with pytest.raises(OSError, match="No space left"):
        build(cfg_for(f"input={WIKI_FIXTURE}", f"out_dir={tmp_path}"))
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == listing
    with pytest.raises(DataError, match=r"store: no manifest.json: not a complete store"):
        open_store(tmp_path / "store")  # the half-written store is never taken for a complete one


def test_an_interrupted_assembly_leaves_no_manifest_and_a_rerun_completes(tmp_path, monkeypatch):
    source = write_jsonl(tmp_path / "docs.jsonl", kept_docs())
    build(cfg_for(f"input={source}", f"out_dir={tmp_path / 'clean'}"))
    out = tmp_path / "run"
    add, calls = StoreWriter.add, []

    def dies_after_the_first_block(self, *rows):
        calls.append(len(rows[0]))
        if len(calls) == 2:
            raise KeyboardInterrupt
        add(self, *rows)

    monkeypatch.setattr(corpus_build, "BLOCK_ROWS", 8)  # a block per article
    monkeypatch.setattr(StoreWriter, "add", dies_after_the_first_block)
    with pytest.raises(KeyboardInterrupt):
        build(cfg_for(f"input={source}", f"out_dir={out}"))
    assert (out / "store" / "vectors.bin").stat().st_size == calls[0] * 64 * 4  # the first block was written
    assert not (out / "store" / MANIFEST).exists() and not (out / "chunks.jsonl").exists()
    monkeypatch.undo()

    info = build(cfg_for(f"input={source}", f"out_dir={out}"))
    assert info["counts"]["chunks_embedded_this_run"] == 0  # the parts were complete: only the assembly ran again
    assert_same_build(out, tmp_path / "clean")


def test_the_store_holds_the_newest_rows_of_each_document_in_document_order(tmp_path, monkeypatch):
    """The old concatenation: each document's newest rows from the parts, in first-seen order, block
    boundaries anywhere (a re-embedded document's rows live in a later part)."""
    docs = kept_docs()
    source = write_jsonl(tmp_path / "docs.jsonl", docs)
    build(cfg_for(f"input={source}", f"out_dir={tmp_path}", "part_chunks=5"))
    write_jsonl(source, [docs[0], edited(docs)[1], docs[2]])  # the second document re-embedded into a last part
    monkeypatch.setattr(corpus_build, "BLOCK_ROWS", 12)  # blocks across articles
    build(cfg_for(f"input={source}", f"out_dir={tmp_path}", "part_chunks=5"))
    parts = json.loads((tmp_path / "parts" / "manifest.json").read_text())["parts"]
    newest = {}
    for part in parts:
        rows = np.load(tmp_path / "parts" / f"{part['name']}.npz")["vectors"]
        first = np.cumsum([0] + [n for _, _, n, _ in part["docs"]])
        newest.update((doc[0], rows[first[i] : first[i + 1]]) for i, doc in enumerate(part["docs"]))
    assert parts[-1]["docs"][0][0] == docs[1].id and list(newest) == [d.id for d in docs]
    vectors, article_ids, chunk_indices = store_rows(tmp_path)
    np.testing.assert_array_equal(vectors, np.concatenate(list(newest.values())))
    assert article_ids.tolist() == [a for a, v in enumerate(newest.values()) for _ in v]
    assert chunk_indices.tolist() == [i for v in newest.values() for i in range(len(v))]


@pytest.mark.parametrize(("dtype", "rounding"), [("float16", 2**-11), ("bfloat16", 2**-8)])
def test_half_storage_halves_the_file_and_rounds_the_rows(tmp_path, dtype, rounding):
    source = write_jsonl(tmp_path / "docs.jsonl", kept_docs())
    build(cfg_for(f"input={source}", f"out_dir={tmp_path / 'run'}"))
    full, ids, chunks = store_rows(tmp_path / "run")
    size = (tmp_path / "run" / "store" / "vectors.bin").stat().st_size
    texts = {name: (tmp_path / "run" / name).read_text() for name in ("articles.jsonl", "chunks.jsonl")}
    info = build(cfg_for(f"input={source}", f"out_dir={tmp_path / 'run'}", f"dtype={dtype}"))  # an output setting: resumes
    assert info["counts"]["chunks_embedded_this_run"] == 0 and info["counts"]["documents_embedded_earlier"] == 3
    assert store_manifest(tmp_path / "run")["dtype"] == info["dtype"] == dtype
    assert (tmp_path / "run" / "store" / "vectors.bin").stat().st_size * 2 == size
    half, half_ids, half_chunks = store_rows(tmp_path / "run")
    np.testing.assert_allclose(half, full, rtol=rounding, atol=2**-24)
    assert not np.array_equal(half, full)
    np.testing.assert_array_equal(half_ids, ids)
    np.testing.assert_array_equal(half_chunks, chunks)
    assert {name: (tmp_path / "run" / name).read_text() for name in texts} == texts


def test_an_invalid_store_dtype_is_one_config_line(tmp_path):
    with pytest.raises(ConfigError) as e:
        build(cfg_for(f"input={WIKI_FIXTURE}", f"out_dir={tmp_path}", "dtype=float64"))
    assert str(e.value) == "dtype (the store's vector storage) must be one of float32, float16, bfloat16 (got 'float64')"
    assert not any(tmp_path.iterdir())  # refused before anything was read or written


def test_max_documents_stops_reading_and_a_later_run_goes_on(tmp_path):
    first = build(cfg_for(f"input={WIKI_FIXTURE}", f"out_dir={tmp_path}", "max_documents=1"))
    assert first["counts"]["stopped_at_max_documents"] and first["counts"]["articles"] == 1
    assert first["counts"]["skipped"] == {"redirect": 1}  # the pages after the first article were never read
    assert articles(tmp_path, "title") == KEPT[:1]
    rest = build(cfg_for(f"input={WIKI_FIXTURE}", f"out_dir={tmp_path}"))
    assert rest["counts"]["documents_embedded_earlier"] == 1 and not rest["counts"]["stopped_at_max_documents"]
    assert articles(tmp_path, "title") == KEPT


def test_namespaces_setting_selects_pages(tmp_path):
    info = build(cfg_for(f"input={WIKI_FIXTURE}", f"out_dir={tmp_path}", "namespaces=[0,4]", "min_article_words=0"))
    # The project page is no longer skipped for its namespace; it turns out to be a redirect.
    assert info["counts"]["skipped"] == {"redirect": 2, "fewer than 0 words": 1}


def test_other_settings_in_the_same_out_dir_are_refused(tmp_path):
    build(cfg_for(f"input={WIKI_FIXTURE}", f"out_dir={tmp_path}"))
    with pytest.raises(ConfigError, match=r"out_dir holds a build made with other settings \(chunk: .*min_words.* use another out_dir"):
        build(cfg_for(f"input={WIKI_FIXTURE}", f"out_dir={tmp_path}", "chunk.min_words=40"))
    (tmp_path / "parts" / "manifest.json").write_text("{broken")
    with pytest.raises(DataError, match=r"manifest.json: corrupt build manifest"):
        build(cfg_for(f"input={WIKI_FIXTURE}", f"out_dir={tmp_path}"))


def test_bad_input_is_one_clear_line(tmp_path):
    proc = run_cli(f"input={tmp_path / 'missing.xml'}", f"out_dir={tmp_path / 'o'}", "encoder=hashing")
    assert (
        proc.returncode == 2
        and proc.stderr.strip().splitlines()[-1] == f"lvm.corpus.build: input={tmp_path / 'missing.xml'}: no such file or folder"
    )
    proc = run_cli(f"input={WIKI_FIXTURE}", "encoder=hashing")
    assert proc.returncode == 2 and "out_dir must be set" in proc.stderr
    dup = tmp_path / "dup.jsonl"
    dup.write_text("".join(json.dumps({"id": "x", "title": "T", "text": "Words here. " * 200}) + "\n" for _ in range(2)))
    with pytest.raises(DataError, match="document id 'x' appears twice"):
        build(cfg_for(f"input={dup}", f"out_dir={tmp_path / 'd'}"))
    with pytest.raises(DataError, match="no document was kept"):
        build(cfg_for(f"input={WIKI_FIXTURE}", f"out_dir={tmp_path / 'e'}", "min_article_words=100000"))


def test_built_store_is_diagnosed_and_trains(tmp_path):
    """The whole pipeline on real pages: build, diagnose, then one short epoch as `data=store` (p6b_v2_wiki's)."""
    out = tmp_path / "store"
    build(cfg_for(f"input={WIKI_FIXTURE}", f"out_dir={out}", "chunk.min_words=20", "chunk.max_words=40", "min_article_words=0"))
    report = diagnose_run(compose_cfg("diagnose", f"store={out / 'store'}", "progress=false", "bootstrap=50"))
    v, a, _ = store_rows(out)
    same = a[1:] == a[:-1]
    assert report["adjacent"]["mean"] == pytest.approx(float((v[1:] * v[:-1]).sum(1)[same].mean()), abs=1e-5)
    assert all((out / "diagnose" / f"diagnose.{ext}").is_file() for ext in ("json", "md", "png"))
    proc = run_module(
        "lvm.train",
        "+experiment=p6b_v2_wiki",
        f"data.path={out / 'store'}",
        "data.split.val=0.34",
        "data.split.ood=0",
        "model.d_model=16",
        "model.ffn=32",
        "model.layers=1",
        "model.heads=2",
        "trainer.max_epochs=1",
        f"hydra.run.dir={tmp_path / 'run'}",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 1 and -1 <= rows[0]["val/cos"] <= 1
    config = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert (config.name, config.model.context_skip, config.optim.optimizer.lr) == ("p6b_v2_wiki", True, 1.0e-4)


@pytest.mark.skipif(not HAVE_TEXT, reason=NEEDS_TEXT)
def test_minilm_build_of_real_pages(tmp_path):
    info = build(cfg_for(f"input={WIKI_FIXTURE}", f"out_dir={tmp_path}", "encoder=minilm", "encoder.dtype=float32"))
    v, a, _ = store_rows(tmp_path)
    assert info["dim"] == 384 and v.shape == (info["counts"]["chunks"], 384)
    adjacent = (v[1:] * v[:-1]).sum(1)[a[1:] == a[:-1]].mean()
    across = (v[a == 0] @ v[a == 2].T).mean()  # agricultural science vs arithmetic mean
    assert adjacent > 0.4 > 0.2 > across  # real text: neighbours related, topics apart
