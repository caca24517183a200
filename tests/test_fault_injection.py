"""Fault injection: damaged checkpoints, a full disk during a save, divergence, wrong resumes, two trainers
on one workdir, kill -9 with grain workers, and bad inputs that must be messages, not tracebacks."""

import importlib.util
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import uuid

import jax
import numpy as np
import pytest

from afm_jax import errors, io
from afm_jax.train import assembly, checkpoint, resume, sharding
from afm_jax.train import run as train_run
from afm_jax.train.defaults import default_config
from afm_jax.train.tasks import get_task

REPO = pathlib.Path(__file__).resolve().parent.parent
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config(dataset) -> "ml_collections.ConfigDict":  # noqa: F821
    config = default_config("mae", "mu/8")
    config.model.update(width=32, depth=1, num_heads=2)
    config.data.path = os.fspath(dataset)
    config.data.num_workers = 0
    config.image_size = 32
    config.batch_size = 8
    config.total_steps = 2
    config.optim.update(warmup_epochs=0.0, base_lr=1e-3)
    config.mae.update(decoder_dim=32, decoder_depth=1, decoder_heads=2)
    config.log_every = 1
    config.checkpoint_every = 1
    config.image_every = 0
    return config


@pytest.fixture(scope="module")
def trained(synthetic_dataset, tmp_path_factory):
    """A workdir with checkpoints of steps 1 and 2, the trainer's own state at step 1, and an abstract
    target to restore into."""
    workdir = tmp_path_factory.mktemp("trained")
    config = _config(synthetic_dataset)
    first = train_run.run(config, os.fspath(workdir), stop_at_step=1)
    state_at_1 = jax.device_get(first.state)
    second = train_run.run(config, os.fspath(workdir))
    assert second.step == 2
    task = get_task("mae")
    mesh = sharding.make_mesh(config.mesh)
    parts = assembly.assemble(config, task, mesh, total_steps=2, warmup_steps=0)
    target = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), parts.abstract_state, parts.state_shardings
    )
    return {"workdir": workdir, "config": config, "state_at_1": state_at_1, "target": target, "task": task}


def _copy(trained, tmp_path) -> pathlib.Path:
    dst = tmp_path / "run"
    shutil.copytree(trained["workdir"], dst)
    return dst


def _largest_state_file(step_dir: pathlib.Path) -> pathlib.Path:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in p.as_posix()]
    return max(files, key=lambda p: p.stat().st_size)


