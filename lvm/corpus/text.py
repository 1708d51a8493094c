"""Text sources and the chunker of `python -m lvm.corpus.build`: documents in, word chunks out.

Sources, all streamed one document at a time (a dump is never loaded whole):
- a MediaWiki XML dump (`.xml` or `.xml.bz2`), main-namespace pages only, redirects skipped,
  wikitext turned into plain prose by mwparserfromhell (templates, refs, tables, file/category
  links and the closing See also / References / External links sections dropped);
- a folder of `.txt` files, one document each (id = path relative to the folder, title = stem);
- JSONL, one object per line with `id`, `title` and `text`.
Any of them may also be read from inside a zip archive (a wheel, say) with `member`.
"""

from __future__ import annotations

import bz2
import io
import itertools
import json
import logging
import multiprocessing
import re
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from xml.etree import ElementTree

from lvm.runtime.errors import ConfigError, DataError

log = logging.getLogger(__name__)

FORMATS = ("mediawiki", "text_dir", "jsonl")


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    text: str
    markup: str = "plain"  # "wikitext" until wikitext_to_prose has run (as_prose)


@dataclass(frozen=True)
class Skipped:
    """A source record that is not a document (a redirect, another namespace): counted, not kept."""

    id: str
    reason: str


def detect_format(path: Path, member: str | None) -> str:
    """The source format implied by a path (or by the archive member's name)."""
    name = (member or path.name).lower()
    if member is None and path.is_dir():
        return "text_dir"
    if name.endswith((".xml", ".xml.bz2")) or (member and name.endswith(".bz2")):
        return "mediawiki"
    if name.endswith((".jsonl", ".jsonl.bz2")):
        return "jsonl"
    raise ConfigError(
        f"input={path}{'!' + member if member else ''}: cannot tell its format from the name; set input_format to one of {list(FORMATS)}"
    )


