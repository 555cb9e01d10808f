"""Pictures and a self-contained report of an analysed sweep, readable without a terminal.

Plots go to OUTPUT_DIR/plots/ (one folder per source when there are several); `report.html`
embeds them, so the one file can be mailed or archived on its own.
"""

import base64
import html
import math
from pathlib import Path

from ..files import safe_name, write_text
from ..plots import pyplot, save
from .formatting import number, render_text

COLOURS = {"baseline": "#444444", "rms_matching": "#1f77b4", "batch_distribution": "#9467bd",
           "nearest_k": "#2ca02c", "anchor_offset": "#ff7f0e", "soft_codebook": "#d62728",
           "other": "#8c564b"}


def _err(row):
    ci = row["f1_ci"]
    if not ci or any(math.isnan(v) for v in ci):
        return (0.0, 0.0)
    return (max(0.0, row["f1"] - ci[0]), max(0.0, ci[1] - row["f1"]))


def plot_ranked(a: dict, src: str, path: Path) -> Path:
    plt = pyplot()
    rows = a["ranked"]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(rows) + 1.6))
    ys = list(range(len(rows)))[::-1]
    lo, hi = zip(*[_err(r) for r in rows])
    from matplotlib.colors import to_rgba

    # A no-op experiment is drawn faint: it repeats the baseline, it does not tie with it.
    ax.barh(ys, [r["f1"] for r in rows], xerr=[lo, hi], capsize=2,
            color=[to_rgba(COLOURS.get(r["category"], COLOURS["other"]),
                           0.3 if r["identical_to_input"] and r["experiment"] != "baseline" else 0.9)
                   for r in rows])
    ax.set_yticks(ys)
    ax.set_yticklabels([r["experiment"] + (" (no-op)" if r["identical_to_input"]
                                           and r["experiment"] != "baseline" else "")
                        for r in rows], fontsize=8)
    if a["baseline_f1"] is not None:
        ax.axvline(a["baseline_f1"], color="black", linestyle="--", linewidth=1, label="baseline")
    present = [c for c in COLOURS if any(r["category"] == c for r in rows)]
    ax.legend([plt.Rectangle((0, 0), 1, 1, color=COLOURS[c]) for c in present], present,
              fontsize=7, loc="best")
    ax.set_xlabel("F1 (bars: 95% bootstrap CI)")
    ax.set_title(f"Ranked F1, source: {src}")
    return save(fig, path)


def _by(a: dict, category: str) -> list[dict]:
    return [r for r in a["ranked"] if r["category"] == category]


def plot_nearest(a: dict, src: str, path: Path) -> Path | None:
    rows = _by(a, "nearest_k")
    if not rows:
        return None
    plt = pyplot()
    ks = sorted({r["config"]["k"] for r in rows})
    alphas = sorted({r["config"]["alpha"] for r in rows})
    grid = [[math.nan] * len(alphas) for _ in ks]
    for r in rows:
        grid[ks.index(r["config"]["k"])][alphas.index(r["config"]["alpha"])] = r["f1"]
    fig, ax = plt.subplots(figsize=(1.2 * len(alphas) + 2.5, 0.8 * len(ks) + 1.8))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    for i in range(len(ks)):
        for j in range(len(alphas)):
            if not math.isnan(grid[i][j]):
                ax.text(j, i, f"{grid[i][j]:.3f}", ha="center", va="center", color="white",
                        fontsize=8)
    ax.set_xticks(range(len(alphas)), [str(x) for x in alphas])
    ax.set_yticks(range(len(ks)), [str(k) for k in ks])
    ax.set_xlabel("alpha (weight of the original)")
    ax.set_ylabel("k")
    ax.set_title(f"nearest_k F1 (blank: not run), source: {src}")
    fig.colorbar(im, ax=ax, label="F1")
    return save(fig, path)


