#!/usr/bin/env python
"""Train-step throughput and MFU of the MAE trainer's own step, optionally against timm/PyTorch.

Command:  python bench/train_step.py --config configs/mae_vits.py [--config configs/dino_vits16.py ...]
              [--batch N] [--image_size P] [--steps K] [--rounds R] [--dtype float32|bfloat16]
              [--compare-timm] [--compare-torch] [--single-thread]

What it measures (synthetic in-memory batches, no dataset):

* ``img_per_s`` / ``step_time_s``: the MAE train step exactly as the trainer builds it
  (``task.build_model`` → ``create_train_state`` → ``make_train_step`` → ``jax.jit`` with donated
  state), compiled once, warmed up, then timed step by step with ``block_until_ready``.
* ``step_flops``: FLOPs of one compiled step from XLA's cost analysis; ``achieved_flops`` =
  step_flops / step_time; ``ceiling_flops``: a 4096² matmul timed on the same device in the same run
  (best of the measurements at the start and after every round); ``mfu`` = achieved / ceiling.
* ``--compare-timm``: a plain *supervised* ViT step (class-token features → linear head → softmax
  CE → AdamW; same variant, batch, resolution, one input channel, same precision) in JAX (our
  ``VisionTransformer`` through the same ``make_train_step``) and in timm/PyTorch
  (``vit_*_patch*_224``, ``torch.optim.AdamW``, ``torch.set_num_threads(os.cpu_count())``).
  ``vs_timm`` = JAX img/s / timm img/s (> 1: JAX is faster). ``timm_vit_mfu`` uses the FLOPs XLA
  counts for the same model (the two models do the same maths).
* ``--compare-torch``: each ``--config``'s method step (MAE, DINO) against its PyTorch peer in
  ``bench/torch_peers.py`` (the reference code's structure on timm's ViT: same sizes, batch, crops,
  precision, one input channel, threads). ``vs_torch`` = our img/s / the peer's (> 1: we are faster),
  for the first config; ``vs_torch_<task>`` and ``methods.<task>`` for every config. Several
  ``--config`` flags time several methods in one run (the first one gives the top-level figures).

Timing: each model is timed in ``--rounds`` interleaved rounds (MAE, JAX ViT, timm ViT, MAE, ...),
so background load on a shared machine hits all of them alike; every figure is the *best* (minimum)
single-step time over all ``--steps`` timed steps (the median is reported beside it).
``cores_used`` (process CPU time / wall time) shows how much of the machine the run actually had;
``--single-thread`` (one XLA and one torch thread, the process pinned to one core) compares per-core
efficiency, which stays steady when other jobs share the cores.

The last line of stdout is one JSON object; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# timm model names of our variants (timm has these sizes with 224-px defaults; img_size is passed).
TIMM_NAMES = {
    "Ti": "vit_tiny_patch{p}_224",
    "S": "vit_small_patch{p}_224",
    "M": "vit_medium_patch{p}_224",
    "B": "vit_base_patch{p}_224",
    "L": "vit_large_patch{p}_224",
    "H": "vit_huge_patch{p}_224",
}


def log(msg: str) -> None:
    print(f"[train_step {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Config.
# ------------------------------------------------------------------------------------------------


def load_config(path: str):
    """`get_config()` of a config file given by path."""
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"--config {path!r}: no such file (e.g. configs/mae_vits.py).")
    spec = importlib.util.spec_from_file_location(f"_bench_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config",
        required=True,
        action="append",
        help="config file, e.g. configs/mae_vits.py; repeat it to time several methods in one "
        "run (the first gives the top-level figures)",
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="per-step batch (default: 8 on CPU, 256 on accelerators)"
    )
    parser.add_argument("--image_size", type=int, default=None, help="default: the config's image_size")
    parser.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default=None,
        help="compute dtype (default: the config's model.dtype on accelerators, "
        "float32 on CPU where bf16 matmuls are slow)",
    )
    parser.add_argument(
        "--mesh",
        default=None,
        help="DATA,FSDP mesh sizes (-1 = the rest), e.g. -1,1 (data parallel) or 1,-1 (FSDP); "
        "fake CPU devices: XLA_FLAGS=--xla_force_host_platform_device_count=8",
    )
    parser.add_argument("--remat", default=None, help="model.remat policy (none|full|dots|dots_no_batch)")
    parser.add_argument("--accum_steps", type=int, default=None, help="gradient accumulation micro-batches")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per model (after warm-up)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="the timed steps are split into this many interleaved rounds"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    parser.add_argument(
        "--compare-timm",
        "--compare_timm",
        dest="compare_timm",
        action="store_true",
        help="also time a supervised ViT step in JAX and in timm/PyTorch",
    )
    parser.add_argument(
        "--compare-torch",
        "--compare_torch",
        dest="compare_torch",
        action="store_true",
        help="also time each config's method step (MAE, DINO) in its PyTorch peer (bench/torch_peers.py)",
    )
    parser.add_argument("--num_classes", type=int, default=1000, help="head size of the supervised ViT")
    parser.add_argument(
        "--single-thread",
        "--single_thread",
        dest="single_thread",
        action="store_true",
        help="CPU: one thread for XLA and torch (per-core efficiency; robust on a machine shared with other jobs)",
    )
    parser.add_argument("--ceiling_size", type=int, default=4096, help="matmul size of the FLOP/s ceiling")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--steps and --rounds must be >= 1 and --warmup >= 0")
    return args


def apply_overrides(config, args: argparse.Namespace, platform_name: str) -> None:
    with config.unlocked():
        config.batch_size = args.batch or (8 if platform_name == "cpu" else 256)
        if args.image_size:
            config.image_size = args.image_size
        config.model.dtype = args.dtype or ("float32" if platform_name == "cpu" else config.model.dtype)
        if args.mesh:
            data, fsdp = (int(v) for v in args.mesh.split(","))
            config.mesh.data, config.mesh.fsdp = data, fsdp
        if args.remat:
            config.model.remat = args.remat
        if args.accum_steps:
            config.accum_steps = args.accum_steps
    # The task's own checks (variant, image size divisible by the patch, dtype names, ...).
    from afm_jax.errors import ConfigError
    from afm_jax.train.tasks import get_task

    try:
        task = get_task(config.task)
        if hasattr(task, "validate"):
            task.validate(config)
    except ConfigError as e:
        raise SystemExit(f"{e}\n(bench flags --batch/--image_size/--dtype set batch_size/image_size/model.dtype)")


# ------------------------------------------------------------------------------------------------
# Timing helpers.
# ------------------------------------------------------------------------------------------------


class StepTimer:
    """Collects per-step wall times of one model."""

    def __init__(self, name: str):
        self.name = name
        self.times: list[float] = []
        self.cpu_times: list[float] = []  # process CPU seconds (all threads) of the same steps

    def add(self, wall: float, cpu: float) -> None:
        self.times.append(wall)
        self.cpu_times.append(cpu)

    @property
    def cpu_median(self) -> float:
        """Median process CPU seconds per step: robust-ish to other load (not to spin-waiting)."""
        return statistics.median(self.cpu_times)

    @property
    def cores_used(self) -> float:
        """Average busy cores of this process while timed (< os.cpu_count(): contended or idle)."""
        return sum(self.cpu_times) / sum(self.times)

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


class JaxStep:
    """A compiled (state, batch) -> (state, metrics) step with donated state, timed per call."""

    def __init__(self, name: str, train_step, state, batch, num_devices: int = 1):
        self.name = name
        t0 = time.perf_counter()
        jitted = train_step if hasattr(train_step, "lower") else jax.jit(train_step, donate_argnums=0)
        self.compiled = jitted.lower(state, batch).compile()
        self.compile_s = time.perf_counter() - t0
        from afm_jax.train import throughput

        self.flops = throughput.compiled_flops(self.compiled, num_devices=num_devices)  # whole step, all devices
        self._jitted = jitted
        self.state, self.batch = state, batch
        self.timer = StepTimer(name)
        self.last_loss = float("nan")

    def run(self, n: int, record: bool = True) -> None:
        if n <= 0:  # e.g. --warmup 0
            return
        for _ in range(n):
            c0, t0 = time.process_time(), time.perf_counter()
            self.state, metrics = self.compiled(self.state, self.batch)
            jax.block_until_ready((self.state, metrics))
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if record:
                self.timer.add(dt, dc)
        self.last_loss = float(metrics["loss"])

    def matmul_flops(self) -> float:
        """Matmul/conv FLOPs of one step counted on its jaxpr (torch FlopCounterMode's convention)."""
        from afm_jax.train import throughput

        return throughput.matmul_flops(self._jitted, self.state, self.batch)


class TorchStep:
    """One timm ViT supervised step (forward, CE, backward, AdamW), timed per call."""

    def __init__(self, config, num_classes: int, seed: int = 0, threads: int | None = None):
        import timm
        import torch

        from afm_jax.models.vit import parse_variant

        self.torch = torch
        torch.manual_seed(seed)
        torch.set_num_threads(threads or os.cpu_count() or 1)
        self.threads = torch.get_num_threads()
        size = config.model.variant.split("/")[0].strip()
        patch = parse_variant(config.model.variant)["patch_size"]
        if size not in TIMM_NAMES:
            raise ValueError(f"No timm model for ViT size {size!r}")
        self.model_name = TIMM_NAMES[size].format(p=patch)
        use_cuda = jax.devices()[0].platform == "gpu" and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_cuda else "cpu")
        self.model = timm.create_model(
            self.model_name,
            pretrained=False,
            num_classes=num_classes,
            in_chans=config.model.in_chans,
            img_size=config.image_size,
        )
        self.model.to(self.device).train()
        o = config.optim
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=1e-4, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay
        )
        self.loss_fn = torch.nn.CrossEntropyLoss()
        rng = np.random.default_rng(seed)
        b, s, c = config.batch_size, config.image_size, config.model.in_chans
        self.x = torch.from_numpy(rng.random((b, c, s, s), dtype=np.float32)).to(self.device)
        self.y = torch.from_numpy(rng.integers(0, num_classes, (b,))).to(self.device)
        dtype = config.model.dtype
        self.autocast_dtype = None if dtype == "float32" else getattr(torch, dtype)
        self.timer = StepTimer("timm_vit")
        self.last_loss = float("nan")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def run(self, n: int, record: bool = True) -> None:
        if n <= 0:  # e.g. --warmup 0
            return
        torch = self.torch
        for _ in range(n):
            self._sync()
            c0, t0 = time.process_time(), time.perf_counter()
            self.opt.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                loss = self.loss_fn(self.model(self.x), self.y)
            loss.backward()
            self.opt.step()
            self._sync()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if record:
                self.timer.add(dt, dc)
        self.last_loss = float(loss.detach())


