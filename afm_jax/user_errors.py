"""The exceptions that mean "the user must change something": shown as a message, never a traceback."""

from __future__ import annotations

import sys
from typing import Any, Callable, TypeVar

from afm_jax.configuration import ConfigError
from afm_jax.data.anonymize import MissingSaltError
from afm_jax.data.records import DatasetNotFoundError
from afm_jax.train.loop import TrainingDivergedError

# FileExistsError: an output that would be overwritten (a dataset, an export) — the message says where.
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, DatasetNotFoundError, MissingSaltError,
                                            TrainingDivergedError, FileExistsError)

T = TypeVar("T")


def exit_on_user_error(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Runs `fn`; a user mistake (USER_ERRORS) becomes `error: <message>` on stderr and exit status 2,
    so command-line tools never show a traceback for something the user must change."""
    try:
        return fn(*args, **kwargs)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