def _line(a: dict, src: str, category: str, key: str, xlabel: str, path: Path,
          logx: bool = False) -> Path | None:
    rows = sorted(_by(a, category), key=lambda r: r["config"][key])
    if not rows:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    xs = [r["config"][key] for r in rows]
    lo, hi = zip(*[_err(r) for r in rows])
    ax.errorbar(xs, [r["f1"] for r in rows], yerr=[lo, hi], marker="o", capsize=3,
                color=COLOURS[category])
    if a["baseline_f1"] is not None:
        ax.axhline(a["baseline_f1"], color="black", linestyle="--", linewidth=1, label="baseline")
        ax.legend(fontsize=8)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("F1 (95% CI)")
    ax.set_title(f"{category}: F1 against {key}, source: {src}")
    return save(fig, path)


def plot_codebook(a: dict, src: str, path: Path) -> Path | None:
    rows = _by(a, "soft_codebook")
    if not rows:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for tau in sorted({r["config"]["tau"] for r in rows}):
        sub = sorted((r for r in rows if r["config"]["tau"] == tau), key=lambda r: r["config"]["size"])
        lo, hi = zip(*[_err(r) for r in sub])
        ax.errorbar([r["config"]["size"] for r in sub], [r["f1"] for r in sub], yerr=[lo, hi],
                    marker="o", capsize=3, label=f"tau={tau}")
    if a["baseline_f1"] is not None:
        ax.axhline(a["baseline_f1"], color="black", linestyle="--", linewidth=1, label="baseline")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("codebook size")
    ax.set_ylabel("F1 (95% CI)")
    ax.legend(fontsize=8)
    ax.set_title(f"soft_codebook: size x tau, source: {src}")
    return save(fig, path)


def plot_diagnostics(a: dict, src: str, path: Path) -> Path | None:
    rows = [r for r in a["ranked"] if "norm_ratio" in r["diagnostics"]]
    if not rows:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, key, label in [(axes[0], "norm_ratio", "mean norm ratio out/in"),
                           (axes[1], "cosine_to_input", "mean cosine(out, in)")]:
        for cat in COLOURS:
            sub = [r for r in rows if r["category"] == cat]
            if sub:
                ax.scatter([r["diagnostics"][key] for r in sub], [r["f1"] for r in sub],
                           color=COLOURS[cat], label=cat, s=22)
        ax.set_xlabel(label)
    if all(r["diagnostics"]["norm_ratio"] > 0 for r in rows):
        axes[0].set_xscale("log")
    axes[0].set_ylabel("F1")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"F1 against what each transform did, source: {src}")
    return save(fig, path)


def write_plots(insights: dict, output_dir: Path) -> list[Path]:
    several = len(insights["sources"]) > 1 or list(insights["sources"]) != ["text"]
    written = []
    for src, a in insights["sources"].items():
        folder = output_dir / "plots" / (safe_name(src) if several else "")
        written += [p for p in [
            plot_ranked(a, src, folder / "ranked_f1.png"),
            plot_nearest(a, src, folder / "nearest_k_heatmap.png"),
            _line(a, src, "anchor_offset", "eps", "eps (offset bound / anchor norm)",
                  folder / "anchor_eps.png", logx=True),
            _line(a, src, "rms_matching", "target_scale", "target scale x vocabulary RMS",
                  folder / "rms_scale.png"),
            plot_codebook(a, src, folder / "codebook.png"),
            plot_diagnostics(a, src, folder / "diagnostics.png"),
        ] if p is not None]
    return written


