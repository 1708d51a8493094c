"""5CAT outputs: 5cat.json (strict JSON), 5cat.md (tables a person reads), 5cat_offsets.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lvm.evaluation.fivecat import ABLATIONS, BINS, OFFSETS
from lvm.runtime.files import write_files
from lvm.runtime.tables import fmt, md_header

LABELS = {"model": "model", "oracle": "oracle", "copy_last": "copy-last", "mean_context": "mean-ctx", "slot_linear": "slot-linear"}


def write_outputs(report: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """5cat.json, 5cat.md and 5cat_offsets.png in `out_dir`; returns their paths."""
    paths = {"json": out_dir / "5cat.json", "md": out_dir / "5cat.md", "png": out_dir / "5cat_offsets.png"}
    return write_files(report, paths, markdown, plot_offsets)


def _get(results: dict[str, Any], split: str, path: str) -> Any:
    node: Any = results.get(split, {})
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: header, gate table (model beside oracle and baselines), metrics."""
    names = list(report["results"])
    subject = report["subject"]
    v = report["verdict"]
    lines = [f"# 5CAT: {'PASS' if v['passed'] else 'FAIL'} ({subject})", ""]
    ck = report.get("checkpoint")
    if ck:
        lines.append(f"- checkpoint: `{ck['path']}` (epoch {ck['epoch']}, 0-based; global step {ck['global_step']})")
    pr = report.get("precision")
    if pr:
        lines.append(
            f"- model forwards: precision {pr['model']}" + (f" (eval.precision=auto: {pr['measured']['reason']})" if pr["measured"] else "")
        )
    d = report["data"]
    lines += [
        f"- data: {d['source']} ({d['chunks']} chunks, {d['articles']} articles, D={d['dim']}); window: "
        + ", ".join(f"{k} {v}" for k, v in report["window"].items()),
        "- splits: "
        + ", ".join(f"{s} {n['evaluated']} of {n['windows']} windows ({n['articles']} articles)" for s, n in report["splits"].items()),
        f"- offsets: {report['offset_convention']}",
        f"- rollout: {report['rollout_convention']}",
        f"- pass rule: {v['rule']}; gates passed {v['gates_passed']}/{v['gates_total']} (needed {v['gates_needed']}),"
        f" non-negative margin: {fmt(v['nonnegative_margin'])}",
        f"- time: {report['seconds']:.1f} s ({', '.join(f'{LABELS.get(p, p)} {s:.1f} s' for p, s in report['seconds_by_predictor'].items())})",
        "",
        "## Gates",
        "",
        *md_header(["gate", "split", "metric", "threshold", *(LABELS.get(n, n) for n in names), "pass"]),
    ]
    verdicts = report["verdicts"]
    for gname, gate in verdicts[subject]["gates"].items():
        for i, c in enumerate(gate["checks"]):
            thr = f">= {c['min']}" if c["min"] is not None else f"<= {c['max']}"
            values = [fmt(verdicts[n]["gates"][gname]["checks"][i]["value"]) for n in names]
            label = f"{gname} {gate['title']}" if i == 0 else ""
            lines.append(f"| {label} | {c['split']} | {c['metric']} | {thr} | " + " | ".join(values) + f" | {fmt(c['passed'])} |")
    lines += ["", *md_header(["verdict", *(LABELS.get(n, n) for n in names)])]
    lines.append("| gates passed | " + " | ".join(f"{verdicts[n]['gates_passed']}/{verdicts[n]['gates_total']}" for n in names) + " |")
    lines.append("| pass | " + " | ".join(fmt(verdicts[n]["passed"]) for n in names) + " |")
    rows = [
        ("non-finite predictions", "nonfinite"),
        ("cos to target", "cos"),
        ("margin vs ctx[-1]", "margin_last"),
        ("A peak k", "offset.peak_k"),
    ]
    rows += [(f"A cos at k={k:+d}" if k else "A cos at k=0 (target)", f"offset.cos.{i}") for i, k in enumerate(OFFSETS)]
    rows += [("A margin", "offset.margin"), ("B R@1", "retrieval.r1"), ("B R@5", "retrieval.r5"), ("B MRR", "retrieval.mrr")]
    rows += [(f"C {a}", f"ablation.{a}") for a in ABLATIONS]
    rows += [("D rollout mean", "rollout.mean")]
    rows += [(f"E {b} bin cos (windows)", f"coherence.{b}") for b in BINS]
    for split in report["splits"]:
        lines += ["", f"## {split.upper()}", "", *md_header(["metric", *(LABELS.get(n, n) for n in names)])]
        for label, path in rows:
            cells = []
            for n in names:
                res = report["results"][n]
                if path.startswith("offset.cos."):
                    cells.append(fmt(res[split]["offset"]["cos"][int(path.rsplit(".", 1)[1])]))
                elif path.startswith("coherence."):
                    b = res[split]["coherence"][path.split(".")[1]]
                    cells.append(f"{fmt(b['cos'])} ({b['windows']})")
                else:
                    cells.append(fmt(_get(res, split, path)))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        roll = report["results"][names[0]][split]["rollout"]
        lines.append(
            "| D rollout per step | "
            + " | ".join(" ".join(fmt(x, 2) for x in report["results"][n][split]["rollout"]["cos"]) for n in names)
            + " |"
        )
        lines.append(
            f"\nTest windows: A {report['results'][names[0]][split]['offset']['windows']}, "
            f"B {report['results'][names[0]][split]['retrieval']['windows']}, D {roll['windows']}."
        )
    cross = {n: report["results"][n].get("val_vs_ood", {}).get("coherence_normal_gap") for n in names}
    lines += [
        "",
        "## VAL vs OOD",
        "",
        *md_header(["metric", *(LABELS.get(n, n) for n in names)]),
        "| E normal-bin cos, abs(VAL - OOD) | " + " | ".join(fmt(cross[n]) for n in names) + " |",
        "",
    ]
    return "\n".join(lines)


def plot_offsets(report: dict[str, Any], path: Path) -> None:
    """Offset sweep (mean cos at target + k) of every predictor, one panel per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(report["splits"])
    fig, axes = plt.subplots(1, len(splits), figsize=(5.5 * len(splits), 4), squeeze=False, sharey=True)
    last_k = -report["window"]["target_offset"]
    for ax, split in zip(axes[0], splits):
        for name, res in report["results"].items():
            ys = [float("nan") if y is None else y for y in res[split]["offset"]["cos"]]
            style = {"linewidth": 2.5, "marker": "o"} if name == report["subject"] else {"linestyle": "--", "marker": "."}
            ax.plot(OFFSETS, ys, label=LABELS.get(name, name), **style)
        ax.axvline(0, color="k", linewidth=0.8)
        ax.axvline(last_k, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(f"{split.upper()}: k=0 target, k={last_k} last context chunk")
        ax.set_xlabel("offset k from the target (chunks)")
        ax.set_xticks(list(OFFSETS))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean cos(pred, chunk at target + k)")
    axes[0][-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
