"""The converter's input list: folder trees and CSV files -> one ordered list of files with labels.

Why a fixed order matters: the list is cut into fixed-size chunks (the unit of work, of resume and of
`--shard i/n`), so every process — a worker, a SLURM array task, a rerun after a kill — must see the
same list. Files are listed per input in sorted relative-path order; inputs keep the order given.

* A folder is walked recursively; every entry that is not a folder is an input (extension or not;
  non-DICOM files, dangling symbolic links, FIFOs and links to folders are reported by the converter,
  not silently dropped).
* A CSV file (`*.csv`) lists files in a `path` column (relative to the CSV's folder or absolute),
  with an optional `label` or `label_name` column.
* `labels_csv` (same columns) attaches labels to files found in folders.

File identities in outputs are salted hashes of `<input number>/<relative path>`: paths often
contain patient IDs or names, so they never reach the manifest. `locate` maps ids back to paths for
someone who has the archive and the salt.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
import pathlib
from collections.abc import Iterable, Sequence

from afm_jax.data import anonymize
from afm_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class InputFile:
    """One input file: its position in the ordered list, where it is, and its label (if any)."""

    index: int
    root: int  # which input (folder or CSV) it came from
    relpath: str  # relative to that input's folder (as given, for absolute CSV entries)
    path: str  # absolute
    label_name: str = ""

    def file_id(self, salt: bytes) -> str:
        return anonymize.hash_id(f"{self.root}/{self.relpath}", salt)


def _read_label_csv(csv_path: pathlib.Path) -> list[tuple[str, str]]:
    """(path, label_name) rows of a CSV with a `path` column and optional `label`/`label_name`."""
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        fields = [c.strip().lower() for c in (reader.fieldnames or [])]
        if "path" not in fields:
            raise ConfigError(
                f"CSV {csv_path} needs a `path` column (and optionally `label`); its columns are {reader.fieldnames}."
            )
        label_key = next((k for k in ("label", "label_name") if k in fields), None)
        rows = []
        for raw in reader:
            row = {k.strip().lower(): (v or "").strip() for k, v in raw.items() if k is not None}
            if row.get("path"):
                rows.append((row["path"], row.get(label_key, "") if label_key else ""))
    return rows


def _walk(root: pathlib.Path) -> list[str]:
    """Every entry below `root` except folders: files, symbolic links (dangling ones too), FIFOs, ...,
    and symbolic links to folders (not followed: cycles) — so that each gets its manifest row."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        linked = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for name in sorted(filenames + linked):
            found.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    return sorted(found)


def list_inputs(
    inputs: Sequence[str | os.PathLike],
    labels_csv: str | os.PathLike | None = None,
    *,
    exclude: Iterable[str | os.PathLike] = (),
) -> list[InputFile]:
    """The ordered input list. Raises ConfigError for a missing input, an empty list or a bad CSV.

    `exclude`: folders to leave out (the output directory, when it lies inside an input tree)."""
    if not inputs:
        raise ConfigError("No input given: pass one or more folders and/or CSV files with --input.")
    excluded = [pathlib.Path(e).expanduser().resolve() for e in exclude]
    labels: dict[str, str] = {}
    if labels_csv:
        lpath = pathlib.Path(labels_csv).expanduser().resolve()
        if not lpath.is_file():
            raise ConfigError(f"Labels CSV {lpath} does not exist (option --labels).")
        for path, label in _read_label_csv(lpath):
            labels[str((lpath.parent / path).resolve())] = label
    files: list[InputFile] = []
    for root_index, given in enumerate(inputs):
        p = pathlib.Path(given).expanduser().resolve()
        if p.is_dir():
            entries = [(rel, str(p / rel), "") for rel in _walk(p)]
        elif p.is_file() and p.suffix.lower() == ".csv":
            seen: set[str] = set()
            entries = []
            for path, label in _read_label_csv(p):
                full = str((p.parent / path).resolve())
                if full not in seen:
                    seen.add(full)
                    entries.append((path, full, label))
        elif p.is_file():
            entries = [(p.name, str(p), "")]
        else:
            raise ConfigError(
                f"Input {p} does not exist: give folders of DICOM files or CSV files with a `path` column."
            )
        for rel, full, label in entries:
            if any(_is_within(full, e) for e in excluded):
                continue
            files.append(InputFile(len(files), root_index, rel, full, label or labels.get(full, "")))
    if not files:
        raise ConfigError(f"The inputs {[str(i) for i in inputs]} hold no files.")
    return files


def _is_within(path: str, folder: pathlib.Path) -> bool:
    try:
        pathlib.Path(path).relative_to(folder)
        return True
    except ValueError:
        return False


def label_ids(files: Sequence[InputFile], label_names: Sequence[str] | None = None) -> dict[str, int]:
    """label_name -> int: the order of `label_names` if given, else sorted names found. Raises
    ConfigError for a label not in `label_names`."""
    found = sorted({f.label_name for f in files if f.label_name})
    if label_names:
        names = list(label_names)
        unknown = sorted(set(found) - set(names))
        if unknown:
            raise ConfigError(f"Labels {unknown} are not among --label_names {names}; add them or fix the CSV.")
    else:
        names = found
    return {name: i for i, name in enumerate(names)}


def inputs_fingerprint(files: Sequence[InputFile]) -> str:
    """SHA-256 over (input, relative path, size, label) of every file: changes if the input list does."""
    h = hashlib.sha256()
    for f in files:
        try:
            size = os.path.getsize(f.path)
        except OSError:
            size = -1
        h.update(f"{f.root}\x00{f.relpath}\x00{size}\x00{f.label_name}\n".encode())
    return h.hexdigest()


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n), 0 <= i < n. Also accepts SLURM's variables via the caller."""
    try:
        i_text, n_text = text.split("/")
        i, n = int(i_text), int(n_text)
    except ValueError:
        raise ConfigError(f"--shard {text!r} must look like i/n (e.g. 3/16, 0-based).") from None
    if not (n >= 1 and 0 <= i < n):
        raise ConfigError(f"--shard {text!r}: need 0 <= i < n.")
    return i, n


def chunk_ranges(num_files: int, chunk_size: int) -> list[range]:
    """Consecutive file-index ranges of at most `chunk_size` files."""
    return [range(s, min(s + chunk_size, num_files)) for s in range(0, num_files, chunk_size)]


def chunks_of_shard(num_chunks: int, shard: tuple[int, int]) -> list[int]:
    """Chunk numbers a shard converts: chunk c belongs to shard c mod n (balanced, deterministic)."""
    i, n = shard
    return list(range(i, num_chunks, n))


def locate(files: Sequence[InputFile], file_ids: Iterable[str], salt: bytes) -> dict[str, str]:
    """file_id (from a manifest) -> path, for the ids found among `files`."""
    wanted = set(file_ids)
    return {fid: f.path for f in files if (fid := f.file_id(salt)) in wanted}
