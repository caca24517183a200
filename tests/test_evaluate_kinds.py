"""tools/evaluate.py on multi-class, ordinal and regression tasks, run as a script: the printed headline
metrics equal sklearn on the saved predictions; flags that do not fit the kind are one `error:` line."""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import sklearn.metrics as skm
from eval_helpers import write_brightness_dataset

ROOT = pathlib.Path(__file__).resolve().parents[1]
BACKBONE = "random_init:,variant=mu/8,image_size=32,depth=1"


def _evaluate(*args):
    return subprocess.run(
        [sys.executable, "tools/evaluate.py", "--backbone", BACKBONE, "--n_boot", "50", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.fspath(ROOT)},
    )


def _printed(stdout):
    """{metric: (point, low, high)} of the headline block."""
    rows = re.findall(r"^\s*(\w+): (-?[\d.]+|nan)  \[(-?[\d.]+|nan), (-?[\d.]+|nan)\]", stdout, re.M)
    return {k: tuple(float(x) for x in v) for k, *v in rows}


def _test_predictions(out):
    with np.load(out / "predictions_test.npz") as z:
        return z["y_true"], z["y_score"]


@pytest.mark.parametrize("kind", ["multiclass", "ordinal"])
def test_class_kinds_print_their_metrics_equal_to_sklearn(synthetic_dataset, tmp_path, kind):
    out = tmp_path / "out"
    done = _evaluate(
        "--data", os.fspath(synthetic_dataset), "--kind", kind, "--classes", "0,1,2",
        "--class_names", "normal,NFF,AFF", "--protocol", "knn", "--unit", "image", "--out", os.fspath(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    got = _printed(done.stdout)
    y, p = _test_predictions(out)
    pred = p.argmax(1)
    assert got["accuracy"][0] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-4)
    assert got["macro_f1"][0] == pytest.approx(skm.f1_score(y, pred, average="macro"), abs=1e-4)
    assert got["balanced_accuracy"][0] == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=1e-4)
    if kind == "ordinal":
        qwk = skm.cohen_kappa_score(y, pred, weights="quadratic", labels=[0, 1, 2])
        assert got["qwk"][0] == pytest.approx(qwk, abs=1e-4)
        assert got["mae_grades"][0] == pytest.approx(skm.mean_absolute_error(y, pred), abs=1e-4)
        assert "auroc" not in got
    for point, low, high in got.values():
        assert low - 1e-4 <= point <= high + 1e-4 or np.isnan(point)
    last = json.loads(done.stdout.strip().splitlines()[-1])
    primary = "qwk" if kind == "ordinal" else "macro_auroc"
    assert last["kind"] == kind and f"{primary}_ci" in last


def test_regression_prints_mae_and_r2_equal_to_sklearn(tmp_path):
    data = write_brightness_dataset(tmp_path / "bright", num_patients=40)
    out = tmp_path / "out"
    done = _evaluate(
        "--data", data, "--kind", "regression", "--target_unit", "months", "--protocol", "linear",
        "--unit", "patient", "--out", os.fspath(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    got = _printed(done.stdout)
    y, s = _test_predictions(out)  # one image per patient: the patient unit is the image
    assert got["mae"][0] == pytest.approx(skm.mean_absolute_error(y, s), abs=1e-4)
    assert got["r2"][0] == pytest.approx(skm.r2_score(y, s), abs=1e-4)
    assert got["rmse"][0] == pytest.approx(np.sqrt(skm.mean_squared_error(y, s)), abs=1e-4)
    assert re.search(r"mae: .* months$", done.stdout, re.M)
    assert "auroc" not in got
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert last["kind"] == "regression" and last["mae"] == pytest.approx(got["mae"][0], abs=1e-4)


@pytest.mark.parametrize(
    "args,words",
    [
        (["--kind", "multiclass"], "needs --classes"),
        (["--kind", "ordinal", "--classes", "0,1,2", "--positive", "2"], "--positive does not apply"),
        (["--kind", "binary", "--classes", "0,1"], "--classes does not apply"),
        (["--kind", "regression", "--classes", "0,1"], "--classes does not apply"),
        (["--kind", "multiclass", "--classes", "0,x"], "must be comma-separated label ints"),
    ],
)
def test_flags_that_do_not_fit_the_kind_are_a_message(tmp_path, args, words):
    done = _evaluate("--synthetic", "12", "--out", os.fspath(tmp_path / "o"), *args)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith("error:") and words in done.stderr and "Traceback" not in done.stderr
