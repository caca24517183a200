"""The curation settings: every filter threshold, duplicate rule and sampling choice is config data.

`default_config()` returns an `ml_collections.ConfigDict` that `tools/curate.py` exposes as
`--config.<key>=<value>` overrides, so a curation run is described by data (and saved into its
report), like the training configs. `validate(config)` checks the values before any work, raising
`ConfigError` naming the key.

Thresholds are in the image convention (float in [0, 1], bone bright). An over-exposed film is
*dark* in that convention (too much dose blackens it), an under-exposed one washed out (bright).
"""

from __future__ import annotations

import ml_collections

from afm_jax import configuration
from afm_jax.errors import ConfigError

# The reasons an image is removed for, in priority order: an image failing several filters is
# counted under the first (its "primary" reason); the manifest lists all of them.
QUALITY_REASONS = ("blank", "underexposed", "overexposed", "saturated", "low_contrast", "metal", "text", "tiny_fov")
DUPLICATE_REASONS = ("exact_duplicate", "near_duplicate", "embedding_duplicate")
METADATA_PREFIX = "metadata:"  # metadata reasons are "metadata:<field>"


def default_config() -> ml_collections.ConfigDict:
    """The curation config with its defaults (sized for processed femur radiographs)."""
    return ml_collections.ConfigDict(
        dict(
            splits="train",  # comma-separated splits to curate (the selection lists their ids)
            threads=2,  # decoding threads of the quality pass
            work_size=128,  # quality signals are computed on an area-downsampled copy of this long side
            quality=ml_collections.ConfigDict(
                dict(
                    blank_max_std=0.01,  # blank / near-constant: pixel std below this
                    underexposed_min_p05=0.5,  # washed out: even the 5th percentile is brighter than this
                    overexposed_max_p95=0.25,  # too dark: even the 95th percentile is darker than this
                    saturated_max_bright_fraction=0.25,  # more than this fraction of pixels >= 0.98 (clipped white)
                    low_contrast_max_range=0.15,  # 99th minus 1st percentile below this
                    metal_max_fraction=0.04,  # solid white (>= 0.98, survives an opening) area above this
                    text_max_fraction=0.03,  # thin bright strokes (white top-hat > 0.35) area above this
                    tiny_fov_min_mm=60.0,  # field of view (short side, mm) below this; unknown spacing passes
                    disable="",  # comma-separated reasons to switch off, e.g. "metal,text"
                )
            ),
            metadata=ml_collections.ConfigDict(
                dict(
                    # "field=A,B;field2=C": keep only records whose field equals one of the values (case-insensitive).
                    # Empty or missing fields pass. E.g. "body_part=FEMUR,LEG,HIP,LOWER_LIMB".
                    allow="",
                    # "field=A,B;...": remove records whose field *contains* one of the values (case-insensitive).
                    deny="image_type=LOCALIZER;series_description=SCOUT,LOCALIZER,TOPOGRAM",
                )
            ),
            duplicates=ml_collections.ConfigDict(
                dict(
                    scope="all",  # "all": within and across patients; "patient": within a patient only
                    phash_max_distance=12,  # near duplicate: perceptual hashes (256 bit) differ in at most this many bits
                    # embedding duplicate: cosine at least this (backbone-specific; <= 0 or > 1: off). Not run on
                    # "thumbnail" embeddings: 16x16 thumbnails of distinct femurs reach 0.99 (pHash covers pixel copies).
                    embedding_min_cosine=0.99,
                )
            ),
            clustering=ml_collections.ConfigDict(
                dict(
                    levels=(32, 8),  # clusters per level of the hierarchical k-means, finest first
                    niter=20,  # k-means iterations per level
                    min_points_per_cluster=4,  # a level gets at most n / this clusters (small datasets)
                    seed=0,
                )
            ),
            selection=ml_collections.ConfigDict(
                dict(
                    target_size=0,  # images to select; 0 = all that survive the filters and dedup
                    target_fraction=0.0,  # or a fraction of the curated split(s) (used when target_size = 0)
                    max_per_patient=0,  # per-patient cap on selected images; 0 = no cap
                    within_cluster="random",  # order inside a leaf cluster: "random" or "centroid" (closest first)
                    seed=0,
                    random_baseline=True,  # also write selection_random.json: a uniform random subset of the same size
                )
            ),
            retrieval=ml_collections.ConfigDict(
                dict(
                    seed_ids="",  # JSON list of image_ids to retrieve toward (e.g. known AFF cases)
                    seed_label=-1,  # or: every image of the split with this label is a seed (-1 = none)
                    neighbours=8,  # nearest neighbours taken per seed (before balanced sampling)
                    min_cosine=0.0,  # and only neighbours at least this similar
                    max_fraction=0.25,  # at most this fraction of the target comes from retrieval (rest: balanced)
                )
            ),
            report=ml_collections.ConfigDict(
                dict(
                    sheet_images=36,  # thumbnails per contact sheet
                    thumb_size=96,  # thumbnail side in pixels
                    max_cluster_sheets=16,  # contact sheets for at most this many top-level clusters
                )
            ),
        )
    )


