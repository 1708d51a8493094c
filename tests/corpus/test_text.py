"""Text sources and the chunker: real MediaWiki pages, .txt folders, JSONL; sentence chunks."""

from __future__ import annotations

import bz2
import json
import zipfile

import pytest

from lvm.corpus.text import (
    Chunker,
    Document,
    Skipped,
    is_prose,
    paragraphs,
    prose_documents,
    read_documents,
    read_mediawiki,
    split_sentences,
)
from lvm.runtime.errors import ConfigError, DataError
from tests.helpers import WIKI_FIXTURE


def docs_of(records) -> list[Document]:
    return [r for r in records if isinstance(r, Document)]


def test_mediawiki_pages_in_order_with_redirects_and_other_namespaces_skipped():
    records = list(read_documents(WIKI_FIXTURE))
    assert [r.title for r in docs_of(records)] == ["Agricultural science", "Alien", "Astronomer", "Arithmetic mean", "Ada"]
    assert [(r.id, r.reason) for r in records if isinstance(r, Skipped)] == [("10", "redirect"), ("724", "namespace 4")]
    astronomer = next(d for d in docs_of(records) if d.title == "Astronomer")
    assert astronomer.id == "580"
    assert astronomer.text.startswith("An astronomer is a scientist in the field of astronomy who concentrates their studies on")


def test_wikitext_markup_and_closing_sections_are_dropped():
    raw = WIKI_FIXTURE.read_text(encoding="utf-8")
    assert "==References==" in raw or "== References ==" in raw  # the fixture does have them
    for doc in docs_of(read_documents(WIKI_FIXTURE)):
        for junk in ("{{", "}}", "[[", "]]", "<ref", "Category:", "File:", "'''", "==", "{|"):
            assert junk not in doc.text, (doc.title, junk)
    mean = next(d for d in docs_of(read_documents(WIKI_FIXTURE)) if d.title == "Arithmetic mean")
    # Link text survives, link targets and See also / References lists do not.
    assert "In mathematics and statistics, the arithmetic mean" in mean.text
    assert "See also" not in mean.text and "External links" not in mean.text


def test_bz2_and_zip_member_give_the_same_documents(tmp_path):
    plain = list(read_documents(WIKI_FIXTURE))
    packed = tmp_path / "sample.xml.bz2"
    packed.write_bytes(bz2.compress(WIKI_FIXTURE.read_bytes()))
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(packed, "pkg/data/sample.xml.bz2")
    assert list(read_documents(packed)) == plain
    assert list(read_documents(wheel, member="pkg/data/sample.xml.bz2")) == plain
    with pytest.raises(DataError, match="no member 'pkg/nope.bz2'"):
        list(read_documents(wheel, member="pkg/nope.bz2"))


def test_parallel_wikitext_conversion_keeps_order_and_content(tmp_path):
    packed = tmp_path / "sample.xml.bz2"
    packed.write_bytes(bz2.compress(WIKI_FIXTURE.read_bytes()))
    serial = list(read_documents(packed, workers=1))
    assert list(read_documents(packed, workers=2)) == serial
    assert list(prose_documents(read_mediawiki(str(WIKI_FIXTURE), lambda: WIKI_FIXTURE.open("rb")), workers=3, batch=1)) == serial
    assert all(d.markup == "plain" for d in docs_of(serial))


def test_malformed_xml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.xml"
    text = WIKI_FIXTURE.read_text(encoding="utf-8")
    bad.write_text(text[: text.index("</page>") + 7] + "\n<page><title>x</title></pag>\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.xml: malformed XML at line \d+"):
        list(read_documents(bad))


