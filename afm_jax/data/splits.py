"""Patient-level split assignment: the one home of "which split is this patient in?".

Splits are by patient, never by image, so no patient is in two splits. Three ways to decide, all
deterministic and independent of input order:

* **hash** (`split_of_patient`): a patient's (already salted and hashed) id is hashed to a number in
  [0, 1) and compared with the cumulative fractions. A patient keeps its split when data is added.
* **stratified** (`assign_stratified`): patients are grouped into strata (e.g. their most frequent
  label), ordered within a stratum by a hash, and patient k of n goes to the split whose cumulative
  fraction range holds the position (k + ½)/n: every stratum is split in the requested proportions,
  within one patient.
* **given** (`splits_from_column`): a split per image from the user's CSV, checked to be per patient.

A leaf module: it imports nothing of afm_jax except `errors`, so every dataset builder can use it.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Mapping, Sequence

import numpy as np

from afm_jax.errors import ConfigError

DEFAULT_SPLIT_FRACTIONS: dict[str, float] = {"train": 0.8, "validation": 0.1, "test": 0.1}
SPLIT_MODES = ("stratified", "hash")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_PATIENT_KEY_PREFIX = b"afm-jax split:"


def is_split_name(name: str) -> bool:
    """True for a lower_snake_case split name (train, validation, test, ...)."""
    return bool(_NAME_RE.match(name))


def validate_fractions(split_fractions: Mapping[str, float]) -> dict[str, float]:
    """{split: fraction} as floats after checking they are positive and sum to 1 (ConfigError, a
    ValueError, otherwise)."""
    fractions = {str(k): float(v) for k, v in split_fractions.items()}
    if not fractions:
        raise ConfigError("split_fractions is empty: give e.g. {'train': 0.8, 'validation': 0.1, 'test': 0.1}.")
    bad = [k for k, v in fractions.items() if not (v > 0) or not is_split_name(k)]
    if bad:
        raise ConfigError(
            f"split_fractions {fractions}: splits {bad} need a positive fraction and a lower_snake_case name."
        )
    if not math.isclose(sum(fractions.values()), 1.0, abs_tol=1e-6):
        raise ConfigError(f"split_fractions {fractions} sum to {sum(fractions.values())}, not 1.")
    return fractions


def parse_split_fractions(text: str, option: str = "--splits") -> dict[str, float]:
    """'train=0.8,validation=0.1,test=0.1' -> {split: fraction}, checked (lower_snake_case names,
    positive fractions summing to 1); ConfigError naming `option` otherwise. Shared by the CLIs."""
    try:
        fractions = {k.strip(): float(v) for k, v in (part.split("=") for part in text.split(","))}
        return validate_fractions(fractions)
    except ValueError as e:
        raise ConfigError(
            f"{option} {text!r} must look like train=0.8,validation=0.1,test=0.1 (positive fractions summing to 1): {e}"
        ) from None


def patient_order_key(patient_id: str) -> bytes:
    """SHA-256 of the patient id: the order of patients within a stratum, and the hash mode's number."""
    return hashlib.sha256(_PATIENT_KEY_PREFIX + patient_id.encode("utf-8")).digest()


def split_of_patient(patient_id: str, split_fractions: Mapping[str, float]) -> str:
    """The split of a patient, deterministic from the hashed id only.

    The id is hashed (SHA-256) to a number in [0, 1) that is compared with the cumulative fractions
    of the splits in sorted name order, so the result does not depend on the dict's order.
    """
    fractions = validate_fractions(split_fractions)
    u = int.from_bytes(patient_order_key(patient_id)[:8], "big") / 2.0**64
    cumulative = 0.0
    names = sorted(fractions)
    for name in names:
        cumulative += fractions[name]
        if u < cumulative:
            return name
    return names[-1]  # u within rounding of 1.0


def majority(counts: Mapping[Hashable, int]) -> Hashable:
    """The most frequent key of `counts`; ties go to the smallest key (so the result is order-free)."""
    top = max(counts.values())
    return min(k for k, v in counts.items() if v == top)


def assign_stratified(
    stratum_of: Mapping[str, Hashable],
    fractions: Sequence[tuple[str, float]],
    order_key: Callable[[str], bytes] = patient_order_key,
) -> dict[str, str]:
    """patient -> split: within each stratum, patients ordered by `order_key` and patient k of n given the
    split whose range of cumulative `fractions` (in the order given, not checked) holds (k + ½)/n."""
    names = [name for name, _ in fractions]
    bounds = np.cumsum([fraction for _, fraction in fractions])
    strata: dict[Hashable, list[str]] = defaultdict(list)
    for patient, stratum in stratum_of.items():
        strata[stratum].append(patient)
    out = {}
    for patients in strata.values():
        patients.sort(key=order_key)
        n = len(patients)
        for k, patient in enumerate(patients):
            position = (k + 0.5) / n
            out[patient] = names[min(int(np.searchsorted(bounds, position, side="right")), len(names) - 1)]
    return out


def assign_patient_splits(
    patient_labels: Mapping[str, Counter], fractions: Mapping[str, float], mode: str = "stratified"
) -> dict[str, str]:
    """patient_id -> split. `patient_labels[p]` counts the labels of p's images (-1 = unlabelled).

    `mode="stratified"`: strata are the patients' most frequent label (-1 when unlabelled), splits in
    sorted name order; `mode="hash"`: `split_of_patient`."""
    if mode not in SPLIT_MODES:
        raise ConfigError(f"split mode {mode!r} must be one of {SPLIT_MODES}.")
    fractions = validate_fractions(fractions)
    if mode == "hash":
        return {p: split_of_patient(p, fractions) for p in patient_labels}
    stratum_of = {}
    for patient, counts in patient_labels.items():
        labelled = {k: v for k, v in counts.items() if k >= 0}
        stratum_of[patient] = majority(labelled) if labelled else -1
    return assign_stratified(stratum_of, [(name, fractions[name]) for name in sorted(fractions)])


def splits_from_column(patient_ids: Sequence[str], given: Sequence[str], examples: Sequence[str]) -> dict[str, str]:
    """patient id -> split from a user's per-image split column (ConfigError if a patient is in two
    splits or a name is not lower_snake_case). `examples[i]` names row i in messages (e.g. its path)."""
    bad = sorted({s for s in given if not is_split_name(s)})
    if bad:
        raise ConfigError(f"Split names {bad} must be lower_snake_case (train, validation, test).")
    out: dict[str, str] = {}
    for pid, split, example in zip(patient_ids, given, examples):
        if out.setdefault(pid, split) != split:
            raise ConfigError(
                f"A patient is in two splits ({out[pid]!r} and {split!r}; e.g. {example}). "
                "Splits must be by patient: fix the CSV's split column."
            )
    return out


def fractions_from_counts(patients_per_split: Mapping[str, int]) -> dict[str, float]:
    """{split: share of patients} of the non-empty splits, in sorted name order (for the dataset info of
    datasets whose splits were given rather than drawn)."""
    total = sum(patients_per_split.values())
    return {s: n / total for s, n in sorted(patients_per_split.items()) if n}
