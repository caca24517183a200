"""The curation report: contact sheets (PNG thumbnail grids) and a short Markdown summary.

So a user can *see* what was removed and why: one sheet per removal reason (duplicates shown as
kept | removed pairs), one per top-level cluster (selected images framed green), and a sample of the
selection. Captions carry only signal values and reasons — never identifiers. Thumbnails are read
back from the records for the few images shown, so the scan holds no pixels.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import cv2
import ml_collections
import numpy as np
from tqdm import tqdm

from afm_jax import io
from afm_jax.data import records, transforms
from afm_jax.data.curation import quality
from afm_jax.data.curation.config import DUPLICATE_REASONS, METADATA_PREFIX

if TYPE_CHECKING:
    from afm_jax.data.curation.curate import Curation

SHEETS_DIR = "contact_sheets"
MARKDOWN_FILE = "report.md"
GREEN, GREY, RED, WHITE = (60, 200, 60), (110, 110, 110), (60, 60, 220), (235, 235, 235)
# the signal a reason is about (shown under each thumbnail of its sheet)
REASON_SIGNAL = {
    "blank": "std",
    "underexposed": "p05",
    "overexposed": "p95",
    "saturated": "bright_fraction",
    "low_contrast": "dynamic_range",
    "metal": "metal_fraction",
    "text": "text_fraction",
    "tiny_fov": "field_mm",
}
_SHORT = {
    "bright_fraction": "white",
    "dynamic_range": "range",
    "metal_fraction": "metal",
    "text_fraction": "text",
    "field_mm": "fov mm",
}
_CAPTION_H = 14


def contact_sheet(
    thumbs: Sequence[np.ndarray],
    captions: Sequence[str],
    frames: Sequence[tuple | None],
    *,
    title: str,
    columns: int = 6,
) -> np.ndarray:
    """A BGR uint8 grid of square uint8 thumbnails, each with a caption strip and optional colour frame."""
    side = thumbs[0].shape[0] if thumbs else 64
    cell_h = side + _CAPTION_H
    rows = max(1, -(-len(thumbs) // columns))
    sheet = np.full((24 + rows * (cell_h + 4), columns * (side + 4), 3), 32, np.uint8)
    cv2.putText(sheet, title[:120], (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, WHITE, 1, cv2.LINE_AA)
    for k, (thumb, caption, frame) in enumerate(zip(thumbs, captions, frames)):
        r, c = divmod(k, columns)
        y, x = 24 + r * (cell_h + 4), c * (side + 4) + 2
        sheet[y : y + side, x : x + side] = thumb[..., None]
        if frame is not None:
            cv2.rectangle(sheet, (x, y), (x + side - 1, y + side - 1), frame, 2)
        cv2.putText(sheet, caption[:22], (x + 1, y + side + 11), cv2.FONT_HERSHEY_SIMPLEX, 0.33, WHITE, 1, cv2.LINE_AA)
    return sheet


class _Thumbnails:
    """Reads, decodes and shrinks the records shown on sheets (one reader per split)."""

    def __init__(self, dataset_dir: pathlib.Path, size: int) -> None:
        self.dataset_dir, self.size = dataset_dir, size
        self.sources: dict[str, records.RecordSource] = {}

    def __call__(self, split: str, index: int) -> np.ndarray:
        if split not in self.sources:
            self.sources[split] = records.open_split(self.dataset_dir, split)
        pixels = transforms.decode_png(self.sources[split][int(index)]["image"])[..., 0]
        small = quality.working_copy(pixels, self.size)
        canvas = np.zeros((self.size, self.size), np.uint8)  # letterboxed, true intensities (no re-windowing)
        h, w = small.shape
        top, left = (self.size - h) // 2, (self.size - w) // 2
        canvas[top : top + h, left : left + w] = np.round(np.clip(small, 0, 1) * 255).astype(np.uint8)
        return canvas


def _caption(result: "Curation", i: int, reason: str) -> str:
    if reason in REASON_SIGNAL:
        key = REASON_SIGNAL[reason]
        return f"{_SHORT.get(key, key)} {result.scan.signals[key][i]:.3g}"
    if reason.startswith(METADATA_PREFIX):
        field = reason[len(METADATA_PREFIX) :]
        return f"{field}={result.scan.metadata[i].get(field, '')}"
    return reason


def _sheet_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name) + ".png"


def write_report(
    result: "Curation", cfg: ml_collections.ConfigDict, dataset_dir: pathlib.Path, *, progress: bool = True
) -> None:
    """Writes the contact sheets and report.md into result.out_dir (the JSON summary is written by run)."""
    rc = cfg.report
    sheets_dir = result.out_dir / SHEETS_DIR
    sheets_dir.mkdir(exist_ok=True)
    thumbs = _Thumbnails(dataset_dir, int(rc.thumb_size))
    scan, limit = result.scan, int(rc.sheet_images)
    rng = np.random.default_rng(0)
    id_row = {image_id: i for i, image_id in enumerate(scan.image_id)}
    jobs: list[tuple[str, str, list[int], list[str], list[tuple | None]]] = []

    primary = np.asarray(result.primary)
    for reason in sorted({p for p in result.primary if p}):
        rows = np.flatnonzero(primary == reason)
        if reason in DUPLICATE_REASONS:  # pairs: kept | removed
            pairs = rows[: max(1, limit // 2)]
            shown = [j for i in pairs for j in (id_row[result.duplicate_of[i]], int(i))]
            captions = [
                c for i in pairs for c in ("kept", "removed" + (" x-patient" if result.cross_patient[i] else ""))
            ]
            frames = [f for _ in pairs for f in (GREEN, RED)]
        else:
            shown = rows[:limit].tolist()
            captions, frames = [_caption(result, i, reason) for i in shown], [RED] * len(shown)
        jobs.append((f"removed_{reason}", f"removed: {reason} ({len(rows)} images)", shown, captions, frames))

    top = result.clusters[-1]
    sizes = np.bincount(top[top >= 0]) if (top >= 0).any() else np.zeros(0, np.int64)
    for k in np.argsort(-sizes, kind="stable")[: int(rc.max_cluster_sheets)]:
        members = np.flatnonzero(top == k)
        shown = rng.permutation(members)[:limit].tolist()
        jobs.append(
            (
                f"cluster_{k:03d}",
                f"top-level cluster {k}: {len(members)} kept by filters, "
                f"{int(result.selected[members].sum())} selected (green)",
                shown,
                ["selected" if result.selected[i] else "" for i in shown],
                [GREEN if result.selected[i] else GREY for i in shown],
            )
        )
    chosen = np.flatnonzero(result.selected)
    if len(chosen):
        shown = rng.permutation(chosen)[:limit].tolist()
        jobs.append(
            (
                "selected_sample",
                f"random sample of the selection ({len(chosen)} images)",
                shown,
                [""] * len(shown),
                [GREEN] * len(shown),
            )
        )

    written = []
    for name, title, shown, captions, frames in tqdm(jobs, desc="contact sheets", disable=not progress, leave=False):
        images = [thumbs(scan.split[i], scan.index[i]) for i in shown]
        sheet = contact_sheet(images, captions, frames, title=title)
        io.write_with(sheets_dir / _sheet_name(name), lambda tmp, sheet=sheet: cv2.imwrite(str(tmp), sheet))
        written.append(_sheet_name(name))
    io.write_text(result.out_dir / MARKDOWN_FILE, markdown(result.summary, written))


def markdown(summary: dict[str, Any], sheets: Sequence[str]) -> str:
    """The human-readable report: counts per reason, duplicates, cluster sizes before/after, files."""
    lines = [
        "# Curation report",
        "",
        f"Dataset `{summary['dataset']}`, splits {', '.join(summary['splits'])}; embeddings: {summary['embeddings']}.",
        "",
        f"- images scanned: {summary['images']} ({summary['patients']} patients)",
        f"- kept after filters and dedup: {summary['kept_after_filters_and_dedup']}",
        f"- selected: {summary['selected']} of target {summary['target_size']} "
        f"({summary['selected_patients']} patients; {summary['retrieved_selected']} via retrieval)",
        "",
        "## Removed per reason (primary reason: the first that applied)",
        "",
        "| reason | removed | fired (any) |",
        "|---|---:|---:|",
    ]
    for reason, count in summary["removed_by_reason"].items():
        lines.append(f"| {reason} | {count} | {summary['reasons_fired'].get(reason, count)} |")
    if not summary["removed_by_reason"]:
        lines.append("| (none) | 0 | 0 |")
    lines += ["", "## Duplicate groups", "", "| kind | groups | across patients | removed |", "|---|---:|---:|---:|"]
    for kind, g in summary["duplicate_groups"].items():
        lines.append(f"| {kind} | {g['groups']} | {g['cross_patient_groups']} | {g['removed']} |")
    lines += ["", "## Cluster sizes before / after selection", ""]
    for level in summary["cluster_levels"]:
        before, after = level["before"], level["after"]
        b, a = np.asarray(list(before.values())), np.asarray([after.get(k, 0) for k in before])
        lines.append(
            f"Level {level['level']} ({level['clusters']} clusters): largest share before "
            f"{b.max() / b.sum():.1%}, after {a.max() / max(a.sum(), 1):.1%}; "
            f"sizes before {sorted(b.tolist(), reverse=True)[:12]}..., after {sorted(a.tolist(), reverse=True)[:12]}..."
        )
        lines.append("")
    if "timings_s" in summary:
        lines += [
            f"Throughput: {summary['images_per_s']} images/s (embedding time excluded); "
            f"timings {summary['timings_s']}.",
            "",
        ]
    lines += ["## Contact sheets", ""] + [f"- [{s}]({SHEETS_DIR}/{s})" for s in sheets] + [""]
    return "\n".join(lines)
