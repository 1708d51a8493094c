"""Metric functions with the oracle, copy-last and mean-of-context predictions, against numpy."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lvm.data.store import ArticleStore
from lvm.evaluation import metrics as M
from tests.helpers import P6, ROOT


def tiny_store(seed=0, d=16, lengths=(9, 12, 7, 10)):
    rng = np.random.default_rng(seed)
    n = sum(lengths)
    v = rng.standard_normal((n, d)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    art = np.repeat(np.arange(len(lengths)), lengths)
    chunk = np.concatenate([np.arange(n_) for n_ in lengths])
    return ArticleStore(v, art, chunk, "tiny")


@pytest.fixture(scope="module")
def setup():
    store = tiny_store()
    windows = store.windows(P6)
    batch = windows.gather(np.arange(len(windows)))
    start, length = store.article_span(batch["target_row"].numpy())
    return store, windows, batch, torch.from_numpy(start), torch.from_numpy(length)


def numpy_within_article_rank(pred, store, target_row):
    """Naive loop: rank of the target among its article's chunks by cosine; ties count against
    the prediction (1 + other chunks scoring >= the target)."""
    out = []
    vec = store.vectors.numpy()
    for p, r in zip(pred, target_row):
        art = store.article_ids[r]
        rows = np.flatnonzero(store.article_ids == art)
        p = p / np.linalg.norm(p)
        scores = vec[rows] @ p
        out.append(1 + int(np.sum(scores[rows != r] >= scores[rows == r][0])))
    return np.array(out)


def test_oracle(setup):
    store, _, b, start, length = setup
    pred = b["target"]
    assert torch.allclose(M.cos(pred, b["target"]), torch.ones(len(pred)), atol=1e-6)
    ranks = M.within_article_ranks(pred, store.vectors, b["target_row"], start, length)
    assert (ranks == 1).all()
    assert M.recall_at(ranks, 1).item() == 1.0 and M.mrr(ranks).item() == 1.0
    expected_margin = 1 - np.sum(b["target"].numpy() * b["context"][:, -1].numpy(), axis=1)
    assert np.allclose(M.margin(pred, b["target"], b["context"][:, -1]).numpy(), expected_margin, atol=1e-6)
    assert (M.six_bank_ranks(pred, b["context"], b["target"]) == 1).all()


def test_copy_last(setup):
    store, _, b, start, length = setup
    pred = M.copy_last(b["context"])
    ctx_last, tgt = b["context"][:, -1].numpy(), b["target"].numpy()
    assert np.allclose(M.cos(pred, b["target"]).numpy(), np.sum(ctx_last * tgt, 1), atol=1e-6)
    assert np.allclose(M.margin(pred, b["target"], b["context"][:, -1]).numpy(), np.sum(ctx_last * tgt, 1) - 1, atol=1e-6)
    ranks = M.within_article_ranks(pred, store.vectors, b["target_row"], start, length)
    # ctx[-1] itself is in the article and scores 1: the target can never rank first.
    assert (ranks >= 2).all()
    assert np.array_equal(ranks.numpy(), numpy_within_article_rank(pred.numpy(), store, b["target_row"].numpy()))


def test_mean_context(setup):
    store, _, b, start, length = setup
    pred = M.mean_context(b["context"])
    m = b["context"].numpy().mean(1)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    assert np.allclose(pred.numpy(), m, atol=1e-6)
    ranks = M.within_article_ranks(pred, store.vectors, b["target_row"], start, length)
    assert np.array_equal(ranks.numpy(), numpy_within_article_rank(m, store, b["target_row"].numpy()))
    assert M.recall_at(ranks, 5).item() == pytest.approx(np.mean(ranks.numpy() <= 5))
    assert M.mrr(ranks).item() == pytest.approx(np.mean(1 / ranks.numpy()))


def test_slot_linear_matches_an_independent_float64_least_squares(setup):
    store, windows, b, start, length = setup
    # Fitted in pieces (batches of 7) equals one numpy solve of the stacked problem in float64.
    w = M.fit_slot_weights((x["context"], x["target"]) for x in windows.batches(7))
    c, t = b["context"].double().numpy(), b["target"].double().numpy()
    A = c.transpose(0, 2, 1).reshape(-1, c.shape[1])  # one row per (window, dimension)
    expected, *_ = np.linalg.lstsq(A, t.reshape(-1), rcond=None)
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-9, atol=1e-12)
    pred = M.slot_linear(b["context"], w)
    direct = np.einsum("nkd,k->nd", c, expected)
    direct /= np.linalg.norm(direct, axis=1, keepdims=True)
    np.testing.assert_allclose(pred.numpy(), direct, atol=1e-6)
    ranks = M.within_article_ranks(pred, store.vectors, b["target_row"], start, length)
    assert np.array_equal(ranks.numpy(), numpy_within_article_rank(direct, store, b["target_row"].numpy()))

    # Least squares on the training windows: its MSE there is at most copy-last's and the mean's.
    def mse(p):
        return float(((p - t) ** 2).sum(-1).mean())

    assert mse(np.einsum("nkd,k->nd", c, expected)) <= min(mse(c[:, -1]), mse(c.mean(1))) + 1e-12


def test_slot_linear_recovers_exact_weights_and_reduces_to_its_baselines(setup):
    """Targets built as a known weighted sum: the fit finds the weights and predicts them exactly
    (the oracle case); targets equal to ctx[-1] give copy-last's one-hot weights."""
    _, _, b, _, _ = setup
    c = b["context"]
    true_w = torch.tensor([0.1, -0.2, 0.3, 0.5, 0.9], dtype=torch.float64)
    exact = torch.einsum("nkd,k->nd", c.double(), true_w).float()
    w = M.fit_slot_weights([(c, exact)])
    np.testing.assert_allclose(w.numpy(), true_w.numpy(), atol=1e-5)
    assert torch.allclose(M.cos(M.slot_linear(c, w), exact), torch.ones(len(c)), atol=1e-5)
    w_last = M.fit_slot_weights([(c, c[:, -1])])
    np.testing.assert_allclose(w_last.numpy(), [0, 0, 0, 0, 1], atol=1e-6)
    assert torch.allclose(M.slot_linear(c, w_last), M.copy_last(c), atol=1e-6)
    with pytest.raises(ValueError, match="at least one training window"):
        M.fit_slot_weights([])


