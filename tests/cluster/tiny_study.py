"""A tiny study for the SLURM test: one MAE pretraining (a few steps) vs its random init, kNN on AFF vs NFF.

Command:  python tools/study.py tests/cluster/tiny_study.py --out DIR     (or --slurm, see test_slurm.py)
Hardware: one CPU core. Runtime: ~1 min. Expected: DIR/report/index.md with 2 rows; numbers are noise.
"""

from afm_jax.evaluation.backbones import BackboneSpec
from afm_jax.evaluation.protocols import TaskSpec
from afm_jax.evaluation.study import PretrainSpec, Study

IMAGE_SIZE = 32


def get_study() -> Study:
    femur = TaskSpec(
        "aff_vs_nff",
        synthetic=dict(num_patients=160, image_size=64, seed=0),
        positive_labels=(2,),
        negative_labels=(1,),
        unit="patient",
        aggregate="mean",
    )
    mae = PretrainSpec(
        config="configs/demo.py",
        data_task="aff_vs_nff",
        overrides={
            "model.variant": "mu/8",
            "model.depth": 2,
            "image_size": IMAGE_SIZE,
            "batch_size": 8,
            "total_steps": 1000,  # a few seconds: long enough to signal the SLURM job mid-run
            "mae.decoder_dim": 32,
            "mae.decoder_depth": 1,
            "mae.decoder_heads": 2,
            "data.num_workers": 0,
            "probe.enabled": False,
            "image_every": 0,
            "checkpoint_every": 1000,
            "log_every": 50,
            "data.synthetic.enabled": False,
        },
    )
    return Study(
        name="tiny",
        tasks={"aff_vs_nff": femur},
        pretrain={"mae": mae},
        backbones={
            "mae": BackboneSpec("checkpoint", path="@mae", image_size=IMAGE_SIZE, pool="avg"),
            "random_init": BackboneSpec("random_init", path="@mae", image_size=IMAGE_SIZE, pool="avg"),
        },
        protocols=("knn",),
        seeds=(0,),
        fractions=(1.0,),
        options={"knn": {"k": 5, "temperature": 0.07}},
        n_boot=50,
        overlay_images=2,
    )
