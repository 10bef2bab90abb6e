"""One self-contained HTML page with the analyses of one or more networks.

The input is ``{network name: analysis.run_all(...) result}``, each optionally with a
``"paths"`` entry (:func:`nad_ext.path_study.analyze_paths`, the section "Per-image paths"). Figures
are PNGs drawn with matplotlib's Agg canvas (no pyplot, no display) and embedded as base64 data
URIs, so the page is a single file that opens anywhere. Written atomically.

May import: :mod:`nad_ext.analysis` and what it may import; not :mod:`nad_ext.training`.
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

from nad_ext import analysis
from nad_ext._utils.storage import atomic_write

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

SECTIONS = [("summary", "Summary"), ("curves", "Layer-wise curves"), ("hit-rate", "Hit rate"),
            ("similarity", "Task similarity"), ("mosaics", "Mosaic examples"),
            ("confusion", "Confusion versus similarity"), ("accuracy", "Masked accuracy"),
            ("beta", "Beta and the fidelity check"), ("paths", "Per-image paths"),
            ("metadata", "Run metadata")]
MEANINGS = (f"{analysis.MEASURES_MEANING[0].upper()}{analysis.MEASURES_MEANING[1:]}. "
            f"{analysis.OPEN_CHANNELS[0].upper()}{analysis.OPEN_CHANNELS[1:]}: open channels / all gated channels "
            "of a sub-architecture. All on the validation images, with the binary sub-architectures.")


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


def _percent(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "&ndash;"
    return f"{100 * float(value):.1f}%"


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
    """Open-channel ratio and mean pairwise IoU against relative depth, one line per network."""
    fig = Figure(figsize=(12, 4.2))
    axes = fig.subplots(1, 2)
    colours = _colours(results_by_network)
    for name, res in results_by_network.items():
        depth = res["stats"]["relative_depth"]
        c = colours[name]
        axes[0].plot(depth, res["stats"]["per_gate_point"]["mean"], "o-", color=c,
                     label=f"{name} ({res['stats']['overall']:.1%} of channels open)")
        axes[1].plot(depth, _as_float(res["layerwise_similarity"]), "o-", color=c, label=name)
    titles = ["Open-channel ratio per gate point (mean over tasks)", "Mean pairwise IoU (task pairs)"]
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("relative depth")
        ax.set_xlim(-0.03, 1.03)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    return _png(fig)


def calibration_figure(name: str, calibration: dict) -> str:
    """A calibration's curve: open ratio (and, by fidelity, balanced accuracy and whether the
    sub-architectures kept their task) against beta, the beta chosen marked."""
    curve = calibration["curve"]
    betas = [row[0] for row in curve]
    fig = Figure(figsize=(6.5, 3.6))
    ax = fig.subplots()
    ax.semilogx(betas, [row[1] for row in curve], "o-", color="#4477aa", label="open ratio")
    if calibration.get("criterion") == "fidelity":
        balanced = [np.nan if row[2] is None else row[2] for row in curve]
        ax.semilogx(betas, balanced, "s-", color="#228833", label="balanced accuracy (short runs)")
        lost = [row for row in curve if not row[3]]
        ax.scatter([row[0] for row in lost], [row[1] for row in lost], s=90, facecolors="none", edgecolors="#cc3311",
                   label="loses the task", zorder=3)
        aim = "largest beta that keeps the task"
    else:
        ax.axhline(calibration["target_open_ratio"], color="grey", ls="--", lw=1, label="target open ratio")
        aim = f"open ratio {calibration['target_open_ratio']:.2f}"
    ax.axvline(calibration["beta"], color="black", lw=1, label=f"beta {calibration['beta']:.3g}")
    ax.set_title(f"{name}: beta calibration ({aim})", fontsize=10)
    ax.set_xlabel("beta")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    return _png(fig)


def _beta_section(name: str, res: dict) -> str:
    """How the network's beta was found, and what the run's fidelity check found."""
    parts = [f"<h3>{html.escape(name)}</h3>"]
    calibration, fidelity = res.get("calibration"), res.get("fidelity")
    if calibration:
        parts.append(calibration_figure(name, calibration))
    if fidelity:
        flagged = fidelity.get("flagged") or []
        mean = lambda key: _as_float([v for v in fidelity[key] if v is not None]).mean()  # noqa: E731
        text = (f"Fidelity check after the last epoch ({html.escape(fidelity['images_from'])}): mean "
                f"{analysis.OWN_CLASS_ACCURACY} {_percent(mean('own_class_accuracy'))} (original "
                f"{_percent(mean('original_own_class_accuracy'))}), {analysis.FALSE_POSITIVES} "
                f"{_percent(mean('false_positive_rate'))}; ")
        text += (f"{len(flagged)} of {len(fidelity['tasks'])} sub-architectures do not do their task: "
                 + html.escape("; ".join(f"{n} ({why})" for n, why in flagged[:10])) if flagged
                 else "every sub-architecture does its task (none constant, none below half the original's "
                      f"{analysis.OWN_CLASS_ACCURACY}).")
        parts.append(f"<p>{text}</p>")
    if not calibration and not fidelity:
        parts.append("<p class='note'>beta given, no fidelity check recorded in the bank.</p>")
    return "".join(parts)


def hit_rate_figure(results_by_network: dict) -> str:
    """The mosaic hit rate against relative depth, one panel per network (small multiples):
    mean +- std, the null baseline +- std, chance, and the share of (mosaic, class) pairs whose
    map was constant (left out of the mean) as grey bars."""
    names = list(results_by_network)
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig = Figure(figsize=(3.6 * cols + 0.4, 3.0 * rows + 0.8))
    axes = np.atleast_1d(fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False)).ravel()
    colours = _colours(names)
    for ax, name in zip(axes, names):
        hit = results_by_network[name]["hit_rate"]
        depth = np.asarray(hit["relative_depth"], dtype=np.float64)
        mean, std = _as_float(hit["mean"]), _as_float(hit["std"])
        null, null_std = _as_float(hit["null_mean"]), _as_float(hit["null_std"])
        constant = _as_float(hit.get("constant_pairs") or [None] * len(depth)) / max(hit.get("pairs") or 1, 1)
        if np.nan_to_num(constant).any():
            ax.bar(depth, np.nan_to_num(constant), width=0.03, color="#d4d4d4", zorder=0,
                   label="share of maps constant (left out)")
        ax.axhline(hit.get("chance", 0.25), color="black", linestyle=":", linewidth=1, label="chance")
        ax.fill_between(depth, null - null_std, null + null_std, color="#888888", alpha=0.18, linewidth=0)
        ax.plot(depth, null, "x--", color="#666666", linewidth=1, label="null (random, same open counts) ± std")
        ax.errorbar(depth, mean, yerr=std, fmt="o-", color=colours[name], ecolor=colours[name], elinewidth=1,
                    capsize=2.5, label="sub-architectures ± std")
        ax.set_title(name, fontsize=10)
        ax.set_xlim(-0.05, 1.05)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    for ax in axes[(rows - 1) * cols:]:
        ax.set_xlabel("relative depth")
    for ax in axes[::cols]:
        ax.set_ylabel("hit rate")
    handles = {}
    for ax in axes[:len(names)]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=4, fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.02))
    fig.suptitle("Mosaic hit rate per gate point", fontsize=11)
    fig.subplots_adjust(bottom=0.22 if rows == 1 else 0.12)
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
    """One mosaic and, for one of its classes, the per-gate-point activation maps; a panel
    whose map is constant says why instead of showing a flat map."""
    hit = res["hit_rate"]
    ex = hit["examples"][example]
    q = example % 4
    layers = [i for i, m in enumerate(ex["maps"][q]) if m is not None]
    constant = (ex.get("constant") or [[None] * len(ex["maps"][q])] * 4)[q]
    cols = 1 + len(layers)
    fig = Figure(figsize=(1.9 * cols, 2.3))
    axes = np.atleast_1d(fig.subplots(1, cols))
    mosaic = np.asarray(ex["mosaic"])
    s = mosaic.shape[0] / 2
    axes[0].imshow(mosaic)
    axes[0].add_patch(_rect((q % 2) * s - 0.5, (q // 2) * s - 0.5, s))
    axes[0].set_title(f"target: {ex['classes'][q]}", fontsize=8)
    for ax, layer in zip(axes[1:], layers):
        point = hit["gate_points"][layer]
        if constant[layer]:
            ax.imshow(mosaic, alpha=0.15)
            ax.set_facecolor("#eeeeee")
            ax.text(0.5, 0.5, _wrap(constant[layer]), transform=ax.transAxes, ha="center", va="center",
                    fontsize=7, color="#333333")
            ax.set_title(f"{point}\nno hit (left out)", fontsize=7)
            continue
        ax.imshow(mosaic, alpha=0.35)
        ax.imshow(np.asarray(ex["maps"][q][layer]), cmap="inferno", alpha=0.75, vmin=0, vmax=1)
        ax.add_patch(_rect((q % 2) * s - 0.5, (q // 2) * s - 0.5, s))
        ax.set_title(f"{point}\nhit {_fmt(ex['hits'][q][layer], 2)}", fontsize=7)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    return _png(fig)


def _wrap(text: str, width: int = 14) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join(lines + [line])


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


_MEASURES = [(analysis.OWN_CLASS_ACCURACY, "own_class_accuracy"), (analysis.FALSE_POSITIVES, "false_positive_rate"),
             (analysis.BALANCED_ACCURACY, "balanced_accuracy")]


def _measures_table(first: str, rows: list[tuple[str, list, dict]]) -> str:
    """A table of (label, leading cells, measures) rows: each measure for the sub-architectures
    and the original network side by side, under one header per measure."""
    lead = rows[0][1] if rows else []
    head1 = (f"<tr><th rowspan='2'>{html.escape(first)}</th>"
             + "".join(f"<th rowspan='2'>{html.escape(h)}</th>" for h, _ in lead)
             + "".join(f"<th colspan='2'>{html.escape(n)}</th>" for n, _ in _MEASURES) + "</tr>")
    head2 = "<tr>" + "<th>sub-architecture</th><th>original</th>" * len(_MEASURES) + "</tr>"
    body = ""
    for label, cells, values in rows:
        tds = [f"<td>{html.escape(label)}</td>"] + [f"<td class='num'>{_fmt(v) if h == 'images' else _percent(v)}</td>"
                                                     for h, v in cells]
        for _, key in _MEASURES:
            tds += [f"<td class='num'>{_percent(values.get(key))}</td>",
                    f"<td class='num'>{_percent(values.get('original_' + key))}</td>"]
        body += "<tr>" + "".join(tds) + "</tr>"
    return f"<table>{head1}{head2}{body}</table>"


def _accuracy_section(name: str, res: dict) -> str:
    acc = res["masked_accuracy"]
    overall = {t["task"]: t["overall"] for t in res["stats"]["per_task"]}
    rows = [(t["task"], [("images", t["images"]), (analysis.OPEN_CHANNELS, overall.get(t["task"]))], t)
            for t in acc["tasks"]]
    rows.append(("mean", [("images", None), (analysis.OPEN_CHANNELS, res["stats"]["overall"])], acc["mean"]))
    return (f"<h3>{html.escape(name)}</h3><p>Objective: {html.escape(_objective(res))}</p>"
            + _measures_table("task", rows))


def _objective(res: dict) -> str:
    """The objective that made the results' bank (results from before the selective variant: paper)."""
    return res.get("objective", "paper")


