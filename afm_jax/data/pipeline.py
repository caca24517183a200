"""Input pipelines: records -> host-local batches of numpy arrays, with grain.

Training (`build_train_iterator`): every epoch, a fresh global permutation of the split (the same
on every host) is cut into equal per-host slices, so each host reads only its own examples, no
example is on two hosts within an epoch, and the deal changes from epoch to epoch. Then decode,
augment, batch. Everything up to the batch is a grain `MapDataset`, i.e. a pure function of the
batch index, so:

- batches are deterministic for a seed and independent of `num_workers` (workers compute whole
  batches by index; grain interleaves them back in order);
- the iterator state is just the index of the next batch (plus what it must match). Restoring it
  rebuilds the pipeline from that batch — exact, cheap, and valid with a different worker count.

Evaluation (`build_eval_iterator`): one pass in dataset order, no augmentation, the last batch padded
and marked by a boolean `mask`, so every example is seen exactly once.

Both spread decoding over `data.num_workers` processes (`mp_prefetch`, spawned; scripts must guard
`__main__`); 0 keeps everything in-process (debugging, tests).
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import signal
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import cv2
import grain
import ml_collections
import numpy as np
from absl import flags
from tqdm import tqdm

from afm_jax.data import records, transforms
from afm_jax.errors import ConfigError

STATE_VERSION = 1


def default_data_config() -> ml_collections.ConfigDict:
    """The `config.data` block: where the dataset is and how it is read and augmented."""
    return ml_collections.ConfigDict(
        dict(
            path="",  # dataset version dir, e.g. DIR/femur/1.0.0 (tools/preprocess.py or
            # python -m afm_jax.data.synthetic --out DIR)
            train_split="train",
            eval_split="validation",
            selection=ml_collections.config_dict.placeholder(
                str
            ),  # JSON list of image_ids to train on (tools/curate.py)
            num_workers=2,  # decoding processes per host; 0 = in-process
            read_threads=1,  # threads per process (per worker, or the main process if num_workers=0)
            prefetch_buffer_size=2,  # batches buffered per worker (or in-process)
            augment=ml_collections.ConfigDict(transforms.default_augment_config()),
        )
    )


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    """cfg[key] for a ConfigDict or a dict; `default` when absent or None."""
    value = cfg.get(key, default)
    return default if value is None else value


def _process_index_and_count(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
        process_index = options.shard_index if process_index is None else process_index
        process_count = options.shard_count if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
    return int(process_index), int(process_count)


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ConfigError(
            f"Global batch size {global_batch_size} must be a positive multiple of the "
            f"{process_count} processes (config key `batch_size`)."
        )
    return global_batch_size // process_count


def _derive_seed(*parts: int) -> int:
    """A 32-bit seed for one use of the run seed (the epoch permutations, a host's augmentations)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _die_with_parent() -> None:
    """Asks Linux to SIGKILL this process when its parent dies (PR_SET_PDEATHSIG), so a trainer killed
    with SIGKILL leaves no decoding workers behind; with them gone, multiprocessing's resource tracker
    sees its pipe close, frees their shared memory in /dev/shm and exits too. A no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


_PR_SET_PDEATHSIG = 1


def _init_worker(worker_index: int, worker_count: int) -> None:
    """Runs in each worker process: dies with the trainer; one OpenCV thread per worker, the workers
    are the parallelism."""
    del worker_index, worker_count
    _die_with_parent()
    cv2.setNumThreads(1)


def _as_plain_arrays(batch: dict[str, Any]) -> dict[str, np.ndarray]:
    """Copies arrays out of grain's shared memory, so a batch kept around (for logging, tests) has no
    shared-memory lifetime tied to the worker pool. Costs a memcpy, ~2% of the decode time."""
    return {k: np.array(v) for k, v in batch.items()}


def _ensure_absl_flags_parsed() -> None:
    """grain reads absl flags; outside absl.app (tests, notebooks) they are unparsed and it would fail."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _to_iterator(elements: grain.MapDataset, batch_size: int, data_cfg: Any) -> grain.DatasetIterator:
    """Batches `elements` and reads them with `read_threads` threads in each of `num_workers` processes.

    Batching happens on the MapDataset, before the workers: batch i is always elements
    [i * b, (i + 1) * b), whichever worker builds it — this is what makes the output independent of
    the worker count.
    """
    num_workers = int(_get(data_cfg, "num_workers", 0))
    buffer = max(1, int(_get(data_cfg, "prefetch_buffer_size", 2)))
    read = grain.ReadOptions(num_threads=int(_get(data_cfg, "read_threads", 1)), prefetch_buffer_size=buffer)
    # Not `enable_shared_memory_output()` on the batches (it would save a copy in the workers): batches
    # still buffered when the iterator closes would then stay in /dev/shm until the process exits.
    it_ds = elements.batch(batch_size, drop_remainder=True).to_iter_dataset(read)
    if num_workers > 0:
        _ensure_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=buffer),
            worker_init_fn=_init_worker,
        )
    return iter(it_ds)


