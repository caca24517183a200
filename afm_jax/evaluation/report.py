"""The report of a comparison: tables with confidence intervals, ROC and calibration curves,
confusion matrices, and attention / class-activation overlays, as Markdown + HTML + PNG files.

What: `write_report(out_dir, results, predictions, tasks, ...)` writes

    index.md, index.html          one row per run (task × protocol × fraction × seed × backbone):
                                  AUROC, AUPRC, accuracy, sensitivity/specificity at the
                                  validation-chosen Youden point, sensitivity at 90/95% specificity,
                                  F1, MCC, kappa — each "point [low, high]" (95% bootstrap CI over
                                  patients); then paired comparisons of every backbone with the
                                  reference one on the same test units (AUROC difference with a
                                  paired-bootstrap CI and p-value, and DeLong's p-value)
    roc_<group>.png               one ROC line per backbone (group = task, protocol, fraction, seed)
    calibration_<group>.png       reliability diagram, one line per backbone
    confusion_<group>.png         one 2×2 matrix per backbone at its operating point
    overlays_<task>_<backbone>.png  test images with the last-block attention (ViTs) and the
                                  linear probe's class-activation map (CAM; for a GAP + linear head
                                  this *is* Grad-CAM: the gradient of the logit w.r.t. the last
                                  feature map is the probe weight / (h·w) at every location)

Why files rather than a dashboard: a study runs on a cluster; a folder of PNGs and one HTML page
can be copied, versioned and read anywhere. matplotlib with the Agg backend (no display needed).
"""

from __future__ import annotations

import html
import math
import os
import pathlib
import re
from collections import defaultdict
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from afm_jax.evaluation import metrics as metrics_lib  # noqa: E402
from afm_jax.evaluation import statistics
from afm_jax.evaluation.protocols import unit_level
import cv2

TABLE_METRICS = ("auroc", "auprc", "accuracy", "sensitivity", "specificity", "sensitivity_at_spec_0.90",
                 "sensitivity_at_spec_0.95", "f1", "mcc", "kappa")
SHORT = {"sensitivity_at_spec_0.90": "sens@spec0.90", "sensitivity_at_spec_0.95": "sens@spec0.95"}


def group_key(result: dict) -> tuple:
    return (result["task"], result["protocol"], float(result["fraction"]), int(result["seed"]))


def group_slug(key: tuple) -> str:
    task, protocol, fraction, seed = key
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{task}_{protocol}_f{fraction:g}_s{seed}")


def _fmt(entry: dict | None) -> str:
    if not entry or not math.isfinite(entry.get("point", math.nan)):
        return "–"
    low, high = entry.get("low", math.nan), entry.get("high", math.nan)
    if math.isfinite(low) and math.isfinite(high):
        return f"{entry['point']:.3f} [{low:.3f}, {high:.3f}]"
    return f"{entry['point']:.3f}"