def _truncate(path: pathlib.Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def _flip_middle(path: pathlib.Path, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _no_record(damage):
    def apply(step_dir):
        (step_dir / checkpoint.INTEGRITY_FILE).unlink()
        damage(step_dir)

    return apply


_DAMAGE = {
    "array_file_deleted": lambda d: _largest_state_file(d).unlink(),
    "array_file_truncated_half": lambda d: _truncate(_largest_state_file(d), 0.5),
    "array_file_truncated_empty": lambda d: _truncate(_largest_state_file(d), 0.0),
    "manifest_ocdbt_deleted": lambda d: (d / "state" / "manifest.ocdbt").unlink(),
    "process_manifest_ocdbt_deleted": lambda d: (d / "state" / "ocdbt.process_0" / "manifest.ocdbt").unlink(),
    "metadata_empty": lambda d: (d / "state" / "_METADATA").write_bytes(b""),
    "metadata_garbage": lambda d: (d / "state" / "_METADATA").write_bytes(b"\x00garbage{"),
    "iterator_json_deleted": lambda d: (d / "data" / "process_0-of-1.json").unlink(),
    "iterator_json_garbage": lambda d: (d / "data" / "process_0-of-1.json").write_text("{not json"),
    "meta_deleted": lambda d: (d / "meta" / "metadata").unlink(),
    "meta_garbage": lambda d: (d / "meta" / "metadata").write_text("][garbage"),
    "flipped_64_bytes_mid_state_file": lambda d: _flip_middle(_largest_state_file(d)),
    "state_item_deleted": lambda d: shutil.rmtree(d / "state"),
    "integrity_record_garbage": lambda d: (d / checkpoint.INTEGRITY_FILE).write_text("{"),
    # Without an integrity record (a run killed between orbax's commit and the record): the restore
    # itself must notice.
    "no_record_array_file_truncated": _no_record(lambda d: _truncate(_largest_state_file(d), 0.5)),
    "no_record_metadata_empty": _no_record(lambda d: (d / "state" / "_METADATA").write_bytes(b"")),
    "no_record_iterator_json_garbage": _no_record(
        lambda d: (d / "data" / "process_0-of-1.json").write_text("{not json")
    ),
}


def _assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(
            np.asarray(
                jax.random.key_data(x)
                if jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key)
                else x
            ),
            np.asarray(
                jax.random.key_data(y)
                if jax.dtypes.issubdtype(getattr(y, "dtype", np.float32), jax.dtypes.prng_key)
                else y
            ),
        )


@pytest.mark.parametrize("kind", sorted(_DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_previous(trained, tmp_path, kind, capsys):
    workdir = _copy(trained, tmp_path)
    _DAMAGE[kind](workdir / "checkpoints" / "2")
    it = trained["task"].build_train_iterator(trained["config"])
    ckpt = checkpoint.Checkpointer(workdir)
    try:
        step, state, meta = ckpt.restore_latest(trained["target"], it)
    finally:
        ckpt.close()
        it.close()
    assert step == 1 and meta["step"] == 1
    _assert_trees_equal(state, trained["state_at_1"])  # bit-identical to the trainer's step-1 state
    assert it.get_state()["next_batch"] == 1
    err = capsys.readouterr().err
    assert "checkpoint of step 2 is damaged" in err
    assert not (workdir / "checkpoints" / "2").exists()
    moved = list((workdir / checkpoint.DAMAGED_DIR).iterdir())
    assert len(moved) == 1 and moved[0].name.startswith("2-")


def test_record_missing_but_files_intact_still_restores_newest(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    (workdir / "checkpoints" / "2" / checkpoint.INTEGRITY_FILE).unlink()
    it = trained["task"].build_train_iterator(trained["config"])
    ckpt = checkpoint.Checkpointer(workdir)
    try:
        step, _, _ = ckpt.restore_latest(trained["target"], it)
    finally:
        ckpt.close()
        it.close()
    assert step == 2 and not (workdir / checkpoint.DAMAGED_DIR).exists()


def test_every_checkpoint_damaged_is_a_message(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    for step in ("1", "2"):
        _flip_middle(_largest_state_file(workdir / "checkpoints" / step))
    it = trained["task"].build_train_iterator(trained["config"])
    ckpt = checkpoint.Checkpointer(workdir)
    try:
        with pytest.raises(errors.CheckpointError, match="No checkpoint .* can be restored.*step 2.*step 1"):
            ckpt.restore_latest(trained["target"], it)
    finally:
        ckpt.close()
        it.close()
    assert sorted(p.name.split("-")[0] for p in (workdir / checkpoint.DAMAGED_DIR).iterdir()) == ["1", "2"]


def test_trainer_resumes_past_flipped_bytes(trained, tmp_path, compilation_cache, capsys):
    """End to end: the silent-corruption case of the issue resumes from the previous step and finishes."""
    workdir = _copy(trained, tmp_path)
    _flip_middle(_largest_state_file(workdir / "checkpoints" / "2"))
    result = train_run.run(trained["config"], os.fspath(workdir))
    out = capsys.readouterr()
    assert result.finished and result.step == 2
    assert "at step 1." in out.out and "checkpoint of step 2 is damaged" in out.err
    verdicts = checkpoint.verify_workdir(workdir)
    assert [(v.step, v.ok, v.verified) for v in verdicts] == [(1, True, True), (2, True, True)]


def test_verify_tool_reports_damage(trained, tmp_path, capsys):
    verify_checkpoints = _tool("verify_checkpoints")
    workdir = _copy(trained, tmp_path)
    assert verify_checkpoints.main(["--workdir", str(workdir)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["verified"] == [1, 2]
    _truncate(_largest_state_file(workdir / "checkpoints" / "2"), 0.5)
    assert verify_checkpoints.main(["--workdir", str(workdir), "--out", str(tmp_path / "report")]) == 1
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert io.read_json(tmp_path / "report" / "verification.json") == report
    assert list(report["damaged"]) == ["2"] and "bytes" in report["damaged"]["2"]
    assert (workdir / "checkpoints" / "2").exists()  # verifying alone moves nothing
    assert verify_checkpoints.main(["--workdir", str(workdir), "--move_damaged"]) == 1
    assert not (workdir / "checkpoints" / "2").exists()
    assert verify_checkpoints.main(["--workdir", str(tmp_path / "nope")]) == 2


# ─── Divergence and a full disk ───────────────────────────────────────────────────────────────────


def test_divergence_keeps_last_good_checkpoint(synthetic_dataset, tmp_path, monkeypatch, compilation_cache):
    config = _config(synthetic_dataset)
    config.total_steps = 3
    task_cls = type(get_task("mae"))
    original = task_cls.loss

    def nan_from_step_2(self, model, batch, key, extra, step):
        loss, aux = original(self, model, batch, key, extra, step)
        return loss * jax.numpy.where(step >= 1, jax.numpy.nan, 1.0), aux

    monkeypatch.setattr(task_cls, "loss", nan_from_step_2)
    with pytest.raises(errors.TrainingDivergedError, match="at step 2"):
        train_run.run(config, os.fspath(tmp_path))
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["1"]  # complete, and no *.orbax-checkpoint-tmp*
    assert [(v.step, v.ok, v.verified) for v in checkpoint.verify_workdir(tmp_path)] == [(1, True, True)]
    assert not (tmp_path / io.LOCK_FILE).exists()


_ENOSPC_SCRIPT = r"""
import errno, sys
import orbax.checkpoint as ocp
from afm_jax.main import *  # noqa  (defines the flags)
import afm_jax.main as main_mod
from absl import app
original = ocp.JsonCheckpointHandler._save_fn
calls = []
async def full_disk(self, x, directory):
    calls.append(directory)
    if x.get("step", 0) >= 2:
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))
    return await original(self, x, directory)
ocp.JsonCheckpointHandler._save_fn = full_disk
app.run(main_mod.main, flags_parser=main_mod.parse_flags)
"""


def test_full_disk_during_async_save_exits_cleanly(tmp_path):
    """ENOSPC inside orbax's background save: one `error:` paragraph naming the step, exit 2, the previous
    checkpoint intact and verified, no temporary folder, the process gone (timeout only guards a hang)."""
    args = [
        "--config",
        "configs/ci/multiprocess_mae.py",
        "--workdir",
        str(tmp_path),
        "--config.total_steps=4",
        "--config.checkpoint_every=1",
        "--config.log_every=1",
        "--config.data.synthetic.num_patients=12",
    ]
    done = subprocess.run(
        [sys.executable, "-c", _ENOSPC_SCRIPT, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.count("error: Saving the checkpoint of step 2") == 1, done.stderr
    assert "No space left on device" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert "step 1) is intact" in done.stderr
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["1"], names
    assert [(v.step, v.ok, v.verified) for v in checkpoint.verify_workdir(tmp_path)] == [(1, True, True)]


# ─── Resume compatibility ─────────────────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def other_dataset(tmp_path_factory):
    from afm_jax.data import synthetic

    return synthetic.build_synthetic_dataset(tmp_path_factory.mktemp("other"), num_patients=24, seed=1, image_size=64)


def test_resume_on_another_dataset_is_refused(trained, tmp_path, other_dataset):
    workdir = _copy(trained, tmp_path)
    config = _config(other_dataset)
    config.total_steps = 4
    with pytest.raises(errors.ConfigError, match=r"Cannot resume.*`dataset_fingerprint`.*new --workdir"):
        train_run.run(config, os.fspath(workdir))
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2"]  # nothing moved


def test_resume_with_changed_batch_seed_depth_task_lists_each(trained):
    meta = checkpoint.read_meta(trained["workdir"] / "checkpoints" / "2")
    config = _config(trained["config"].data.path)
    config.batch_size, config.seed, config.model.depth = 16, 7, 2
    with pytest.raises(errors.ConfigError) as e:
        resume.check_resume(meta, config)
    for key in ("`batch_size`: checkpoint 8, now 16", "`seed`: checkpoint 0, now 7", "`model.depth`: checkpoint 1"):
        assert key in str(e.value)
    dino = default_config("dino", "mu/8")
    dino.data.path = config.data.path
    with pytest.raises(errors.ConfigError, match="`task`: checkpoint 'mae', now 'dino'"):
        resume.check_resume(meta, dino)


def test_resume_with_safe_changes_proceeds_with_a_note(trained):
    meta = checkpoint.read_meta(trained["workdir"] / "checkpoints" / "2")
    config = _config(trained["config"].data.path)
    config.total_steps, config.optim.base_lr = 10, 1e-4
    notes = resume.check_resume(meta, config)
    assert len(notes) == 1 and "total_steps 2 -> 10" in notes[0] and "optim.base_lr 0.001 -> 0.0001" in notes[0]


# ─── Config values that were accepted although wrong ──────────────────────────────────────────────


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("keep_checkpoints", 0, "keep_checkpoints"),
        ("keep_checkpoints", -1, "keep_checkpoints"),
        ("data.num_workers", -1, "data.num_workers"),
    ],
)
def test_bad_counts_refused(synthetic_dataset, tmp_path, key, value, match):
    config = _config(synthetic_dataset)
    node, leaf = (config.data, "num_workers") if key.startswith("data.") else (config, key)
    node[leaf] = value
    with pytest.raises(errors.ConfigError, match=match):
        train_run.run(config, os.fspath(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("workdir", ["", "  "])
def test_empty_workdir_refused(synthetic_dataset, workdir):
    with pytest.raises(errors.ConfigError, match="--workdir is empty"):
        train_run.run(_config(synthetic_dataset), workdir)


def test_workdir_a_file_or_read_only_is_a_message(synthetic_dataset, tmp_path):
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(errors.ConfigError, match="is a file"):
        train_run.run(_config(synthetic_dataset), os.fspath(file))

    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root writes into any folder: a read-only mount instead, where allowed
        if (
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True
            ).returncode
            != 0
        ):
            pytest.skip("cannot mount a read-only tmpfs here")
    else:
        ro.chmod(0o500)
    try:
        with pytest.raises(errors.ConfigError, match="cannot be written"):
            train_run.run(_config(synthetic_dataset), os.fspath(ro / "run"))
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(ro)], check=True)
        else:
            ro.chmod(0o700)


# ─── Locks ────────────────────────────────────────────────────────────────────────────────────────


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path, monkeypatch):
    import socket

    lock = tmp_path / io.LOCK_FILE
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid, "started": "then"}))
        with pytest.raises(errors.LockedError, match=rf"in use by another run \(host .*pid {holder.pid}, started then"):
            with io.exclusive_lock(tmp_path, "test", errors.LockedError):
                pass
    finally:
        holder.kill()
        holder.wait()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "started": "then"}))
    with io.exclusive_lock(tmp_path, "test", errors.LockedError):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()
    lock.write_text(json.dumps({"host": "another-node", "pid": 1, "started": "then", "slurm_job": "77"}))
    with pytest.raises(errors.LockedError, match="host another-node"):
        with io.exclusive_lock(tmp_path, "test", errors.LockedError):
            pass
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # the same job, requeued onto another node: its old lock is stale
    with io.exclusive_lock(tmp_path, "test", errors.LockedError):
        assert json.loads(lock.read_text())["slurm_job"] == "77"