def read_documents(
    path: str | Path, fmt: str = "auto", member: str | None = None, workers: int = 1, namespaces: Sequence[int] = (0,)
) -> Iterator[Document | Skipped]:
    """Documents of a source as plain prose, in source order, with the records that are not
    documents. `workers` processes turn wikitext into prose (see prose_documents); MediaWiki
    pages outside `namespaces` are Skipped."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"input={path}: no such file or folder")
    if fmt == "auto":
        fmt = detect_format(path, member)
    if fmt not in FORMATS:
        raise ConfigError(f"input_format must be auto or one of {list(FORMATS)} (got {fmt!r})")
    if fmt == "text_dir":
        if member is not None or not path.is_dir():
            raise ConfigError(f"input_format=text_dir needs a folder of .txt files (got {path})")
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise DataError(f"input={path}: the folder holds no .txt file")
        return read_text_files(path, files)
    name = f"{path}!{member}" if member else str(path)
    if fmt == "jsonl":
        return read_jsonl(name, lambda: open_stream(path, member))
    return prose_documents(read_mediawiki(name, lambda: open_stream(path, member), namespaces), workers)


def as_prose(record: Document | Skipped) -> Document | Skipped:
    """A record with its wikitext turned into plain prose (other records unchanged)."""
    if isinstance(record, Document) and record.markup == "wikitext":
        return Document(record.id, record.title, wikitext_to_prose(record.text))
    return record


def prose_documents(records: Iterable[Document | Skipped], workers: int, batch: int = 64) -> Iterator[Document | Skipped]:
    """`as_prose` over a stream, in order. mwparserfromhell takes nearly all the time of reading a
    dump, so with workers > 1 batches of pages go to a process pool;
    batches keep memory bounded (Pool.imap would read the whole dump ahead)."""
    records = iter(records)
    if workers <= 1:
        yield from map(as_prose, records)
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        for group in iter(lambda: list(itertools.islice(records, batch * workers)), []):
            yield from pool.map(as_prose, group, chunksize=max(1, len(group) // (4 * workers)))


@contextmanager
def open_stream(path: Path, member: str | None = None) -> Iterator[IO[bytes]]:
    """A binary stream of a file or of a member of a zip archive, bz2-decompressed on the fly."""
    with _open_raw(path, member) as raw:
        if (member or path.name).endswith(".bz2"):
            with bz2.open(raw) as stream:
                yield stream
        else:
            yield raw


@contextmanager
def _open_raw(path: Path, member: str | None) -> Iterator[IO[bytes]]:
    if member is None:
        with path.open("rb") as f:
            yield f
        return
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise DataError(f"input={path}: input_member is set but the file is not a zip archive ({e})") from None
    with archive:
        if member not in archive.namelist():
            raise DataError(f"input={path}: no member {member!r} in the archive")
        with archive.open(member) as f:
            yield f


def read_text_files(folder: Path, files: Sequence[Path]) -> Iterator[Document]:
    """One document per file (id = path relative to `folder`, title = stem)."""
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{f}: not UTF-8 text ({e})") from None
        yield Document(str(f.relative_to(folder)), f.stem, text)


def read_jsonl(name: str, opener) -> Iterator[Document]:
    """Documents of a JSONL file: one object with string `id`, `title` and `text` per line."""
    with opener() as raw:
        for lineno, line in enumerate(io.TextIOWrapper(raw, encoding="utf-8"), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{name} line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{name} line {lineno}: expected an object with id, title and text")
            missing = [k for k in ("id", "title", "text") if k not in obj]
            if missing:
                raise DataError(f"{name} line {lineno}: missing key(s) {missing}; each line needs id, title and text")
            if not isinstance(obj["text"], str):
                raise DataError(f"{name} line {lineno}: 'text' must be a string")
            yield Document(str(obj["id"]), str(obj["title"]), obj["text"])


def read_mediawiki(name: str, opener, namespaces: Sequence[int] = (0,)) -> Iterator[Document | Skipped]:
    """Pages of a MediaWiki XML export, streamed; pages outside `namespaces` and redirects are Skipped."""
    with opener() as raw:
        context = ElementTree.iterparse(raw, events=("start", "end"))
        try:
            _, root = next(context)
            for event, elem in context:
                if event != "end" or _local(elem.tag) != "page":
                    continue
                yield _page(elem, namespaces)
                root.clear()  # keep memory flat: drop the parsed pages
        except ElementTree.ParseError as e:
            line, col = e.position
            raise DataError(f"{name}: malformed XML at line {line}, column {col} ({e})") from None


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _page(page: ElementTree.Element, namespaces: Sequence[int]) -> Document | Skipped:
    fields = {_local(child.tag): child for child in page}
    title = (fields["title"].text or "") if "title" in fields else ""
    page_id = (fields["id"].text or title) if "id" in fields else title
    ns = int(fields["ns"].text) if "ns" in fields and fields["ns"].text else 0
    if ns not in namespaces:
        return Skipped(page_id, f"namespace {ns}")
    if "redirect" in fields:
        return Skipped(page_id, "redirect")
    text = ""
    revision = fields.get("revision")
    if revision is not None:
        for child in revision:
            if _local(child.tag) == "text":
                text = child.text or ""
    return Document(page_id, title, text, markup="wikitext")


DROP_SECTIONS = frozenset(
    s.lower()
    for s in (
        "See also",
        "References",
        "External links",
        "Further reading",
        "Notes",
        "Footnotes",
        "Bibliography",
        "Sources",
        "Citations",
        "Notes and references",
        "Works cited",
    )
)
DROP_TAGS = frozenset(("ref", "references", "gallery", "table", "math", "timeline", "imagemap", "score", "syntaxhighlight"))
DROP_LINK_PREFIXES = ("file:", "image:", "category:", "media:")
_INTERWIKI = re.compile(r"^:?[a-z]{2,3}(-[a-z]+)?:")


def wikitext_to_prose(wikitext: str) -> str:
    """Plain paragraphs of an article's wikitext: what a reader sees as running text."""
    import mwparserfromhell

    code = mwparserfromhell.parse(wikitext)
    for section in code.get_sections(levels=[2]):
        heading = section.filter_headings(recursive=False)
        if heading and heading[0].title.strip_code().strip().lower() in DROP_SECTIONS:
            _remove(code, section)
    for node in code.filter_templates(recursive=False):
        _remove(code, node)
    for node in code.filter_tags(recursive=True):
        if str(node.tag).strip().lower() in DROP_TAGS:
            _remove(code, node)
    for node in code.filter_wikilinks(recursive=True):
        target = str(node.title).strip().lower()
        if target.startswith(DROP_LINK_PREFIXES) or _INTERWIKI.match(target):
            _remove(code, node)
    for node in code.filter_headings(recursive=True):
        _remove(code, node)
    # Wikitext paragraphs and list items are single lines: make each a paragraph.
    lines = (" ".join(line.split()) for line in code.strip_code(normalize=True, collapse=True).split("\n"))
    return "\n\n".join(line for line in lines if line)