def csv_items(value: str) -> list[str]:
    """ "a, b,,c" -> ["a", "b", "c"]."""
    return [v.strip() for v in str(value or "").split(",") if v.strip()]


def parse_field_rules(spec: str, key: str) -> dict[str, list[str]]:
    """ "field=A,B;field2=C" -> {"field": ["A", "B"], "field2": ["C"]} (values upper-cased)."""
    rules: dict[str, list[str]] = {}
    for part in str(spec or "").split(";"):
        if not part.strip():
            continue
        field, sep, values = part.partition("=")
        if not sep or not field.strip() or not csv_items(values):
            raise ConfigError(
                f"Config key `{key}` = {spec!r} is invalid: expected 'field=A,B;field2=C' "
                f"(got the part {part!r}). Fix it with --config.{key}=..."
            )
        rules.setdefault(field.strip(), []).extend(v.upper() for v in csv_items(values))
    return rules


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks every value before any work; raises ConfigError naming the key and what to do."""
    req = configuration.require
    req(config, "splits", lambda v: bool(csv_items(v)), "one or more split names, comma-separated")
    req(config, "threads", lambda v: int(v) >= 1, "a thread count >= 1")
    req(config, "work_size", lambda v: int(v) >= 32, "a size >= 32 pixels")
    for name in (
        "blank_max_std",
        "underexposed_min_p05",
        "overexposed_max_p95",
        "saturated_max_bright_fraction",
        "low_contrast_max_range",
        "metal_max_fraction",
        "text_max_fraction",
    ):
        req(config, f"quality.{name}", lambda v: 0.0 <= float(v) <= 1.0, "a number in [0, 1]")
    req(config, "quality.tiny_fov_min_mm", lambda v: float(v) >= 0.0, "a length in mm >= 0 (0 = off)")
    req(
        config,
        "quality.disable",
        lambda v: set(csv_items(v)) <= set(QUALITY_REASONS),
        f"a comma-separated subset of {', '.join(QUALITY_REASONS)}",
    )
    parse_field_rules(config.metadata.allow, "metadata.allow")
    parse_field_rules(config.metadata.deny, "metadata.deny")
    configuration.require_choice(config, "duplicates.scope", ("all", "patient"))
    req(
        config,
        "duplicates.phash_max_distance",
        lambda v: -1 <= int(v) <= 64,
        "a bit count in [0, 64] of the 256-bit hash (-1 = off)",
    )
    req(
        config,
        "duplicates.embedding_min_cosine",
        lambda v: -1.0 <= float(v) <= 2.0,
        "a cosine in (0, 1] (<= 0 or > 1 switches embedding dedup off)",
    )
    req(
        config,
        "clustering.levels",
        lambda v: len(v) >= 1 and all(int(k) >= 1 for k in v) and all(int(a) >= int(b) for a, b in zip(v, v[1:])),
        "a tuple of cluster counts per level, finest first and non-increasing, e.g. (32, 8)",
    )
    req(config, "clustering.niter", lambda v: int(v) >= 1, "an iteration count >= 1")
    req(config, "clustering.min_points_per_cluster", lambda v: int(v) >= 1, "a count >= 1")
    req(config, "selection.target_size", lambda v: int(v) >= 0, "an image count >= 0 (0 = keep all survivors)")
    req(config, "selection.target_fraction", lambda v: 0.0 <= float(v) <= 1.0, "a fraction in [0, 1]")
    req(config, "selection.max_per_patient", lambda v: int(v) >= 0, "a count >= 0 (0 = no cap)")
    configuration.require_choice(config, "selection.within_cluster", ("random", "centroid"))
    req(config, "retrieval.neighbours", lambda v: int(v) >= 0, "a count >= 0")
    req(config, "retrieval.min_cosine", lambda v: -1.0 <= float(v) <= 1.0, "a cosine in [-1, 1]")
    req(config, "retrieval.max_fraction", lambda v: 0.0 <= float(v) <= 1.0, "a fraction of the target in [0, 1]")
    req(config, "report.sheet_images", lambda v: 1 <= int(v) <= 400, "a count in [1, 400]")
    req(config, "report.thumb_size", lambda v: 16 <= int(v) <= 512, "a size in [16, 512] pixels")
    req(config, "report.max_cluster_sheets", lambda v: int(v) >= 0, "a count >= 0")