# ─── Training ────────────────────────────────────────────────────────────────────────────────────


class HostEpochRecords(grain.MapDataset):
    """The infinite stream of one host's training records: element i is record perm_e[start + j],
    (e, j) = divmod(i, count), where perm_e is epoch e's permutation of the whole split.

    Every host computes the same perm_e (from the shared seed) and takes its own slice [start,
    start + count), so within an epoch no example is on two hosts, and the deal changes every epoch.
    (grain's shuffle + slice + repeat do the same, but cost ~6% of the decode time per element in
    index hashing and stats; one numpy permutation per epoch costs ~10 ms per 500k records.)
    """

    def __init__(self, source: records.RecordSource, *, seed: int, start: int, count: int) -> None:
        super().__init__()
        self._source, self._seed, self._start, self._count = source, int(seed), int(start), int(count)
        self._n = len(source)
        self._permutations: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return sys.maxsize

    def __str__(self) -> str:
        return f"HostEpochRecords(start={self._start}, count={self._count}, of={self._n})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, j = divmod(int(index), self._count)
        return self._source[int(self._permutation(epoch)[self._start + j])]

    def _permutation(self, epoch: int) -> np.ndarray:
        perm = self._permutations.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self._seed, epoch]).permutation(self._n)
            # Keep this and the previous epoch (reader threads straddle the boundary), drop older ones.
            self._permutations = {e: p for e, p in self._permutations.items() if e == epoch - 1} | {epoch: perm}
        return perm

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_permutations": {}}


def build_train_dataset(
    data_cfg: Any,
    *,
    global_batch_size: int,
    seed: int,
    image_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    transform: grain.transforms.RandomMap | None = None,
) -> tuple[grain.MapDataset, dict[str, Any]]:
    """The infinite MapDataset of this host's augmented training examples (batched by the iterator),
    and the facts an iterator state must match to be resumed on it.

    `transform` replaces the per-example augmentation (record -> dict of arrays), e.g. DINO's
    multi-crop (`afm_jax.data.multicrop`); the epoch order, host slicing and seeds stay the same.
    The default is `TrainTransform` of `data_cfg.augment` at `image_size`."""
    pi, pc = _process_index_and_count(process_index, process_count)
    local_batch = _local_batch_size(global_batch_size, pc)
    source = records.open_split(
        _get(data_cfg, "path", ""), _get(data_cfg, "train_split", "train"), selection=_get(data_cfg, "selection", None)
    )
    per_host = len(source) // pc  # equal slices (the remainder is dropped), so hosts' epochs stay aligned
    if per_host == 0:
        raise ConfigError(
            f"The training split {_get(data_cfg, 'train_split', 'train')!r} of {source.path} has "
            f"{len(source)} examples, too few for {pc} processes: use a bigger dataset or split "
            "(config keys `data.path`, `data.train_split`, `data.selection`) or fewer processes."
        )
    start, end = pi * per_host, (pi + 1) * per_host
    if transform is None:
        transform = transforms.TrainTransform(transforms.train_chain(_get(data_cfg, "augment", None), image_size))
    ds = HostEpochRecords(source, seed=_derive_seed(seed, 0), start=start, count=end - start)
    ds = ds.random_map(transform, seed=_derive_seed(seed, 1, pi))
    # What decides which examples come next; augmentation and image size may change on resume.
    facts = {
        "seed": int(seed),
        "local_batch_size": local_batch,
        "process_index": pi,
        "process_count": pc,
        "examples": len(source),
    }
    return ds, facts


_TOPOLOGY_FACTS = {"process_index", "process_count", "local_batch_size"}


def _same_global_batch(saved: Mapping[str, Any], now: Mapping[str, Any]) -> bool:
    try:
        return int(saved["local_batch_size"]) * int(saved["process_count"]) == int(now["local_batch_size"]) * int(
            now["process_count"]
        )
    except (KeyError, TypeError, ValueError):
        return False


