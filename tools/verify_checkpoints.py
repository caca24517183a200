"""Verify a run's checkpoints without training: every step folder against its integrity record.

Usage: python tools/verify_checkpoints.py --workdir RUN [--move_damaged] [--out REPORT_DIR]

Example:
    python tools/verify_checkpoints.py --workdir runs/mae_vitb16
    python tools/verify_checkpoints.py --workdir runs/mae_vitb16 --out reports/   # also writes verification.json

Each step in RUN/checkpoints is checked against the sha256 and size of every file recorded when it was
saved (checkpoints/<step>/integrity.json), and its metadata and data-iterator JSON must parse. One line
per step (`ok`, `ok (no integrity record: not verifiable)` or `DAMAGED: <reason>`), then one JSON object.
Exit status 0 when every step is good, 1 when one is damaged. `--move_damaged` moves damaged steps to
RUN/checkpoints_damaged/<step>-<reason>, as the trainer does on resume (not while a trainer runs there).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

from absl import flags

from afm_jax import cli, io
from afm_jax.errors import LockedError
from afm_jax.train import checkpoint


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string(
        "workdir", None, "A run's folder (as given to afm_jax.main) or its checkpoints/ folder.", flag_values=fv
    )
    flags.DEFINE_bool("move_damaged", False, "Move damaged steps to checkpoints_damaged/.", flag_values=fv)
    flags.DEFINE_string(
        "out", None, "Folder to write the JSON report into (verification.json); default: none.", flag_values=fv
    )


TOOL = cli.Tool(__doc__, define_flags, required=("workdir",))


def verify(fv: flags.FlagValues, _args: list[str]) -> int:
    if fv.out is not None:
        cli.check_output_dir(fv.out)
    verdicts = checkpoint.verify_workdir(fv.workdir)
    if not verdicts:
        print(f"No checkpoint in {fv.workdir}.")
    for v in verdicts:
        status = (
            "ok"
            if v.ok and v.verified
            else "ok (no integrity record: not verifiable)"
            if v.ok
            else f"DAMAGED: {v.damage}"
        )
        print(f"step {v.step}: {status}")
    damaged = [v for v in verdicts if not v.ok]
    moved = []
    if damaged and fv.move_damaged:
        root = pathlib.Path(fv.workdir)
        root = root.parent if root.name == checkpoint.CHECKPOINTS_DIR else root
        with io.exclusive_lock(root, "tools/verify_checkpoints.py --move_damaged", LockedError):
            for v in damaged:
                moved.append(str(checkpoint.quarantine(root / checkpoint.CHECKPOINTS_DIR / str(v.step), v.kind)))
                print(f"moved step {v.step} to {moved[-1]}")
    report = {
        "workdir": str(fv.workdir),
        "steps": [v.step for v in verdicts],
        "verified": [v.step for v in verdicts if v.ok and v.verified],
        "unverifiable": [v.step for v in verdicts if v.ok and not v.verified],
        "damaged": {str(v.step): v.damage for v in damaged},
        "moved": moved,
    }
    if fv.out is not None:
        pathlib.Path(fv.out).mkdir(parents=True, exist_ok=True)
        io.write_json(pathlib.Path(fv.out) / "verification.json", report)
    print(json.dumps(report))
    return 1 if damaged else 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(TOOL, verify, argv)


if __name__ == "__main__":
    cli.app_main(TOOL, verify)
