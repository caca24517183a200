"""Salted hashing of identifiers, so no raw patient ID or UID reaches a record, log or report.

The salt is a secret the user provides (environment variable or a file they name); it is never
written into any output. Hashes are HMAC-SHA256, truncated to 16 hex digits (64 bits): enough to
make collisions negligible at 10^6 patients and short enough to read in a manifest.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from afm_jax.errors import MissingSaltError

SALT_ENV_VAR = "AFM_SALT"
SALT_FILE_ENV_VAR = "AFM_SALT_FILE"
# Only for the embedded synthetic data, whose identifiers are fake anyway.
SYNTHETIC_DEMO_SALT = b"afm-jax synthetic demo salt (not a secret)"


def load_salt(salt_file: str | os.PathLike | None = None, *, allow_demo_salt: bool = False) -> bytes:
    """Returns the hashing salt from `salt_file`, $AFM_SALT_FILE or $AFM_SALT (in that order).

    `allow_demo_salt` is for synthetic data only: it falls back to a fixed public salt.
    """
    path = salt_file or os.environ.get(SALT_FILE_ENV_VAR)
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise MissingSaltError(
                f"Salt file {p} does not exist. Create it with a long random secret, "
                f"e.g. `python -c 'import secrets; print(secrets.token_hex(32))' > {p}`."
            )
        salt = p.read_bytes().strip()
        if not salt:
            raise MissingSaltError(f"Salt file {p} is empty.")
        return salt
    env = os.environ.get(SALT_ENV_VAR)
    if env:
        return env.encode()
    if allow_demo_salt:
        return SYNTHETIC_DEMO_SALT
    raise MissingSaltError(
        f"No hashing salt: set ${SALT_ENV_VAR} or ${SALT_FILE_ENV_VAR}, or pass a salt file. Patient IDs "
        "and UIDs are hashed with it; keep it secret and keep it the same for every dataset you want to "
        "link (the same patient must get the same hash across datasets)."
    )


def hash_id(raw: str, salt: bytes) -> str:
    """Salted, one-way hash of an identifier (HMAC-SHA256, first 16 hex digits)."""
    if not salt:
        raise MissingSaltError("Empty salt.")
    return hmac.new(salt, raw.strip().encode("utf-8"), hashlib.sha256).hexdigest()[:16]