def _remove(code, node) -> None:
    try:
        code.remove(node)
    except ValueError:  # already removed with an enclosing node
        pass


# A sentence ends at . ! or ? (optionally closed by quotes/brackets) followed by space and a
# capital, digit or opening quote; initials ("J. R. R.") and common abbreviations do not end one.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])")
_ABBREVIATIONS = re.compile(
    r"(?:\b[A-Z]|\b(?:Mr|Mrs|Ms|Dr|Prof|St|Sr|Jr|Gen|Col|Lt|Sgt|Rev|Hon|Mt|No|Vol|vs|etc|al|ca|cf|e\.g|i\.e|approx|Inc|Ltd|Co|Corp|Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec))\.$"
)


def paragraphs(text: str) -> list[str]:
    """Paragraphs of plain text: blocks separated by blank lines, hard-wrapped lines joined."""
    blocks = re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n"))
    return [p for p in (" ".join(b.split()) for b in blocks) if p]


_PROSE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*$")


def is_prose(paragraph: str) -> bool:
    """Whether a paragraph ends like a sentence (list items, captions and table residue do not)."""
    return bool(_PROSE_END.search(paragraph))


def split_sentences(paragraph: str) -> list[str]:
    """Sentences of one paragraph."""
    out: list[str] = []
    buf = ""
    for piece in _SENTENCE_END.split(paragraph.strip()):
        buf = f"{buf} {piece}" if buf else piece
        if not _ABBREVIATIONS.search(buf):
            out.append(buf.strip())
            buf = ""
    if buf.strip():
        out.append(buf.strip())
    return [s for s in out if s]


@dataclass(frozen=True)
class Chunker:
    """Greedy sentence chunks: sentences are added until a chunk has >= min_words words, and a
    chunk never passes max_words (a longer sentence is cut at max_words words). A short tail is
    merged into the last chunk when that fits, else kept as a chunk of its own. With prose_only,
    paragraphs that do not end like a sentence are left out (and counted by the caller)."""

    min_words: int = 60
    max_words: int = 120
    prose_only: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.min_words <= self.max_words:
            raise ConfigError(f"chunk: need 0 < min_words <= max_words (got {self.min_words}, {self.max_words})")

    def kept_paragraphs(self, text: str) -> tuple[list[str], list[str]]:
        """(kept, dropped) paragraphs of a document's text."""
        paras = paragraphs(text)
        if not self.prose_only:
            return paras, []
        kept: list[str] = []
        dropped: list[str] = []
        for p in paras:
            (kept if is_prose(p) else dropped).append(p)
        return kept, dropped

    def chunks(self, kept: list[str]) -> list[str]:
        """Chunks of the kept paragraphs, in order."""
        chunks: list[list[str]] = []
        cur: list[str] = []
        for sentence in (s for p in kept for s in split_sentences(p)):
            words = sentence.split()
            for start in range(0, len(words), self.max_words):
                piece = words[start : start + self.max_words]
                if cur and len(cur) + len(piece) > self.max_words:
                    chunks.append(cur)
                    cur = []
                cur = cur + piece
                if len(cur) >= self.min_words:
                    chunks.append(cur)
                    cur = []
        if cur:
            if chunks and len(chunks[-1]) + len(cur) <= self.max_words:
                chunks[-1] = chunks[-1] + cur
            else:
                chunks.append(cur)
        return [" ".join(c) for c in chunks]
