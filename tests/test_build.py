"""`python -m lvm.data.build`: real MediaWiki pages, a .txt folder and JSONL into article stores,
with the toy hashing encoder (no heavy extras); resumable; refuses to mix settings."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

import lvm.data.encoders as encoders
from lvm.data.build import build
from lvm.data.diagnose import run as diagnose_run
from lvm.data.encoders import hashed_bow
from lvm.data.loaders import load_store_npz
from lvm.data.text import Chunker, Document, read_documents
from lvm.errors import ConfigError, DataError
from tests.helpers import compose_cfg, run_module
from tests.test_encoders import HAVE_TEXT, NEEDS_TEXT
from tests.test_text import FIXTURE

KEPT = ["Agricultural science", "Astronomer", "Arithmetic mean"]  # Alien (18 words) and Ada (0) are too short


def cfg_for(*overrides: str):
    return compose_cfg("build", "encoder=hashing", "progress=false", *overrides)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return run_module("lvm.data.build", *args, timeout=300)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_mediawiki_build_end_to_end(tmp_path):
    out = tmp_path / "store"
    proc = run_cli(str(FIXTURE), f"out_dir={out}", "encoder=hashing", "progress=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "built " in proc.stdout and "3 articles" in proc.stdout

    z = np.load(out / "store.npz")
    assert sorted(z.files) == ["article_indices", "chunk_indices", "doc_ids", "titles", "vectors"]
    assert z["titles"].tolist() == KEPT and z["doc_ids"].tolist() == ["572", "580", "612"]
    chunks = read_jsonl(out / "chunks.jsonl")
    assert [c["row"] for c in chunks] == list(range(len(z["vectors"])))
    # Independently: chunk the fixture's documents ourselves and embed them with the toy encoder.
    chunker = Chunker()
    docs = {d.title: d for d in read_documents(FIXTURE) if isinstance(d, Document)}
    expected = [(a, i, text) for a, title in enumerate(KEPT) for i, text in enumerate(chunker.chunks(chunker.kept_paragraphs(docs[title].text)[0]))]
    assert [(c["article_index"], c["chunk_index"], c["text"]) for c in chunks] == expected
    assert z["article_indices"].tolist() == [a for a, _, _ in expected]
    assert z["chunk_indices"].tolist() == [i for _, i, _ in expected]
    raw = hashed_bow([t for _, _, t in expected], dim=64)
    np.testing.assert_allclose(z["vectors"], raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)
    assert z["vectors"].dtype == np.float32

    store = load_store_npz(out / "store.npz", normalize="error")  # unit rows: no renormalisation needed
    assert store.num_articles == 3 and store.dim == 64

    info = json.loads((out / "build_info.json").read_text())
    assert info["dim"] == 64 and info["encoder"]["name"] == "hashed-bow"
    c = info["counts"]
    assert c["skipped"] == {"redirect": 1, "namespace 4": 1, "fewer than 300 words": 2}
    assert (c["documents_read"], c["documents_kept"], c["articles"], c["chunks"]) == (5, 3, 3, len(expected))
    lengths = np.bincount(z["article_indices"])
    assert c["windows_context5_next"] == int(np.clip(lengths - 5, 0, None).sum())
    assert info["throughput"]["chunks_embedded_this_run"] == len(expected) and info["throughput"]["chunks_per_second"] > 0


def test_text_folder_and_jsonl_build(tmp_path):
    docs = [d for d in read_documents(FIXTURE) if isinstance(d, Document) and d.title in KEPT]
    folder = tmp_path / "txt"
    folder.mkdir()
    for i, d in enumerate(docs):
        (folder / f"{i:02d}-{d.title}.txt").write_text(d.text, encoding="utf-8")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"id": d.id, "title": d.title, "text": d.text}) + "\n" for d in docs))
    info_txt = build(cfg_for(f"input={folder}", f"out_dir={tmp_path / 'a'}"))
    info_jsonl = build(cfg_for(f"input={jsonl}", f"out_dir={tmp_path / 'b'}"))
    a, b = np.load(tmp_path / "a" / "store.npz"), np.load(tmp_path / "b" / "store.npz")
    assert a["titles"].tolist() == [f"{i:02d}-{d.title}" for i, d in enumerate(docs)] and b["titles"].tolist() == KEPT
    np.testing.assert_array_equal(a["vectors"], b["vectors"])  # same text, same chunks, same vectors
    assert info_txt["counts"]["chunks"] == info_jsonl["counts"]["chunks"] == len(a["vectors"])


def test_interrupted_build_resumes_and_matches_a_clean_one(tmp_path, monkeypatch):
    clean = build(cfg_for(f"input={FIXTURE}", f"out_dir={tmp_path / 'clean'}", "part_chunks=5"))
    calls = []

    def dies_on_third_part(texts, **kw):
        calls.append(len(texts))
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a user's Ctrl-C in the middle of a build
        return hashed_bow(texts, **kw)

    monkeypatch.setattr(encoders, "hashed_bow", dies_on_third_part)
    with pytest.raises(KeyboardInterrupt):
        build(cfg_for(f"input={FIXTURE}", f"out_dir={tmp_path / 'run'}", "part_chunks=5"))
    manifest = json.loads((tmp_path / "run" / "parts" / "manifest.json").read_text())
    assert len(manifest["parts"]) == 2 and not (tmp_path / "run" / "store.npz").exists()
    monkeypatch.undo()

    resumed = build(cfg_for(f"input={FIXTURE}", f"out_dir={tmp_path / 'run'}", "part_chunks=5"))
    done_before = sum(len(p["docs"]) for p in manifest["parts"])
    assert resumed["counts"]["documents_embedded_earlier"] == done_before
    assert resumed["counts"]["documents_embedded_this_run"] == 3 - done_before
    assert resumed["counts"]["chunks_embedded_this_run"] == clean["counts"]["chunks"] - sum(p["chunks"] for p in manifest["parts"])
    x, y = np.load(tmp_path / "clean" / "store.npz"), np.load(tmp_path / "run" / "store.npz")
    for key in x.files:
        np.testing.assert_array_equal(x[key], y[key])
    assert (tmp_path / "clean" / "chunks.jsonl").read_text() == (tmp_path / "run" / "chunks.jsonl").read_text()

    again = build(cfg_for(f"input={FIXTURE}", f"out_dir={tmp_path / 'run'}", "part_chunks=5"))
    assert again["counts"]["chunks_embedded_this_run"] == 0 and again["counts"]["documents_embedded_earlier"] == 3


def test_max_documents_stops_reading_and_a_later_run_goes_on(tmp_path):
    first = build(cfg_for(f"input={FIXTURE}", f"out_dir={tmp_path}", "max_documents=1"))
    assert first["counts"]["stopped_at_max_documents"] and first["counts"]["articles"] == 1
    assert first["counts"]["skipped"] == {"redirect": 1}  # the pages after the first article were never read
    assert np.load(tmp_path / "store.npz")["titles"].tolist() == KEPT[:1]
    rest = build(cfg_for(f"input={FIXTURE}", f"out_dir={tmp_path}"))
    assert rest["counts"]["documents_embedded_earlier"] == 1 and not rest["counts"]["stopped_at_max_documents"]
    assert np.load(tmp_path / "store.npz")["titles"].tolist() == KEPT


def test_namespaces_setting_selects_pages(tmp_path):
    info = build(cfg_for(f"input={FIXTURE}", f"out_dir={tmp_path}", "namespaces=[0,4]", "min_article_words=0"))
    # The project page is no longer skipped for its namespace; it turns out to be a redirect.
    assert info["counts"]["skipped"] == {"redirect": 2, "fewer than 0 words": 1}


def test_other_settings_in_the_same_out_dir_are_refused(tmp_path):
    build(cfg_for(f"input={FIXTURE}", f"out_dir={tmp_path}"))
    with pytest.raises(ConfigError, match=r"out_dir holds a build made with other settings \(chunk: .*min_words.* use another out_dir"):
        build(cfg_for(f"input={FIXTURE}", f"out_dir={tmp_path}", "chunk.min_words=40"))
    (tmp_path / "parts" / "manifest.json").write_text("{broken")
    with pytest.raises(DataError, match=r"manifest.json: corrupt build manifest"):
        build(cfg_for(f"input={FIXTURE}", f"out_dir={tmp_path}"))


def test_bad_input_is_one_clear_line(tmp_path):
    proc = run_cli(f"input={tmp_path / 'missing.xml'}", f"out_dir={tmp_path / 'o'}", "encoder=hashing")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == f"lvm.data.build: input={tmp_path / 'missing.xml'}: no such file or folder"
    proc = run_cli(f"input={FIXTURE}", "encoder=hashing")
    assert proc.returncode == 2 and "out_dir must be set" in proc.stderr
    dup = tmp_path / "dup.jsonl"
    dup.write_text("".join(json.dumps({"id": "x", "title": "T", "text": "Words here. " * 200}) + "\n" for _ in range(2)))
    with pytest.raises(DataError, match="document id 'x' appears twice"):
        build(cfg_for(f"input={dup}", f"out_dir={tmp_path / 'd'}"))
    with pytest.raises(DataError, match="no document was kept"):
        build(cfg_for(f"input={FIXTURE}", f"out_dir={tmp_path / 'e'}", "min_article_words=100000"))


def test_built_store_is_diagnosed_and_trains(tmp_path):
    """The whole pipeline on real pages: build, diagnose, then one short epoch as `data=store_npz`."""
    out = tmp_path / "store"
    build(cfg_for(f"input={FIXTURE}", f"out_dir={out}", "chunk.min_words=20", "chunk.max_words=40", "min_article_words=0"))
    report = diagnose_run(compose_cfg("diagnose", f"store={out / 'store.npz'}", "progress=false", "bootstrap=50"))
    z = np.load(out / "store.npz")
    v, a = z["vectors"], z["article_indices"]
    same = a[1:] == a[:-1]
    assert report["adjacent"]["mean"] == pytest.approx(float((v[1:] * v[:-1]).sum(1)[same].mean()), abs=1e-5)
    assert all((out / "diagnose" / f"diagnose.{ext}").is_file() for ext in ("json", "md", "png"))
    proc = run_module(
        "lvm.train", "+experiment=p6b_v2_wiki", f"data.path={out / 'store.npz'}",
        "data.split.val=0.34", "data.split.ood=0", "model.d_model=16", "model.ffn=32", "model.layers=1", "model.heads=2",
        "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'run'}", timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 1 and -1 <= rows[0]["val/cos"] <= 1
    config = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert (config.name, config.model.context_skip, config.optim.lr) == ("p6b_v2_wiki", True, 1.0e-4)


@pytest.mark.skipif(not HAVE_TEXT, reason=NEEDS_TEXT)
def test_minilm_build_of_real_pages(tmp_path):
    info = build(cfg_for(f"input={FIXTURE}", f"out_dir={tmp_path}", "encoder=minilm", "encoder.dtype=float32"))
    z = np.load(tmp_path / "store.npz")
    assert info["dim"] == 384 and z["vectors"].shape == (info["counts"]["chunks"], 384)
    v, a = z["vectors"], z["article_indices"]
    adjacent = (v[1:] * v[:-1]).sum(1)[a[1:] == a[:-1]].mean()
    across = (v[a == 0] @ v[a == 2].T).mean()  # agricultural science vs arithmetic mean
    assert adjacent > 0.4 > 0.2 > across  # real text: neighbours related, topics apart
