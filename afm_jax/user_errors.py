"""The exceptions that mean "the user must change something": shown as a message, never a traceback."""

from __future__ import annotations

from afm_jax.configuration import ConfigError
from afm_jax.data.anonymize import MissingSaltError
from afm_jax.data.records import DatasetNotFoundError
from afm_jax.train.loop import TrainingDivergedError

# FileExistsError: an output that would be overwritten (a dataset, an export) — the message says where.
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, DatasetNotFoundError, MissingSaltError,
                                            TrainingDivergedError, FileExistsError)