class TrainIterator(grain.DatasetIterator):
    """Infinite iterator over this host's training batches; its state is the next batch's index.

    Yields {'image': float32 (B_local, S, S, 1), 'label': int32 (B_local,)}. The grain pipeline
    starts on the first `next()` (or `start_prefetch()`), so restoring a fresh iterator is free.
    """

    def __init__(self, examples: grain.MapDataset, facts: dict[str, Any], data_cfg: Any) -> None:
        super().__init__()
        self._dataset, self._facts, self._data_cfg = examples, facts, data_cfg
        self._next_batch = 0
        self._it: grain.DatasetIterator | None = None

    def _inner(self) -> grain.DatasetIterator:
        if self._it is None:
            batch = self._facts["local_batch_size"]
            self._it = _to_iterator(self._dataset[self._next_batch * batch :], batch, self._data_cfg)
        return self._it

    def __next__(self) -> dict[str, np.ndarray]:
        if self._closed:
            raise ValueError("The training iterator is closed; build a new one (or set_state to reopen it).")
        batch = _as_plain_arrays(next(self._inner()))
        self._next_batch += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable: the next batch index and the pipeline facts it is only valid for."""
        return {"version": STATE_VERSION, "next_batch": self._next_batch, **self._facts}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues from `state` (from `get_state`); raises ValueError if the pipeline differs."""
        version = state.get("version") if isinstance(state, Mapping) else None
        if version != STATE_VERSION:
            raise ValueError(
                f"Not a data iterator state of this code (version {version!r}, expected "
                f"{STATE_VERSION}); it was saved by a different input pipeline."
            )
        changed = {k: (state.get(k), v) for k, v in self._facts.items() if state.get(k) != v}
        if changed and set(changed) <= _TOPOLOGY_FACTS and _same_global_batch(state, self._facts):
            # Resumed on another number of processes (e.g. 2 hosts -> 1): the global batch index is
            # still right, so training continues at the same step and epoch position; only the deal of
            # examples to hosts differs, so the rest of this epoch may repeat or skip a few examples.
            logging.getLogger(__name__).warning(
                "Data iterator resumed on %d process(es) from a state saved with %d: same global batch, "
                "continuing at batch %d with a new deal of examples to processes.",
                self._facts["process_count"],
                state.get("process_count"),
                int(state["next_batch"]),
            )
            changed = {}
        if changed:
            detail = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in changed.items())
            raise ConfigError(
                f"Cannot resume the data iterator, the input pipeline changed ({detail}). Resume with "
                "the same data config, seed, batch size and process count, or start a new workdir."
            )
        self.close()  # a running pipeline was positioned for the old state
        self._closed = False
        self._next_batch = int(state["next_batch"])

    def start_prefetch(self) -> None:
        self._inner().start_prefetch()

    def close(self) -> None:
        if self._it is not None:
            self._it.close()
            self._it = None
        super().close()


