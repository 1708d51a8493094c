"""`python -m lvm.corpus.build input=PATH out_dir=DIR [encoder=minilm]`: real text into an article store.

Reads a MediaWiki dump, a folder of .txt files or JSONL (lvm/corpus/text.py), chunks each document,
embeds the chunks (lvm/corpus/encoders.py) and writes into `out_dir`:
- `store/`: a store directory (lvm/data/mapped.py, `data=store`) of unit rows in `dtype` storage,
  article ids 0..A-1 in document order, chunk indices 0..n-1; streamed block by block from the
  parts, so the vectors are never all in RAM;
- `articles.jsonl`: one line per article with its index, doc id, title and chunk count;
- `chunks.jsonl`: one line per row of the store with its article, chunk index and text;
- `build_info.json`: source, encoder, dim, storage dtype, counts, throughput, warnings.
Resumable: embedded documents are kept in `out_dir/parts/` (one NPZ + JSONL per part and a
manifest with a content hash per document); re-running the same command skips every document
already embedded unchanged, and re-embeds one whose title or text changed (the store then holds
only its new rows). A build with different content settings in the same `out_dir` is refused rather
than mixed; `dtype` is an output setting, so a rerun with another one only re-assembles the store.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from lvm.corpus.encoders import Encoder, make_encoder
from lvm.corpus.text import Chunker, Document, read_documents
from lvm.data.mapped import STORAGE, StoreWriter
from lvm.runtime.cli import CONF_DIR, entry_point, run_entry_point
from lvm.runtime.errors import ConfigError, DataError
from lvm.runtime.files import atomic_open, atomic_write_text
from lvm.runtime.threads import set_threads

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STORE = "store"  # the store directory in out_dir
BLOCK_ROWS = 4096  # rows buffered per StoreWriter.add
COUNTS = (
    "documents_read",
    "documents_kept",
    "documents_embedded_earlier",
    "documents_embedded_this_run",
    "documents_changed_reembedded",
    "chunks_embedded_this_run",
    "words",
    "paragraphs_dropped_not_prose",
    "words_dropped_not_prose",
)


def content_hash(title: str, chunks: Sequence[str]) -> str:
    """sha256 of what a document puts into the store (its title and chunk texts): when it differs
    from the manifest's, the document's stored rows are stale."""
    return hashlib.sha256(json.dumps([title, list(chunks)], ensure_ascii=False).encode()).hexdigest()


@dataclass
class Pending:
    """Documents chunked but not yet embedded, with their content hashes."""

    docs: list[tuple[Document, list[str], str]] = field(default_factory=list)

    @property
    def chunks(self) -> int:
        return sum(len(c) for _, c, _ in self.docs)


class Parts:
    """The resumable state of a build: embedded parts on disk and the manifest that lists them."""

    def __init__(self, folder: Path, settings: dict[str, Any]) -> None:
        self.folder = folder
        self.settings = settings
        self.manifest: dict[str, Any] = {"settings": settings, "encoder": None, "parts": []}
        path = folder / MANIFEST
        if path.is_file():
            try:
                self.manifest = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: corrupt build manifest ({e.msg}); delete {folder} to start over") from None
            self._check_settings(path)
            if any(len(doc) != 4 for part in self.manifest["parts"] for doc in part["docs"]):
                raise DataError(
                    f"{path}: build manifest without a content hash per document (expected [id, title, chunks, hash]); "
                    f"delete {folder} to start over"
                )
        # doc id -> content hash of its newest rows (a re-embedded document is listed again, later)
        self.done = {doc[0]: doc[3] for part in self.manifest["parts"] for doc in part["docs"]}

    def _check_settings(self, path: Path) -> None:
        theirs = self.manifest.get("settings", {})
        diff = sorted(k for k in set(theirs) | set(self.settings) if theirs.get(k) != self.settings.get(k))
        if diff:
            detail = "; ".join(f"{k}: {theirs.get(k)!r} there vs {self.settings.get(k)!r} now" for k in diff)
            raise ConfigError(
                f"{path}: out_dir holds a build made with other settings ({detail}); use another out_dir, "
                f"or delete {self.folder} to start over"
            )

    @property
    def encoder_dtype(self) -> str | None:
        return (self.manifest.get("encoder") or {}).get("dtype")

    def write(self, pending: Pending, vectors: np.ndarray, encoder: dict[str, Any], seconds: float) -> None:
        """Store one embedded part, then record it in the manifest (each write atomic)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"part-{len(self.manifest['parts']):05d}"
        with atomic_open(self.folder / f"{name}.npz", "wb") as f:
            np.savez(f, vectors=vectors)
        lines = [
            json.dumps(
                {"doc_id": doc.id, "title": doc.title, "chunk_index": i, "words": len(text.split()), "text": text}, ensure_ascii=False
            )
            for doc, chunks, _ in pending.docs
            for i, text in enumerate(chunks)
        ]
        atomic_write_text(self.folder / f"{name}.jsonl", "\n".join(lines) + "\n")
        earlier = (self.manifest["encoder"] or {}).get("dtype_calibration")
        if earlier and not encoder.get("dtype_calibration"):
            encoder = encoder | {"dtype_calibration": earlier}  # the measurement behind the dtype a resumed build reuses
        self.manifest["encoder"] = encoder
        self.manifest["parts"].append(
            {
                "name": name,
                "docs": [[doc.id, doc.title, len(chunks), digest] for doc, chunks, digest in pending.docs],
                "chunks": len(lines),
                "encode_seconds": round(seconds, 3),
            }
        )
        atomic_write_text(self.folder / MANIFEST, json.dumps(self.manifest, ensure_ascii=False, indent=1))
        self.done.update((doc.id, digest) for doc, _, digest in pending.docs)

    def assemble(self, out_dir: Path, context: int, dtype: str) -> dict[str, Any]:
        """Stream the parts into `out_dir/store/` (`dtype` storage), articles.jsonl and chunks.jsonl:
        each document once, with its newest rows, at the place it was first embedded (input order);
        return their counts. The store's manifest is written last, after both JSONL files."""
        parts = self.manifest["parts"]
        if not parts:
            raise DataError(f"{self.settings['input']}: no document was kept, so there is nothing to store (see the skipped counts above)")
        newest: dict[str, tuple[int, int, str, int]] = {}  # doc id -> (part, first row in it, title, chunks)
        for p, part in enumerate(parts):
            first = 0
            for doc_id, title, n, _ in part["docs"]:
                newest[doc_id] = (p, first, title, n)  # a later entry replaces the value, the key keeps its place
                first += n

        @functools.lru_cache(maxsize=2)
        def load(p: int) -> tuple[np.ndarray, list[str]]:
            """Part p's vectors and chunk texts. Documents come in part order, except a re-embedded
            one, whose rows are in a later part: two parts cached cover that detour and back."""
            return self._part_vectors(parts[p]), self._part_texts(parts[p])

        dim = load(next(iter(newest.values()))[0])[0].shape[1]
        source = self.settings["input"] + (f" [{self.settings['input_member']}]" if self.settings["input_member"] else "")
        block: list[tuple[np.ndarray, int]] = []  # (rows, article index) not yet added to the store
        lengths, row, buffered = [], 0, 0
        with (
            StoreWriter(
                out_dir / STORE,
                dim,
                dtype,
                normalize="error",  # encoders give unit float32 rows (unit_rows): another is a damaged part
                encoder=encoder_label(self.manifest["encoder"]),
                source=source,
                overwrite=True,
            ) as writer,
            atomic_open(out_dir / "articles.jsonl") as articles,
            atomic_open(out_dir / "chunks.jsonl") as chunks,
        ):  # exits in reverse: the JSONL files are in place before the store's manifest is written
            for a, (doc_id, (p, first, title, n)) in enumerate(newest.items()):
                vectors, texts = load(p)
                if vectors.shape[1] != dim:
                    raise DataError(
                        f"{self.folder}: parts have different dimensions [{dim}, {vectors.shape[1]}]; delete {self.folder} and rebuild"
                    )
                block.append((vectors[first : first + n], a))
                for line in texts[first : first + n]:
                    chunks.write(json.dumps({"row": row, "article_index": a, **json.loads(line)}, ensure_ascii=False) + "\n")
                    row += 1
                articles.write(json.dumps({"article_index": a, "doc_id": doc_id, "title": title, "chunks": n}, ensure_ascii=False) + "\n")
                lengths.append(n)
                buffered += n
                if buffered >= BLOCK_ROWS or a == len(newest) - 1:
                    writer.add(
                        np.concatenate([v for v, _ in block]),
                        np.concatenate([np.full(len(v), i, np.int64) for v, i in block]),
                        np.concatenate([np.arange(len(v), dtype=np.int64) for v, _ in block]),
                    )
                    block, buffered = [], 0
        sizes = np.array(lengths)
        return {"articles": len(sizes), "chunks": row, "dim": dim, "longest_article_chunks": int(sizes.max())} | window_counts(
            sizes, context
        )

    def _part_texts(self, part: Mapping[str, Any]) -> list[str]:
        """The JSONL lines of a part, one per chunk."""
        path = self.folder / f"{part['name']}.jsonl"
        try:
            texts = path.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise DataError(f"{path}: cannot read this part ({e}); delete {self.folder} and re-run") from None
        if len(texts) != part["chunks"]:
            raise DataError(f"{path}: {len(texts)} chunk texts but the manifest lists {part['chunks']} chunks")
        return texts

    def _part_vectors(self, part: Mapping[str, Any]) -> np.ndarray:
        path = self.folder / f"{part['name']}.npz"
        try:
            with np.load(path) as npz:
                v = npz["vectors"]
        except (OSError, KeyError, ValueError) as e:
            raise DataError(
                f"{path}: cannot read this part ({e}); delete it and its manifest entry, or {self.folder}, and re-run"
            ) from None
        if len(v) != part["chunks"]:
            raise DataError(f"{path}: {len(v)} vectors but the manifest lists {part['chunks']} chunks")
        return v