def test_random_predictions_match_naive_ranking(setup):
    store, _, b, start, length = setup
    pred = torch.randn(len(b["target"]), store.dim, generator=torch.Generator().manual_seed(1))
    ranks = M.within_article_ranks(pred, store.vectors, b["target_row"], start, length)
    assert np.array_equal(ranks.numpy(), numpy_within_article_rank(pred.numpy(), store, b["target_row"].numpy()))


def test_six_bank_reads_perfect_for_collapsed_model(setup):
    """A model pointing away from its whole context ranks the target first in the 6-bank."""
    _, _, b, _, _ = setup
    collapsed = -b["context"].mean(1)
    assert M.recall_at(M.six_bank_ranks(collapsed, b["context"], b["target"]), 5).item() == 1.0
    assert M.cos(collapsed, b["target"]).mean().item() < 0.1


# Hand-built store for the tie rule (D = 2). Article 0 holds a duplicate (rows 0 and 2); article 1
# is shorter, so its batch row is padded to article 0's length.
TIE_VECTORS = torch.tensor(
    [
        [1.0, 0.0],
        [0.0, 1.0],
        [1.0, 0.0],
        [-1.0, 0.0],  # article 0: rows 0-3
        [1.0, 0.0],
        [0.6, 0.8],
        [0.0, -1.0],
    ]
)  # article 1: rows 4-6
NAN, INF = float("nan"), float("inf")
# (prediction, target row, expected rank by hand: 1 + other chunks of the article scoring >= the target)
TIE_CASES = [
    ([1.0, 0.0], 0, 2),  # oracle, but row 2 duplicates the target: the tie counts against it
    ([0.0, 1.0], 1, 1),  # oracle of a unique vector: rank 1 (scores 0, 1, 0, 0)
    ([1.0, 1.0], 0, 3),  # scores .707, .707, .707, -.707: rows 1 and 2 tie the target row 0
    ([1.0, 1.0], 3, 4),  # ... and all three beat the target row 3
    ([0.6, 0.8], 5, 1),  # oracle in the shorter article
    ([-1.0, 0.0], 4, 3),  # target scores -1, rows 5 (-.6) and 6 (0) beat it; padding must not count
    ([0.0, 0.0], 5, 3),  # zero prediction: every score is 0, all tie: last of 3
    ([0.0, 0.0], 0, 4),  # ... last of 4
    ([NAN, 0.0], 4, 3),  # any NaN component: last
    ([INF, 0.0], 0, 4),  # any inf component: last
    ([1.0, -INF], 6, 3),
]


