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
SCATTER_COLS = 6
PANEL_IN = 1.8  # inches per scatter panel
MAX_FIG_IN = 11.3  # figures are drawn at 96 dpi no wider than the page (no downscaling of text)
MAX_MONTAGE = 96
THUMB = 112

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1150px;color:#222;background:#fff}
h1{font-size:24px;margin-bottom:4px} h2{font-size:19px;margin-top:32px;border-bottom:1px solid #ccc;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0;font-size:13px} td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f3f3f3} td.l,th.l{text-align:left} .muted{color:#777;font-size:13px} .bad{color:#b00}
img.fig{max-width:100%;border:1px solid #eee} .grid{display:flex;flex-wrap:wrap;gap:6px}
figure.t{margin:0;width:120px;text-align:center;font-size:11px} figure.t img{width:112px;height:112px;image-rendering:pixelated;border:1px solid #ccc}
.big{font-size:22px;font-weight:600} .card{display:inline-block;border:1px solid #ddd;border-radius:6px;padding:8px 14px;margin:4px 8px 4px 0;vertical-align:top}
.card.wide{max-width:520px} figure.t figcaption{line-height:1.25} figure.t figcaption .muted{font-size:11px}
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

    return Figure(figsize=(min(w, MAX_FIG_IN), h), layout="constrained")


def scatter_figure(site_id: Sequence[str], predicted: np.ndarray, recorded: np.ndarray, per_site: Sequence[Mapping]) -> str:
    """Small multiples: predicted vs recorded repeat mean, one panel per site, with the
    least-squares line (model units differ from recorded units) (base64 PNG)."""
    n = min(len(site_id), MAX_SCATTER_SITES)
    cols = min(SCATTER_COLS, max(1, n))
    rows = int(math.ceil(n / cols))
    fig = _figure(PANEL_IN * cols + 0.4, PANEL_IN * rows + 0.5)
    info = {p["site_id"]: p for p in per_site}
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_visible(False)
            continue
        x, y = predicted[i], recorded[i]
        ok = np.isfinite(x) & np.isfinite(y)
        p = info.get(str(site_id[i]), {})
        included = p.get("included", True)
        color = "#1f77b4" if included else "#999999"
        ax.scatter(x[ok], y[ok], s=7, alpha=0.65, color=color, linewidths=0)
        if ok.sum() >= 2 and np.ptp(x[ok]) > 0:
            slope, icept = np.polyfit(x[ok], y[ok], 1)
            xs = np.array([x[ok].min(), x[ok].max()])
            ax.plot(xs, slope * xs + icept, color="#444444", lw=0.8)
        r = p.get("pearson_r")
        r2 = p.get("r2_er")
        ax.set_title(f"{site_id[i]}{'' if included else ' (excluded)'}\nr={_fmt(r, 2)}  r²_ER={_fmt(r2, 2)}", fontsize=8)
        ax.tick_params(labelsize=6.5, length=2, pad=1)
        ax.locator_params(nbins=4)
    fig.supxlabel("model prediction (model units)", fontsize=10)
    fig.supylabel("recorded response (mean over repeats)", fontsize=10)
    return _png(fig)


def ceiling_figure(per_site: Sequence[Mapping]) -> str:
    """Raw r² and noise-corrected r²_ER against split-half reliability (the noise ceiling of
    raw r²), and the distributions of r²_ER and reliability (base64 PNG)."""
    def arr(key: str) -> np.ndarray:
        return np.array([np.nan if p.get(key) is None else p[key] for p in per_site], dtype=float)

    r2er, rel, r = arr("r2_er"), arr("split_half_reliability"), arr("pearson_r")
    raw = r * r
    inc = np.array([bool(p.get("included")) for p in per_site])
    from matplotlib.ticker import MaxNLocator

    fig = _figure(11.0, 4.2)
    ax = fig.add_subplot(1, 2, 1)
    ax.set_title("Per site: r² against the noise ceiling", fontsize=10)
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
    ax.legend(fontsize=7.5, loc="upper left")
    if (~inc).any():
        ax.text(0.99, 0.01, "grey: excluded sites", transform=ax.transAxes, ha="right", va="bottom", fontsize=7, color="#777")
    ax2 = fig.add_subplot(1, 2, 2)
    bins = np.linspace(min(-0.2, lo), 1.2, 29)
    if np.isfinite(r2er[inc]).any():
        ax2.hist(np.clip(r2er[inc & np.isfinite(r2er)], bins[0], bins[-1]), bins=bins, alpha=0.6, label="r²_ER", color="#ff7f0e")
    if np.isfinite(rel[inc]).any():
        ax2.hist(np.clip(rel[inc & np.isfinite(rel)], bins[0], bins[-1]), bins=bins, alpha=0.5, label="split-half reliability", color="#7f7f7f")
    ax2.set_title("Distribution over included sites", fontsize=10)
    ax2.set_xlabel("value (clipped to the axis range)")
    ax2.set_ylabel("number of sites")
    ax2.yaxis.set_major_locator(MaxNLocator(integer=True))
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend(fontsize=8)
    else:
        ax2.text(0.5, 0.5, "no included site with a defined value", transform=ax2.transAxes, ha="center", va="center",
                 fontsize=10, color="#777")
    return _png(fig)


def _bars(rows: Sequence[Mapping], value: str, pred: str, ylabel: str, ref: float, title: str) -> str:
    targets = [str(r["target_site"]) for r in rows]
    v = np.array([np.nan if r.get(value) is None else r[value] for r in rows], dtype=float)
    p = np.array([np.nan if r.get(pred) is None else r[pred] for r in rows], dtype=float)
    w = max(5.0, 0.28 * len(rows) + 2)
    fig = _figure(w, 3.8)
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
        ax.set_xticklabels(targets, rotation=90, fontsize=7.5 if len(rows) <= 45 else 6.5)
        ax.set_xlim(-0.7, len(rows) - 0.3)
        ax.set_xlabel("target site")
    else:
        ax.set_xlabel(f"{len(rows)} target sites")
    ax.legend(fontsize=8)
    return _png(fig)


def stretch_figure(rows: Sequence[Mapping]) -> str:
    return _bars(rows, "gain", "predicted_gain", "response / natural max - 1", 0.0,
                 "Stretch: gain over each target's natural maximum (green: above)")


def one_hot_figure(rows: Sequence[Mapping]) -> str:
    return _bars(rows, "ratio", "predicted_ratio", "one-hot score / best natural", 1.0,
                 "One-hot: score ratio vs the best natural image (green: beats it)")


def montage_html(run_dir: Path | None, manifest: Sequence[Mapping[str, str]], notes: Mapping[str, str] | None = None) -> str:
    """Thumbnails of the stimuli (PNG files named in the manifest), labelled with objective
    and target, plus ``notes[stimulus_id]`` (e.g. the recorded outcome) where given."""
    from PIL import Image

    from synth.validation.io import find_stimulus_png, normalize_objective

    if run_dir is None or not manifest:
        return ""
    order = {"stretch": 0, "one_hot": 1}
    rows = sorted(manifest, key=lambda r: (order.get(normalize_objective(r["objective"]), 2), normalize_objective(r["objective"]),
                                           r["target_site"], r["stimulus_id"]))
    notes = notes or {}
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
        label = f"{html.escape(normalize_objective(row['objective']))}<br>target {html.escape(row['target_site'])}"
        if row["stimulus_id"] in notes:
            label += f"<br><span class='muted'>{html.escape(notes[row['stimulus_id']])}</span>"
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


def _outcome_notes(stretch_rows: Sequence[Mapping], one_hot_rows: Sequence[Mapping]) -> dict[str, str]:
    """``stimulus_id -> caption`` for each target's best image."""
    notes: dict[str, str] = {}
    for r in stretch_rows:
        if r.get("stimulus_id"):
            notes[str(r["stimulus_id"])] = f"gain {_signed(r.get('gain'))} ({_signed(r.get('predicted_gain'))})"
    for r in one_hot_rows:
        if r.get("stimulus_id"):
            notes[str(r["stimulus_id"])] = f"ratio {_fmt(r.get('ratio'), 2)} ({_fmt(r.get('predicted_ratio'), 2)})"
    return notes


def _signed(v: Any) -> str:
    return "–" if v is None or not math.isfinite(float(v)) else f"{float(v):+.2f}"


def _summary_cards(report: Mapping[str, Any]) -> str:
    cards = [
        ("median Pearson r", report.get("median_pearson_r")),
        ("median r²_ER (noise-corrected)", report.get("median_r2_er")),
        ("median split-half reliability", report.get("median_split_half_reliability")),
    ]
    out = "".join(f'<div class="card"><div class="muted">{t}</div><div class="big">{_fmt(v)}</div></div>' for t, v in cards)
    m = report.get("matched", {})
    unpred = m.get("stimuli_recorded_not_predicted")
    unrec = m.get("stimuli_predicted_not_recorded")
    extra = []
    if unpred:
        extra.append(f"{unpred} recorded image(s) have no prediction and are not scored here")
    if unrec:
        extra.append(f"{unrec} predicted image(s) were not recorded")
    out += (
        f'<p>{report.get("n_sites_included", 0)} of {report.get("n_sites", 0)} sites in the medians; '
        f'{m.get("stimuli_matched", "?")} images matched ({m.get("stimuli_predicted", "?")} predicted, '
        f'{m.get("stimuli_recorded", "?")} recorded); {m.get("sites_matched", "?")} sites matched '
        f'({m.get("sites_predicted", "?")} predicted, {m.get("sites_recorded", "?")} recorded).'
        + (f' <span class="muted">({"; ".join(extra)}.)</span>' if extra else "") + "</p>"
    )
    exc = report.get("excluded_sites") or []
    if exc:
        items = "".join(f"<li>{html.escape(str(e['site_id']))}: {html.escape(str(e['reason']))}</li>" for e in exc[:50])
        more = f"<li>… and {len(exc) - 50} more</li>" if len(exc) > 50 else ""
        out += f'<details><summary>{len(exc)} site(s) excluded from the medians</summary><ul class="muted">{items}{more}</ul></details>'
    return out


def _pct(v: Any) -> str:
    return "–" if v is None or not math.isfinite(float(v)) else f"{100 * float(v):.0f}%"


def _control_cards(report: Mapping[str, Any]) -> str:
    """The two questions a lab asks, answered in one line each (recorded, 95% CI, model)."""
    st, oh = report.get("stretch") or {}, report.get("one_hot") or {}
    cards = []
    if st.get("n_targets"):
        ci = (st.get("ci95") or {}).get("fraction_above_natural_max")
        pred = (st.get("predicted") or {}).get("fraction_above_natural_max")
        cards.append((f"Stretch: targets driven above their natural maximum ({st['n_targets']} targets)",
                      _pct(st.get("fraction_above_natural_max")),
                      f"95% CI {_pct(ci[0]) if ci else '–'} to {_pct(ci[1]) if ci else '–'}; model predicted {_pct(pred)}; "
                      f"median gain {_fmt(st.get('median_gain'), 2)}"))
    if oh.get("n_targets"):
        ci = (oh.get("ci95") or {}).get("fraction_beating_best_natural")
        pred = (oh.get("predicted") or {}).get("fraction_beating_best_natural")
        cards.append((f"One-hot: targets where a synthesized image beats the best natural one ({oh['n_targets']} targets)",
                      _pct(oh.get("fraction_beating_best_natural")),
                      f"95% CI {_pct(ci[0]) if ci else '–'} to {_pct(ci[1]) if ci else '–'}; model predicted {_pct(pred)}; "
                      f"median score ratio {_fmt(oh.get('median_score_ratio'), 2)}"))
    return "".join(
        f'<div class="card wide"><div class="muted">{html.escape(t)}</div><div class="big">{v}</div>'
        f'<div class="muted">{html.escape(d)}</div></div>' for t, v, d in cards)


def _held_cell(held: Mapping[str, Any] | None, key: str) -> str:
    """A held-out-repeats figure with its 95% CI, or '–'."""
    if not held:
        return "–"
    ci = (held.get("ci95") or {}).get(key)
    return _fmt(held.get(key)) + (f" {_ci(ci)}" if ci else "")


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
                 f'<td>{_ci((b.get("ci95") or {}).get(key))}</td><td>{_held_cell(b.get("held_out_repeats"), key)}</td>'
                 f'<td>{_fmt(pred)}</td></tr>')
    sp = report.get("synthetic_prediction") or {}
    body += (f'<tr><td class="l">Median per-site r, predicted vs recorded, synthesized images</td><td>{sp.get("n_images", "–")} images</td>'
             f'<td>{_fmt(sp.get("median_site_r"))}</td><td>–</td><td>–</td><td>–</td></tr>')
    bs = report.get("bootstrap") or {}
    return (
        '<table><tr><th class="l">outcome</th><th>targets</th><th>recorded</th><th>95% CI</th><th>held-out repeats</th><th>predicted (model)</th></tr>'
        f"{body}</table><p class=\"muted\">Bootstrap: {bs.get('n', 0)} resamples of {html.escape(str(bs.get('resampled', '')))} "
        f"(seed {bs.get('seed', '–')}). Natural set: {(report.get('natural') or {}).get('n_images', '–')} images. "
        "Held-out repeats: best images picked on half of each image's trials and scored on the other half (both ways, "
        "averaged); the recorded column picks and scores on the same trials, which favours the larger natural set.</p>"
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
    parts.append('<p class="muted">One point per image scored (the images present in both the predictions and the '
                 "recording); line: least-squares fit (model and recorder units differ); grey points: a site excluded "
                 "from the medians.</p>")
    parts.append("<h2>Noise-corrected r² against the split-half ceiling</h2>")
    parts.append(_img(ceiling_figure(per_site), "r2_er vs reliability"))
    parts.append('<p class="muted">Raw r² cannot exceed what the noisy repeat means allow (about the split-half reliability, '
                 "dashed). r²_ER corrects for trial-to-trial noise: it estimates the fraction of the explainable (repeatable) "
                 "variance the model captures, 1 being a perfect model.</p>")
    if "stretch" in report:
        parts.append("<h2>Control outcomes</h2>")
        parts.append(_control_cards(report))
        parts.append(_control_table(report))
        st = (report.get("stretch") or {}).get("per_target") or []
        oh = (report.get("one_hot") or {}).get("per_target") or []
        if st:
            parts.append(_img(stretch_figure(st), "stretch gains"))
        if oh:
            parts.append(_img(one_hot_figure(oh), "one-hot score ratios"))
        montage = montage_html(fig_data.run_dir, fig_data.manifest, _outcome_notes(st, oh))
        if montage:
            parts.append("<h2>Stimuli and their targets</h2><p class='muted'>Under each target's best image: the recorded "
                         "outcome (stretch: response / natural max - 1; one-hot: score / best natural score) and, in "
                         "brackets, the model's prediction.</p>" + montage)
    parts.append("<h2>Per site</h2>" + _per_site_table(per_site))
    methods = report.get("methods") or {}
    if methods:
        parts.append("<h2>Methods</h2><ul class='muted'>" + "".join(
            f"<li><b>{html.escape(k)}</b>: {html.escape(str(v))}</li>" for k, v in methods.items()) + "</ul>")
    s = report.get("settings") or {}
    parts.append(f"<p class='muted'>settings: {html.escape(', '.join(f'{k}={v}' for k, v in s.items()))}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
