"""Curate a dataset: remove bad images and duplicates, then pick a cluster-balanced subset.

    python tools/curate.py --data DIR/<name>/<version> --out curation/ [--embeddings thumbnail|FILE.npz]
        [--config.selection.target_size=N] [--config.metadata.allow='body_part=FEMUR,LEG'] ...

Writes into --out: selection.json (use it with --config.data.selection=<out>/selection.json),
selection_random.json (a random subset of the same size, the ablation's baseline), manifest.csv
(every signal, reason, duplicate link and cluster per image), report.json / report.md (counts
removed per reason, cluster sizes before/after, throughput) and contact_sheets/*.png. Every setting
is a `--config.<key>=<value>` override of afm_jax/data/curation/config.py. See docs/curate.md.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # runs from a fresh clone, uninstalled

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from afm_jax.data.curation import config as curation_config  # noqa: E402

_DATA = flags.DEFINE_string("data", None, "Dataset directory (a version dir, <out_dir>/<name> or an <out_dir> with one dataset).")
_OUT = flags.DEFINE_string("out", None, "Output directory for the selection, manifest, report and contact sheets.")
_EMBEDDINGS = flags.DEFINE_string("embeddings", "thumbnail",
                                  "'thumbnail' (model-free baseline), 'backbone:<kind:path,key=value>' (e.g. "
                                  "backbone:checkpoint:runs/mae,image_size=224), or a .npz (embeddings, image_id) / "
                                  ".npy (+ .ids.json).")
flags.mark_flags_as_required(["data", "out"])
_CONFIG: flags.FlagHolder | None = None


def _define_config_flag() -> None:
    """The --config flag; ml_collections applies the --config.* overrides of sys.argv right here."""
    global _CONFIG
    try:
        _CONFIG = config_flags.DEFINE_config_dict("config", curation_config.default_config(), "Curation settings.")
    except (AttributeError, KeyError, ValueError, TypeError) as e:  # unknown key or unparsable value
        from afm_jax.configuration import bad_override_message  # pylint: disable=g-import-not-at-top
        print("error: " + bad_override_message(sys.argv, e, "afm_jax/data/curation/config.py"), file=sys.stderr)
        sys.exit(2)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}. Settings go as --config.key=value.")
    logging.set_verbosity(logging.WARNING)
    from afm_jax.evaluation.curation_embeddings import curate  # pylint: disable=g-import-not-at-top
    from afm_jax.errors import exit_on_user_error

    result = exit_on_user_error(curate, _DATA.value, _OUT.value, _CONFIG.value, embeddings=_EMBEDDINGS.value)
    s = result.summary
    removed = ", ".join(f"{k} {v}" for k, v in s["removed_by_reason"].items()) or "none"
    print(f"Scanned {s['images']} images ({s['images_per_s']} img/s without embeddings); removed: {removed}.")
    print(f"Selected {s['selected']} images ({s['selected_patients']} patients) -> {result.out_dir / 'selection.json'}")
    print(f"Report: {result.out_dir / 'report.md'} (contact sheets in {result.out_dir / 'contact_sheets'})")


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}\nRun with --helpfull for the flags.", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    _define_config_flag()
    app.run(main, flags_parser=_parse_flags)
