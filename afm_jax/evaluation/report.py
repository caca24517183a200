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
    overlays_<task>_<backbone>.png  test images with the last-block attention of the pooled token (ViTs) and the
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
import cv2
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from afm_jax.evaluation import metrics as metrics_lib  # noqa: E402
from afm_jax.evaluation import statistics
from afm_jax.evaluation.protocols import PRIMARY_METRIC, primary_metric_fn, unit_level

TABLE_METRICS = (
    "auroc",
    "auprc",
    "accuracy",
    "sensitivity",
    "specificity",
    "sensitivity_at_spec_0.90",
    "sensitivity_at_spec_0.95",
    "f1",
    "mcc",
    "kappa",
)
KIND_METRICS = {
    "binary": TABLE_METRICS,
    "multiclass": ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc", "kappa"),
    "ordinal": ("qwk", "mae_grades", "within_1", "accuracy", "balanced_accuracy", "macro_f1", "macro_auroc"),
    "regression": ("mae", "rmse", "r2", "pearson", "bias", "loa_low", "loa_high"),
}
LOWER_IS_BETTER = ("mae", "rmse", "mae_grades")
SHORT = {"sensitivity_at_spec_0.90": "sens@spec0.90", "sensitivity_at_spec_0.95": "sens@spec0.95"}
# Warnings of the summary page (issue 19): too few test units to conclude anything.
MIN_TEST_PATIENTS, MIN_TEST_NEGATIVES = 50, 20


def kind_of(result: dict) -> str:
    return result.get("kind", "binary")


def group_key(result: dict) -> tuple:
    return (result["task"], result["protocol"], float(result["fraction"]), int(result["seed"]))


def group_slug(key: tuple) -> str:
    task, protocol, fraction, seed = key
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{task}_{protocol}_f{fraction:g}_s{seed}")


RUN_HEADER = ["task", "protocol", "fraction", "seed", "backbone"]  # the columns naming a run in each table


def _run_cells(r: dict) -> list[str]:
    """The cells naming a run in every results table (RUN_HEADER)."""
    return [r["task"], r["protocol"], f"{float(r['fraction']):g}", str(r["seed"]), r["backbone"]]


def _fmt(entry: dict | None) -> str:
    if not entry or not math.isfinite(entry.get("point", math.nan)):
        return "–"
    low, high = entry.get("low", math.nan), entry.get("high", math.nan)
    if math.isfinite(low) and math.isfinite(high):
        return f"{entry['point']:.3f} [{low:.3f}, {high:.3f}]"
    return f"{entry['point']:.3f}"


def results_table(results: list[dict], kind: str = "binary") -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the main table of one task kind, runs sorted by task, protocol, fraction, seed,
    backbone order."""
    columns = KIND_METRICS[kind]
    count = "n (pos)" if kind == "binary" else "n"
    header = RUN_HEADER + ["unit", count] + [SHORT.get(m, m) for m in columns]
    rows = []
    for r in sorted((r for r in results if kind_of(r) == kind), key=lambda r: (*group_key(r), r.get("order", 0))):
        m = r["metrics"]
        n = int(m.get("n", {}).get("point", r.get("num_units", 0)))
        pos = int(round(n * m.get("prevalence", {}).get("point", 0.0)))
        rows.append(
            _run_cells(r)
            + [r["unit"], f"{n} ({pos})" if kind == "binary" else str(n)]
            + [_fmt(m.get(k)) for k in columns]
        )
    return header, rows


def comparisons(
    results: list[dict],
    predictions: dict[str, Any],
    tasks: dict[str, Any],
    reference: str,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> list[dict]:
    """The primary metric (AUROC; macro AUROC, QWK, MAE for other kinds) of each backbone minus the
    reference's, on the same test units of each group, with a paired patient bootstrap."""

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
            if task.kind == "binary":
                paired = statistics.paired_bootstrap(
                    y, s, ref_s, ref_groups, "auroc", n_boot=n_boot, seed=seed, return_replicates=True
                )
                delong_p = float(statistics.delong_test(y, s, ref_s).get("p_value", math.nan))
            else:
                paired = statistics.paired_bootstrap(
                    y, s, ref_s, ref_groups, primary_metric_fn(task), n_boot=n_boot, seed=seed, return_replicates=True
                )
                delong_p = math.nan
            out.append(
                {
                    "group": key,
                    "backbone": name,
                    "reference": reference,
                    **paired,
                    "metric": PRIMARY_METRIC[task.kind],
                    "delong_p": delong_p,
                }
            )
    return out