def encoder_label(encoder: Mapping[str, Any]) -> str:
    """The encoder in a few words for the store's manifest: name (kind, dtype)."""
    details = ", ".join(str(encoder[k]) for k in ("kind", "dtype") if encoder.get(k))
    return f"{encoder.get('name')} ({details})"


def window_counts(lengths: np.ndarray, context: int) -> dict[str, int]:
    """How many next-chunk windows of `context` chunks the articles hold (each inside one article)."""
    return {
        f"windows_context{context}_next": int(np.clip(lengths - context, 0, None).sum()),
        f"articles_with_a_window_context{context}": int((lengths > context).sum()),
    }


def window_warnings(stored: Mapping[str, Any], context: int) -> list[str]:
    """Why a store is unusable for next-chunk training, if it is: it holds no window."""
    if stored[f"windows_context{context}_next"]:
        return []
    return [
        f"the store holds no next-chunk window of context {context}: no article has more than {context} chunks "
        f"(the longest has {stored['longest_article_chunks']}); lower chunk.min_words and chunk.max_words "
        "(more, shorter chunks) or windows_context, or add longer documents"
    ]


def content_settings(cfg: DictConfig) -> dict[str, Any]:
    """What decides the content of a build: a resumed build must have the same."""
    return {
        "input": str(Path(cfg.input).resolve()),
        "input_member": cfg.input_member,
        "input_format": cfg.input_format,
        "namespaces": list(cfg.namespaces),
        "chunk": OmegaConf.to_container(cfg.chunk, resolve=True),
        "min_article_words": int(cfg.min_article_words),
        "encoder": OmegaConf.to_container(cfg.encoder, resolve=True),
    }


