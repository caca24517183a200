"""The entry point as a user meets it: overrides, and clear messages (no traceback) for mistakes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

REPO = Path(__file__).resolve().parent.parent


def _load(config_file, *overrides):
    """Parses like the entry point does (ml_collections reads the overrides from sys.argv)."""
    argv = ["prog", f"--config={REPO / config_file}", *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True)
    saved, sys.argv = sys.argv, argv
    try:
        fv(argv)
    finally:
        sys.argv = saved
    return fv.config


def _main(*args, timeout=120):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "afm_jax.main", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "config_file", ["configs/mae_vitl.py", "configs/mae_vitb.py", "configs/mae_vits.py", "configs/demo.py"]
)
def test_every_config_loads_with_paper_defaults(config_file):
    config = _load(config_file)
    assert config.task == "mae"
    assert config.optim.b1 == 0.9 and config.optim.b2 == 0.95 and config.optim.weight_decay == 0.05
    assert config.mae.norm_pix_loss is True


def test_overrides_reach_nested_keys():
    config = _load(
        "configs/mae_vits.py", "--config.mae.mask_ratio=0.6", "--config.model.variant=B/16", "--config.batch_size=32"
    )
    assert config.mae.mask_ratio == 0.6 and config.model.variant == "B/16" and config.batch_size == 32


def test_unknown_key_is_rejected_by_name():
    with pytest.raises((flags.Error, AttributeError), match="mask_ratioo"):
        _load("configs/mae_vits.py", "--config.mae.mask_ratioo=0.6")


def test_missing_dataset_gives_a_paragraph_not_a_traceback(tmp_path):
    result = _main("--config", "configs/mae_vitl.py", "--workdir", str(tmp_path / "w"))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "afm_jax.data.synthetic" in result.stderr and "--config.data.path" in result.stderr


def test_missing_dataset_path_that_does_not_exist(tmp_path):
    result = _main(
        "--config",
        "configs/mae_vits.py",
        "--workdir",
        str(tmp_path / "w"),
        f"--config.data.path={tmp_path / 'nowhere'}",
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert str(tmp_path / "nowhere") in result.stderr


def test_bad_value_names_the_key(tmp_path):
    result = _main("--config", "configs/mae_vits.py", "--workdir", str(tmp_path / "w"), "--config.mae.mask_ratio=1.5")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "mae.mask_ratio" in result.stderr


def test_unknown_key_on_the_command_line_names_it(tmp_path):
    result = _main("--config", "configs/mae_vits.py", "--workdir", str(tmp_path / "w"), "--config.optim.lrr=1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "config.optim.lrr" in result.stderr


def test_batch_larger_than_the_dataset_is_refused_before_any_work(synthetic_dataset, tmp_path):
    result = _main(
        "--config",
        "configs/mae_vits.py",
        "--workdir",
        str(tmp_path / "w"),
        f"--config.data.path={synthetic_dataset}",
        "--config.batch_size=100000",
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "batch_size" in result.stderr and "larger than" in result.stderr
