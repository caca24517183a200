"""Every exception of afm_jax that means "the user must change something", in one place.

What: one base class, `UserError`, and its kinds. Command-line tools and `python -m afm_jax.main`
run their work through `exit_on_user_error`, which turns any `UserError` into one paragraph on
stderr and exit status 2 instead of a traceback. Why one module: a leaf that imports nothing of
afm_jax, so every layer (and every worker process) can raise these without importing the trainer.

Each class also derives from the builtin it refines (ValueError, FileNotFoundError, ...), so code
that catches the builtin keeps working.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, TypeVar


class UserError(Exception):
    """A mistake the user can fix (a config value, a path, a file); the message says what to do."""


class ConfigError(UserError, ValueError):
    """A config value is missing or invalid; the message names the key and what to do."""


class DatasetNotFoundError(UserError, FileNotFoundError):
    """The dataset path or split does not exist; the message says how to make one."""


class MissingSaltError(UserError, RuntimeError):
    """Real identifiers would be hashed without a user-provided salt."""


class TrainingDivergedError(UserError, FloatingPointError):
    """The loss became NaN/inf: a config problem (learning rate, clipping) the user must change."""


class CheckpointError(UserError, RuntimeError):
    """No checkpoint of a workdir can be restored, or saving one failed (e.g. a full disk); the
    message names the step, the reason and what is still intact."""


class OutOfSpaceError(UserError, OSError):
    """The disk (or quota) is full while a run writes its logs or outputs; the message says where."""


class StoppedBeforeFinishingError(UserError, RuntimeError):
    """A training run inside a larger job (a study's pretraining or fine-tuning) was stopped by a signal
    (time limit, preemption) after saving its checkpoint; the job must be rerun to resume it. Nothing
    computed from the unfinished run is kept."""


class LockedError(UserError, RuntimeError):
    """A folder is in use by another run (its lock file names the holder: host, pid, start time)."""


class InteropError(ConfigError):
    """Weights that do not fit the model the config describes, or a file that is not a ViT state dict."""


class UnreadableImageError(ConfigError):
    """With strict=True: a listed image file does not decode (the message names it and the reason)."""


class IncompleteConversionError(ConfigError):
    """Some conversion chunks are not done yet; the message says which and what to run."""


class NothingConvertedError(ConfigError):
    """No input file was converted (wrong folder, or every file skipped/failed); the manifest says why."""


class DecodeError(ValueError):
    """One DICOM file cannot be turned into an image. Not a user error: the converter records it as
    that file's `failed:<reason>` manifest row and goes on with the next file."""


class TruncatedFileError(DecodeError):
    """The file ends before its pixel data does (or before the Pixel Data element)."""


class DecoderCrashError(DecodeError):
    """The child process decoding one file died (abort, segfault, killed for memory)."""


class DecodeTimeoutError(DecodeError):
    """Decoding one file took longer than the per-file time limit; its child process was stopped."""


T = TypeVar("T")


def user_error_message(error: BaseException) -> str:
    """The one-paragraph text shown for a user error (`error: ...`)."""
    return f"error: {error}"


def exit_on_user_error(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Runs `fn`; a `UserError` (or FileExistsError: an output that would be overwritten, the message
    says where) becomes `error: <message>` on stderr and exit status 2."""
    try:
        return fn(*args, **kwargs)
    except (UserError, FileExistsError) as e:
        print(user_error_message(e), file=sys.stderr)
        sys.exit(2)