def test_text_folder_one_document_per_file_with_wrapped_lines_joined(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("First line of a\nwrapped sentence.\n\nSecond paragraph here.\n", encoding="utf-8")
    (tmp_path / "b" / "c.txt").write_text("Only one.", encoding="utf-8")
    (tmp_path / "ignored.md").write_text("not a txt file")
    docs = list(read_documents(tmp_path))
    assert [(d.id, d.title) for d in docs] == [("a.txt", "a"), ("b/c.txt", "c")]
    assert paragraphs(docs[0].text) == ["First line of a wrapped sentence.", "Second paragraph here."]


def test_text_folder_errors(tmp_path):
    with pytest.raises(DataError, match="holds no .txt file"):
        list(read_documents(tmp_path))
    (tmp_path / "x.txt").write_bytes(b"caf\xe9 latin-1")
    with pytest.raises(DataError, match=r"x\.txt: not UTF-8"):
        list(read_documents(tmp_path))
    with pytest.raises(DataError, match="no such file"):
        list(read_documents(tmp_path / "missing.xml"))


def test_jsonl_documents_and_errors(tmp_path):
    good = tmp_path / "docs.jsonl"
    good.write_text(
        json.dumps({"id": 7, "title": "T", "text": "Hello."}) + "\n\n" + json.dumps({"id": "b", "title": "U", "text": "Bye."}) + "\n"
    )
    assert list(read_documents(good)) == [Document("7", "T", "Hello."), Document("b", "U", "Bye.")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": 1, "title": "T", "text": "x"}) + "\n" + json.dumps({"id": 2, "text": "y"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl line 2: missing key\(s\) \['title'\]"):
        list(read_documents(bad))
    bad.write_text("{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl line 1: not valid JSON"):
        list(read_documents(bad))
    with pytest.raises(ConfigError, match="cannot tell its format"):
        list(read_documents(WIKI_FIXTURE.parent / "README.md"))


def test_sentences_respect_abbreviations_initials_and_quotes():
    text = 'He said "yes." Then Dr. Smith left at 5 p.m. today. J. R. R. Tolkien wrote it! Was it 1950? 12 men came.'
    assert split_sentences(text) == [
        'He said "yes."',
        "Then Dr. Smith left at 5 p.m. today.",
        "J. R. R. Tolkien wrote it!",
        "Was it 1950?",
        "12 men came.",
    ]


def test_prose_filter():
    assert is_prose("A sentence.") and is_prose('He said "no."') and is_prose("Really?")
    assert not is_prose("List item without a stop") and not is_prose("Caption: a map")


def sentences(n: int, words: int) -> str:
    return " ".join(" ".join(f"W{i}x{j}" for j in range(words - 1)) + " end." for i in range(n))


def test_chunker_bounds_tail_and_long_sentences():
    c = Chunker(min_words=20, max_words=30, prose_only=True)
    chunks = c.chunks([sentences(10, 7)])  # 70 words in 7-word sentences
    sizes = [len(x.split()) for x in chunks]
    assert sum(sizes) == 70 and all(20 <= s <= 30 for s in sizes)
    assert " ".join(chunks).split() == sentences(10, 7).split()  # nothing lost, order kept
    # A sentence longer than max_words is cut; a short tail is merged when it fits.
    long = c.chunks([sentences(1, 65)])
    assert [len(x.split()) for x in long] == [30, 30, 5]  # 30 + 5 > max_words: the tail stays alone
    assert [len(x.split()) for x in c.chunks([sentences(1, 25), sentences(1, 4)])] == [29]
    assert c.chunks([]) == []


def test_chunker_paragraph_selection_and_settings():
    c = Chunker(min_words=3, max_words=10)
    kept, dropped = c.kept_paragraphs("A real sentence here.\n\nA list item\n\nAnother one here.")
    assert kept == ["A real sentence here.", "Another one here."] and dropped == ["A list item"]
    kept, dropped = Chunker(3, 10, prose_only=False).kept_paragraphs("A list item\n\nEnd.")
    assert kept == ["A list item", "End."] and dropped == []
    with pytest.raises(ConfigError, match="min_words <= max_words"):
        Chunker(min_words=50, max_words=10)


def test_fixture_chunks_respect_bounds():
    c = Chunker()
    for doc in docs_of(read_documents(WIKI_FIXTURE)):
        kept, _ = c.kept_paragraphs(doc.text)
        sizes = [len(x.split()) for x in c.chunks(kept)]
        assert all(s <= c.max_words for s in sizes)
        assert all(s >= c.min_words for s in sizes[:-1]), doc.title  # only the last may be short
