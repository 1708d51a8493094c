"""The report of `python -m lvm.diagnosis.diagnose`: the statistics of lvm/diagnosis/stats.py and
lvm/diagnosis/baselines.py read in plain words (findings), as markdown and as a six-panel plot,
written with the JSON."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lvm.diagnosis.baselines import BASELINES
from lvm.runtime.files import write_files
from lvm.runtime.tables import fmt, md_table

# Findings mention anisotropy above this mean-vector norm, and near duplicates above this fraction.
_ANISOTROPY_NOTE = 0.2
_DUPLICATE_NOTE = 0.01

PRIOR_TEXT = {"mean_context": "the mean-of-context weights (a large alpha gives the mean of context plus an intercept)", "zero": "zero"}
NAMES = {"copy_last": "copy-last", "mean_context": "mean of context", "slot_linear": "slot-linear", "ridge": "ridge"}


# ----------------------------------------------------------------------------- findings


def findings(r: Mapping[str, Any]) -> list[str]:
    """Plain-language reading of a report: what the data can teach, and what it cannot."""
    out = []
    b = r["baselines"]
    if "next" in b:
        p = b["next"]["predictors"]
        copy, mean, slot, ridge = (p[n]["next"]["cos_target"]["mean"] for n in BASELINES)
        best = max(mean, slot, ridge)
        if best > copy:
            out.append(
                f"Headroom: the best baseline ({best:.3f}) beats copy-last ({copy:.3f}) by {best - copy:+.3f} on held-out "
                "articles; a model has to beat these, not copy-last alone."
            )
        else:
            out.append(
                f"No headroom: neither mean of context ({mean:.3f}), slot-linear ({slot:.3f}) nor ridge ({ridge:.3f}) "
                f"beats copy-last ({copy:.3f})."
            )
        gap = p["ridge"]["next"]["cos_last"]["mean"] - ridge
        out.append(
            f"Margin: ridge sits {gap:+.3f} closer to ctx[-1] than to the target, so a negative margin against ctx[-1] "
            "is expected of a good predictor here."
        )
    if b.get("direction"):
        out.append(
            _direction_finding(
                "Forward against backward prediction of the same chunks (ridge)",
                b["direction"]["predictors"]["ridge"]["forward_minus_backward"],
            )
        )
    if r["offset_profile"] is not None:
        out.append(_profile_finding(r["offset_profile"], r["adjacent"]))
    delta = r["windows"]["mismatched_delta"]["mean"]
    out.append(f"The mismatched 2-vs-1 delta is {delta:+.3f}: similarity decays with distance; it is not a direction.")
    sim = r["similarity"]
    same, diff = sim["same_article_far"]["mean"], sim["different_articles"]["mean"]
    if same is not None and diff is not None:
        out.append(
            f"Topic: chunks of one article more than {sim['far_gap']} apart have cos {same:.3f}, different articles "
            f"{diff:.3f}; article identity is {'strong' if same - diff > 0.1 else 'weak'} ({same - diff:+.3f})."
        )
    norm = r["anisotropy"]["mean_vector_norm"]
    if norm > _ANISOTROPY_NOTE:
        out.append(f"Anisotropy: the mean vector has norm {norm:.3f}, so two random chunks have mean cos about {norm**2:.3f}.")
    nd = r["near_duplicates"]
    if nd["near_duplicate_fraction"] and nd["near_duplicate_fraction"] > _DUPLICATE_NOTE:
        out.append(
            f"Near duplicates: {nd['near_duplicate_fraction']:.1%} of adjacent pairs have cos >= {nd['threshold']}; "
            "copy-last is flattered on them; consider deduplicating."
        )
    return out


def _profile_finding(prof: Mapping[str, Any], adjacent: Mapping[str, Any]) -> str:
    """One line on forward minus backward similarity at matched distances, read as what it is."""
    fb = prof["forward_minus_backward"]
    mean, lo, hi = np.array(fb["mean"]), fb["lo"], fb["hi"]
    what = "Forward against backward similarity at matched distances (same anchors)"
    if lo is None:
        i = int(np.argmax(np.abs(mean)))
        return what + f": largest at d={prof['distances'][i]}, {mean[i]:+.3f} (no interval: fewer than two articles)."
    outside = [i for i in range(len(mean)) if not lo[i] <= 0 <= hi[i]]
    if not outside:
        return what + f": no measurable difference at any distance 1..{len(mean)} (largest |mean| {np.abs(mean).max():.3f})."
    i = max(outside, key=lambda j: abs(mean[j]))
    what += f": largest at d={prof['distances'][i]}, {mean[i]:+.3f}"
    rel = adjacent["relative"]["mean"]
    return (
        what + f" [{lo[i]:+.3f}, {hi[i]:+.3f}]. Per article it telescopes to the d pairs at the end minus the d pairs at the "
        f"start of the anchor range: drift along the article (adjacent cos {_num(rel[0])} in the first bin, {_num(rel[-1])} "
        "in the last), not an arrow of time."
    )


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _direction_finding(what: str, stat: Mapping[str, Any]) -> str:
    """One line on a forward-minus-backward difference: does its interval include 0?"""
    mean, lo, hi = stat["mean"], stat["lo"], stat["hi"]
    if lo is None:
        return f"{what}: {mean:+.3f} (no interval: fewer than two articles)."
    if lo <= 0 <= hi:
        return f"{what}: {mean:+.3f} [{lo:+.3f}, {hi:+.3f}]: no measurable arrow of time."
    better = "forward" if mean > 0 else "backward"
    return f"{what}: {mean:+.3f} [{lo:+.3f}, {hi:+.3f}]: the interval excludes 0; {better} is better on these targets by {abs(mean):.3f}."


# ----------------------------------------------------------------------------- outputs


def write_outputs(report: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """diagnose.json, diagnose.md and diagnose.png in `out_dir`; returns their paths."""
    paths = {"json": out_dir / "diagnose.json", "md": out_dir / "diagnose.md", "png": out_dir / "diagnose.png"}
    return write_files(report, paths, markdown, plot)


def _ci(stat: dict[str, Any], i: int | None = None) -> str:
    """'mean [lo, hi]' of a bootstrap entry (column i of list-valued entries)."""

    def pick(v):
        return v if i is None or v is None else v[i]

    lo, hi = pick(stat["lo"]), pick(stat["hi"])
    ci = f" [{fmt(lo)}, {fmt(hi)}]" if lo is not None else ""
    return fmt(pick(stat["mean"])) + ci


def markdown(r: dict[str, Any]) -> str:
    """The report as markdown: findings, a summary table, then one section per statistic."""
    st, w, s = r["store"], r["windows"], r["settings"]
    k, pct = s["context"], int(round(100 * s["level"]))
    lines = [
        f"# Dataset diagnosis: `{st['path']}`",
        "",
        f"- {st['chunks']} chunks, {st['articles']} articles, D={st['dim']}; {w['windows']} windows "
        f"(context {k} + the next chunk, inside one article) in {w['articles']} articles",
        f"- intervals: {pct}% percentile bootstrap over articles ({s['bootstrap']} resamples); time {r['seconds_total']:.1f} s",
        "",
        "## Findings",
        "",
        *(f"- {f}" for f in r["findings"]),
        "",
        "## Summary",
        "",
    ]
    sim, b = r["similarity"], r["baselines"]
    rows = [
        ["cos(ctx[-1], next)", _ci(w["decay"], 0)],
        ["cos(ctx[-1], ctx[-2])", _ci(w["cos_last_prev"])],
        [f"cos(next, ctx[-j]), j = 1..{k}", ", ".join(fmt(v) for v in w["decay"]["mean"])],
        [f"same article, more than {s['far_gap']} chunks apart", fmt(sim["same_article_far"]["mean"])],
        ["different articles", fmt(sim["different_articles"]["mean"])],
        ["norm of the mean vector", fmt(r["anisotropy"]["mean_vector_norm"])],
        [f"adjacent near duplicates (cos >= {s['near_duplicate']})", fmt(r["near_duplicates"]["near_duplicate_fraction"], 4)],
    ]
    if "next" in b:
        p = b["next"]["predictors"]
        rows.append(
            [
                "held-out cos(pred, next): copy-last / mean of context / slot-linear / ridge",
                " / ".join(fmt(p[n]["next"]["cos_target"]["mean"]) for n in NAMES),
            ]
        )
        rows.append(["ridge cos(pred, ctx[-1])", fmt(p["ridge"]["next"]["cos_last"]["mean"])])
    lines += [*md_table(["statistic", "value"], rows), ""]
    lines += _adjacent_md(r["adjacent"])
    lines += _direction_md(r, pct)
    lines += _similarity_md(r)
    lines += _baselines_md(b, pct, k)
    return "\n".join(lines)


def _adjacent_md(a: dict[str, Any]) -> list[str]:
    rel = a["relative"]
    edges = rel["bin_edges"]
    rows = [[f"{edges[i]:.1f}-{edges[i + 1]:.1f}", fmt(m), str(c)] for i, (m, c) in enumerate(zip(rel["mean"], rel["count"]))]
    out = [
        "## Adjacent chunks by position in the article",
        "",
        f"Mean cos of chunks i and i+1 ({a['pairs']} pairs, mean {fmt(a['mean'])}), by the pair's relative position "
        "(0 = first pair of the article, 1 = last). A rise or fall at the ends means article openings or endings "
        "behave differently from the body.",
        "",
    ]
    out += [*md_table(["relative position", "mean cos", "pairs"], rows), ""]
    edge = [[str(i), fmt(a["from_start"]["mean"][i]), fmt(a["from_end"]["mean"][i])] for i in range(len(a["from_start"]["mean"]))]
    return out + [*md_table(["pair from the edge", "from the start", "from the end"], edge), ""]


def _direction_md(r: dict[str, Any], pct: int) -> list[str]:
    w, prof = r["windows"], r["offset_profile"]
    k = r["settings"]["context"]
    out = ["## Similarity decay and direction", "", "Decay: mean cos(next, ctx[-j]) over all windows; similarity falls with distance.", ""]
    out += [*md_table(["j", f"cos(next, ctx[-j]) [{pct}% CI]"], [[str(j + 1), _ci(w["decay"], j)] for j in range(k)]), ""]
    if prof is None:
        out += [f"Offset profile: no chunk has {r['settings']['max_offset']} consecutive chunks on both sides.", ""]
    else:
        out += [
            f"Offset profile: mean cos(c_i, c_(i+k)) over the SAME {prof['anchors']} anchors i ({prof['articles']} articles) "
            "for every k, so the two sides compare like with like. Forward minus backward at distance d is "
            "cos(c_i, c_(i+d)) - cos(c_i, c_(i-d)) over those anchors. Per article its sum telescopes to the d pairs at the "
            "end of the anchor range minus the d pairs at its start: a non-zero value means similarity drifts along the "
            "article (see the position table), not that text has a direction. The prediction test on the same targets "
            "(Baselines) is the direction test.",
            "",
        ]
        m = len(prof["distances"])
        rows = [
            [str(d), _ci(prof["profile"], m + d), _ci(prof["profile"], m - d), _ci(prof["forward_minus_backward"], d - 1)]
            for d in prof["distances"]
        ]
        out += [*md_table(["d", "forward cos(c_i, c_(i+d))", "backward cos(c_i, c_(i-d))", f"forward - backward [{pct}% CI]"], rows), ""]
    out += [
        "Two single numbers, for comparison with earlier reports:",
        "",
        f"- matched distances, windows: cos(ctx[-1], next) - cos(ctx[-1], ctx[-2]) = {_ci(w['matched_difference'])}. "
        "Both pairs are one chunk apart; per article this difference is exactly "
        f"[cos(last adjacent pair) - cos(c{k - 2}, c{k - 1})] / windows (chunks numbered from 0), a boundary term, not a direction.",
        f'- MISMATCHED distances (the original\'s "delta"): cos(next, ctx[-2]) - cos(next, ctx[-1]) = {_ci(w["mismatched_delta"])}. '
        "It compares a pair two chunks apart with a pair one chunk apart, so it measures the decay above; "
        "its sign says nothing about an arrow of time, however narrow its interval.",
        "",
    ]
    return out


def _similarity_md(r: dict[str, Any]) -> list[str]:
    sim, a, nd = r["similarity"], r["anisotropy"], r["near_duplicates"]
    rows = [
        [
            f"same article, more than {sim['far_gap']} apart",
            str(sim["same_article_far"]["pairs"]),
            fmt(sim["same_article_far"]["mean"]),
            fmt(sim["same_article_far"]["std"]),
        ],
        [
            "different articles",
            str(sim["different_articles"]["pairs"]),
            fmt(sim["different_articles"]["mean"]),
            fmt(sim["different_articles"]["std"]),
        ],
    ]
    out = [
        "## Within against across articles",
        "",
        "A seeded sample of pairs: a uniform chunk, then a uniform partner of the kind (so every chunk weighs the same, "
        "as in training, rather than every pair).",
        "",
    ]
    out += [*md_table(["pairs", "sampled", "mean cos", "std"], rows), ""]
    out += [
        "## Anisotropy",
        "",
        f"Norm of the mean vector: {fmt(a['mean_vector_norm'])} (0 = directions spread evenly). Its square, "
        f"{fmt(a['mean_vector_norm_squared'])}, is about the mean cos of two random chunks: the floor every cosine above stands on.",
        "",
        "## Near duplicates",
        "",
        f"{nd['near_duplicate_pairs']} of {nd['adjacent_pairs']} adjacent pairs have cos >= {nd['threshold']} "
        f"({fmt(nd['near_duplicate_fraction'], 4)}); {nd['exact_adjacent_pairs']} are exact copies. Exact copies anywhere "
        f"in the store: {nd['exact_copies_anywhere']['extra_copies']} extra rows in {nd['exact_copies_anywhere']['groups']} groups "
        f"({nd['exact_copies_anywhere']['groups_spanning_articles']} spanning articles).",
        "",
    ]
    if nd["examples"]:
        out += [
            *md_table(
                ["article", "chunks", "store rows", "cos"],
                [
                    [str(e["article"]), f"{e['chunks'][0]}, {e['chunks'][1]}", f"{e['rows'][0]}, {e['rows'][1]}", f"{e['cos']:.4f}"]
                    for e in nd["examples"]
                ],
            ),
            "",
        ]
    return out


def _baselines_md(b: dict[str, Any], pct: int, k: int) -> list[str]:
    out = ["## Baselines on held-out articles", ""]
    if "next" not in b:
        return out + [f"Skipped: {b['skipped']}.", ""]
    nxt, p = b["next"], b["next"]["predictors"]
    out += [
        f"Next chunk: {nxt['scored']} of {b['windows']['heldout']} held-out windows scored ({nxt['articles']} articles; "
        "a uniform sample when more than max_eval).",
        "",
    ]
    rows = [[NAMES[n], _ci(p[n]["next"]["cos_target"]), fmt(p[n]["next"]["cos_last"]["mean"])] for n in NAMES]
    out += [*md_table(["predictor", f"cos(pred, next) [{pct}% CI]", "cos(pred, ctx[-1])"], rows), ""]
    d = b["direction"]
    if d is None:
        out += [f"Forward against backward: no held-out chunk has {k} chunks on both sides.", ""]
    else:
        p = d["predictors"]
        out += [
            f"Forward against backward on the same {d['scored']} held-out target chunks ({d['articles']} articles; of "
            f"{b['direction_targets']} with {k} chunks on both sides): forward predicts each from the chunks before it, backward "
            "from the chunks after it, time-reversed so ctx[-1] is again the nearest. Same targets, so the difference is paired.",
            "",
        ]
        rows = [
            [
                NAMES[n],
                _ci(p[n]["forward"]["cos_target"]),
                _ci(p[n]["backward"]["cos_target"]),
                _ci(p[n]["forward_minus_backward"]),
                fmt(p[n]["forward"]["cos_last"]["mean"]),
                fmt(p[n]["backward"]["cos_last"]["mean"]),
            ]
            for n in NAMES
        ]
        out += [
            *md_table(
                [
                    "predictor",
                    f"forward cos(pred, target) [{pct}% CI]",
                    "backward",
                    "forward - backward",
                    "fwd cos(pred, ctx[-1])",
                    "bwd cos(pred, ctx[-1])",
                ],
                rows,
            ),
            "",
        ]
    ridge = b["ridge"]["forward"]
    out.append(
        f"Ridge: closed form on the flattened context with an intercept, one model per direction, shrunk toward "
        f"{PRIOR_TEXT[ridge['prior']]}; fitted on {b['train_sampled']} training windows (a uniform sample when more than "
        "ridge.max_train), alpha chosen by mean cos on the tune articles, then refitted on fit + tune; predictions are normalised."
    )
    for direction, info in b["ridge"].items():
        tried = ", ".join(f"{a}: {fmt(v)}" for a, v in info["tune_cos_by_alpha"].items())
        out.append(
            f"- ridge {direction}: alpha {info['alpha']:g} (tune cos by alpha: {tried}; {info['fit_windows']} fit, {info['tune_windows']} tune windows)"
        )
    out.append(
        "Slot-linear: one least-squares weight per context slot, no intercept, fitted on the same training windows "
        "(the baseline lvm.train reports); weights, oldest to nearest chunk:"
    )
    for direction, info in b["ridge"].items():
        out.append(f"- {direction}: {', '.join(fmt(w) for w in info['slot_weights'])}")
    return out + [""]


def plot(r: dict[str, Any], path: Path) -> None:
    """Six panels: adjacent cos by position, decay, offset profile, asymmetry, within/cross, baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 3, figsize=(17, 9.5))
    _plot_adjacent(ax[0, 0], r["adjacent"])
    _plot_decay(ax[0, 1], r["windows"])
    _plot_profile(ax[0, 2], ax[1, 0], r["offset_profile"], r["windows"])
    _plot_similarity(ax[1, 1], r["similarity"])
    _plot_baselines(ax[1, 2], r["baselines"])
    fig.suptitle(
        f"{r['store']['path']}: {r['store']['chunks']} chunks, {r['store']['articles']} articles, D={r['store']['dim']} "
        f"(bars and bands: {int(round(100 * r['settings']['level']))}% article bootstrap)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _nan(values: list[Any]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], float)


def _err(stat: dict[str, Any]) -> np.ndarray | None:
    """Asymmetric error bars (2, n) from a list-valued bootstrap entry, or None without a CI."""
    if stat["lo"] is None:
        return None
    mean = _nan(stat["mean"])
    return np.abs(np.vstack([mean - _nan(stat["lo"]), _nan(stat["hi"]) - mean]))


def _plot_adjacent(ax: Any, a: dict[str, Any]) -> None:
    edges = np.array(a["relative"]["bin_edges"])
    ax.plot((edges[1:] + edges[:-1]) / 2, _nan(a["relative"]["mean"]), marker="o")
    if a["mean"] is not None:
        ax.axhline(a["mean"], color="grey", linestyle=":", label=f"all pairs {a['mean']:.3f}")
        ax.legend()
    ax.set(
        title="adjacent chunks by position",
        xlabel="relative position of the pair in its article (0 first, 1 last)",
        ylabel="mean cos(c_i, c_(i+1))",
    )


def _plot_decay(ax: Any, w: dict[str, Any]) -> None:
    j = np.arange(1, len(w["decay"]["mean"]) + 1)
    ax.errorbar(j, _nan(w["decay"]["mean"]), yerr=_err(w["decay"]), marker="o", capsize=3, label="cos(next, ctx[-j])")
    ax.axhline(w["cos_last_prev"]["mean"], color="C1", linestyle="--", label=f"cos(ctx[-1], ctx[-2]) {w['cos_last_prev']['mean']:.3f}")
    ax.set(title="decay with distance (next-chunk windows)", xlabel="j", ylabel="mean cos", xticks=j)
    ax.legend()


def _plot_profile(ax: Any, ax_asym: Any, prof: dict[str, Any] | None, w: dict[str, Any]) -> None:
    if prof is None:
        for a in (ax, ax_asym):
            a.text(0.5, 0.5, "no anchors with max_offset chunks on both sides", ha="center", transform=a.transAxes)
        return
    k = np.array(prof["offsets"])
    mean = _nan(prof["profile"]["mean"])
    mean[k == 0] = np.nan  # cos 1 at k = 0 would flatten the plot
    ax.plot(k, mean, marker="o")
    if prof["profile"]["lo"] is not None:
        lo, hi = _nan(prof["profile"]["lo"]), _nan(prof["profile"]["hi"])
        lo[k == 0] = hi[k == 0] = np.nan
        ax.fill_between(k, lo, hi, alpha=0.3)
    ax.set(
        title=f"offset profile, same {prof['anchors']} anchors for every k",
        xlabel="k (chunks from the anchor)",
        ylabel="mean cos(c_i, c_(i+k))",
    )
    d = np.array(prof["distances"])
    ax_asym.errorbar(
        d,
        _nan(prof["forward_minus_backward"]["mean"]),
        yerr=_err(prof["forward_minus_backward"]),
        marker="o",
        capsize=3,
        label="matched: cos(c_i,c_(i+d)) - cos(c_i,c_(i-d))",
    )
    ax_asym.axhline(0, color="k", linewidth=0.8)
    ax_asym.axhline(
        w["mismatched_delta"]["mean"],
        color="C3",
        linestyle="--",
        label=f"MISMATCHED 2-vs-1 delta {w['mismatched_delta']['mean']:+.3f} (decay, not direction)",
    )
    ax_asym.set(title="forward minus backward", xlabel="distance d", ylabel="cos difference", xticks=d)
    ax_asym.legend(fontsize=8)


def _plot_similarity(ax: Any, sim: dict[str, Any]) -> None:
    edges = np.array(sim["histogram_edges"])
    for name, label in (("same_article_far", f"same article, > {sim['far_gap']} apart"), ("different_articles", "different articles")):
        counts = np.array(sim[name]["histogram"], float)
        if counts.sum():
            ax.stairs(counts / counts.sum(), edges, label=f"{label} (mean {sim[name]['mean']:.3f})")
    ax.set(title="within against across articles", xlabel="cos", ylabel="fraction of pairs")
    ax.legend()


def _plot_baselines(ax: Any, b: dict[str, Any]) -> None:
    if "next" not in b:
        ax.text(0.5, 0.5, "baselines skipped", ha="center", transform=ax.transAxes)
        return
    bars = [("next chunk (all windows)", b["next"]["predictors"], "next")]
    if b["direction"]:
        bars += [(f"{d} (same targets)", b["direction"]["predictors"], d) for d in ("forward", "backward")]
    x, width = np.arange(len(NAMES)), 0.8 / len(bars)
    for i, (label, preds, key) in enumerate(bars):
        stats = [preds[n][key]["cos_target"] for n in NAMES]
        mean = np.array([st["mean"] for st in stats])
        err = None if stats[0]["lo"] is None else np.abs(np.array([[m - st["lo"], st["hi"] - m] for m, st in zip(mean, stats)]).T)
        pos = x + (i - (len(bars) - 1) / 2) * width
        ax.bar(pos, mean, width, yerr=err, capsize=3, label=label)
        for xi, m in zip(pos, mean):
            ax.text(xi, m, f"{m:.3f}", ha="center", va="bottom", fontsize=7)
    values = [
        v
        for _, preds, key in bars
        for n in NAMES
        for v in (preds[n][key]["cos_target"]["mean"], preds[n][key]["cos_target"]["hi"])
        if v is not None
    ]
    ax.set_ylim(max(0.0, np.floor((min(values) - 0.1) * 10) / 10), max(values) + 0.02 + 0.03 * len(bars))  # room for the legend
    ax.set(title="baselines on held-out articles", xticks=x, xticklabels=[NAMES[n] for n in NAMES], ylabel="mean cos(pred, target)")
    ax.legend(loc="upper left", fontsize=8)