def validate(cfg: DictConfig) -> None:
    """Impossible settings, named, before any model is loaded or any text read."""
    for key in ("input", "out_dir"):
        if OmegaConf.is_missing(cfg, key) or not cfg[key]:
            raise ConfigError(f"{key} must be set: python -m lvm.corpus.build input=PATH out_dir=DIR [encoder=minilm]")
    if int(cfg.min_article_words) < 0:
        raise ConfigError(f"min_article_words must be >= 0 (got {cfg.min_article_words})")
    if int(cfg.part_chunks) < 1:
        raise ConfigError(f"part_chunks must be >= 1 (got {cfg.part_chunks})")
    if cfg.max_documents is not None and int(cfg.max_documents) < 1:
        raise ConfigError(f"max_documents must be null or >= 1 (got {cfg.max_documents})")
    if int(cfg.workers) < 1:
        raise ConfigError(f"workers must be >= 1 (got {cfg.workers})")
    if int(cfg.windows_context) < 1:
        raise ConfigError(f"windows_context must be >= 1 (got {cfg.windows_context})")
    if cfg.dtype not in STORAGE:
        raise ConfigError(f"dtype (the store's vector storage) must be one of {', '.join(STORAGE)} (got {cfg.dtype!r})")


def build(cfg: DictConfig) -> dict[str, Any]:
    """Run a build (or finish an interrupted one) and return its build info."""
    validate(cfg)
    set_threads(cfg.threads)
    start = time.perf_counter()
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chunker = Chunker(int(cfg.chunk.min_words), int(cfg.chunk.max_words), bool(cfg.chunk.prose_only))
    settings = content_settings(cfg)
    parts = Parts(out_dir / "parts", settings)
    documents = read_documents(cfg.input, cfg.input_format, cfg.input_member, int(cfg.workers), tuple(cfg.namespaces))
    encoder_cfg = dict(settings["encoder"])
    if encoder_cfg.get("dtype") == "auto" and parts.encoder_dtype:
        encoder_cfg["dtype"] = parts.encoder_dtype  # a resumed build keeps the precision it chose
    encoder = make_encoder(encoder_cfg)
    counts, encode_seconds = _embed_all(cfg, documents, chunker, encoder, parts)
    stored = parts.assemble(out_dir, int(cfg.windows_context), str(cfg.dtype))
    wall = time.perf_counter() - start
    warnings = window_warnings(stored, int(cfg.windows_context))
    info = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "input": {k: settings[k] for k in ("input", "input_member", "input_format", "namespaces")},
        "encoder": parts.manifest["encoder"] or encoder.describe(),
        "chunk": settings["chunk"] | {"min_article_words": settings["min_article_words"]},
        "dim": stored["dim"],
        "dtype": str(cfg.dtype),  # the store's vector storage
        "counts": counts | {k: v for k, v in stored.items() if k != "dim"},
        "warnings": warnings,
        "throughput": {
            "wall_seconds": round(wall, 2),
            "encode_seconds_this_run": round(encode_seconds, 2),
            "chunks_embedded_this_run": counts["chunks_embedded_this_run"],
            "chunks_per_second": round(counts["chunks_embedded_this_run"] / encode_seconds, 1) if encode_seconds else None,
        },
        "outputs": {name: str(out_dir / name) for name in (STORE, "articles.jsonl", "chunks.jsonl", "build_info.json")},
    }
    atomic_write_text(out_dir / "build_info.json", json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    c, t = info["counts"], info["throughput"]
    log.info(
        "built %s: %d articles, %d chunks, D=%d, %d windows (context %d, next chunk); %d chunks embedded this run in %.1f s (%s chunks/s)",
        info["outputs"][STORE],
        c["articles"],
        c["chunks"],
        info["dim"],
        c[f"windows_context{cfg.windows_context}_next"],
        cfg.windows_context,
        t["chunks_embedded_this_run"],
        t["encode_seconds_this_run"],
        t["chunks_per_second"],
    )
    for warning in warnings:  # last, after the summary, and named (the CLI's log format shows no level)
        log.warning("WARNING: %s", warning)
    return info


def _embed_all(cfg: DictConfig, documents: Iterator, chunker: Chunker, encoder: Encoder, parts: Parts) -> tuple[dict[str, Any], float]:
    """Read, chunk and embed every document not embedded yet; returns counts and encoding time."""
    counts: Counter[str] = Counter({k: 0 for k in COUNTS})
    skipped: Counter[str] = Counter()
    seen: set[str] = set()
    pending = Pending()
    encode_seconds = 0.0
    limit = cfg.max_documents
    stopped = False

    def flush() -> None:
        nonlocal pending, encode_seconds
        if not pending.docs:
            return
        t0 = time.perf_counter()
        vectors = encoder.encode([text for _, chunks, _ in pending.docs for text in chunks])
        seconds = time.perf_counter() - t0
        encode_seconds += seconds
        parts.write(pending, vectors, encoder.describe(), seconds)
        counts["chunks_embedded_this_run"] += len(vectors)
        pending = Pending()

    bar = tqdm(documents, desc="documents", unit="doc", disable=not cfg.progress, dynamic_ncols=True, mininterval=1.0)
    for record in bar:
        if not isinstance(record, Document):
            skipped[record.reason] += 1
            continue
        if record.id in seen:
            raise DataError(f"{cfg.input}: document id {record.id!r} appears twice; ids must be unique")
        seen.add(record.id)
        counts["documents_read"] += 1
        kept, dropped = chunker.kept_paragraphs(record.text)
        words = sum(len(p.split()) for p in kept)
        counts["paragraphs_dropped_not_prose"] += len(dropped)
        counts["words_dropped_not_prose"] += sum(len(p.split()) for p in dropped)
        if words < int(cfg.min_article_words) or words == 0:
            skipped[f"fewer than {cfg.min_article_words} words"] += 1
            continue
        counts["documents_kept"] += 1
        counts["words"] += words
        chunks = chunker.chunks(kept)
        digest = content_hash(record.title, chunks)
        earlier = parts.done.get(record.id)
        if earlier == digest:
            counts["documents_embedded_earlier"] += 1
        else:
            if earlier is not None:
                counts["documents_changed_reembedded"] += 1
            pending.docs.append((record, chunks, digest))
            if pending.chunks >= int(cfg.part_chunks):
                flush()
        bar.set_postfix(kept=counts["documents_kept"], embedded=counts["chunks_embedded_this_run"], refresh=False)
        if limit is not None and counts["documents_kept"] >= limit:
            log.info("max_documents=%d reached: the rest of %s is not read", limit, cfg.input)
            stopped = True
            break
    flush()
    bar.close()
    counts["documents_embedded_this_run"] = counts["documents_kept"] - counts["documents_embedded_earlier"]
    result = dict(counts) | {"skipped": dict(skipped), "stopped_at_max_documents": stopped}
    for reason, n in sorted(skipped.items()):
        log.info("skipped %d records: %s", n, reason)
    if counts["documents_changed_reembedded"]:
        log.info(
            "re-embedded %d documents whose title or text changed since they were embedded into %s",
            counts["documents_changed_reembedded"],
            cfg.out_dir,
        )
    return result, encode_seconds


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="build")
@entry_point("lvm.corpus.build")
def main(cfg: DictConfig) -> None:
    build(cfg)


def cli() -> None:
    """The console script."""
    run_entry_point(main, positional="input")


if __name__ == "__main__":
    cli()
