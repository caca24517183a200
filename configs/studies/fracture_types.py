"""Every task kind on the synthetic femurs: AFF vs NFF (binary), fracture type normal / NFF / AFF
(three classes), and a regression-style target, with low-shot fractions and two seeds.

Command:  python tools/study.py configs/studies/fracture_types.py      (output in study_out/fracture_types/)
Hardware: a laptop CPU (sized for 2 cores).
Runtime:  measured 2 min 5 s (125 s wall, 133 s CPU, 1.5 GB peak memory) on the shared 2-core
          machine, load average 0.4 at the start and 3.0 at the end (commit after f79be0e): render 300
          synthetic patients at 128 px (~15 s), a 200-step MAE pretraining of a 4-block ViT-Ti/8 at 64 px
          (~55 s), one forward pass per backbone × split (features cached, shared by all tasks,
          fractions and seeds), 36 kNN + linear runs with 300 bootstrap replicates each (~85 s), report.
          The 12 min measured earlier was the same config on the machine while several other jobs ran
          (a trial with 96 px synthetic images, started at load average 10, took 2 min 8 s but lost
          most of the signal, so the 128 px / 200-step recipe is kept).
Tasks:
  aff_vs_nff      binary, patient level (labels 2 vs 1), AUROC etc. at the validation Youden point.
  fracture_type   three classes normal (0) / NFF (1) / AFF (2), patient level: accuracy, balanced
                  accuracy, macro-F1, macro one-vs-rest AUROC, per-class sensitivity/specificity,
                  confusion matrices with the class names.
  field_of_view   regression of the radiograph's field-of-view width in mm (pixel spacing × columns,
                  `protocols.DERIVED_TARGETS["field_of_view_mm"]`): the synthetic generator records no
                  continuous clinical quantity (no age, no cortical thickness), but each image's
                  magnification (0.85–1.15, field 240 mm / magnification) is recorded in its pixel spacing
                  and is visible as the femur's apparent size. Image level (each image has its own
                  magnification); MAE in mm, RMSE, R², Pearson r, Bland–Altman plots.
Expected: study_out/fracture_types/report/index.html, opening with the summary (warnings: 29 AFF/NFF
          and 38 test patients < 50, 16 negative AFF/NFF test patients < 20; the forest plot; low-shot curves over
          25% / 100% of the training patients with the range over seeds 0 and 1; paired differences with
          `random_init` pooled over seeds), then one table per task kind, per-seed comparisons, figures,
          overlays of the probe's TP/FP/FN, predictions.csv. Measured in the run above (linear probe, all
          training patients, seed 0; 95% CIs over patients):
            aff_vs_nff     AUROC        mae 0.64 [0.45, 0.86]   random_init 0.47 [0.21, 0.71]
            fracture_type  macro AUROC  mae 0.53 [0.39, 0.64]   random_init 0.57 [0.40, 0.70]
            field_of_view  MAE (mm)     mae 22.0 [18.6, 26.4]   random_init 20.9 [17.9, 24.5]
          (an earlier version of this file recorded AUROC 0.81 / 0.72, macro AUROC 0.62 / 0.72 and MAE
          12.7 / 13.1 mm: measured with the previous synthetic generator, before the radiograph-like
          femurs of afm_jax/data/synthetic.py, whose fractures are subtler and framings more varied.)
          No pooled paired difference excludes 0: at this CPU budget the study shows the machinery
          for every task kind, not MAE's value.
"""

from afm_jax.evaluation.backbones import BackboneSpec
from afm_jax.evaluation.protocols import TaskSpec
from afm_jax.evaluation.study import PretrainSpec, Study, small_mae_overrides

IMAGE_SIZE = 64
SYNTHETIC = dict(num_patients=300, image_size=128, seed=0)


def get_study() -> Study:
    tasks = {
        "aff_vs_nff": TaskSpec(
            "aff_vs_nff",
            synthetic=SYNTHETIC,
            positive_labels=(2,),
            negative_labels=(1,),
            class_names=("NFF", "AFF"),
            unit="patient",
        ),
        "fracture_type": TaskSpec(
            "fracture_type",
            synthetic=SYNTHETIC,
            kind="multiclass",
            classes=((0,), (1,), (2,)),
            class_names=("normal", "NFF", "AFF"),
            unit="patient",
        ),
        "field_of_view": TaskSpec(
            "field_of_view",
            synthetic=SYNTHETIC,
            kind="regression",
            target="field_of_view_mm",
            target_unit="mm",
            unit="image",
        ),
    }
    mae = PretrainSpec(
        config="configs/demo.py",
        data_task="aff_vs_nff",
        overrides=small_mae_overrides(IMAGE_SIZE, total_steps=200),
    )
    study = Study(
        name="fracture_types",
        tasks=tasks,
        pretrain={"mae": mae},
        backbones={
            "random_init": BackboneSpec("random_init", path="@mae", image_size=IMAGE_SIZE, pool="avg"),
            "mae": BackboneSpec("checkpoint", path="@mae", image_size=IMAGE_SIZE, pool="avg"),
        },
        reference="random_init",
        protocols=("knn", "linear"),
        seeds=(0, 1),
        fractions=(0.25, 1.0),
        options={"knn": {"k": 20, "temperature": 0.07}},
        n_boot=300,
        overlay_images=4,
    )
    # kNN and the probe are deterministic on all training patients, so seed 1 would repeat seed 0 at
    # fraction 1 (only the bootstrap draw would differ): seeds are run where they matter, in low-shot.
    study.runs = [r for r in study.all_runs() if r.fraction < 1.0 or r.seed == 0]
    return study
