"""report.html: one self-contained page (figures embedded as base64 PNG; no network).

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot, no global
backend change), so rendering works headless and does not disturb a caller's plots.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

MAX_SCATTER_SITES = 48
MAX_MONTAGE = 96
THUMB = 112

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1150px;color:#222;background:#fff}
h1{font-size:24px;margin-bottom:4px} h2{font-size:19px;margin-top:32px;border-bottom:1px solid #ccc;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0;font-size:13px} td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f3f3f3} td.l,th.l{text-align:left} .muted{color:#777;font-size:13px} .bad{color:#b00}
img.fig{max-width:100%;border:1px solid #eee} .grid{display:flex;flex-wrap:wrap;gap:6px}
figure.t{margin:0;width:120px;text-align:center;font-size:11px} figure.t img{width:112px;height:112px;image-rendering:pixelated;border:1px solid #ccc}
.big{font-size:22px;font-weight:600} .card{display:inline-block;border:1px solid #ddd;border-radius:6px;padding:8px 14px;margin:4px 8px 4px 0}
"""


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return "–" if not math.isfinite(float(v)) else f"{float(v):.{digits}f}"
    return html.escape(str(v))


def _ci(v: Any) -> str:
    if not v:
        return "–"
    return f"[{_fmt(v[0])}, {_fmt(v[1])}]"


