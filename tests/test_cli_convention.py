"""Every tool in tools/ follows one command-line convention (afm_jax/cli.py): absl flags in snake_case,
`--help` with an example command, `--config.a.b=v` settings whose unknown keys are refused naming the
key, `error: <one paragraph>` + exit 2 for user mistakes, and no sys.path edits or platform forcing."""

import concurrent.futures
import importlib.util
import pathlib
import re
import subprocess
import sys

import ml_collections
import pytest
from absl import flags

from afm_jax import cli, configuration

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOOLS = (
    "preprocess",
    "curate",
    "make_eval_dataset",
    "export_timm",
    "import_timm",
    "evaluate",
    "study",
    "verify_checkpoints",
)


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_tool_is_covered():
    assert sorted(p.stem for p in (ROOT / "tools").glob("*.py")) == sorted(TOOLS)


def test_help_as_a_script_shows_an_example_and_exits_0():
    """Run as scripts (under absl.app.run), concurrently to keep the imports' wall time down."""

    def run(name):
        return name, subprocess.run(
            [sys.executable, str(ROOT / "tools" / f"{name}.py"), "--help"], capture_output=True, text=True, timeout=300
        )

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for name, done in pool.map(run, TOOLS):
            assert done.returncode == 0, (name, done.stderr[-2000:])
            assert "Example" in done.stdout and f"python tools/{name}.py" in done.stdout, name
            assert "Usage:" in done.stdout and "Flags:" in done.stdout, name
            assert "Traceback" not in done.stderr, name


@pytest.mark.parametrize("name", TOOLS)
def test_short_help_and_a_bogus_setting(name, capsys):
    tool = load_tool(name)
    assert tool.main(["-h"]) == 0
    out = capsys.readouterr().out
    assert "Example" in out and "--out" in out
    for flag in re.findall(r"^  --([\w.]+)", out, flags=re.M):  # one spelling: snake_case, as absl
        assert "-" not in flag, (name, flag)
    assert tool.main(["--config.nonexistent=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nonexistent" in err and "Traceback" not in err, err
    assert "\n\n" not in err.strip() and err.count("error:") == 1, err  # one paragraph
    assert tool.main(["--no_such_flag"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no_such_flag" in err and "\n\n" not in err.strip()


def test_bogus_setting_exits_2_when_run_as_a_script():
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "study.py"),
            "configs/studies/demo.py",
            "--config.slurm.nonexistent=1",
            "--config.slurm.gpus=2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr
    assert "slurm.nonexistent" in done.stderr and "gpus" not in done.stderr  # the bad key only


@pytest.mark.parametrize("folder", ("tools", "bench"))
def test_no_sys_path_edits_or_platform_forcing(folder):
    for path in sorted((ROOT / folder).glob("*.py")):
        text = path.read_text()
        assert "sys.path" not in text and "JAX_PLATFORMS" not in text, path
    for path in (ROOT / "tests").glob("test_*.py"):  # tests run with the installed package too
        assert path.name == pathlib.Path(__file__).name or "sys.path" + ".insert" not in path.read_text(), path


# ─── afm_jax/cli.py itself, on a toy tool ─────────────────────────────────────────────────────────


def _toy(positional=""):
    def define(fv):
        flags.DEFINE_string("out", None, "Output folder.", flag_values=fv)
        flags.DEFINE_integer("workers", 1, "Workers.", flag_values=fv)

    def config(argv):
        return ml_collections.ConfigDict(dict(size=8, opt=dict(lr=0.1, name="adam")))

    return cli.Tool(
        "Toy tool.\n\nExample:\n    python toy.py --out o\n",
        define,
        default_config=config,
        config_keys_in="toy.py",
        positional=positional,
        required=("out",),
    )


def test_parse_applies_overrides_and_names_the_bad_one():
    fv, rest = cli.parse(_toy(), ["--out", "o", "--config.size=16", "--config.opt.lr=0.5", "--workers=3"])
    assert (fv.out, fv.workers, fv.config.size, fv.config.opt.lr, fv.config.opt.name, rest) == (
        "o",
        3,
        16,
        0.5,
        "adam",
        [],
    )
    with pytest.raises(configuration.ConfigError) as e:
        cli.parse(_toy(), ["--out", "o", "--config.size=16", "--config.opt.zz=1"])
    assert "opt.zz" in str(e.value) and "config.size" not in str(e.value)
    with pytest.raises(configuration.ConfigError, match=r"config\.size=abc"):
        cli.parse(_toy(), ["--out", "o", "--config.opt.lr=0.5", "--config.size=abc"])
    with pytest.raises(configuration.ConfigError, match="--out"):
        cli.parse(_toy(), ["--config.size=16"])
    with pytest.raises(configuration.ConfigError, match="Unexpected arguments"):
        cli.parse(_toy(), ["--out", "o", "stray"])
    assert cli.parse(_toy(positional="FILE"), ["f.py", "--out", "o"])[1] == ["f.py"]


def test_run_turns_user_errors_into_one_line_and_status(capsys, tmp_path):
    def work(fv, args):
        cli.require_positive(fv.workers, "workers")
        cli.check_output_dir(fv.out)
        return 0

    (tmp_path / "f").write_text("x")
    assert cli.run(_toy(), work, ["--out", str(tmp_path)]) == 0
    assert cli.run(_toy(), work, ["--out", str(tmp_path), "--workers", "-1"]) == 2
    assert capsys.readouterr().err == "error: --workers must be >= 0, got -1.\n"
    assert cli.run(_toy(), work, ["--out", str(tmp_path / "f")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert cli.run(_toy(), work, ["--help"]) == 0
    out = capsys.readouterr().out
    assert "Example" in out and "--config.opt.lr=0.1" in out and "--workers" in out


def test_refuse_overwrite(tmp_path):
    cli.refuse_overwrite(tmp_path / "new", "model.safetensors", overwrite=False)
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(configuration.ConfigError, match="--overwrite"):
        cli.refuse_overwrite(tmp_path, "model.safetensors", overwrite=False)
    cli.refuse_overwrite(tmp_path, "model.safetensors", overwrite=True)


def test_bad_override_message_names_only_the_failing_key():
    argv = ["--config.a=1", "--config.b.zz=2", "--config.c=3"]
    message = configuration.bad_override_message(argv, AttributeError(KeyError("'zz'")), "defaults.py")
    assert "--config.b.zz" in message and "--config.a" not in message and "--config.c" not in message
    message = configuration.bad_override_message(argv, ValueError("flag --config.c=3: bad"), "defaults.py")
    assert "in --config.c " in message and "--config.b.zz" not in message