def test_second_trainer_on_a_locked_workdir_is_refused(synthetic_dataset, tmp_path):
    import socket

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / io.LOCK_FILE).write_text(
            json.dumps(
                {"host": socket.gethostname(), "pid": holder.pid, "started": "2026-01-01", "what": "afm_jax trainer"}
            )
        )
        with pytest.raises(errors.LockedError, match=f"pid {holder.pid}, started 2026-01-01"):
            train_run.run(_config(synthetic_dataset), os.fspath(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "checkpoints").exists()


# ─── kill -9 with grain workers; two trainers at once ─────────────────────────────────────────────


def _marked_pids(marker: str) -> list[int]:
    pids = []
    for proc in pathlib.Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker.encode() in (proc / "environ").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


def _shm_in_use_by_others() -> set[str]:
    used = set()
    for proc in pathlib.Path("/proc").iterdir():
        try:
            for line in (proc / "maps").read_text().splitlines():
                if "/dev/shm/" in line:
                    used.add(line.split("/dev/shm/")[1].split()[0])
        except OSError:
            pass
    return used


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")
def test_kill_9_with_workers_leaves_no_orphans_and_second_trainer_is_refused(tmp_path):
    marker = f"AFM_FAULT_TEST_{uuid.uuid4().hex}"
    shm_before = set(os.listdir("/dev/shm"))
    cmd = [
        sys.executable,
        "-m",
        "afm_jax.main",
        "--config",
        "configs/ci/multiprocess_mae.py",
        "--workdir",
        str(tmp_path),
        "--config.total_steps=100000",
        "--config.data.num_workers=2",
        "--config.log_every=1",
        "--config.checkpoint_every=2",
        "--config.data.synthetic.num_patients=12",
    ]
    env = {**ENV, marker: "1"}
    trainer = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = []
        for line in trainer.stdout:  # wait until training (and so the workers) is under way
            seen.append(line)
            if line.startswith("step 3/"):
                break
        assert any(line.startswith("step 3/") for line in seen), "".join(seen)
        workers = [p for p in _marked_pids(marker) if p != trainer.pid]
        assert len(workers) >= 2, workers  # 2 grain workers (+ multiprocessing's resource tracker)

        second = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"pid {trainer.pid}" in second.stderr and "in use by another run" in second.stderr
        assert "Traceback" not in second.stderr

        trainer.send_signal(signal.SIGKILL)
        trainer.wait(timeout=60)
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
    for _ in range(100):  # the kernel delivers the workers' SIGKILL asynchronously
        if not _marked_pids(marker):
            break
        time.sleep(0.2)
    orphans = _marked_pids(marker)
    for pid in orphans:  # do not leak them into the machine even when failing
        os.kill(pid, signal.SIGKILL)
    assert orphans == []
    leaked = set(os.listdir("/dev/shm")) - shm_before - _shm_in_use_by_others()
    assert leaked == set()

    # The lock left by the killed trainer is stale (dead pid on this host): a rerun takes it over.
    rerun = subprocess.run(
        [*cmd[:-4], "--config.total_steps=4", "--config.data.num_workers=0", "--config.data.synthetic.num_patients=12"],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "Resumed from" in rerun.stdout


def test_preprocess_refuses_an_output_dataset_in_use(tmp_path, monkeypatch, capsys):
    import socket

    import pydicom.data

    preprocess = _tool("preprocess")
    archive = tmp_path / "archive"
    archive.mkdir()
    for src in [f for f in pydicom.data.get_testdata_files("CT_small.dcm")][:1]:
        shutil.copy(src, archive / "a.dcm")
    monkeypatch.setenv("AFM_SALT", "lock test salt")
    out = tmp_path / "out"
    args = [
        "--input",
        str(archive),
        "--out",
        str(out),
        "--workers",
        "0",
        "--quiet",
        "--config.image_size=24",
        "--config.name=tiny",
        "--name",
        "femur",
    ]
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out.mkdir()
        (out / ".femur_tiny_v1.lock").write_text(
            json.dumps(
                {"host": socket.gethostname(), "pid": holder.pid, "started": "earlier", "what": "tools/preprocess.py"}
            )
        )
        assert preprocess.main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and f"pid {holder.pid}" in err and "femur_tiny_v1 is in use" in err
        assert not (out / ".work").exists()
        assert preprocess.main(args + ["--shard", "0/2"]) == 0  # a shard holds only its own shard's lock
    finally:
        holder.kill()
        holder.wait()
    capsys.readouterr()
    assert preprocess.main(args) == 0  # the holder is gone: its lock is stale
    assert (out / "femur_tiny_v1" / "1.0.0" / "dataset_info.json").is_file()
    assert not list(out.glob(".*.lock"))


# ─── Bad inputs that printed a traceback ──────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    "content,message", [(None, "does not exist"), ("def get_config(:\n", "syntax error at line 1")]
)
def test_main_with_a_missing_or_broken_config_file(tmp_path, content, message):
    config = tmp_path / "config.py"
    if content is not None:
        config.write_text(content)
    done = subprocess.run(
        [sys.executable, "-m", "afm_jax.main", "--config", str(config), "--workdir", str(tmp_path / "w")],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and done.stderr.startswith("error:") and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_text_file_named_safetensors_is_a_message(synthetic_dataset, tmp_path, capsys):
    fake = tmp_path / "weights.safetensors"
    fake.write_text("hello, not weights")
    config = _config(synthetic_dataset)
    config.init_from = os.fspath(fake)
    with pytest.raises(errors.InteropError, match="cannot be read with safetensors"):
        train_run.run(config, os.fspath(tmp_path / "run"))
    assert _tool("import_timm").main(["--input", str(fake), "--out", str(tmp_path / "imp")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "cannot be read with safetensors" in err


def test_evaluate_random_init_with_unknown_variant_is_a_message():
    # as a script: absl's global flag state in this process depends on which tests ran before
    done = subprocess.run(
        [sys.executable, "tools/evaluate.py", "--backbone", "random_init:,variant=Z/99", "--synthetic", "12"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=pathlib.Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 2, done.stderr[-2000:]
    err = done.stderr
    assert err.startswith("error:") and "Unknown ViT size 'Z'" in err and "Traceback" not in err


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_real_full_disk_on_a_small_tmpfs(trained, tmp_path):
    """The workdir on a tmpfs that holds one checkpoint, not two: a message, the first step intact."""
    size = sum(p.stat().st_size for p in (trained["workdir"] / "checkpoints" / "1").rglob("*") if p.is_file())
    mnt = tmp_path / "small"
    mnt.mkdir()
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.6) + 256 * 1024}", "tmpfs", str(mnt)],
            capture_output=True,
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here")
    try:
        config = trained["config"].copy_and_resolve_references()
        config.total_steps = 6
        with pytest.raises((errors.CheckpointError, errors.OutOfSpaceError), match="intact"):
            train_run.run(config, os.fspath(mnt))
        assert not list((mnt / "checkpoints").glob("*orbax-checkpoint-tmp*"))
        verdicts = checkpoint.verify_workdir(mnt)
        assert verdicts and all(v.ok and v.verified for v in verdicts), verdicts
        # the failed run closed every file it opened there (a leaked one keeps the filesystem busy)
        assert _open_files_under(mnt) == []
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mnt)], check=True)  # detach anyway: no mount outlives the test


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_metrics_writer_closes_its_files_on_a_full_disk(tmp_path):
    """tensorboardX flushes before it closes; on a full disk that raises, and its event file must still close."""
    from afm_jax.train.metrics_writer import MetricsWriter

    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        writer = MetricsWriter(mnt)
        with open(mnt / "filler", "wb", buffering=0) as filler, pytest.raises(OSError):
            while True:
                filler.write(b"\0" * 4096)
        with pytest.raises(OSError):
            writer.write_scalars(1, {"loss": 1.0})  # metrics.jsonl is line-buffered: this write fails
        with pytest.raises(OSError):
            writer.close()  # tensorboardX's final flush fails
        writer.close()  # a second close is a no-op
        assert _open_files_under(mnt) == []
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mnt)], check=True)


def _open_files_under(directory: pathlib.Path) -> list[str]:
    """The files under `directory` this process holds open (from /proc/self/fd)."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the descriptor listdir itself used, already closed
            continue
        if target.startswith(f"{directory}/"):
            held.append(target)
    return held


@pytest.mark.parametrize(
    "content,message", [(None, "does not exist"), ('{"a": 1}', "JSON list"), ('["no-such-image"]', "matches none")]
)
def test_bad_selection_is_a_message(synthetic_dataset, tmp_path, content, message):
    selection = tmp_path / "selection.json"
    if content is not None:
        selection.write_text(content)
    config = _config(synthetic_dataset)
    config.data.selection = os.fspath(selection)
    with pytest.raises(errors.UserError, match=message):
        train_run.run(config, os.fspath(tmp_path / "run"))