def _png(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(b64: str, alt: str) -> str:
    return f'<img class="fig" alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h))


def scatter_figure(site_id: Sequence[str], predicted: np.ndarray, recorded: np.ndarray, per_site: Sequence[Mapping]) -> str:
    """Small multiples: predicted vs recorded repeat mean, one panel per site (base64 PNG)."""
    n = min(len(site_id), MAX_SCATTER_SITES)
    cols = min(8, max(1, n))
    rows = int(math.ceil(n / cols))
    fig = _figure(1.55 * cols, 1.55 * rows + 0.2)
    info = {p["site_id"]: p for p in per_site}
    for i in range(n):
        ax = fig.add_subplot(rows, cols, i + 1)
        x, y = predicted[i], recorded[i]
        ok = np.isfinite(x) & np.isfinite(y)
        p = info.get(str(site_id[i]), {})
        color = "#1f77b4" if p.get("included", True) else "#999999"
        ax.scatter(x[ok], y[ok], s=4, alpha=0.6, color=color, linewidths=0)
        r = p.get("pearson_r")
        ax.set_title(f"{site_id[i]}\nr={_fmt(r, 2)}", fontsize=7)
        ax.tick_params(labelsize=5, length=2)
    fig.supxlabel("predicted", fontsize=8)
    fig.supylabel("recorded (repeat mean)", fontsize=8)
    fig.tight_layout(pad=0.4)
    return _png(fig)


def ceiling_figure(per_site: Sequence[Mapping]) -> str:
    """Raw r² and noise-corrected r²_ER against split-half reliability (the noise ceiling of
    raw r²), and the distributions of r²_ER and reliability (base64 PNG)."""
    def arr(key: str) -> np.ndarray:
        return np.array([np.nan if p.get(key) is None else p[key] for p in per_site], dtype=float)

    r2er, rel, r = arr("r2_er"), arr("split_half_reliability"), arr("pearson_r")
    raw = r * r
    inc = np.array([bool(p.get("included")) for p in per_site])
    fig = _figure(10.5, 3.8)
    ax = fig.add_subplot(1, 2, 1)
    for y, label, marker in ((raw, "raw r² (prediction vs repeat mean)", "o"), (r2er, "noise-corrected r²_ER", "^")):
        ok = np.isfinite(y) & np.isfinite(rel)
        ax.scatter(rel[ok & inc], y[ok & inc], s=16, marker=marker, label=label, alpha=0.8)
        if (ok & ~inc).any():
            ax.scatter(rel[ok & ~inc], y[ok & ~inc], s=16, marker=marker, color="#aaaaaa", alpha=0.8)
    finite = np.r_[rel[np.isfinite(rel)], r2er[np.isfinite(r2er)], raw[np.isfinite(raw)], 0.0]
    lo = min(0.0, float(finite.min()))
    ax.plot([lo, 1], [lo, 1], color="k", lw=0.8, ls="--", label="y = reliability (ceiling of raw r²)")
    ax.axhline(1.0, color="#d62728", lw=0.8, ls=":", label="r²_ER = 1 (all explainable variance)")
    ax.set_xlabel("split-half reliability (Spearman-Brown)")
    ax.set_ylabel("per-site r²")
    ax.legend(fontsize=7, loc="upper left")
    if (~inc).any():
        ax.text(0.99, 0.01, "grey: excluded sites", transform=ax.transAxes, ha="right", va="bottom", fontsize=7, color="#777")
    ax2 = fig.add_subplot(1, 2, 2)
    bins = np.linspace(min(-0.2, lo), 1.2, 29)
    if np.isfinite(r2er[inc]).any():
        ax2.hist(np.clip(r2er[inc & np.isfinite(r2er)], bins[0], bins[-1]), bins=bins, alpha=0.6, label="r²_ER", color="#ff7f0e")
    if np.isfinite(rel[inc]).any():
        ax2.hist(np.clip(rel[inc & np.isfinite(rel)], bins[0], bins[-1]), bins=bins, alpha=0.5, label="split-half reliability", color="#7f7f7f")
    ax2.set_xlabel("value per included site (clipped to the axis)")
    ax2.set_ylabel("sites")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def _bars(rows: Sequence[Mapping], value: str, pred: str, ylabel: str, ref: float, title: str) -> str:
    targets = [str(r["target_site"]) for r in rows]
    v = np.array([np.nan if r.get(value) is None else r[value] for r in rows], dtype=float)
    p = np.array([np.nan if r.get(pred) is None else r[pred] for r in rows], dtype=float)
    w = min(14.0, max(5.0, 0.28 * len(rows) + 2))
    fig = _figure(w, 3.4)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(rows))
    colors = np.where(np.nan_to_num(v, nan=-np.inf) > ref, "#2ca02c", "#d62728")
    ax.bar(x, np.nan_to_num(v - ref, nan=0.0), bottom=ref, color=colors, alpha=0.8, label="recorded")
    if np.isfinite(p).any():
        ax.scatter(x, p, marker="_", s=160, color="k", zorder=3, label="predicted")
    ax.axhline(ref, color="k", lw=0.8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if len(rows) <= 60:
        ax.set_xticks(x)
        ax.set_xticklabels(targets, rotation=90, fontsize=6)
    else:
        ax.set_xlabel(f"{len(rows)} target sites")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def stretch_figure(rows: Sequence[Mapping]) -> str:
    return _bars(rows, "gain", "predicted_gain", "response / natural max - 1", 0.0,
                 "Stretch: gain over each target's natural maximum (green: above)")


def one_hot_figure(rows: Sequence[Mapping]) -> str:
    return _bars(rows, "ratio", "predicted_ratio", "one-hot score / best natural", 1.0,
                 "One-hot: score ratio vs the best natural image (green: beats it)")


def montage_html(run_dir: Path | None, manifest: Sequence[Mapping[str, str]]) -> str:
    """Thumbnails of the stimuli (PNG files named in the manifest), labelled with objective and target."""
    from PIL import Image

    from synth.validation.io import find_stimulus_png, normalize_objective

    if run_dir is None or not manifest:
        return ""
    rows = sorted(manifest, key=lambda r: (normalize_objective(r["objective"]), r["target_site"], r["stimulus_id"]))
    cells, missing = [], 0
    for row in rows[:MAX_MONTAGE]:
        p = find_stimulus_png(run_dir, row)
        if p is None:
            missing += 1
            continue
        try:
            with Image.open(p) as im:
                im = im.convert("RGB") if im.mode not in ("L", "RGB") else im.copy()
                im.thumbnail((THUMB, THUMB))
                buf = io.BytesIO()
                im.save(buf, format="PNG")
        except Exception as err:  # a corrupt file must not sink the report
            log.warning("montage: cannot read %s (%s)", p, err)
            missing += 1
            continue
        b64 = base64.b64encode(buf.getvalue()).decode("ascii")
        label = f"{normalize_objective(row['objective'])}<br>target {html.escape(row['target_site'])}"
        cells.append(
            f'<figure class="t"><img alt="{html.escape(row["stimulus_id"])}" title="{html.escape(row["stimulus_id"])}" '
            f'src="data:image/png;base64,{b64}"><figcaption>{label}</figcaption></figure>'
        )
    note = []
    if len(rows) > MAX_MONTAGE:
        note.append(f"first {MAX_MONTAGE} of {len(rows)} stimuli shown")
    if missing:
        note.append(f"{missing} PNG file(s) not found under {html.escape(str(run_dir))}/stimuli")
    return (f'<p class="muted">{"; ".join(note)}</p>' if note else "") + f'<div class="grid">{"".join(cells)}</div>'


def _summary_cards(report: Mapping[str, Any]) -> str:
    cards = [
        ("median Pearson r", report.get("median_pearson_r")),
        ("median r²_ER (noise-corrected)", report.get("median_r2_er")),
        ("median split-half reliability", report.get("median_split_half_reliability")),
    ]
    out = "".join(f'<div class="card"><div class="muted">{t}</div><div class="big">{_fmt(v)}</div></div>' for t, v in cards)
    m = report.get("matched", {})
    out += (
        f'<p>{report.get("n_sites_included", 0)} of {report.get("n_sites", 0)} sites in the medians; '
        f'{m.get("stimuli_matched", "?")} images matched ({m.get("stimuli_predicted", "?")} predicted, '
        f'{m.get("stimuli_recorded", "?")} recorded); {m.get("sites_matched", "?")} sites matched '
        f'({m.get("sites_predicted", "?")} predicted, {m.get("sites_recorded", "?")} recorded).</p>'
    )
    exc = report.get("excluded_sites") or []
    if exc:
        items = "".join(f"<li>{html.escape(str(e['site_id']))}: {html.escape(str(e['reason']))}</li>" for e in exc[:50])
        more = f"<li>… and {len(exc) - 50} more</li>" if len(exc) > 50 else ""
        out += f'<details><summary>{len(exc)} site(s) excluded from the medians</summary><ul class="muted">{items}{more}</ul></details>'
    return out


def _control_table(report: Mapping[str, Any]) -> str:
    rows = [
        ("Stretch: fraction of targets above their natural max", "stretch", "fraction_above_natural_max"),
        ("Stretch: median gain (response / natural max - 1)", "stretch", "median_gain"),
        ("One-hot: median score ratio (vs best natural)", "one_hot", "median_score_ratio"),
        ("One-hot: fraction beating the best natural image", "one_hot", "fraction_beating_best_natural"),
    ]
    body = ""
    for label, blk, key in rows:
        b = report.get(blk) or {}
        pred = (b.get("predicted") or {}).get(key)
        body += (f'<tr><td class="l">{label}</td><td>{b.get("n_targets", 0)}</td><td>{_fmt(b.get(key))}</td>'
                 f'<td>{_ci((b.get("ci95") or {}).get(key))}</td><td>{_fmt(pred)}</td></tr>')
    sp = report.get("synthetic_prediction") or {}
    body += (f'<tr><td class="l">Median per-site r, predicted vs recorded, synthesized images</td><td>{sp.get("n_images", "–")} images</td>'
             f'<td>{_fmt(sp.get("median_site_r"))}</td><td>–</td><td>–</td></tr>')
    bs = report.get("bootstrap") or {}
    return (
        '<table><tr><th class="l">outcome</th><th>targets</th><th>recorded</th><th>95% CI</th><th>predicted (model)</th></tr>'
        f"{body}</table><p class=\"muted\">Bootstrap: {bs.get('n', 0)} resamples of {html.escape(str(bs.get('resampled', '')))} "
        f"(seed {bs.get('seed', '–')}). Natural set: {(report.get('natural') or {}).get('n_images', '–')} images.</p>"
    )


def _per_site_table(per_site: Sequence[Mapping]) -> str:
    head = "<tr><th class='l'>site</th><th>Pearson r</th><th>r²_ER</th><th>split-half reliability</th><th>images</th><th>median repeats</th><th>in medians</th></tr>"
    body = "".join(
        f"<tr><td class='l'>{html.escape(str(p['site_id']))}</td><td>{_fmt(p.get('pearson_r'))}</td><td>{_fmt(p.get('r2_er'))}</td>"
        f"<td>{_fmt(p.get('split_half_reliability'))}</td><td>{p.get('n_images')}</td><td>{_fmt(p.get('median_repeats'), 1)}</td>"
        f"<td{'' if p.get('included') else ' class=bad'}>{_fmt(p.get('included'))}</td></tr>"
        for p in per_site
    )
    return f"<details><summary>Per-site table ({len(per_site)} sites)</summary><table>{head}{body}</table></details>"


def render_html(report: Mapping[str, Any], fig_data) -> str:
    """The whole page as a string.

    Args:
        report: the report.json dict.
        fig_data: :class:`synth.validation.validate.FigureData` (joined arrays, run folder, manifest).
    """
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>synth validation report</title><style>{_CSS}</style></head><body>"]
    parts.append("<h1>Validation report</h1>")
    inputs = report.get("inputs") or {}
    if inputs:
        parts.append('<p class="muted">' + "<br>".join(
            f"{k}: {html.escape(str(v))}" for k, v in inputs.items() if k != "sha256" and v is not None) + "</p>")
    parts.append("<h2>Prediction accuracy and noise ceilings</h2>")
    parts.append(_summary_cards(report))
    per_site = report.get("per_site") or []
    n = len(fig_data.site_id)
    note = f" (first {MAX_SCATTER_SITES} of {n} sites)" if n > MAX_SCATTER_SITES else ""
    parts.append(f"<h2>Predicted vs recorded, per site{note}</h2>")
    parts.append(_img(scatter_figure(fig_data.site_id, fig_data.predicted, fig_data.recorded, per_site), "scatter per site"))
    parts.append("<h2>Noise-corrected r² against the split-half ceiling</h2>")
    parts.append(_img(ceiling_figure(per_site), "r2_er vs reliability"))
    parts.append('<p class="muted">Raw r² cannot exceed what the noisy repeat means allow (about the split-half reliability, '
                 "dashed). r²_ER corrects for trial-to-trial noise: it estimates the fraction of the explainable (repeatable) "
                 "variance the model captures, 1 being a perfect model.</p>")
    if "stretch" in report:
        parts.append("<h2>Control outcomes</h2>")
        parts.append(_control_table(report))
        st = (report.get("stretch") or {}).get("per_target") or []
        oh = (report.get("one_hot") or {}).get("per_target") or []
        if st:
            parts.append(_img(stretch_figure(st), "stretch gains"))
        if oh:
            parts.append(_img(one_hot_figure(oh), "one-hot score ratios"))
        montage = montage_html(fig_data.run_dir, fig_data.manifest)
        if montage:
            parts.append("<h2>Stimuli</h2>" + montage)
    parts.append("<h2>Per site</h2>" + _per_site_table(per_site))
    methods = report.get("methods") or {}
    if methods:
        parts.append("<h2>Methods</h2><ul class='muted'>" + "".join(
            f"<li><b>{html.escape(k)}</b>: {html.escape(str(v))}</li>" for k, v in methods.items()) + "</ul>")
    s = report.get("settings") or {}
    parts.append(f"<p class='muted'>settings: {html.escape(', '.join(f'{k}={v}' for k, v in s.items()))}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