def load_torch_peers():
    """bench/torch_peers.py as a module (it imports torch and timm: an optional extra)."""
    file = Path(__file__).with_name("torch_peers.py")
    spec = importlib.util.spec_from_file_location("_bench_torch_peers", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------
# Steps (the MAE one is the trainer's; the supervised one shares its machinery).
# ------------------------------------------------------------------------------------------------


def _optimizer(config, total_steps: int = 1000, warmup_steps: int = 100):
    from afm_jax.train import optim

    schedule = optim.learning_rate_schedule(config.optim, config.batch_size, total_steps, warmup_steps)
    return optim.make_optimizer(config.optim, schedule), schedule


def synthetic_images(config, seed: int) -> jax.Array:
    rng = np.random.default_rng(seed)
    b, s, c = config.batch_size, config.image_size, config.model.in_chans
    return jnp.asarray(rng.random((b, s, s, c), dtype=np.float32))


def build_method_step(config, total_steps: int = 1000, warmup_steps: int = 100) -> JaxStep:
    """The pretraining step exactly as the trainer assembles it (task optimiser, extra state,
    sharding over `config.mesh`), on a random batch shaped like the task's input."""
    from afm_jax.train import assembly, sharding
    from afm_jax.train.tasks import get_task

    task = get_task(config.task)
    task.setup(config, workdir="", total_steps=total_steps, steps_per_epoch=max(total_steps // 100, 1))
    mesh = sharding.make_mesh(config.mesh)
    parts = assembly.assemble(config, task, mesh, total_steps=total_steps, warmup_steps=warmup_steps)
    batch = sharding.global_batch(mesh, task.example_batch(config, config.batch_size, seed=1))
    return JaxStep(config.task, parts.jit_step, parts.initial_state(), batch, num_devices=mesh.size)


class SupervisedViT(nnx.Module):
    """Our ViT encoder + a linear head on the class token (the supervised comparison model)."""

    def __init__(self, config, num_classes: int, rngs: nnx.Rngs):
        from afm_jax.models import factory

        self.encoder = factory.build_encoder(config.model, config.image_size, rngs)
        self.head = nnx.Linear(
            self.encoder.embed_dim,
            num_classes,
            dtype=DTYPES[config.model.dtype],
            param_dtype=DTYPES[config.model.param_dtype],
            rngs=rngs,
        )

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.head(self.encoder.pooled_features(images, pool="cls")).astype(jnp.float32)


def supervised_loss(model: SupervisedViT, batch: dict, key: jax.Array, extra=None, step=None):
    del key, extra, step  # no drop-path / dropout, as timm's defaults
    logits = model(batch["image"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, ({}, {})


def build_jax_vit_step(config, num_classes: int) -> JaxStep:
    from afm_jax.train import state as state_lib
    from afm_jax.train import step as step_lib

    tx, schedule = _optimizer(config)
    model = SupervisedViT(config, num_classes, nnx.Rngs(config.seed))
    graphdef, state = state_lib.create_train_state(model, tx, seed=config.seed + 1)
    train_step = step_lib.make_train_step(graphdef, supervised_loss, tx, schedule)
    labels = np.random.default_rng(2).integers(0, num_classes, (config.batch_size,))
    batch = {"image": synthetic_images(config, seed=2), "label": jnp.asarray(labels, jnp.int32)}
    return JaxStep("jax_vit", train_step, state, batch)


# ------------------------------------------------------------------------------------------------
# Main.
# ------------------------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


def _round(x, digits: int = 4):
    if x is None:
        return None
    return float(f"{x:.{digits}g}")


def matmul_gflop(step: JaxStep, peer) -> tuple[float | None, float | None]:
    """(ours, the peer's) matmul GFLOP per step, counted the same way (2 per multiply-add): do both
    sides do the same work? A counting failure (e.g. an op the torch counter cannot follow on some
    device) is logged and gives None; it never stops the timing (the GPU check has minutes)."""
    try:
        counts = (step.matmul_flops() / 1e9, peer.count_matmul_flops() / 1e9)
    except Exception as e:  # noqa: BLE001 - a diagnostic, not the measurement
        log(f"  matmul FLOPs not counted: {type(e).__name__}: {e}")
        return None, None
    log("  matmul GFLOP/step (jaxpr / torch FlopCounterMode): %.1f / %.1f" % counts)
    return counts


def method_figures(method: dict, ceiling: float) -> dict:
    """The figures of one --config's step (and its torch peer's, if timed) for the JSON."""
    c, step, peer = method["config"], method["jax"], method["torch"]
    b = c.batch_size
    achieved = step.flops / step.timer.best if step.flops else None
    out = {
        "config": method["path"],
        "batch": b,
        "img_per_s": _round(b / step.timer.best),
        "img_per_s_median": _round(b / step.timer.median),
        "step_flops": step.flops,
        "mfu": _round(_ratio(achieved, ceiling)),
        "compile_s": _round(step.compile_s, 3),
        "cores_used": _round(step.timer.cores_used, 3),
        "cpu_s_per_step": _round(step.timer.cpu_median),
        "loss": _round(step.last_loss),
        "steps_timed": len(step.timer.times),
    }
    if peer is not None:
        pt = peer.timer
        out.update(
            {
                "torch_img_per_s": _round(b / pt.best),
                "torch_img_per_s_median": _round(b / pt.median),
                # XLA's FLOPs of our step: the peer does the same maths (matmul_flops_ratio checks it)
                "torch_mfu": _round(_ratio(step.flops / pt.best if step.flops else None, ceiling)),
                "matmul_gflop": _round(method["matmul_gflop"][0]),
                "torch_matmul_gflop": _round(method["matmul_gflop"][1]),
                "matmul_flops_ratio": _round(_ratio(*method["matmul_gflop"])),
                "vs_torch": _round(_ratio(b / step.timer.best, b / pt.best)),
                "vs_torch_median": _round(_ratio(b / step.timer.median, b / pt.median)),
                "vs_torch_cpu": _round(_ratio(pt.cpu_median, step.timer.cpu_median)),
                "torch_cores_used": _round(pt.cores_used, 3),
                "torch_cpu_s_per_step": _round(pt.cpu_median),
                "torch_loss": _round(peer.last_loss),
                "torch_peer": peer.name,
            }
        )
    elif method["torch_error"]:
        out["torch_error"] = method["torch_error"]
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.single_thread:  # read when the backend starts, i.e. at the first jax.devices() below
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
        # XLA:CPU still runs independent ops on other threads (1.87 cores busy measured): pin the whole
        # process, ours and the peer alike, to one core so that "single thread" means one core.
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    from afm_jax.train import throughput

    device = jax.devices()[0]
    configs = []
    for path in args.config:
        c = load_config(path)
        apply_overrides(c, args, device.platform)
        configs.append(c)
    config = configs[0]
    dtype_name = config.model.dtype
    b = config.batch_size
    log(
        f"device {device.platform}:{device.device_kind} ({jax.device_count()} device(s), "
        f"{os.cpu_count()} CPUs); {config.task} {config.model.variant}, batch {b}, "
        f"{config.image_size} px, {dtype_name}"
    )

    # Ceiling: a large matmul, measured at the start and after every round; the best counts (as
    # for the steps, so background load on a shared machine biases neither side of the ratio).
    ceiling_dtype = DTYPES[dtype_name]

    def measure_ceiling() -> float:
        return throughput.measure_matmul_flops(size=args.ceiling_size, dtype=ceiling_dtype, device=device)

    ceilings = [measure_ceiling()]
    log(f"matmul ceiling ({args.ceiling_size}², {dtype_name}): {ceilings[0] / 1e9:.1f} GFLOP/s")

    runners: list = []
    methods: list[dict] = []  # one per --config: {"config", "path", "jax", "torch", "torch_error"}
    peers, peers_error = None, None
    if args.compare_torch:
        try:
            peers = load_torch_peers()
        except ImportError as e:  # torch/timm are an optional extra
            peers_error = f"torch/timm unavailable: {e}"
            log(peers_error)
    for path, c in zip(args.config, configs):
        log(f"compiling the {c.task} train step ({path}) over {jax.device_count()} device(s), mesh {dict(c.mesh)} ...")
        step = build_method_step(c)
        step.timer.name = c.task
        log(f"  compiled in {step.compile_s:.1f} s; XLA counts {(step.flops or 0) / 1e9:.1f} GFLOP/step")
        runners.append(step)
        method = {"config": c, "path": path, "jax": step, "torch": None, "torch_error": peers_error}
        if peers is not None:
            try:
                peer = peers.peer_for(c, StepTimer(f"torch_{c.task}"), threads=1 if args.single_thread else None)
                log(f"torch peer {peer.name} with {peer.threads} torch threads")
                method["matmul_gflop"] = matmul_gflop(step, peer)
                runners.append(peer)
                method["torch"] = peer
            except ValueError as e:  # no peer for this task
                method["torch_error"] = str(e)
                log(str(e))
        methods.append(method)
    mae = methods[0]["jax"]

    jax_vit = timm_vit = None
    timm_error = None
    if args.compare_timm:
        log("compiling the supervised JAX ViT step ...")
        jax_vit = build_jax_vit_step(config, args.num_classes)
        log(f"  compiled in {jax_vit.compile_s:.1f} s; XLA counts {(jax_vit.flops or 0) / 1e9:.1f} GFLOP/step")
        runners.append(jax_vit)
        try:
            timm_vit = TorchStep(config, args.num_classes, threads=1 if args.single_thread else None)
            log(f"timm {timm_vit.model_name} on {timm_vit.device} with {timm_vit.threads} torch threads")
            runners.append(timm_vit)
        except ImportError as e:  # torch/timm are an optional extra
            timm_error = f"timm/torch unavailable: {e}"
            log(timm_error)

    for r in runners:
        name = getattr(r, "name", "timm_vit")
        log(f"warm-up {name}: {args.warmup} step(s)")
        r.run(args.warmup, record=False)

    per_round = math.ceil(args.steps / args.rounds)
    remaining = {id(r): args.steps for r in runners}
    for k in range(args.rounds):
        for r in runners:
            n = min(per_round, remaining[id(r)])
            if n <= 0:
                continue
            r.run(n)
            remaining[id(r)] -= n
            log(
                f"round {k + 1}/{args.rounds} {r.timer.name}: best {b / r.timer.best:.2f} img/s, "
                f"median {b / r.timer.median:.2f} img/s over {len(r.timer.times)} steps, "
                f"{r.timer.cores_used:.2f} cores busy"
            )
        ceilings.append(measure_ceiling())
        log(f"round {k + 1}/{args.rounds} matmul ceiling: {ceilings[-1] / 1e9:.1f} GFLOP/s")
    ceiling = max(ceilings)

    step_time = mae.timer.best
    achieved = mae.flops / step_time if mae.flops else None
    result = {
        "bench": "train_step",
        "config": args.config[0],
        "task": config.task,
        "variant": config.model.variant,
        "batch": b,
        "image_size": config.image_size,
        "dtype": dtype_name,
        "device": f"{device.platform}:{device.device_kind}",
        "num_devices": jax.device_count(),
        "mesh": dict(config.mesh),
        "accum_steps": int(config.get("accum_steps", 1)),
        "remat": config.model.get("remat", "none"),
        "cpu_count": os.cpu_count(),
        "threads": 1 if args.single_thread else "all",
        "timing": f"best of {len(mae.timer.times)} timed steps (median also given)",
        "img_per_s": _round(b / step_time),
        "img_per_s_median": _round(b / mae.timer.median),
        "step_time_s": _round(step_time),
        "compile_s": _round(mae.compile_s, 3),
        "step_flops": mae.flops,
        "achieved_flops": _round(achieved),
        "ceiling_flops": _round(ceiling),
        "ceiling": f"{args.ceiling_size}^2 {dtype_name} matmul, best of {len(ceilings)} in this run",
        "ceiling_flops_median": _round(statistics.median(ceilings)),
        "mfu": _round(_ratio(achieved, ceiling)),
        "loss": _round(mae.last_loss),
        "cores_used": _round(mae.timer.cores_used, 3),
        "cpu_s_per_step": _round(mae.timer.cpu_median),
    }
    if device.platform != "cpu":
        peak, source = throughput.device_peak_flops(device)
        peak *= jax.device_count()  # the step runs on every device; each has this peak
        result.update(peak_flops=peak, peak_source=source, mfu_vs_peak=_round(_ratio(achieved, peak)))
    if args.compare_timm:
        jt = jax_vit.timer.best
        jax_achieved = jax_vit.flops / jt if jax_vit.flops else None
        result.update(
            {
                "jax_vit_img_per_s": _round(b / jt),
                "jax_vit_img_per_s_median": _round(b / jax_vit.timer.median),
                "jax_vit_step_flops": jax_vit.flops,
                "jax_vit_mfu": _round(_ratio(jax_achieved, ceiling)),
                "jax_vit_cores_used": _round(jax_vit.timer.cores_used, 3),
                "jax_vit_cpu_s_per_step": _round(jax_vit.timer.cpu_median),
                "timm_vit_img_per_s": None,
                "vs_timm": None,
            }
        )
        if timm_vit is not None:
            tt = timm_vit.timer.best
            timm_achieved = jax_vit.flops / tt if jax_vit.flops else None
            result.update(
                {
                    "timm_vit_img_per_s": _round(b / tt),
                    "timm_vit_img_per_s_median": _round(b / timm_vit.timer.median),
                    "timm_vit_mfu": _round(_ratio(timm_achieved, ceiling)),
                    "vs_timm": _round(_ratio(b / jt, b / tt)),
                    "vs_timm_median": _round(_ratio(b / jax_vit.timer.median, b / timm_vit.timer.median)),
                    "timm_vit_cores_used": _round(timm_vit.timer.cores_used, 3),
                    "timm_vit_cpu_s_per_step": _round(timm_vit.timer.cpu_median),
                    "timm_model": timm_vit.model_name,
                    "torch_threads": timm_vit.threads,
                    "torch_version": timm_vit.torch.__version__,
                }
            )
        else:
            result["timm_error"] = timm_error
    if len(methods) > 1 or args.compare_torch:
        result["methods"] = {}
        for method in methods:
            name = method["config"].task
            key = name if name not in result["methods"] else f"{name}_{len(result['methods'])}"
            figures = method_figures(method, ceiling)
            result["methods"][key] = figures
            if args.compare_torch:
                result[f"vs_torch_{key}"] = figures.get("vs_torch")
        if args.compare_torch:
            first = result["methods"][next(iter(result["methods"]))]
            result.update(
                vs_torch=first.get("vs_torch"),
                vs_torch_median=first.get("vs_torch_median"),
                torch_img_per_s=first.get("torch_img_per_s"),
            )
            peer = next((m["torch"] for m in methods if m["torch"] is not None), None)
            if peer is not None:
                result.update(torch_threads=peer.threads, torch_version=peer.torch.__version__)
    result.update(
        {
            "jax_version": jax.__version__,
            "python": platform.python_version(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            # the allocator changes CPU step times by up to 1.5x (bench/README.md, "Allocator")
            "ld_preload": os.environ.get("LD_PRELOAD", ""),
            "malloc_conf": os.environ.get("MALLOC_CONF", ""),
        }
    )
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
