"""A real SIGTERM (what SLURM sends on preemption) saves a checkpoint, exits 0, and a rerun resumes."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY = [
    "--config.model.variant=mu/8",
    "--config.image_size=32",
    "--config.batch_size=8",
    "--config.data.synthetic.num_patients=12",
    "--config.data.synthetic.image_size=64",
    "--config.data.num_workers=0",
    "--config.mae.decoder_dim=32",
    "--config.mae.decoder_depth=1",
    "--config.mae.decoder_heads=2",
    "--config.log_every=1",
    "--config.image_every=0",
    "--config.checkpoint_every=100000",
    "--config.probe.enabled=False",
]


ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _command(workdir, total_steps):
    return [
        sys.executable,
        "-m",
        "afm_jax.main",
        "--config",
        "configs/demo.py",
        "--workdir",
        str(workdir),
        f"--config.total_steps={total_steps}",
        *TINY,
    ]


def test_sigterm_saves_and_rerun_resumes(tmp_path):
    proc = subprocess.Popen(
        _command(tmp_path, 100000), cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    deadline = time.time() + 300
    for line in proc.stdout:  # wait until training is under way
        lines.append(line)
        if line.startswith("step 3/") or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    lines.append(out)
    text = "".join(lines)
    assert proc.returncode == 0, text
    assert "Stopping at step" in text and "SIGTERM" in text and "Traceback" not in text
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved and max(saved) >= 3

    rerun = subprocess.run(
        _command(tmp_path, max(saved) + 2), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr
    assert "Resumed from" in rerun.stdout and f"at step {max(saved)}" in rerun.stdout
    assert f"step {max(saved) + 2}/{max(saved) + 2}" in rerun.stdout
