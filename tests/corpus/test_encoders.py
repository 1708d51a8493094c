"""Encoders: the toy hashing encoder, output checks, `module:function` resolution; MiniLM and
WordLlama when the optional text extra is installed."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from lvm.corpus.encoders import (
    _import_extra,
    hashed_bow,
    make_encoder,
    resolve_callable,
    unit_rows,
)
from lvm.runtime.errors import ConfigError, DataError
from tests.helpers import HAVE_TEXT, HAVE_WORDLLAMA, NEEDS_TEXT, ROOT

# conf/encoder/minilm.yaml, as lvm.corpus.build composes it.
MINILM = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "encoder" / "minilm.yaml"))

RELATED = [
    "The cat sat on the mat and purred at the dog.",
    "A cat was sitting on a mat, purring at a dog.",
    "Quarterly revenue rose on strong bond trading.",
]


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_hashed_bow_is_deterministic_bag_of_words():
    a = hashed_bow(["the cat sat", "sat cat the", "the dog ran"], dim=32)
    assert np.array_equal(a, hashed_bow(["the cat sat", "sat cat the", "the dog ran"], dim=32))
    assert np.array_equal(a[0], a[1])  # word order does not matter
    # Each word is +-1 in one bucket, and a text is the sum of its words (punctuation and case ignored).
    words = hashed_bow(["the", "cat", "sat", "dog", "ran"], dim=32)
    assert (np.abs(words).sum(1) == 1).all() and (np.count_nonzero(words, axis=1) == 1).all()
    np.testing.assert_array_equal(a[0], words[0] + words[1] + words[2])
    np.testing.assert_array_equal(hashed_bow(["The CAT, sat."], dim=32)[0], a[0])
    assert not np.array_equal(hashed_bow(["x y"], dim=32, seed=1), hashed_bow(["x y"], dim=32, seed=0))


def test_hashing_encoder_through_the_callable_encoder():
    enc = make_encoder(
        {"_target_": "lvm.corpus.encoders.CallableEncoder", "target": "lvm.corpus.encoders:hashed_bow", "kwargs": {"dim": 48}}
    )
    out = enc.encode(RELATED)
    assert out.shape == (3, 48) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    raw = hashed_bow(RELATED, dim=48)
    np.testing.assert_allclose(out, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)
    assert enc.describe() == {
        "kind": "callable",
        "name": "lvm.corpus.encoders:hashed_bow",
        "target": "lvm.corpus.encoders:hashed_bow",
        "kwargs": {"dim": 48},
    }


def test_unit_rows_rejects_bad_encoder_output():
    np.testing.assert_allclose(unit_rows([[3.0, 4.0]], 1, "e"), [[0.6, 0.8]])
    with pytest.raises(DataError, match=r"encoder e: expected an array of shape \[2, D\] for 2 texts, got \(1, 2\)"):
        unit_rows([[3.0, 4.0]], 2, "e")
    with pytest.raises(DataError, match=r"encoder e: 1 of 2 vectors are zero or not finite \(first: text 1\)"):
        unit_rows([[1.0, 0.0], [np.nan, 0.0]], 2, "e")
    with pytest.raises(DataError, match="zero or not finite"):
        unit_rows([[0.0, 0.0]], 1, "e")
    with pytest.raises(DataError, match="not a numeric array"):
        unit_rows([["a", "b"]], 1, "e")


def test_callable_and_kind_errors_name_the_setting():
    with pytest.raises(ConfigError, match="encoder.target must be 'module:function'"):
        resolve_callable("lvm.corpus.encoders")
    with pytest.raises(ConfigError, match="cannot import no_such_module"):
        resolve_callable("no_such_module:f")
    with pytest.raises(ConfigError, match="lvm.corpus.encoders has no function nope"):
        resolve_callable("lvm.corpus.encoders:nope")
    with pytest.raises(ConfigError, match="encoder: needs a _target_"):
        make_encoder({"kind": "openai"})
    with pytest.raises(ConfigError, match=r"encoder: .*unexpected keyword argument 'dims'"):
        make_encoder({**MINILM, "dims": 3})
    with pytest.raises(ConfigError, match=r"encoder.path=/no/such/model: no such folder; .* by local path"):
        make_encoder({**MINILM, "package": None, "path": "/no/such/model"})


def test_missing_extra_says_what_to_install():
    with pytest.raises(ConfigError, match=r"'no_such_encoder_lib', which is not installed .* pip install -e '\.\[text\]'"):
        _import_extra("no_such_encoder_lib")


@pytest.mark.skipif(not HAVE_TEXT, reason=NEEDS_TEXT)
def test_minilm_real_embeddings():
    enc = make_encoder({**MINILM, "dtype": "float32"})
    fp32 = enc.encode(RELATED)
    assert fp32.shape == (3, 384) and enc.describe()["dim"] == 384
    np.testing.assert_allclose(np.linalg.norm(fp32, axis=1), 1.0, atol=1e-5)
    assert cos(fp32[0], fp32[1]) > 0.7 > 0.2 > cos(fp32[0], fp32[2])  # paraphrase close, unrelated far
    enc.choose_dtype(RELATED * 6)
    chosen = enc.describe()["dtype_calibration"]
    assert chosen["chosen"] in ("float32", "bfloat16") and chosen["min_cos_bfloat16_vs_float32"] >= 0.99
    again = enc.encode(RELATED)
    assert float((again * fp32).sum(1).min()) >= 0.99  # whichever precision, the same vectors


@pytest.mark.skipif(not HAVE_WORDLLAMA, reason=NEEDS_TEXT)
def test_wordllama_real_embeddings():
    enc = make_encoder(OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "encoder" / "wordllama.yaml")))
    out = enc.encode(RELATED)
    assert out.shape == (3, 256)
    assert cos(out[0], out[1]) > cos(out[0], out[2])