def _table(headers, rows) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _model_sections(insights: dict, summary: dict, level: int = 2) -> list[str]:
    """Provenance and the result tables of one model's sweep."""
    h = f"h{level}"
    prov = summary.get("provenance", {})
    prov_rows = [(k, v if not isinstance(v, (dict, list)) else
                  ", ".join(f"{a}={b}" for a, b in v.items()) if isinstance(v, dict) else
                  " ".join(map(str, v))) for k, v in prov.items()]
    parts = [f"<{h}>Run provenance</{h}>", _table(["field", "value"], prov_rows)]
    for src, a in insights["sources"].items():
        parts.append(f"<{h}>Results, source: {html.escape(src)}</{h}>")
        parts.append(_table(
            ["rank", "experiment", "category", "F1", "95% CI", "EM", "empty", "vs baseline",
             "norm ratio", "cosine to input"],
            [(i, r["experiment"], r["category"], number(r["f1"]),
              f"[{number(r['f1_ci'][0])}, {number(r['f1_ci'][1])}]" if r["f1_ci"] else "n/a",
              number(r["em"]), number(r["empty_rate"], 2),
              (r.get("vs_baseline") or {}).get("label", "reference" if r["experiment"] == "baseline" else ""),
              number(r["diagnostics"].get("norm_ratio")), number(r["diagnostics"].get("cosine_to_input")))
             for i, r in enumerate(a["ranked"], 1)]))
    return parts


def _cross_model_sections(cross: dict) -> list[str]:
    names = cross["models"]
    parts = []
    for src, c in cross["sources"].items():
        parts.append(f"<h2>Cross-model, source: {html.escape(src)}</h2>")
        parts.append(_table(["experiment"] + names, [[row["experiment"]] + [
            number(row["f1"][n]) for n in names] for row in c["table"]]))
        parts.append(_table(["models", "experiments", "Spearman", "Kendall tau-b"], [
            (f"{p['a']} vs {p['b']}", p["n"], number(p["spearman"], 2), number(p["kendall"], 2))
            for p in c["agreement"]]))
        parts.append(_table(["model", "winner", "category", "F1", "vs baseline"], [
            (n, w["experiment"], w["category"], number(w["f1"]), w["vs_baseline"] or "n/a")
            for n, w in c["winners"].items()]))
    return parts


def write_html(insights: dict, summary: dict, plots: list[Path], path: Path) -> Path:
    parts = ["<!doctype html><meta charset='utf-8'><title>LatentWire sweep report</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:13px;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
             "pre{background:#f6f6f6;padding:1em;white-space:pre-wrap;font-size:13px}"
             "img{max-width:100%;border:1px solid #eee;margin:0.5em 0}</style>",
             "<h1>LatentWire embedding sweep</h1>",
             f"<p>{summary.get('successful', '?')} of {summary.get('total_experiments', '?')} "
             f"runs succeeded, {summary.get('failed', 0)} failed"
             f"{', interrupted' if summary.get('interrupted') else ''}.</p>"]
    if "models" in insights:
        for m in summary["models"]:
            parts.append(f"<h2>Model {html.escape(m['model_id'])} ({html.escape(m['dir'])}/)</h2>")
            parts += _model_sections(insights["models"][m["dir"]], m["summary"], level=3)
        parts += _cross_model_sections(insights["cross_model"])
    else:
        parts += _model_sections(insights, summary)
    parts.append("<h2>Insights</h2><pre>" + html.escape(render_text(insights)) + "</pre>")
    parts.append("<h2>Plots</h2>")
    for p in plots:
        data = base64.b64encode(p.read_bytes()).decode()
        parts.append(f"<h3>{html.escape(str(p.relative_to(path.parent)))}</h3>"
                     f"<img alt='{html.escape(p.name)}' src='data:image/png;base64,{data}'>")
    write_text(path, "\n".join(parts))
    return path


def write(insights: dict, summary: dict, output_dir: Path) -> list[Path]:
    """Write every plot and the report; return their paths, the report last."""
    try:
        if "models" in insights:  # each model's plots in its own folder
            plots = [p for name, sub in insights["models"].items()
                     for p in write_plots(sub, output_dir / name)]
        else:
            plots = write_plots(insights, output_dir)
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib)")
        plots = []
    return plots + [write_html(insights, summary, plots, output_dir / "report.html")]
