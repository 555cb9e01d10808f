"""How an analysed sweep reads as text: numbers and the insight sections.

Its own module so that the analysis (which prints the text) and the report (which embeds it)
both stand on it rather than on each other.
"""

import math


def number(x, digits=3) -> str:
    """`x` to `digits` places, or n/a where there is no value (missing, or NaN)."""
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _heading(title: str) -> str:
    return f"{'=' * 72}\n{title}\n{'=' * 72}"


def render_text(insights: dict) -> str:
    """The insight sections, as the terminal prints them and report.html embeds them; for a
    sweep over several models, each model's, then the comparison across them."""
    if "models" in insights:
        parts = [f"{'#' * 72}\nMODEL {insights['model_ids'][name]} ({name}/)\n{'#' * 72}\n"
                 + render_text(sub) for name, sub in insights["models"].items()]
        return "\n".join(parts + [render_cross_model(insights["cross_model"])])
    out = []
    for src, a in insights["sources"].items():
        tag = f" (source: {src})" if len(insights["sources"]) > 1 or src != "text" else ""
        out.append(_heading(f"TOP 5 PERFORMERS{tag}"))
        for i, r in enumerate(a["ranked"][:5], 1):
            ci = r["f1_ci"]
            label = (r.get("vs_baseline") or {}).get("label", "reference"
                                                      if r["experiment"] == "baseline" else "n/a")
            tie = "  (tied with #1)" if r.get("tied_with_top") else ""
            out.append(f"  {i}. {r['experiment']:<20} F1 {r['f1']:.3f} "
                       f"{'[' + number(ci[0]) + ', ' + number(ci[1]) + ']' if ci else '[n/a]'}  "
                       f"EM {number(r['em'])}  vs baseline: {label}{tie}")
        out.append(_heading(f"BEST IN EACH CATEGORY{tag}"))
        for cat, r in a["best_per_category"].items():
            label = (r.get("vs_baseline") or {}).get("label", "")
            out.append(f"  {cat:<20} {r['experiment']:<20} F1 {r['f1']:.3f}  {label}")
        out.append(_heading(f"HYPERPARAMETER INSIGHTS{tag}"))
        hp = a["hyperparameters"]
        if "nearest_k" in hp:
            h = hp["nearest_k"]
            out.append(f"  nearest_k: best k={h['best'].get('k')}, alpha={h['best'].get('alpha')} "
                       f"({h['best_experiment']})")
            out.append("    mean F1 by k:     " + ", ".join(f"k={k}: {v:.3f}"
                                                          for k, v in h["mean_f1_by_k"].items()))
            out.append("    mean F1 by alpha: " + ", ".join(f"a={k}: {v:.3f}"
                                                          for k, v in h["mean_f1_by_alpha"].items()))
        if "anchor_offset" in hp:
            h = hp["anchor_offset"]
            out.append(f"  anchor_offset: F1 {h['trend']}: " + ", ".join(
                f"eps={k}: {v:.3f}" for k, v in h["f1_by_eps"].items())
                + ("  (every anchor run was a no-op on this source)" if h["all_no_op"] else ""))
        if "rms_matching" in hp:
            out.append("  rms_matching: " + ", ".join(
                f"scale {k}: {v:.3f}" for k, v in hp["rms_matching"]["f1_by_scale"].items()))
        if "soft_codebook" in hp:
            h = hp["soft_codebook"]
            out.append(f"  soft_codebook: best size={h['best'].get('size')}, "
                       f"tau={h['best'].get('tau')}; mean F1 by size: "
                       + ", ".join(f"{k}: {v:.3f}" for k, v in h["mean_f1_by_size"].items())
                       + "; by tau: " + ", ".join(f"{k}: {v:.3f}"
                                                  for k, v in h["mean_f1_by_tau"].items()))
        if not hp:
            out.append("  (no swept hyperparameters in these results)")
        out.append(_heading(f"KEY INSIGHTS{tag}"))
        out += [f"  - {line}" for line in a["interpretation"]]
        out.append(_heading(f"RECOMMENDATIONS{tag}"))
        out += [f"  - {line}" for line in a["recommendations"]]
    if insights["recovery"]:
        out.append(_heading("RECOVERY: F1(source + transform) / F1(text baseline)"))
        for r in insights["recovery"]:
            ci = r["recovery_ci"]
            out.append(f"  {r['source']:<14} {r['experiment']:<20} F1 {r['f1']:.3f}  recovery "
                       f"{r['recovery']:.2f} "
                       + (f"[{number(ci[0], 2)}, {number(ci[1], 2)}]" if ci else ""))
    if insights["failed"] or insights["not_run"]:
        out.append(_heading("INCOMPLETE SWEEP"))
        for f in insights["failed"]:
            err = f.get("error") or {}
            out.append(f"  failed:  {f['experiment']} ({f['source']}): {err.get('type', '')}: "
                       f"{err.get('message', '')}")
        for n in insights["not_run"]:
            out.append(f"  not run: {n['experiment']} ({n['source']})")
    return "\n".join(out)


def render_cross_model(cross: dict) -> str:
    names = cross["models"]
    width = max(10, *(len(n) for n in names))
    out = []
    for src, c in cross["sources"].items():
        out.append(_heading(f"CROSS-MODEL: F1 per model and rank agreement (source: {src})"))
        out.append(f"  {'experiment':<20} " + " ".join(f"{n:>{width}}" for n in names))
        out += [f"  {row['experiment']:<20} " + " ".join(f"{row['f1'][n]:>{width}.3f}" for n in names)
                for row in c["table"]]
        for pair in c["agreement"]:
            out.append(f"  {pair['a']} vs {pair['b']} over {pair['n']} experiments: Spearman "
                       f"{number(pair['spearman'], 2)}, Kendall {number(pair['kendall'], 2)}")
        for n, w in c["winners"].items():
            out.append(f"  winner on {n}: {w['experiment']} ({w['category']}, F1 {w['f1']:.3f}, "
                       f"vs baseline: {w['vs_baseline'] or 'n/a'})")
        verdict = ("the same experiment wins on every model" if c["same_winner"] else
                   "different experiments win, of the same category" if c["same_winning_category"]
                   else "different transforms win on different models")
        out.append(f"  -> {verdict}")
    return "\n".join(out)