def _comparison_rows(comps: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = RUN_HEADER + [
        "vs",
        "metric",
        "diff [95% CI]",
        "p (paired bootstrap)",
        "p (DeLong)",
    ]
    rows = [
        [
            c["group"][0],
            c["group"][1],
            f"{c['group'][2]:g}",
            str(c["group"][3]),
            c["backbone"],
            c["reference"],
            c.get("metric", "auroc"),
            f"{c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]",
            f"{c['p_value']:.3g}",
            "–" if not math.isfinite(c["delong_p"]) else f"{c['delong_p']:.3g}",
        ]
        for c in comps
    ]
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
        (line,) = ax.plot(
            bins["mean_predicted"][ok],
            bins["observed_fraction"][ok],
            marker="o",
            ms=3,
            lw=1.2,
            label=f"{name} (ECE {bins['ece']:.3f})",
            clip_on=False,
        )
        for x, y_, c in zip(bins["mean_predicted"][ok], bins["observed_fraction"][ok], bins["counts"][ok]):
            ax.annotate(
                str(int(c)), (x, y_), textcoords="offset points", xytext=(2, 3), fontsize=5, color=line.get_color()
            )
    ax.set(
        xlabel="mean predicted probability (numbers: units per bin)",
        ylabel="observed fraction positive",
        xlim=(0, 1),
        ylim=(-0.03, 1.05),
    )
    _finish_diagonal_plot(fig, ax, title, path, legend_loc="upper left")


def _finish_diagonal_plot(fig, ax, title: str, path: pathlib.Path, *, legend_loc: str) -> None:
    """The chance/ideal diagonal, title and legend; saves and closes the figure."""
    ax.plot([0, 1], [0, 1], ls="--", c="0.6", lw=0.8)
    ax.set_title(title, fontsize=7)
    ax.legend(loc=legend_loc, fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_confusions(
    matrices: dict[str, np.ndarray],
    title: str,
    path: pathlib.Path,
    class_names: tuple[str, ...] | list[str] = ("negative", "positive"),
) -> None:
    """One confusion matrix per backbone (rows truth, columns prediction), axes named by class."""
    n = len(matrices)
    k = len(class_names)
    side = 2.6 + 0.35 * max(0, k - 2)
    fig, axes = plt.subplots(1, n, figsize=(side * n + 0.4, side + 0.4), dpi=110, squeeze=False)
    for ax, (name, cm) in zip(axes[0], matrices.items()):
        ax.imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            ax.text(
                j, i, str(int(v)), ha="center", va="center", fontsize=10, color="white" if v > cm.max() / 2 else "black"
            )
        ax.set(xticks=range(k), yticks=range(k), xlabel="predicted", ylabel="true", title=name)
        ax.set_xticklabels(class_names, fontsize=6, rotation=30)
        ax.set_yticklabels(class_names, fontsize=6)
        ax.title.set_fontsize(8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_bland_altman(
    curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str, path: pathlib.Path, unit: str = ""
) -> None:
    """Bland–Altman plot per backbone: difference (prediction − truth) against the mean of both, with the
    mean difference and the 95% limits of agreement (± 1.96 SD)."""
    n = len(curves)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.2), dpi=110, squeeze=False)
    for ax, (name, (y, p)) in zip(axes[0], curves.items()):
        m = metrics_lib.regression_metrics(y, p)
        ax.scatter((y + p) / 2, p - y, s=6, alpha=0.6)
        for v, ls in ((m["bias"], "-"), (m["loa_low"], "--"), (m["loa_high"], "--")):
            ax.axhline(v, ls=ls, c="0.3", lw=0.8)
        ax.set_title(f"{name}: MAE {m['mae']:.3g} {unit}".strip(), fontsize=7)
        ax.set_xlabel(f"mean of prediction and truth {f'({unit})' if unit else ''}", fontsize=7)
        ax.set_ylabel("prediction − truth", fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_forest(rows: list[tuple[str, float, float, float]], title: str, path: pathlib.Path) -> None:
    """Forest plot: one line per (label, point, low, high)."""
    fig, ax = plt.subplots(figsize=(6.5, 0.28 * len(rows) + 1.0), dpi=110)
    for i, (label, point, low, high) in enumerate(rows):
        ax.errorbar(
            [point], [i], xerr=[[max(point - low, 0)], [max(high - point, 0)]], fmt="o", ms=3, capsize=2, c="C0"
        )
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r[0] for r in rows], fontsize=6)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=8)
    ax.grid(axis="x", lw=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_low_shot(
    curves: dict[str, list[tuple[float, float, float, float]]], title: str, ylabel: str, path: pathlib.Path
) -> None:
    """Metric vs number of labelled training patients: mean over seeds (line) and range (band)."""
    fig, ax = plt.subplots(figsize=(4.8, 3.6), dpi=110)
    for name, pts in curves.items():
        pts = sorted(pts)
        x = [p[0] for p in pts]
        ax.plot(x, [p[1] for p in pts], marker="o", ms=3, label=name)
        ax.fill_between(x, [p[2] for p in pts], [p[3] for p in pts], alpha=0.2)
    ax.set_xscale("log")
    ax.set(xlabel="labelled training patients", ylabel=ylabel)
    ax.set_title(title, fontsize=7)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_overlays(
    images: np.ndarray, maps: dict[str, np.ndarray], captions: list[str], title: str, path: pathlib.Path
) -> None:
    """Rows: the image, then each map (resized to the image) over it; columns: the images."""
    n = len(images)  # a list of (H, W, 1) images, each at its own (stored) resolution, or one array
    rows = 1 + len(maps)
    fig, axes = plt.subplots(rows, n, figsize=(1.9 * n, 1.9 * rows + 0.3), dpi=110, squeeze=False)
    for j in range(n):
        img = np.asarray(images[j], np.float32)[..., 0]
        axes[0, j].imshow(img, cmap="gray", vmin=0, vmax=1)
        axes[0, j].set_title(captions[j], fontsize=5)
        for i, (name, m) in enumerate(maps.items(), start=1):
            up = _resize_map(m[j], img.shape)
            axes[i, j].imshow(img, cmap="gray", vmin=0, vmax=1)
            axes[i, j].imshow(up, cmap="jet", alpha=0.45, vmin=0, vmax=1)
            if j == 0:
                axes[i, j].set_ylabel(name, fontsize=6)
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


def operating_point_rows(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The fixed-threshold table (MURA: study-level kappa at 0.5 per body part and overall, and at the
    validation threshold, labelled as such)."""
    header = RUN_HEADER + [
        "threshold",
        "group",
        "n",
        "kappa",
        "sensitivity",
        "specificity",
        "accuracy",
    ]
    rows = []
    for r in sorted(results, key=lambda r: (*group_key(r), r.get("order", 0))):
        for op in r.get("operating_points", []):
            t = op["threshold"]
            label = op["label"] + ("" if t is None or op["label"].startswith("fixed") else f" ({t:.3g})")
            groups = [("all", {"n": op["n"], **op["overall"]})] + sorted(op["by_group"].items())
            for name, m in groups:
                rows.append(
                    _run_cells(r)
                    + [label, name, str(m["n"])]
                    + [_fmt(m.get(k)) for k in ("kappa", "sensitivity", "specificity", "accuracy")]
                )
    return header, rows


def _primary(r: dict) -> tuple[str, dict]:
    key = r.get("primary_metric") or PRIMARY_METRIC[kind_of(r)]
    return key, r["metrics"].get(key, {})


def forest_rows(results: list[dict]) -> list[tuple[str, float, float, float]]:
    """(label, point, low, high) of each run's primary metric, ordered by task, protocol, fraction, seed, backbone."""
    rows = []
    for r in sorted(results, key=lambda r: (*group_key(r), r.get("order", 0))):
        key, m = _primary(r)
        rows.append(
            (
                f"{r['task']} · {r['protocol']} · {float(r['fraction']):g} · s{r['seed']} · {r['backbone']} ({key})",
                m.get("point", math.nan),
                m.get("low", math.nan),
                m.get("high", math.nan),
            )
        )
    return rows


def low_shot_curves(results: list[dict]) -> dict[tuple[str, str], dict[str, list[tuple[float, float, float, float]]]]:
    """{(task, protocol): {backbone: [(labelled patients, mean, min, max over seeds)]}} where a task has
    more than one fraction."""
    by: dict[tuple, dict] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in results:
        patients = r.get("info", {}).get("num_train_patients")
        if patients is None:
            continue
        by[(r["task"], r["protocol"])][r["backbone"]][float(r["fraction"])].append(
            (float(patients), _primary(r)[1].get("point", math.nan))
        )
    out = {}
    for key, backbones in by.items():
        if max(len(f) for f in backbones.values()) < 2:
            continue
        out[key] = {
            b: [
                (
                    float(np.mean([p for p, _ in v])),
                    float(np.mean([m for _, m in v])),
                    float(np.min([m for _, m in v])),
                    float(np.max([m for _, m in v])),
                )
                for v in fr.values()
            ]
            for b, fr in backbones.items()
        }
    return out


def pooled_comparisons(comps: list[dict]) -> list[dict]:
    """Paired differences pooled over seeds per (task, protocol, fraction, backbone): mean difference
    and an interval over seeds × bootstrap (`statistics.pooled_difference`)."""
    by: dict[tuple, list[dict]] = defaultdict(list)
    for c in comps:
        by[
            (c["group"][0], c["group"][1], c["group"][2], c["backbone"], c["reference"], c.get("metric", "auroc"))
        ].append(c)
    out = []
    for key, cs in sorted(by.items()):
        pooled = statistics.pooled_difference(
            [c["diff"] for c in cs], [c["replicates"] for c in cs if "replicates" in c]
        )
        out.append(
            {
                "task": key[0],
                "protocol": key[1],
                "fraction": key[2],
                "backbone": key[3],
                "reference": key[4],
                "metric": key[5],
                **pooled,
            }
        )
    return out


def report_warnings(results: list[dict], predictions: dict[str, Any], tasks: dict[str, Any]) -> list[str]:
    """Plain warnings: test sets too small to conclude anything, thresholds that collapse."""
    out, seen = [], set()
    for r in sorted(results, key=lambda r: (*group_key(r), r.get("order", 0))):
        task = tasks[r["task"]]
        test = predictions[r["run_id"]][1]
        patients = len(np.unique(test.patient_id))
        if r["task"] not in seen:
            seen.add(r["task"])
            if patients < MIN_TEST_PATIENTS:
                out.append(
                    f"Task {r['task']}: only {patients} test patients (< {MIN_TEST_PATIENTS}); intervals are "
                    "wide and small differences cannot be concluded."
                )
            if kind_of(r) == "binary":
                _, y, _, _ = unit_level(test, task)
                negatives = int(np.sum(y == 0))
                if negatives < MIN_TEST_NEGATIVES:
                    out.append(
                        f"Task {r['task']}: only {negatives} negative test {r['unit']}s (< {MIN_TEST_NEGATIVES});"
                        " specificity moves in steps of 1/{0} and sensitivity at 90% and 95% specificity may "
                        "coincide.".format(max(negatives, 1))
                    )
        if kind_of(r) == "binary":
            m = r["metrics"]
            sens, spec = m.get("sensitivity", {}).get("point"), m.get("specificity", {}).get("point")
            if sens is not None and spec is not None and (sens in (0.0, 1.0) and spec in (0.0, 1.0)):
                out.append(
                    f"{r['run_id']}: the validation-chosen threshold {m['threshold']['point']:.3g} calls every "
                    f"test {r['unit']} one class (sensitivity {sens:.2f}, specificity {spec:.2f})."
                )
    return out


def write_predictions_csv(
    path: pathlib.Path, results: list[dict], predictions: dict[str, Any], tasks: dict[str, Any]
) -> None:
    """One row per run × test unit: the run, the unit's hashed id, its cluster (hashed patient id), the
    truth and the score(s). Only hashed ids from the records are written."""
    lines = ["run_id,task,backbone,protocol,fraction,seed,unit,unit_id,cluster_id,y_true,score"]
    for r in sorted(results, key=lambda r: (*group_key(r), r.get("order", 0))):
        ids, y, s, groups = unit_level(predictions[r["run_id"]][1], tasks[r["task"]])
        for i, yt, sc, g in zip(ids.tolist(), np.asarray(y).tolist(), np.asarray(s), groups.tolist()):
            score = ";".join(f"{v:.6g}" for v in np.atleast_1d(sc))
            lines.append(
                f"{r['run_id']},{r['task']},{r['backbone']},{r['protocol']},{float(r['fraction']):g},"
                f"{r['seed']},{r['unit']},{i},{g},{yt},{score}"
            )
    path.write_text("\n".join(lines) + "\n")


def write_report(
    out_dir: str | os.PathLike,
    results: list[dict],
    predictions: dict[str, Any],
    tasks: dict[str, Any],
    *,
    reference: str | None = None,
    overlays: dict[str, dict] | None = None,
    title: str = "Backbone comparison",
    n_boot: int = 1000,
    seed: int = 0,
) -> pathlib.Path:
    """Writes the report folder (see the module docstring); returns the path of index.html.

    results: one dict per run (run_id, task, backbone, protocol, fraction, seed, unit, metrics, order,
    threshold, kind); predictions: run_id -> (validation Prediction, test Prediction); overlays:
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

    summary: list[tuple[str, str]] = []
    plot_forest(
        forest_rows(results), "primary metric per run with 95% CI (AUROC / macro AUROC / QWK / MAE)", out / "forest.png"
    )
    summary.append(("forest plot: primary metric ± 95% CI per backbone × protocol × task", "forest.png"))
    for (task, protocol), curves in sorted(low_shot_curves(results).items()):
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"lowshot_{task}_{protocol}.png")
        metric = PRIMARY_METRIC[tasks[task].kind]
        plot_low_shot(
            curves, f"{task} · {protocol}: {metric} vs labelled patients (mean, range over seeds)", metric, out / name
        )
        summary.append((f"low-shot: {task} · {protocol}", name))

    figures: list[tuple[str, str]] = []
    for key, runs in sorted(groups.items()):
        runs = sorted(runs, key=lambda r: r.get("order", 0))
        slug, label = group_slug(key), f"{key[0]} · {key[1]} · {key[2]:.0%} of training patients · seed {key[3]}"
        task = tasks[key[0]]
        unit = runs[0]["unit"]
        plots = []
        if task.kind == "binary":
            curves, calib, confusions = {}, {}, {}
            for r in runs:
                _, y, s, _ = unit_level(predictions[r["run_id"]][1], task)
                curves[r["backbone"]] = (y, s, r["metrics"]["auroc"]["point"])
                calib[r["backbone"]] = (y, s)
                threshold = r["metrics"]["threshold"]["point"]
                confusions[f"{r['backbone']} (P ≥ {threshold:.3g}, from {r.get('threshold_from', 'validation')})"] = (
                    metrics_lib.confusion(y, (s >= threshold).astype(int), labels=[0, 1])
                )
            names = tuple(task.names)
            plots = [
                ("roc", lambda p, c=curves: plot_roc(c, f"{label} ({unit} level)", p)),
                ("calibration", lambda p, c=calib: plot_calibration(c, f"{label} ({unit} level)", p)),
                ("confusion", lambda p, c=confusions: plot_confusions(c, f"{label} ({unit} level)", p, names)),
            ]
        elif task.kind in ("multiclass", "ordinal"):
            confusions = {}
            for r in runs:
                _, y, s, _ = unit_level(predictions[r["run_id"]][1], task)
                confusions[f"{r['backbone']} (argmax)"] = metrics_lib.confusion(
                    y, np.argmax(s, axis=1), labels=range(task.num_classes)
                )
            plots = [
                (
                    "confusion",
                    lambda p, c=confusions: plot_confusions(c, f"{label} ({unit} level)", p, tuple(task.names)),
                )
            ]
        else:
            pairs = {}
            for r in runs:
                _, y, s, _ = unit_level(predictions[r["run_id"]][1], task)
                pairs[r["backbone"]] = (y, s)
            plots = [
                (
                    "bland_altman",
                    lambda p, c=pairs: plot_bland_altman(c, f"{label} ({unit} level)", p, task.target_unit),
                )
            ]
        for kind, fn in plots:
            name = f"{kind}_{slug}.png"
            fn(out / name)
            figures.append((f"{kind}: {label}", name))
    for (task, backbone), ov in sorted((overlays or {}).items()):
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"overlays_{task}_{backbone}.png")
        plot_overlays(ov["images"], ov["maps"], ov["captions"], f"{backbone} on {task} test images", out / name)
        figures.append((f"overlays: {backbone} on {task}", name))

    kinds = [k for k in KIND_METRICS if any(kind_of(r) == k for r in results)]
    tables = [(k, *results_table(results, k)) for k in kinds]
    comps = comparisons(results, predictions, tasks, reference, n_boot=n_boot, seed=seed)
    c_header, c_rows = _comparison_rows(comps)
    pooled = pooled_comparisons(comps)
    p_header = [
        "task",
        "protocol",
        "fraction",
        "backbone",
        "vs",
        "metric",
        "seeds",
        "mean diff [95% CI, seeds × bootstrap]",
        "p",
    ]
    p_rows = [
        [
            c["task"],
            c["protocol"],
            f"{c['fraction']:g}",
            c["backbone"],
            c["reference"],
            c["metric"],
            str(c["num_seeds"]),
            f"{c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]",
            f"{c['p_value']:.3g}",
        ]
        for c in pooled
    ]
    warnings = report_warnings(results, predictions, tasks)
    write_predictions_csv(out / "predictions.csv", results, predictions, tasks)
    note = (
        "Metrics on the test split at the task's unit (image probabilities averaged per unit); "
        "95% CIs by bootstrap over patients; the operating point (Youden) is chosen on validation. "
        "Per-unit test predictions (hashed ids only): predictions.csv."
    )
    md = [f"# {title}", "", "## Summary", "", note, ""]
    md += ["### Warnings", ""] + ([f"- {w}" for w in warnings] or ["(none)"]) + [""]
    md += [
        f"### Paired differences with `{reference}`, pooled over seeds",
        "",
        _markdown_table(p_header, p_rows) if p_rows else "(no pairs on identical test units)",
        "",
    ]
    md += [f"![{cap}]({name})\n" for cap, name in summary]
    for k, header, rows in tables:
        md += [f"## Results: {k} tasks", "", _markdown_table(header, rows), ""]
    o_header, o_rows = operating_point_rows(results)
    if o_rows:
        md += [
            "## Operating points (unit called positive when P >= threshold)",
            "",
            _markdown_table(o_header, o_rows),
            "",
        ]
    md += [
        f"## Paired comparisons with `{reference}` (per seed)",
        "",
        _markdown_table(c_header, c_rows) if c_rows else "(no pairs on identical test units)",
        "",
        "## Figures",
        "",
    ] + [f"### {cap}\n\n![{cap}]({name})\n" for cap, name in figures]
    (out / "index.md").write_text("\n".join(md))
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:3px 6px}th{background:#eee}img{max-width:900px;margin:6px 0}"
        ".warn{color:#a40}"
    )
    page = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1><h2>Summary</h2>"
        f"<p>{html.escape(note)}</p><h3>Warnings</h3>",
        "<ul>" + "".join(f"<li class='warn'>{html.escape(w)}</li>" for w in warnings) + "</ul>"
        if warnings
        else "<p>(none)</p>",
        f"<h3>Paired differences with {html.escape(reference)}, pooled over seeds</h3>",
        _html_table(p_header, p_rows) if p_rows else "<p>(no pairs on identical test units)</p>",
    ]
    page += [f"<img src='{html.escape(name)}' alt='{html.escape(cap)}'>" for cap, name in summary]
    for k, header, rows in tables:
        page += [f"<h2>Results: {html.escape(k)} tasks</h2>", _html_table(header, rows)]
    if o_rows:
        page += [
            "<h2>Operating points (unit called positive when P &gt;= threshold)</h2>",
            _html_table(o_header, o_rows),
        ]
    page += [
        f"<h2>Paired comparisons with {html.escape(reference)} (per seed)</h2>",
        _html_table(c_header, c_rows) if c_rows else "<p>(no pairs on identical test units)</p>",
        "<h2>Figures</h2>",
    ]
    page += [
        f"<h3>{html.escape(cap)}</h3><img src='{html.escape(name)}' alt='{html.escape(cap)}'>" for cap, name in figures
    ]
    page.append("</body></html>")
    index = out / "index.html"
    index.write_text("\n".join(page))
    return index
