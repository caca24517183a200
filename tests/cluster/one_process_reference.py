"""The 1-process twin of a 2-process job: one process, 2 CPU devices, fed both hosts' batches side by side.

    python tests/cluster/one_process_reference.py CONFIG WORKDIR TOTAL_STEPS

In a 2-process job host i reads its own slice of each epoch (`process_index=i`) and its rows fill
device i of the global batch; here one process builds both hosts' iterators and concatenates them, so
every step sees the same global batch on the same (data=2) mesh. The final parameters must then
equal the 2-process job's (tests/cluster/test_slurm.py compares them).
"""

import importlib.util
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import grain  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from afm_jax.data import pipeline  # noqa: E402
from afm_jax.data.synthetic import prepare_dataset  # noqa: E402
from afm_jax.train import loop  # noqa: E402
from afm_jax.train.tasks import get_task  # noqa: E402


class TwoHosts(grain.DatasetIterator):
    """Batches of hosts 0 and 1 of a 2-process job, concatenated (host 0's rows first)."""

    def __init__(self, iterators):
        super().__init__()
        self._iterators = iterators

    def __next__(self):
        parts = [next(it) for it in self._iterators]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self):
        return self._iterators[0].get_state()

    def set_state(self, state):
        raise NotImplementedError("the reference run never resumes")

    def close(self):
        for it in self._iterators:
            it.close()


def main(config_file: str, workdir: str, total_steps: int) -> None:
    spec = importlib.util.spec_from_file_location("config", config_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.total_steps = total_steps
    prepare_dataset(config, workdir)
    task = get_task(config.task)
    task.build_train_iterator = lambda c: TwoHosts(
        [
            pipeline.build_train_iterator(
                c.data,
                global_batch_size=c.batch_size,
                seed=c.seed,
                image_size=c.image_size,
                process_index=i,
                process_count=2,
            )
            for i in range(2)
        ]
    )
    result = loop.train(config, workdir, task)
    assert result.finished and result.step == total_steps, result.step


if __name__ == "__main__":
    flags.FLAGS.mark_as_parsed()
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