def test_ties_and_degenerate_predictions_rank_against_the_model():
    pred = torch.tensor([c[0] for c in TIE_CASES])
    rows = torch.tensor([c[1] for c in TIE_CASES])
    start = torch.where(rows < 4, 0, 4)
    length = torch.where(rows < 4, 4, 3)
    ranks = M.within_article_ranks(pred, TIE_VECTORS, rows, start, length)
    assert ranks.tolist() == [c[2] for c in TIE_CASES]


def test_ties_and_degenerate_predictions_in_a_bank():
    bank = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]).expand(5, 3, 2)  # slot 0 duplicates the true slot 1
    pred = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.0, 0.0], [NAN, NAN]])
    # scores (1, 1, 0), (.995, .995, .0995), (0, 0, 1), (0, 0, 0), NaN: by hand 2, 2, 3, 3, 3.
    assert M.ranks_in_bank(pred, bank, true_slot=1).tolist() == [2, 2, 3, 3, 3]
    unique = torch.tensor([[0.0, -1.0], [1.0, 0.0], [0.0, 1.0]]).expand(1, 3, 2)
    assert M.ranks_in_bank(torch.tensor([[1.0, 0.0]]), unique, true_slot=1).tolist() == [1]  # oracle


@pytest.mark.parametrize("fill", [float("nan"), float("inf"), 0.0], ids=["nan", "inf", "zero"])
def test_degenerate_predictions_rank_last(setup, fill):
    store, _, b, start, length = setup
    pred = torch.full_like(b["target"], fill)
    ranks = M.within_article_ranks(pred, store.vectors, b["target_row"], start, length)
    worst = store.article_lengths[store.row_article[b["target_row"].numpy()]]  # article length of each target
    assert np.array_equal(ranks.numpy(), worst)
    assert M.recall_at(ranks, 1).item() == 0.0 and M.recall_at(ranks, 5).item() == 0.0  # every article has > 5 chunks
    assert M.mrr(ranks).item() == pytest.approx(np.mean(1.0 / worst))
    assert (M.six_bank_ranks(pred, b["context"], b["target"]) == 6).all()


def run_printing_mb(code: str) -> float:
    """The megabytes that `code`, run in a fresh one-thread Python, prints."""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return float(proc.stdout)


def test_slot_linear_fit_holds_no_memory_per_batch():
    """Fitting on a large split streams: peak memory must not grow with the number of batches
    (a list of per-batch Gram results once held ~30 MB per batch: 14 GB on the original's scale)."""
    code = (
        "import resource, torch\n"
        "from lvm.evaluation import metrics as M\n"
        "c, t = torch.randn(1024, 5, 768), torch.randn(1024, 768)\n"
        "M.fit_slot_weights([(c, t)])\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "M.fit_slot_weights((c, t) for _ in range(60))\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n"
    )
    grown = run_printing_mb(code)
    assert grown < 500, f"peak RSS grew by {grown:.0f} MB over 60 batches"


def test_slot_gram_converts_a_large_batch_in_bounded_pieces():
    """One batch of 1,024 windows at D = 768 (16 MB in float32): the float64 statistics take at most
    GRAM_ELEMENTS components at a time (8 MB), not a 31 MB float64 copy of the whole batch (a run's
    set-up on a 1 GB store peaked up to ~190 MB higher with those copies, measured), and agree with it."""
    code = (
        "import torch\n"
        "from lvm.evaluation import metrics as M\n"
        "hwm = lambda: next(int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmHWM'))\n"
        "c, t = torch.randn(1024, 5, 768), torch.randn(1024, 768)\n"
        "M.slot_gram(c[:300], t[:300])  # the kernels' first-use set-up is not the batch's memory\n"
        "open('/proc/self/clear_refs', 'w').write('5')  # the peak RSS starts again from the current RSS\n"
        "before = hwm()\n"
        "g, b = M.slot_gram(c, t)\n"
        "print((hwm() - before) / 1024)\n"
    )
    grown = run_printing_mb(code)
    assert grown < 20, f"peak RSS grew by {grown:.0f} MB in one slot_gram"
    c, t = torch.randn(300, 5, 768), torch.randn(300, 768)
    cd, td = c.double().numpy(), t.double().numpy()
    g, b = M.slot_gram(c, t)
    np.testing.assert_allclose(g.numpy(), np.einsum("njd,nkd->jk", cd, cd), rtol=1e-12)
    np.testing.assert_allclose(b.numpy(), np.einsum("nkd,nd->k", cd, td), rtol=1e-12)