def _summary_section(results_by_network: dict) -> str:
    """One row per network: open channels and the three measures, means over tasks."""
    rows = [(f"{name}: {_objective(res)} objective", [(analysis.OPEN_CHANNELS, res["stats"]["overall"])],
             res["masked_accuracy"]["mean"]) for name, res in results_by_network.items()]
    return _measures_table("network", rows)


def paths_layerwise_figure(results_by_network: dict) -> str:
    """Per-image paths (c): per gate point, the share of images whose path there is most similar
    to their own class's sub-architecture, against relative depth; chance dashed."""
    fig = Figure(figsize=(7.5, 4.0))
    ax = fig.subplots()
    colours = _colours(results_by_network)
    chances = {res["paths"]["layerwise"]["chance"] for res in results_by_network.values()}
    for name, res in results_by_network.items():
        layer = res["paths"]["layerwise"]
        rows = layer["per_gate_point"]
        ax.plot([r["relative_depth"] for r in rows], [r["top1_label"] for r in rows], "o-", color=colours[name],
                label=name)
        if len(chances) > 1:  # networks with different numbers of classes: a chance line each
            ax.axhline(layer["chance"], color=colours[name], ls="--", lw=1, alpha=0.7)
    if len(chances) == 1:
        ax.axhline(chances.pop(), color="black", ls="--", lw=1, label="chance")
    ax.set_title("Per-image paths: top-1 agreement with the label per gate point (dashed: chance)", fontsize=10)
    ax.set_xlabel("relative depth")
    ax.set_ylabel("top-1 agreement with the label")
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return _png(fig)


