"""report.html: one self-contained page (images and plots inline as data: URIs, no network) with
the overlays of every image and method, the deletion/insertion and sanity curves, and the tables."""

from __future__ import annotations

import base64
import html
import io
import json
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ..errors import OnnxGradCamError
from ..explain.overlay import overlay
from .base import MetricResult

if TYPE_CHECKING:
    from .run import EvaluationResult, RunResult

THUMB = 128  # px, the longer side of a gallery overlay
# the values a gallery card shows (every metric's per-image value is still a sort key)
HEADLINE = (
    "deletion",
    "insertion",
    "average_drop",
    "road_combined",
    "road_combined_original",
    "pointing_game",
    "energy_pointing_game",
    "localisation_error",
    "sanity_cascading",
)
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def require_matplotlib() -> Any:
    """matplotlib's module, or a one-line error naming the extra that installs it."""
    try:
        import matplotlib
    except ImportError as exc:
        raise OnnxGradCamError(
            f"the report needs matplotlib ({exc}): to fix this, pip install 'onnx-gradcam[report]' "
            "(or write metrics.json only: --no-report, report=False)"
        ) from None
    return matplotlib


def figure(width: float, height: float) -> Any:
    """A matplotlib Figure on the Agg canvas, without pyplot (no global state, no display)."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def data_uri(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode("ascii")


def _image_jpeg(img: Image.Image) -> bytes:
    """A gallery overlay as JPEG (a fifth of the PNG's size: the page stays small for large sets)."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _run_title(run: RunResult) -> str:
    return f"{run.method} @ {run.layer}"


def _curve(result: MetricResult) -> tuple[np.ndarray, np.ndarray] | None:
    """(x [P], curves [N, P]) of a deletion/insertion result: curves[name] (or its one 2-D array)."""
    arrays = {k: np.asarray(v, np.float64) for k, v in result.curves.items()}
    ys = arrays.get(result.name)
    if ys is None or ys.ndim != 2:
        two = [v for k, v in arrays.items() if v.ndim == 2 and k != "x"]
        ys = two[0] if two else None
    if ys is None or ys.shape[1] < 2:
        return None
    x = arrays.get("x")
    if x is None or x.shape != (ys.shape[1],):
        x = np.linspace(0.0, 1.0, ys.shape[1])
    return x, ys


def curves_plot(runs: list[RunResult]) -> bytes | None:
    """Deletion and insertion: the mean score over the images against the fraction of pixels changed."""
    panels = [name for name in ("deletion", "insertion") if any(name in r.metrics for r in runs)]
    if not panels:
        return None
    fig = figure(4.2 * len(panels), 3.2)
    for i, name in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for j, run in enumerate(runs):
            got = _curve(run.metrics[name]) if name in run.metrics else None
            if got is None:
                continue
            x, ys = got
            value = run.metrics[name].value
            ax.plot(x, ys.mean(axis=0), color=COLOURS[j % len(COLOURS)], label=f"{_run_title(run)} (AUC {value:.3f})")
        ax.set_title(name)
        ax.set_xlabel("fraction of pixels " + ("deleted" if name == "deletion" else "inserted"))
        ax.set_ylabel("probability of the class (mean)")
        ax.set_xlim(0, 1)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_png(fig)


def sanity_plot(runs: list[RunResult]) -> bytes | None:
    """Cascading randomisation: Spearman correlation (mean ± std over images) per randomised block."""
    found = [(r, r.metrics["sanity_cascading"]) for r in runs if "sanity_cascading" in r.metrics]
    if not found:
        return None
    fig = figure(6.4, 3.4)
    ax = fig.add_subplot(1, 1, 1)
    blocks: list[str] = []
    for j, (run, res) in enumerate(found):
        rho = np.asarray(res.curves.get("spearman", np.zeros((0, 0))), np.float64)
        if rho.ndim != 2 or rho.shape[1] == 0:
            continue
        named = res.settings.get("blocks", [])
        blocks = [str(b) for b in named] if isinstance(named, list) else []
        xs = np.arange(rho.shape[1])
        mean, std = np.nanmean(rho, axis=0), np.nanstd(rho, axis=0)
        colour = COLOURS[j % len(COLOURS)]
        ax.plot(xs, mean, marker="o", color=colour, label=_run_title(run))
        ax.fill_between(xs, mean - std, mean + std, color=colour, alpha=0.15)
    if blocks:
        ax.set_xticks(np.arange(len(blocks)), [b if len(b) <= 18 else "…" + b[-17:] for b in blocks], rotation=30)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylim(-1.05, 1.05)
    ax.set_xlabel("randomised down to block (from the logits)")
    ax.set_ylabel("Spearman ρ with the original map")
    ax.set_title("sanity check: cascading randomisation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_png(fig)


def _fmt(v: float) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{v:.4g}"


def _settings_text(settings: dict[str, object]) -> str:
    shown = {k: v for k, v in settings.items() if not isinstance(v, (list, dict)) or len(json.dumps(v)) < 80}
    return ", ".join(f"{k}: {v}" for k, v in shown.items())


def _table(run: RunResult) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td class='num'>{_fmt(m.value)}</td>"
        f"<td class='settings'>{html.escape(_settings_text(m.settings))}</td></tr>"
        for name, m in run.metrics.items()
    )
    return (
        f"<h3>{html.escape(_run_title(run))}</h3><table class='metrics'><thead><tr><th>metric</th><th>value</th>"
        f"<th>settings</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _sort_keys(result: EvaluationResult) -> list[tuple[str, str]]:
    """(key, label) of the gallery's sort choices: confidence, name, then each metric of each run."""
    keys = [("confidence", "confidence"), ("name", "name")]
    for i, run in enumerate(result.runs):
        for name, m in run.metrics.items():
            if np.asarray(m.per_image).shape == (len(result.names),):
                keys.append((f"m{i}-{name}", f"{name} ({_run_title(run)})"))
    return keys


def _card(result: EvaluationResult, i: int, picture: Image.Image) -> str:
    cls, truth = int(result.classes[i]), int(result.truth[i])
    wrong = truth >= 0 and truth != cls
    attrs = {"data-name": result.names[i], "data-confidence": f"{float(result.probabilities[i]):.6g}"}
    thumb = picture.convert("RGB").copy()
    thumb.thumbnail((THUMB, THUMB))
    figures = []
    for r, run in enumerate(result.runs):
        rows = []
        for name, m in run.metrics.items():
            per = np.asarray(m.per_image, np.float64)
            if per.shape == (len(result.names),):
                attrs[f"data-m{r}-{name}"] = "" if not np.isfinite(per[i]) else f"{per[i]:.6g}"
                if name in HEADLINE:
                    rows.append(f"<tr><td>{html.escape(name)}</td><td class='num'>{_fmt(per[i])}</td></tr>")
        shown = overlay(thumb, run.maps[i])
        title = html.escape(_run_title(run))
        figures.append(
            f"<figure><img alt='{title} overlay' src='{data_uri(_image_jpeg(shown), 'jpeg')}'>"
            f"<figcaption><b>{title}</b><table>{''.join(rows)}</table></figcaption></figure>"
        )
    truth_text = f" · truth {html.escape(result.label(truth))}" if truth >= 0 else ""
    badge = "<span class='badge'>misclassified</span>" if wrong else ""
    attr_text = " ".join(f"{k}='{html.escape(v, quote=True)}'" for k, v in attrs.items())
    return (
        f"<div class='card{' wrong' if wrong else ''}' {attr_text}><div class='head'><b>{html.escape(result.names[i])}"
        f"</b> {badge}<br>predicted {html.escape(result.label(cls))} ({float(result.probabilities[i]):.3f})"
        f"{truth_text}</div><div class='figs'>{''.join(figures)}</div></div>"
    )


# nothing beyond the file itself: images are data: URIs, style and script inline
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; } h3 { font-size: 1em; }
.meta { color: #555; font-size: 0.85em; }
#gallery { display: flex; flex-wrap: wrap; gap: 10px; }
.card { border: 2px solid #ccc; border-radius: 6px; padding: 6px; font-size: 0.8em; }
.card.wrong { border-color: #d62728; }
.badge { background: #d62728; color: white; border-radius: 3px; padding: 0 4px; }
.figs { display: flex; gap: 8px; } figure { margin: 4px 0 0 0; width: 150px; }
figcaption { overflow-wrap: anywhere; } figcaption table { border-collapse: collapse; font-size: 0.9em; }
figcaption td { padding: 0 2px; overflow-wrap: anywhere; } figcaption td.num { white-space: nowrap; }
table.metrics { border-collapse: collapse; font-size: 0.85em; }
table.metrics td, table.metrics th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } td.settings { color: #555; }
img.plot { max-width: 100%; }
"""

SCRIPT = """
(function () {
  const gallery = document.getElementById('gallery');
  const key = document.getElementById('sort-key');
  const order = document.getElementById('sort-order');
  function value(card, k) {
    if (k === 'name') return card.dataset.name;
    const v = card.getAttribute('data-' + k);
    return v === null || v === '' ? NaN : parseFloat(v);
  }
  function sort() {
    const k = key.value, down = order.value === 'desc';
    const cards = Array.from(gallery.children);
    cards.sort(function (a, b) {
      const x = value(a, k), y = value(b, k);
      if (k === 'name') return down ? y.localeCompare(x) : x.localeCompare(y);
      if (isNaN(x) !== isNaN(y)) return isNaN(x) ? 1 : -1;  // no value: last
      return down ? y - x : x - y;
    });
    cards.forEach(function (c) { gallery.appendChild(c); });
    document.body.dataset.sorted = k + ':' + order.value;
  }
  key.addEventListener('change', sort);
  order.addEventListener('change', sort);
  sort();
})();
"""


def report_html(result: EvaluationResult, pictures: list[Image.Image]) -> str:
    """The page as text: gallery (sortable), deletion/insertion curves, sanity curve, one table per run."""
    require_matplotlib()
    wrong = sum(1 for c, t in zip(result.classes, result.truth) if t >= 0 and t != c)
    known = int(np.sum(result.truth >= 0))
    options = "".join(
        f"<option value='{html.escape(k)}'>{html.escape(label)}</option>" for k, label in _sort_keys(result)
    )
    cards = "".join(_card(result, i, pictures[i]) for i in range(len(result.names)))
    plots = []
    curves = curves_plot(result.runs)
    if curves is not None:
        plots.append(
            "<h2>Deletion and insertion</h2><img class='plot' id='plot-curves' alt='deletion and insertion curves' "
            f"src='{data_uri(curves)}'>"
        )
    sanity = sanity_plot(result.runs)
    if sanity is not None:
        plots.append(
            f"<h2>Sanity check</h2><img class='plot' id='plot-sanity' alt='sanity check' src='{data_uri(sanity)}'>"
        )
    tables = "".join(_table(run) for run in result.runs)
    versions = ", ".join(f"{k} {v}" for k, v in result.versions.items())
    accuracy = f"; {wrong} of {known} images with a known class misclassified" if known else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<title>onnx-gradcam evaluation</title><style>{STYLE}</style></head>
<body data-sorted="">
<h1>onnx-gradcam evaluation</h1>
<p class="meta">model {html.escape(result.model)} (sha256 {result.model_sha256[:16]}…)
· {len(result.names)} images{accuracy} · {html.escape(versions)}</p>
<h2>Gallery</h2>
<p><label>sort by <select id="sort-key">{options}</select></label>
<select id="sort-order"><option value="desc">highest first</option>
<option value="asc">lowest first</option></select></p>
<div id="gallery">{cards}</div>
{"".join(plots)}
<h2>Metrics per method and layer</h2>
{tables}
<script>{SCRIPT}</script>
</body></html>
"""