def numpy_diversity_and_ca(pred, target):
    """Naive float64 loops: the per-dimension std of the unit predictions over the targets', and
    each sample's share of other targets with a strictly lower cosine than its own."""
    p = pred / np.linalg.norm(pred, axis=1, keepdims=True)
    t = target / np.linalg.norm(target, axis=1, keepdims=True)
    spread = lambda x: np.mean([np.std(x[:, j], ddof=1) for j in range(x.shape[1])])  # noqa: E731
    n = len(p)
    ca = [sum(p[i] @ t[j] < p[i] @ t[i] for j in range(n) if j != i) / (n - 1) for i in range(n)]
    return spread(p) / spread(t), np.array(ca)


@pytest.mark.parametrize("predictor", ["oracle", "copy_last", "mean_context", "constant"])
def test_diversity_and_contrastive_accuracy(setup, predictor):
    _, _, b, _, _ = setup
    ctx, tgt = b["context"], b["target"]
    pred = {
        "oracle": tgt,
        "copy_last": M.copy_last(ctx),
        "mean_context": M.mean_context(ctx),
        "constant": tgt.mean(0, keepdim=True).expand_as(tgt),
    }[predictor]
    div, ca = numpy_diversity_and_ca(pred.double().numpy(), tgt.double().numpy())
    assert M.diversity(pred, tgt).item() == pytest.approx(div, rel=1e-4, abs=1e-6)
    assert np.allclose(M.contrastive_accuracy(pred, tgt).numpy(), ca, atol=1e-6)
    if predictor == "oracle":  # its own target is the only one at cosine 1
        assert M.diversity(pred, tgt).item() == pytest.approx(1.0) and M.contrastive_accuracy(pred, tgt).min().item() == 1.0
    if predictor == "constant":  # no spread; every pair is ranked once each way: exactly chance
        assert M.diversity(pred, tgt).item() == pytest.approx(0.0, abs=1e-6)
        assert M.contrastive_accuracy(pred, tgt).mean().item() == pytest.approx(0.5)
    if predictor == "copy_last":  # unit vectors as spread out as the targets (this store has no structure to find)
        assert 0.8 < M.diversity(pred, tgt).item() < 1.2
    # The training step's path: unit predictions, the target normalised once for both statistics.
    from lvm.model.module import batch_health

    health = batch_health(torch.nn.functional.normalize(pred, dim=-1), 3.0 * tgt)  # a target's scale does not matter
    assert health[0].item() == pytest.approx(div, rel=1e-4, abs=1e-6)
    assert health[1].item() == pytest.approx(ca.mean(), abs=1e-6)


def test_nan_predictions_score_no_diversity_and_no_contrastive_accuracy(setup):
    _, _, b, _, _ = setup
    pred = b["target"].clone()
    pred[3] = float("nan")
    assert torch.isnan(M.diversity(pred, b["target"]))
    ca = M.contrastive_accuracy(pred, b["target"])
    assert ca[3].item() == 0.0  # never perfect


class GatherRecorder:
    """Store vectors that record how many components each gather takes."""

    def __init__(self, vectors: torch.Tensor) -> None:
        self.vectors, self.shape, self.gathered = vectors, vectors.shape, []

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor:
        self.gathered.append(rows.numel() * self.shape[-1])
        return self.vectors[rows]


def test_within_article_ranking_gathers_a_bounded_block_at_wide_dimensions():
    """1,000 windows of 60-chunk articles at D=768 (the mini-5CAT sample of a p6-sized store) once
    gathered 46 M components (184 MB) in one block; the ranks are the brute-force ones whatever the blocks."""
    store = tiny_store(d=768, lengths=(60,) * 20)
    batch = store.windows(P6).gather(np.arange(len(store.windows(P6))))
    batch = {k: v.repeat_interleave(4, dim=0)[:1000] for k, v in batch.items()}
    start, length = (torch.from_numpy(a) for a in store.article_span(batch["target_row"].numpy()))
    pred = batch["context"][:, -1] + 0.5 * batch["target"]
    vectors = GatherRecorder(store.vectors)
    ranks = M.within_article_ranks(pred, vectors, batch["target_row"], start, length)
    assert max(vectors.gathered) <= M.MAX_CANDIDATE_ELEMENTS and len(vectors.gathered) > 1
    assert np.array_equal(ranks.numpy(), numpy_within_article_rank(pred.numpy(), store, batch["target_row"].numpy()))