def _paths_table(name: str, p: dict) -> str:
    """One network's per-image path analyses (a), (b), (d), each against its baseline."""
    a, b, attack, det = p["path_to_class"], p["misclassified"], p["attack"], p["detector"]
    rows = [[f"(a) path to class, {top} agreement with the {what}", a[f"{key}_{what}"], a["chance"][key],
             a["permuted"].get(f"{key}_{what}")]
            for key, top in (("top1", "top-1"), ("topk", f"top-{a['k']}")) for what in ("label", "prediction")]
    rows.append([f"(b) misclassified images ({b['misclassified']}) closer to the predicted class than to their own",
                 b["share_closer_to_prediction"], b["chance"], b["correct_share_closer_to_other"]])
    for key, what in (("all", "all"), ("flipped", "prediction flipped"), ("not_flipped", "prediction kept")):
        d = det.get(key)
        rows.append([f"(d) detector ROC AUC, attacked ({what}, {d['attacked'] if d else 0}) vs clean "
                     f"({d['clean'] if d else 0})", d and d["auc"], 0.5, None])
    note = (f"{attack['method'].upper()} at eps {attack['eps']:.4g} ({html.escape(attack['space'])}): the original "
            f"network's accuracy {_percent(attack['accuracy_clean'])} clean, {_percent(attack['accuracy_attacked'])} "
            f"attacked; {attack['flipped']} of {attack['images']} predictions flipped. Left out (no meaningful "
            f"path): clean {_left_out(p['status']['clean'])}, attacked {_left_out(p['status']['attacked'])}.")
    return (f"<h3>{html.escape(name)}</h3>" + _table(["analysis", "value", "chance", "baseline (above)"], rows)
            + f"<p class='note'>{note}</p>")


