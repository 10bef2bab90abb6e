"""One self-contained HTML page with the analyses of one or more networks.

The input is ``{network name: analysis.run_all(...) result}``; figures are PNGs drawn with
matplotlib's Agg canvas (no pyplot, no display) and embedded as base64 data URIs, so the page
is a single file that opens anywhere. Written atomically.
"""
from __future__ import annotations

import base64
import datetime
import html
import io
import json
import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from nad_ext.maskbank import atomic_write

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1250px;
       color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.7em; margin-bottom: .2em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
h3 { margin-bottom: .3em; } p.note { color: #555; font-size: .92em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .3em .6em; text-align: left; vertical-align: top; }
th { background: #f3f4f6; } tr:nth-child(even) td { background: #fafafa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #eee; margin: .4em 0; }
.meta td:first-child { font-weight: 600; white-space: nowrap; }
nav a { margin-right: 1em; }
"""

SECTIONS = [("curves", "Layer-wise curves"), ("similarity", "Task similarity"), ("mosaics", "Mosaic examples"),
            ("confusion", "Confusion versus similarity"), ("accuracy", "Masked accuracy"), ("metadata", "Run metadata")]


def _png(fig: Figure) -> str:
    """An <img> tag holding the figure as an embedded PNG."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="figure">'


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "&ndash;"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.{digits}f}"
    return html.escape(str(value))


def _table(headers: list[str], rows: list[list], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{_fmt(v)}</td>' if i >= numeric_from and not isinstance(v, str)
                         else f"<td>{_fmt(v)}</td>" for i, v in enumerate(row)) + "</tr>"
        for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _colours(names):
    cycle = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    return {n: cycle[i % len(cycle)] for i, n in enumerate(names)}


def _as_float(values) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


# ----------------------------------------------------------------------------------------------
# Figures


def curves_figure(results_by_network: dict) -> str:
    """Open ratio, mean pairwise IoU and hit rate (with chance and null lines) against relative
    depth, one line per network."""
    fig = Figure(figsize=(15, 4.2))
    axes = fig.subplots(1, 3)
    colours = _colours(results_by_network)
    for name, res in results_by_network.items():
        depth = res["stats"]["relative_depth"]
        c = colours[name]
        axes[0].plot(depth, res["stats"]["per_gate_point"]["mean"], "o-", color=c, label=name)
        axes[1].plot(depth, _as_float(res["layerwise_similarity"]), "o-", color=c, label=name)
        hit = res["hit_rate"]
        mean, std = _as_float(hit["mean"]), _as_float(hit["std"])
        axes[2].plot(hit["relative_depth"], mean, "o-", color=c, label=name)
        axes[2].fill_between(hit["relative_depth"], mean - std, mean + std, color=c, alpha=0.12)
        axes[2].plot(hit["relative_depth"], _as_float(hit["null_mean"]), "x--", color=c, alpha=0.7,
                     label=f"{name} (null)")
    axes[2].axhline(0.25, color="black", linestyle=":", label="chance 0.25")
    titles = ["Open-channel ratio (mean over tasks)", "Mean pairwise IoU (task pairs)",
              "Mosaic hit rate (mean ± std)"]
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("relative depth")
        ax.set_xlim(-0.03, 1.03)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    for ax in (axes[0], axes[2]):
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    return _png(fig)


def similarity_figure(name: str, res: dict) -> str:
    """The IoU similarity matrix in cluster order."""
    sim = np.asarray(res["similarity"]["iou"], dtype=np.float64)
    order = list(res["similarity"]["order"])
    tasks = [res["tasks"][i] for i in order]
    side = min(9.0, 3.0 + 0.22 * len(tasks))
    fig = Figure(figsize=(side + 1.2, side))
    ax = fig.subplots()
    image = ax.imshow(sim[np.ix_(order, order)], cmap="viridis", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="mean IoU over gate points")
    if len(tasks) <= 40:
        ax.set_xticks(range(len(tasks)), tasks, rotation=90, fontsize=8)
        ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
    ax.set_title(f"{name}: task similarity (cluster order)")
    return _png(fig)


def mosaic_figure(name: str, res: dict, example: int) -> str:
    """One mosaic and, for one of its classes, the per-gate-point activation maps."""
    hit = res["hit_rate"]
    ex = hit["examples"][example]
    q = example % 4
    layers = [i for i, m in enumerate(ex["maps"][q]) if m is not None]
    cols = 1 + len(layers)
    fig = Figure(figsize=(1.9 * cols, 2.3))
    axes = np.atleast_1d(fig.subplots(1, cols))
    mosaic = np.asarray(ex["mosaic"])
    s = mosaic.shape[0] / 2
    axes[0].imshow(mosaic)
    axes[0].add_patch(_rect((q % 2) * s - 0.5, (q // 2) * s - 0.5, s))
    axes[0].set_title(f"target: {ex['classes'][q]}", fontsize=8)
    for ax, layer in zip(axes[1:], layers):
        ax.imshow(mosaic, alpha=0.35)
        ax.imshow(np.asarray(ex["maps"][q][layer]), cmap="inferno", alpha=0.75, vmin=0, vmax=1)
        ax.add_patch(_rect((q % 2) * s - 0.5, (q // 2) * s - 0.5, s))
        value = ex["hits"][q][layer]
        ax.set_title(f"{hit['gate_points'][layer]}\nhit {_fmt(value, 2)}", fontsize=7)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    return _png(fig)


def _rect(x, y, side):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), side, side, fill=False, edgecolor="#00e5ff", linewidth=1.5)


# ----------------------------------------------------------------------------------------------
# Sections


def _confusion_section(name: str, res: dict) -> str:
    conf = res.get("confusion") or {}
    if "skipped" in conf:
        return f"<h3>{html.escape(name)}</h3><p class='note'>Skipped: {html.escape(conf['skipped'])}</p>"
    rows = [[r["class"], ", ".join(f"{c} ({v:.2f})" for c, v in zip(r["similar"], r["similar_iou"])),
             ", ".join(f"{c} ({p:.2f})" for c, p in zip(r["predicted"], r["predicted_prob"])), r["overlap"]]
            for r in conf["per_class"]]
    k = conf["k"]
    summary = (f"Mean overlap {_fmt(conf['mean_overlap'], 2)} of {k} (chance {_fmt(conf['chance_overlap'], 2)}). "
               f"{conf['misclassified']} misclassified images: predicted class within the true class's "
               f"{k} most similar sub-architectures for {_fmt(conf['fraction_rank_le_k'], 3)} of them "
               f"(chance {_fmt(conf['chance'], 3)}), mean rank {_fmt(conf['mean_rank'], 2)}.")
    return (f"<h3>{html.escape(name)}</h3><p>{summary}</p><p class='note'>Predictions: "
            f"{html.escape(conf['predictions'])}; similarity: mean IoU.</p>"
            + _table(["class", f"top-{k} similar sub-architectures (IoU)", f"top-{k} predicted (mean prob)",
                      "overlap"], rows))


def _accuracy_section(name: str, res: dict) -> str:
    acc = res["masked_accuracy"]
    overall = {t["task"]: t["overall"] for t in res["stats"]["per_task"]}
    rows = [[t["task"], t["images"], overall.get(t["task"]), t["accuracy"], t["original_accuracy"],
             t["rejection"], t["original_rejection"]] for t in acc["tasks"]]
    m = acc["mean"]
    rows.append(["mean", None, res["stats"]["overall"], m["accuracy"], m["original_accuracy"], m["rejection"],
                 m["original_rejection"]])
    objective = res.get("objective", "paper")  # results from before the selective variant: paper
    return (f"<h3>{html.escape(name)}</h3><p>Objective: {html.escape(objective)}</p>"
            + _table(["task", "images", "open channels", "sub-arch. accuracy", "original accuracy",
                      "sub-arch. rejection", "original rejection"], rows)
            + f"<p class='note'>{html.escape(acc['definition'])}. Rejection: lower is better.</p>")


def _metadata_section(metadata: dict, results_by_network: dict) -> str:
    from nad_ext import __version__

    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "nad_ext version": __version__,
            "networks": ", ".join(results_by_network)}
    meta.update(metadata)
    rows = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(v if isinstance(v, str) else json.dumps(v, default=str))}"
        f"</td></tr>" for k, v in meta.items())
    return f"<table class='meta'>{rows}</table>"


def write_report(results_by_network: dict[str, dict], out_path: str | Path, metadata: dict) -> Path:
    """Writes the HTML report of ``{network name: analysis.run_all result}`` to ``out_path``.

    ``metadata`` (models, data set, config, ...) is shown as a table, together with the date
    and the nad_ext version. Returns the path written.
    """
    if not results_by_network:
        raise ValueError("results_by_network is empty: nothing to report")
    out_path = Path(out_path)
    parts = ["<h1>Neural Architecture Disentanglement report</h1>",
             f"<p>{len(results_by_network)} network(s): {html.escape(', '.join(results_by_network))}.</p>",
             "<nav>" + "".join(f'<a href="#{a}">{t}</a>' for a, t in SECTIONS) + "</nav>"]
    parts.append('<h2 id="curves">Layer-wise curves</h2>')
    parts.append("<p class='note'>x: gate point position / (number of gate points - 1). Hit rate: share of the "
                 "top activations inside the target class's quadrant; dashed: random sub-architectures with the "
                 "same per-layer open counts; dotted: chance.</p>")
    parts.append(curves_figure(results_by_network))
    for name, res in results_by_network.items():
        notes = res["hit_rate"].get("notes") or {}
        if notes:
            parts.append(f"<p class='note'>{html.escape(name)}: no hit rate at "
                         f"{html.escape(', '.join(notes))} (output not spatial).</p>")
    parts.append('<h2 id="similarity">Task similarity</h2>')
    parts += [similarity_figure(name, res) for name, res in results_by_network.items()]
    parts.append('<h2 id="mosaics">Mosaic examples</h2>')
    parts.append("<p class='note'>Each row: a mosaic (target quadrant boxed) and the target class's "
                 "activation map at each spatial gate point, with its hit.</p>")
    for name, res in results_by_network.items():
        parts.append(f"<h3>{html.escape(name)}</h3>")
        examples = res["hit_rate"]["examples"]
        shown = [mosaic_figure(name, res, e) for e, ex in enumerate(examples) if "mosaic" in ex]
        parts += shown or ["<p class='note'>No example arrays in these results.</p>"]
    parts.append('<h2 id="confusion">Confusion versus similarity</h2>')
    parts += [_confusion_section(name, res) for name, res in results_by_network.items()]
    parts.append('<h2 id="accuracy">Masked accuracy</h2>')
    parts += [_accuracy_section(name, res) for name, res in results_by_network.items()]
    parts.append('<h2 id="metadata">Run metadata</h2>')
    parts.append(_metadata_section(metadata, results_by_network))
    page = ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>NAD report</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
    atomic_write(out_path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    return out_path
