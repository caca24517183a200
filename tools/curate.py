"""Curate a dataset: remove bad images and duplicates, then pick a cluster-balanced subset.

Usage: python tools/curate.py --data DATASET --out FOLDER [--embeddings thumbnail|FILE.npz] [--config.KEY=VALUE ...]

Example:
    python tools/curate.py --data /data/femur_std512_v1/1.0.0 --out curation/ \\
        --config.selection.target_size=5000 --config.metadata.allow='body_part=FEMUR,LEG'

Writes into --out: selection.json (use it with --config.data.selection=<out>/selection.json),
selection_random.json (a random subset of the same size, the ablation's baseline), manifest.csv
(every signal, reason, duplicate link and cluster per image), report.json / report.md (counts
removed per reason, cluster sizes before/after, throughput) and contact_sheets/*.png. Every setting
is a `--config.<key>=<value>` override of afm_jax/data/curation/config.py. See docs/curate.md.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags, logging

from afm_jax import cli
from afm_jax.data.curation import config as curation_config
from afm_jax.evaluation.curation_embeddings import curate


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string(
        "data",
        None,
        "Dataset directory (a version dir, <out_dir>/<name> or an <out_dir> with one dataset).",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "out", None, "Output folder for the selection, manifest, report and contact sheets.", flag_values=fv
    )
    flags.DEFINE_string(
        "embeddings",
        "thumbnail",
        "'thumbnail' (model-free baseline), 'backbone:<kind:path,key=value>' (e.g. "
        "backbone:checkpoint:runs/mae,image_size=224), or a .npz (embeddings, image_id) / "
        ".npy (+ .ids.json).",
        flag_values=fv,
    )


TOOL = cli.Tool(
    __doc__,
    define_flags,
    default_config=lambda argv: curation_config.default_config(),
    config_keys_in="afm_jax/data/curation/config.py",
    required=("data", "out"),
)


def work(fv: flags.FlagValues, args: list[str]) -> int:
    logging.set_verbosity(logging.WARNING)
    cli.check_output_dir(fv.out)
    result = curate(fv.data, fv.out, fv.config, embeddings=fv.embeddings)
    s = result.summary
    removed = ", ".join(f"{k} {v}" for k, v in s["removed_by_reason"].items()) or "none"
    print(f"Scanned {s['images']} images ({s['images_per_s']} img/s without embeddings); removed: {removed}.")
    print(f"Selected {s['selected']} images ({s['selected_patients']} patients) -> {result.out_dir / 'selection.json'}")
    print(f"Report: {result.out_dir / 'report.md'} (contact sheets in {result.out_dir / 'contact_sheets'})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(TOOL, work, argv)


if __name__ == "__main__":
    cli.app_main(TOOL, work)
