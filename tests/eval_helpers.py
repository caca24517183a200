"""Small evaluation datasets shared by the evaluation tests."""

import os

import numpy as np


def write_brightness_dataset(out, num_patients: int = 80) -> str:
    """`num_patients` patients, one 32×32 image each, whose float `target` is a linear function of the
    image's brightness: target = 20 + 100 · b months (b uniform in [0.1, 0.9]), so a model can read it,
    and whose label is 2 for b > 0.5, else 1 (an easily separable binary label: AFF 2 vs NFF 1).
    Splits train / validation / test = 0.6 / 0.2 / 0.2 of the patients."""
    from afm_jax.data import records

    rng = np.random.default_rng(5)
    examples = []
    for i in range(num_patients):
        b = float(rng.uniform(0.1, 0.9))
        img = np.clip(b + rng.normal(0, 0.02, (32, 32)), 0, 1)
        examples.append(
            dict(
                image=(img * 65535).astype(np.uint16),
                patient_id=f"p{i:03d}",
                image_id=f"p{i:03d}_0",
                label=2 if b > 0.5 else 1,
                target=20.0 + 100.0 * b,
            )
        )
    return os.fspath(
        records.write_dataset(
            examples, out, name="bright", split_fractions={"train": 0.6, "validation": 0.2, "test": 0.2}
        )
    )


def split_targets(path, split) -> dict[str, float]:
    """image_id -> the record's float target, read independently of the code under test."""
    from afm_jax.data import records

    source = records.open_split(path, split)
    return {source[i]["image_id"]: float(source[i]["target"]) for i in range(len(source))}