def _left_out(status: dict) -> str:
    return ", ".join(f"{n} {k}" for k, n in status.items() if k != "ok" and n) or "none"


def _paths_section(results_by_network: dict) -> str:
    with_paths = {n: r for n, r in results_by_network.items() if r.get("paths")}
    settings = next(iter(with_paths.values()))["paths"]["settings"]
    intro = ("Each validation image's own sub-architecture (its path: NAD with the image as a task of one, "
             f"{settings['steps']} step(s) of {settings['views']} augmented views, gates initialised at std "
             f"{settings['init_std']:g}, target: the original network's prediction, as in CDRP) compared with the "
             "class sub-architectures by the mean IoU over gate points. Baselines: (a) the labels, or predictions, "
             "shuffled among the images; (b) correctly classified images, with a random other class in place of "
             "the prediction. (d) flags paths far from every class (1 - the highest IoU) and separates attacked "
             "images (their paths learnt from PNG files, as the clean ones) from clean ones. Images none of whose "
             "views the network answers as on the image itself have no path and are left out (counted under each "
             "table); an attack that does not survive the augmentation leaves more attacked images out.")
    tables = "".join(_paths_table(name, res["paths"]) for name, res in with_paths.items())
    return (f"<p class='note'>{html.escape(intro)}</p>" + tables
            + "<h3>(c) Class specificity per gate point</h3>" + paths_layerwise_figure(with_paths))


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
             "<nav>" + "".join(f'<a href="#{a}">{t}</a>' for a, t in SECTIONS if a != "paths" or any(
                 res.get("paths") for res in results_by_network.values())) + "</nav>"]
    parts.append('<h2 id="summary">Summary</h2>')
    parts.append(_summary_section(results_by_network))
    parts.append(f"<p class='note'>Means over tasks. {html.escape(MEANINGS)}</p>")
    parts.append('<h2 id="curves">Layer-wise curves</h2>')
    parts.append("<p class='note'>x: gate point position / (number of gate points - 1). Open-channel ratio per "
                 f"gate point; the legend gives each network's {html.escape(analysis.OPEN_CHANNELS)}.</p>")
    parts.append(curves_figure(results_by_network))
    parts.append('<h2 id="hit-rate">Hit rate</h2>')
    parts.append("<p class='note'>Share of the top activations inside the target class's quadrant of a 2x2 "
                 "mosaic (chance 0.25), one panel per network. Dashed grey: random sub-architectures with the "
                 "same per-layer open counts. Grey bars: share of (mosaic, class) pairs whose activation map is "
                 "constant (every channel closed there or upstream); they have no top activations and are left "
                 "out of the mean.</p>")
    parts.append(hit_rate_figure(results_by_network))
    for name, res in results_by_network.items():
        by_note = {}
        for point, note in (res["hit_rate"].get("notes") or {}).items():
            by_note.setdefault(note, []).append(point)
        for note, points in by_note.items():
            parts.append(f"<p class='note'>{html.escape(name)}: {html.escape(', '.join(points))}: "
                         f"{html.escape(note)}.</p>")
    parts.append('<h2 id="similarity">Task similarity</h2>')
    parts += [similarity_figure(name, res) for name, res in results_by_network.items()]
    parts.append('<h2 id="mosaics">Mosaic examples</h2>')
    parts.append("<p class='note'>Each row: a mosaic (target quadrant boxed) and the target class's "
                 "activation map at each spatial gate point, with its hit; a constant map is not drawn, the "
                 "panel says why.</p>")
    for name, res in results_by_network.items():
        parts.append(f"<h3>{html.escape(name)}</h3>")
        examples = res["hit_rate"]["examples"]
        shown = [mosaic_figure(name, res, e) for e, ex in enumerate(examples) if "mosaic" in ex]
        parts += shown or ["<p class='note'>No example arrays in these results.</p>"]
    parts.append('<h2 id="confusion">Confusion versus similarity</h2>')
    parts += [_confusion_section(name, res) for name, res in results_by_network.items()]
    parts.append('<h2 id="accuracy">Masked accuracy</h2>')
    parts.append(f"<p class='note'>{html.escape(MEANINGS)} Predictions are the top-1 over all classes.</p>")
    parts += [_accuracy_section(name, res) for name, res in results_by_network.items()]
    parts.append('<h2 id="beta">Beta and the fidelity check</h2>')
    parts.append("<p class='note'>A calibrated beta's curve from its short runs; the fidelity check runs each "
                 "task's binary sub-architecture on a sample after the last epoch (nad_ext.training.fidelity).</p>")
    parts += [_beta_section(name, res) for name, res in results_by_network.items()]
    if any(res.get("paths") for res in results_by_network.values()):
        parts.append('<h2 id="paths">Per-image paths</h2>')
        parts.append(_paths_section(results_by_network))
    parts.append('<h2 id="metadata">Run metadata</h2>')
    parts.append(_metadata_section(metadata, results_by_network))
    page = ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>NAD report</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
    atomic_write(out_path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    return out_path