def build_train_iterator(
    data_cfg: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    seed: int,
    image_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> TrainIterator:
    """The infinite, shuffled, augmented iterator of this host's training batches.

    Each process reads its own slice of the split (`process_index`/`process_count` default to the JAX
    process; tests pass them to simulate hosts) and yields batches of global_batch_size //
    process_count. Deterministic for a seed and independent of `data_cfg.num_workers`;
    checkpointable with `iterator_state` / `restore_iterator_state` (or grain's orbax handler).
    """
    dataset, facts = build_train_dataset(
        data_cfg,
        global_batch_size=global_batch_size,
        seed=seed,
        image_size=image_size,
        process_index=process_index,
        process_count=process_count,
    )
    return TrainIterator(dataset, facts, data_cfg)


def iterator_state(it: grain.DatasetIterator) -> dict[str, Any]:
    """The JSON-serialisable state of a training iterator (save it beside the train state)."""
    return it.get_state()


def restore_iterator_state(it: grain.DatasetIterator, state: dict[str, Any]) -> None:
    """Makes `it` yield exactly the batches an uninterrupted iterator would have yielded after `state`."""
    it.set_state(state)


# ─── Evaluation ──────────────────────────────────────────────────────────────────────────────────


class _PaddedEvalElement(grain.transforms.Map):
    """Local position k -> the eval example at its global position, or a masked-out padding element.

    Host `pi` of `pc` takes rows [pi * b, (pi + 1) * b) of every global batch, so the global batch
    assembled from the hosts' local batches (in process order) is in dataset order.
    """

    def __init__(
        self,
        source: records.RecordSource,
        transform: transforms.EvalTransform,
        batch_size: int,
        local_batch: int,
        process_index: int,
        image_size: int,
    ) -> None:
        self.source, self.transform = source, transform
        self.batch_size, self.local_batch, self.process_index = batch_size, local_batch, process_index
        self.image_size = image_size

    def map(self, k: int) -> dict[str, Any]:
        batch, row = divmod(int(k), self.local_batch)
        g = batch * self.batch_size + self.process_index * self.local_batch + row
        if g < len(self.source):
            return {**self.transform.map(self.source[g]), "mask": np.bool_(True)}
        size = self.image_size
        return {
            "image": np.zeros((size, size, 1), np.float32),
            "label": np.int32(-1),
            "patient_id": "",
            "image_id": "",
            "mask": np.bool_(False),
        }


def _threads_instead_of_workers(data_cfg: Any) -> dict[str, Any]:
    """The eval reading options: as many decoding threads in-process as the config gives workers.

    One deterministic pass does not repay spawning worker processes (seconds per split), and grain's
    worker shutdown after an exhausted pass leaves shared-memory blocks for the resource tracker to
    reclaim at exit (with a warning). PNG decoding releases the GIL, so threads scale.
    """
    workers = int(_get(data_cfg, "num_workers", 0))
    threads = int(_get(data_cfg, "read_threads", 1))
    return {
        "num_workers": 0,
        "read_threads": max(threads, workers * threads, 1),
        "prefetch_buffer_size": _get(data_cfg, "prefetch_buffer_size", 2),
    }


class EvalIterator(Iterator[dict]):
    """One pass over a split in batches; `len()` is the number of batches. Closes itself at the end."""

    def __init__(
        self, dataset: grain.MapDataset, local_batch: int, data_cfg: Any, num_batches: int, num_examples: int
    ) -> None:
        self._dataset, self._local_batch, self._data_cfg = dataset, local_batch, data_cfg
        self.num_batches, self.num_examples = num_batches, num_examples
        self._it: grain.DatasetIterator | None = None
        self._done = 0

    def __len__(self) -> int:
        return self.num_batches

    def __next__(self) -> dict[str, np.ndarray]:
        if self._done >= self.num_batches:
            self.close()
            raise StopIteration
        if self._it is None:
            self._it = _to_iterator(self._dataset, self._local_batch, _threads_instead_of_workers(self._data_cfg))
        batch = _as_plain_arrays(next(self._it))
        self._done += 1
        return batch

    def close(self) -> None:
        if self._it is not None:
            self._it.close()
            self._it = None

    def __del__(self) -> None:
        if getattr(self, "_it", None) is not None:
            self.close()


def build_eval_iterator(
    data_cfg: ml_collections.ConfigDict,
    *,
    split: str,
    batch_size: int,
    image_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> EvalIterator:
    """One deterministic pass over `split`: every example exactly once, in dataset order, no augmentation.

    Yields {'image': float32 (b, S, S, 1), 'label': int32 (b,), 'patient_id': str (b,),
    'image_id': str (b,), 'mask': bool (b,)} with b = batch_size // process_count; the last batch
    is padded (mask False, label -1, empty ids). The selection in `data_cfg` is not applied:
    evaluation always covers the whole split.
    """
    pi, pc = _process_index_and_count(process_index, process_count)
    local_batch = _local_batch_size(batch_size, pc)
    source = records.open_split(_get(data_cfg, "path", ""), split)
    num_batches = math.ceil(len(source) / batch_size)
    element = _PaddedEvalElement(
        source,
        transforms.EvalTransform(transforms.eval_chain(image_size)),
        batch_size,
        local_batch,
        pi,
        int(image_size),
    )
    ds = grain.MapDataset.range(num_batches * local_batch).map(element)
    return EvalIterator(ds, local_batch, data_cfg, num_batches, len(source))


def map_split(
    fn: Callable[[np.ndarray], Any],
    data_cfg: Any,
    *,
    split: str,
    batch_size: int,
    image_size: int,
    keys: Sequence[str] = ("label", "patient_id", "image_id"),
    limit: int | None = None,
    progress: bool = False,
    desc: str = "",
) -> dict[str, np.ndarray]:
    """`fn(images)` over every image of `split` once, in dataset order, on this host (no sharding).

    The one loop behind feature extraction, probe scoring and monitors: returns
    {"output": concatenated fn outputs (padding rows dropped), <key>: the batch column for each of
    `keys`}. `limit` stops after that many images (the first `limit` of the split).
    """
    batches = build_eval_iterator(
        data_cfg, split=split, batch_size=batch_size, image_size=image_size, process_index=0, process_count=1
    )
    cols: dict[str, list] = {"output": [], **{k: [] for k in keys}}
    seen = 0
    try:
        for batch in tqdm(batches, desc=desc or f"[{split}]", disable=not progress, leave=False):
            keep = np.asarray(batch["mask"], bool)
            cols["output"].append(np.asarray(fn(batch["image"]))[keep])
            for k in keys:
                cols[k].append(np.asarray(batch[k])[keep])
            seen += int(keep.sum())
            if limit is not None and seen >= limit:
                break
    finally:
        batches.close()
    out = {k: np.concatenate(v) for k, v in cols.items()}
    if limit is not None:
        out = {k: v[:limit] for k, v in out.items()}
    return out
