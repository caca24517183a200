"""Curation ablation: pretrain MAE on a curated subset vs a random subset of the same size.

The question of issue 8 ("can the most informative images be found automatically?") as one study:
two pretraining arms that differ only in `data.selection` — `tools/curate.py`'s selection vs its
random baseline of the same size from the same split — each with two pretraining seeds, then the
standard downstream comparison (kNN and linear probe, AFF vs NFF and normal vs fractured, patient-level
AUROC with bootstrap CIs and paired tests against the random arm).

Commands (CPU demo size; for the real archive point AFM_ABLATION_DATA at the femur dataset and use a
pretraining config sized for the cluster):
    python -m afm_jax.data.synthetic --out data --num_patients 300 --image_size 128
    python tools/curate.py --data data/synthetic_femur/1.0.0 --out curation_out \\
        --config.selection.target_fraction=0.5
    python tools/study.py configs/studies/curation_ablation.py
Environment: AFM_ABLATION_DATA (dataset version dir), AFM_ABLATION_CURATION (tools/curate.py --out).
Hardware: a laptop CPU (2 cores).
Runtime:  8 min 48 s measured on 2 shared cores: four 300-step MAE pretrainings of a 4-block ViT-Ti/8
          at 64 px (~1.5 min each), features and probes (~1 min), report.
Expected: study_out/curation_ablation/report/index.html with one row per arm × seed × task ×
          protocol. Both arms see the same number of images per step and the same total steps, so a
          difference is the selection's. On the synthetic set (no injected defects, few clusters)
          expect no significant difference — it demonstrates the protocol; the real archive, with
          follow-up duplicates, implants and other body parts, is where curation can matter.
          Measured (test AUROC, patient level, AFF vs NFF linear): curated 0.63 / 0.71 (seeds 0/1),
          random subset 0.63 / 0.78; kNN 0.46 / 0.58 vs 0.50 / 0.44 — no difference beyond seed noise.
"""

import os
import pathlib

from afm_jax.errors import ConfigError
from afm_jax.evaluation.backbones import BackboneSpec
from afm_jax.evaluation.protocols import TaskSpec
from afm_jax.evaluation.study import PretrainSpec, Study, small_mae_overrides

DATA = os.environ.get("AFM_ABLATION_DATA", "data/synthetic_femur/1.0.0")
CURATION = os.environ.get("AFM_ABLATION_CURATION", "curation_out")
IMAGE_SIZE = 64
SEEDS = (0, 1)
ARMS = {"curated": "selection.json", "random_subset": "selection_random.json"}

# One pretraining recipe for every arm; only data.selection and seed differ.
PRETRAIN = {**small_mae_overrides(IMAGE_SIZE, total_steps=300), "data.path": DATA}


def get_study() -> Study:
    missing = [f for f in ARMS.values() if not (pathlib.Path(CURATION) / f).is_file()]
    if missing:
        raise ConfigError(
            f"The curation ablation needs tools/curate.py's output in {CURATION} (missing: "
            f"{', '.join(missing)}); run `python tools/curate.py --data {DATA} --out {CURATION}` "
            "first, or set AFM_ABLATION_CURATION."
        )
    tasks = {
        "aff_vs_nff": TaskSpec("aff_vs_nff", data=DATA, positive_labels=(2,), negative_labels=(1,)),
        "fracture": TaskSpec("fracture", data=DATA, positive_labels=(1, 2), negative_labels=(0,)),
    }
    pretrain, backbones = {}, {}
    for arm, selection in ARMS.items():
        for seed in SEEDS:
            name = f"{arm}_s{seed}"
            pretrain[name] = PretrainSpec(
                config="configs/demo.py",
                overrides={**PRETRAIN, "seed": seed, "data.selection": os.fspath(pathlib.Path(CURATION) / selection)},
            )
            backbones[name] = BackboneSpec("checkpoint", path=f"@{name}", image_size=IMAGE_SIZE, pool="avg")
    return Study(
        name="curation_ablation",
        tasks=tasks,
        pretrain=pretrain,
        backbones=backbones,
        protocols=("knn", "linear"),
        reference="random_subset_s0",
        n_boot=1000,
        overlay_images=0,
        options={"knn": {"k": 20, "temperature": 0.07}},
    )