def results_table(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the main table, runs sorted by task, protocol, fraction, seed, backbone order."""
    header = ["task", "protocol", "fraction", "seed", "backbone", "unit", "n (pos)"] + [SHORT.get(m, m) for m in TABLE_METRICS]
    rows = []
    for r in sorted(results, key=lambda r: (*group_key(r), r.get("order", 0))):
        m = r["metrics"]
        n = int(m.get("n", {}).get("point", r.get("num_units", 0)))
        pos = int(round(n * m.get("prevalence", {}).get("point", 0.0)))
        rows.append([r["task"], r["protocol"], f"{float(r['fraction']):g}", str(r["seed"]), r["backbone"], r["unit"],
                     f"{n} ({pos})"] + [_fmt(m.get(k)) for k in TABLE_METRICS])
    return header, rows


def comparisons(results: list[dict], predictions: dict[str, Any], tasks: dict[str, Any], reference: str, *,
                n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """AUROC of each backbone minus the reference's, on the same test units of each group."""

    by_group: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in results:
        by_group[group_key(r)][r["backbone"]] = r
    out = []
    for key, runs in sorted(by_group.items()):
        if reference not in runs:
            continue
        task = tasks[key[0]]
        ref_ids, ref_y, ref_s, ref_groups = unit_level(predictions[runs[reference]["run_id"]][1], task)
        for name, r in runs.items():
            if name == reference:
                continue
            ids, y, s, _ = unit_level(predictions[r["run_id"]][1], task)
            if len(ids) != len(ref_ids) or not np.array_equal(ids, ref_ids) or not np.array_equal(y, ref_y):
                continue  # not the same test units: no paired comparison
            paired = statistics.paired_bootstrap(y, s, ref_s, ref_groups, "auroc", n_boot=n_boot, seed=seed)
            delong = statistics.delong_test(y, s, ref_s)
            out.append({"group": key, "backbone": name, "reference": reference, **paired,
                        "delong_p": float(delong.get("p_value", math.nan))})
    return out


def _comparison_rows(comps: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["task", "protocol", "fraction", "seed", "backbone", "vs", "AUROC diff [95% CI]", "p (paired bootstrap)",
              "p (DeLong)"]
    rows = [[c["group"][0], c["group"][1], f"{c['group'][2]:g}", str(c["group"][3]), c["backbone"], c["reference"],
             f"{c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]", f"{c['p_value']:.3g}", f"{c['delong_p']:.3g}"]
            for c in comps]
    return header, rows


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ─── Figures ─────────────────────────────────────────────────────────────────────────────────────

def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], title: str, path: pathlib.Path) -> None:
    """curves: backbone -> (y_true, y_score, auroc)."""
    fig, ax = plt.subplots(figsize=(4.8, 4.6), dpi=110)
    for name, (y, s, auroc) in curves.items():
        fpr, tpr, _ = metrics_lib.roc_curve_points(y, s)
        ax.plot(fpr, tpr, lw=1.6, label=f"{name} (AUROC {auroc:.3f})")
    ax.set(xlabel="1 − specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01))
    _finish_diagonal_plot(fig, ax, title, path, legend_loc="lower right")


def plot_calibration(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str, path: pathlib.Path) -> None:
    fig, ax = plt.subplots(figsize=(4.8, 4.6), dpi=110)
    for name, (y, s) in curves.items():
        bins = metrics_lib.calibration_bins(y, np.clip(s, 0.0, 1.0), n_bins=10)
        ok = bins["counts"] > 0
        ax.plot(bins["mean_predicted"][ok], bins["observed_fraction"][ok], marker="o", ms=3, lw=1.2,
                label=f"{name} (ECE {bins['ece']:.3f})")
    ax.set(xlabel="mean predicted probability", ylabel="observed fraction positive", xlim=(0, 1), ylim=(0, 1))
    _finish_diagonal_plot(fig, ax, title, path, legend_loc="upper left")


def _finish_diagonal_plot(fig, ax, title: str, path: pathlib.Path, *, legend_loc: str) -> None:
    """The chance/ideal diagonal, title and legend; saves and closes the figure."""
    ax.plot([0, 1], [0, 1], ls="--", c="0.6", lw=0.8)
    ax.set_title(title, fontsize=7)
    ax.legend(loc=legend_loc, fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_confusions(matrices: dict[str, np.ndarray], title: str, path: pathlib.Path) -> None:
    n = len(matrices)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n + 0.4, 2.8), dpi=110, squeeze=False)
    for ax, (name, cm) in zip(axes[0], matrices.items()):
        ax.imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(int(v)), ha="center", va="center", fontsize=10,
                    color="white" if v > cm.max() / 2 else "black")
        ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["neg", "pos"], yticklabels=["neg", "pos"],
               xlabel="predicted", ylabel="true", title=name)
        ax.title.set_fontsize(8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_overlays(images: np.ndarray, maps: dict[str, np.ndarray], captions: list[str], title: str,
                  path: pathlib.Path) -> None:
    """Rows: the image, then each map (resized to the image) over it; columns: the images."""
    n = len(images)
    rows = 1 + len(maps)
    fig, axes = plt.subplots(rows, n, figsize=(1.9 * n, 1.9 * rows + 0.3), dpi=110, squeeze=False)
    for j in range(n):
        img = images[j, ..., 0]
        axes[0, j].imshow(img, cmap="gray", vmin=0, vmax=1)
        axes[0, j].set_title(captions[j], fontsize=7)
        for i, (name, m) in enumerate(maps.items(), start=1):
            up = _resize_map(m[j], img.shape)
            axes[i, j].imshow(img, cmap="gray", vmin=0, vmax=1)
            axes[i, j].imshow(up, cmap="jet", alpha=0.45, vmin=0, vmax=1)
            if j == 0:
                axes[i, j].set_ylabel(name, fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _resize_map(m: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    m = np.asarray(m, np.float32)
    return cv2.resize(m, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC).clip(0, 1)


def cam_maps(spatial: np.ndarray, weights: np.ndarray, mean: np.ndarray | float = 0.0) -> np.ndarray:
    """Class-activation maps ReLU(Σ_k w_k (A_k − μ_k)) of (B, h, w, D) features, each scaled to [0, 1].

    With `mean` the probe's training-feature mean and `weights` its coef / scale, the mean over
    locations of the un-rectified map plus the probe's intercept is the probe's logit for an
    average-pooled backbone: each location's share of the evidence. Without centring, the constant
    w · μ dominates and the map shows feature magnitude, not evidence.
    """
    centred = np.asarray(spatial, np.float64) - np.asarray(mean, np.float64)
    cam = np.maximum(np.einsum("bhwd,d->bhw", centred, np.asarray(weights, np.float64)), 0.0)
    peak = cam.reshape(len(cam), -1).max(axis=1)[:, None, None]
    return (cam / np.maximum(peak, 1e-12)).astype(np.float32)


# ─── The report ──────────────────────────────────────────────────────────────────────────────────

def write_report(out_dir: str | os.PathLike, results: list[dict], predictions: dict[str, Any],
                 tasks: dict[str, Any], *, reference: str | None = None, overlays: dict[str, dict] | None = None,
                 title: str = "Backbone comparison", n_boot: int = 1000, seed: int = 0) -> pathlib.Path:
    """Writes the report folder (see the module docstring); returns the path of index.html.

    results: one dict per run (run_id, task, backbone, protocol, fraction, seed, unit, metrics, order,
    threshold); predictions: run_id -> (validation Prediction, test Prediction); overlays:
    (task, backbone) keyed dicts {"images", "captions", "maps": {name: (B, h, w)}}.
    """

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not results:
        raise ValueError("No results to report: run the study first.")
    order = sorted({(r.get("order", 0), r["backbone"]) for r in results})
    reference = reference or order[0][1]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in results:
        groups[group_key(r)].append(r)

    figures: list[tuple[str, str]] = []
    for key, runs in sorted(groups.items()):
        runs = sorted(runs, key=lambda r: r.get("order", 0))
        slug, label = group_slug(key), f"{key[0]} · {key[1]} · {key[2]:.0%} of training patients · seed {key[3]}"
        curves, calib, confusions = {}, {}, {}
        for r in runs:
            _, y, s, _ = unit_level(predictions[r["run_id"]][1], tasks[r["task"]])
            curves[r["backbone"]] = (y, s, r["metrics"]["auroc"]["point"])
            calib[r["backbone"]] = (y, s)
            threshold = r["metrics"]["threshold"]["point"]
            confusions[r["backbone"]] = metrics_lib.confusion(y, (s >= threshold).astype(int), labels=[0, 1])
        unit = runs[0]["unit"]
        for kind, fn, args in (("roc", plot_roc, curves), ("calibration", plot_calibration, calib),
                               ("confusion", plot_confusions, confusions)):
            name = f"{kind}_{slug}.png"
            fn(args, f"{label} ({unit} level)", out / name)
            figures.append((f"{kind}: {label}", name))
    for (task, backbone), ov in sorted((overlays or {}).items()):
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"overlays_{task}_{backbone}.png")
        plot_overlays(ov["images"], ov["maps"], ov["captions"], f"{backbone} on {task} test images", out / name)
        figures.append((f"overlays: {backbone} on {task}", name))

    header, rows = results_table(results)
    comps = comparisons(results, predictions, tasks, reference, n_boot=n_boot, seed=seed)
    c_header, c_rows = _comparison_rows(comps)
    note = ("Metrics on the test split at the task's unit (image probabilities averaged per unit); "
            "95% CIs by bootstrap over patients; the operating point (Youden) is chosen on validation.")
    md = [f"# {title}", "", note, "", _markdown_table(header, rows), "",
          f"## Paired comparisons with `{reference}`", "",
          _markdown_table(c_header, c_rows) if c_rows else "(no pairs on identical test units)", "",
          "## Figures", ""] + [f"### {cap}\n\n![{cap}]({name})\n" for cap, name in figures]
    (out / "index.md").write_text("\n".join(md))
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:3px 6px}th{background:#eee}img{max-width:900px;margin:6px 0}")
    page = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1><p>{html.escape(note)}</p>",
            _html_table(header, rows), f"<h2>Paired comparisons with {html.escape(reference)}</h2>",
            _html_table(c_header, c_rows) if c_rows else "<p>(no pairs on identical test units)</p>", "<h2>Figures</h2>"]
    page += [f"<h3>{html.escape(cap)}</h3><img src='{html.escape(name)}' alt='{html.escape(cap)}'>" for cap, name in figures]
    page.append("</body></html>")
    index = out / "index.html"
    index.write_text("\n".join(page))
    return index
