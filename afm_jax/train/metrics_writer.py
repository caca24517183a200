"""Run logging from process 0: TensorBoard events, `metrics.jsonl`, a console progress line, PNGs.

Other processes get a writer that does nothing, so call sites never branch on the process index.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import time
from typing import Mapping

import cv2
import numpy as np


class MetricsWriter:
    """Writes scalars and images for one run directory; a no-op unless `enabled`."""

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True, total_steps: int | None = None):
        self.enabled = enabled
        self.workdir = os.fspath(workdir)
        self.total_steps = total_steps
        self._tb = None
        self._jsonl = None
        self._start = time.time()
        if enabled:
            from tensorboardX import SummaryWriter  # imported lazily: only process 0 needs it

            os.makedirs(self.workdir, exist_ok=True)
            self._tb = SummaryWriter(os.path.join(self.workdir, "tensorboard"))
            self._jsonl = open(os.path.join(self.workdir, "metrics.jsonl"), "a", buffering=1)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "time": round(time.time(), 3)}
        for name, value in scalars.items():
            value = float(value)
            record[name] = value
            self._tb.add_scalar(name, value, int(step))
        self._jsonl.write(json.dumps(record) + "\n")

    def write_record(self, record: Mapping) -> None:
        """A free-form JSON line (e.g. the run header with config and code version)."""
        if self.enabled:
            self._jsonl.write(json.dumps(dict(record)) + "\n")

    def write_image(self, step: int, name: str, image: np.ndarray) -> str | None:
        """Saves a float [0,1] (H,W) or (H,W,1) image as `<workdir>/images/<name>_<step>.png` and to TensorBoard."""
        if not self.enabled:
            return None
        image = np.clip(np.asarray(image, np.float32).squeeze(), 0.0, 1.0)
        path = os.path.join(self.workdir, "images", f"{name}_{int(step):07d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        cv2.imwrite(path, (image * 255.0 + 0.5).astype(np.uint8))
        self._tb.add_image(name, image[None], int(step), dataformats="CHW")
        return path

    def progress(self, step: int, scalars: Mapping[str, float]) -> None:
        """One console line: step/total, loss, img/s, MFU, ETA."""
        if not self.enabled:
            return
        parts = [f"step {step}" + (f"/{self.total_steps}" if self.total_steps else "")]
        for key, fmt in (
            ("loss", "loss {:.4f}"),
            ("lr", "lr {:.2e}"),
            ("img_per_s", "{:.1f} img/s"),
            ("mfu", "MFU {:.1%}"),
        ):
            if key in scalars:
                parts.append(fmt.format(float(scalars[key])))
        if "step_time_s" in scalars and self.total_steps:
            eta = (self.total_steps - step) * float(scalars["step_time_s"])
            parts.append(f"ETA {datetime.timedelta(seconds=int(eta))}")
        print(" | ".join(parts), file=sys.stdout, flush=True)

    def close(self) -> None:
        """Closes both logs, also when the disk is full (then the flush error is raised after closing)."""
        if not self.enabled:
            return
        self.enabled = False
        try:
            self._tb.close()
        except OSError:
            _close_event_files(self._tb)
            raise
        finally:
            self._jsonl.close()


def _close_event_files(summary_writer) -> None:
    """Closes the event files of a tensorboardX writer whose `close()` failed.

    tensorboardX flushes before it closes: on a full disk the flush raises and the file stays open, which
    keeps the workdir's filesystem busy (it cannot be unmounted) for the rest of the process.
    """
    for file_writer in getattr(summary_writer, "all_writers", {}).values():
        event_file_writer = getattr(file_writer, "event_writer", None)
        events = getattr(event_file_writer, "_ev_writer", None)
        handle = getattr(getattr(events, "_py_recordio_writer", None), "_writer", None)
        if handle is not None:
            with contextlib.suppress(OSError):
                handle.close()  # the buffered flush fails again, the descriptor is closed regardless
        if event_file_writer is not None:
            event_file_writer._closed = True  # its atexit hook would retry the flush and print a traceback
