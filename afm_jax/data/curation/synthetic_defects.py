"""The synthetic femur set with injected defects of every kind curation should remove, and the truth.

Used by the curation tests, the benchmark and the how-to: clean synthetic patients plus, per kind,
`per_kind` images derived from clean ones (same patient unless stated): blank, over-exposed (dark),
under-exposed (washed out), low contrast, a metal plate, burned-in text, a tiny field of view, exact
duplicates (same pixels, other PNG bytes; one of them filed under another patient), near duplicates
(re-noised, slightly re-scaled copies) and images of another body part (HAND, by metadata).
`truth` maps each injected image_id to the reason curation should give it.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import cv2
import numpy as np

from afm_jax.data import anonymize, records, synthetic

# injected kind -> the primary reason curation should report
EXPECTED_REASON = {
    "blank": "blank",
    "overexposed": "overexposed",
    "underexposed": "underexposed",
    "low_contrast": "low_contrast",
    "metal": "metal",
    "text": "text",
    "tiny_fov": "tiny_fov",
    "exact_duplicate": "exact_duplicate",
    "near_duplicate": "near_duplicate",
    "other_body_part": "metadata:body_part",
}
# the metadata rule that makes "other_body_part" a removal (pass as config.metadata.allow)
FEMUR_ONLY = "body_part=FEMUR"


@dataclasses.dataclass(frozen=True)
class DefectiveDataset:
    path: pathlib.Path
    truth: dict[str, str]  # injected image_id -> expected reason
    origin: dict[str, str]  # injected image_id -> the clean image_id it was made from
    clean_ids: list[str]  # the untouched synthetic images


def _to_unit(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float64) / 65535.0


def _to_u16(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, 0.0, 1.0) * 65535.0).astype(np.uint16)


def _metal_plate(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A lateral plate along the shaft with screw heads, solid white (9% of the image)."""
    s = x.shape[0]
    out = x.copy()
    left = int(s * rng.uniform(0.35, 0.45))
    out[int(0.2 * s) : int(0.8 * s), left : left + max(2, int(0.15 * s))] = 1.0
    for y in np.linspace(0.25, 0.75, 5):
        cv2.circle(out, (left + int(0.07 * s), int(y * s)), max(1, s // 24), 1.0, -1)
    return out


def _burned_text(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Several lines of bright annotation text across the image (portable / supine labels, dates)."""
    s = x.shape[0]
    mask = np.zeros((s, s), np.uint8)
    scale, thick = s / 256.0 * 0.9, max(1, round(s / 256.0 * 2))
    words = ("PORTABLE SUPINE", "AP FEMUR 2 VIEWS", "TECH 07 KV 70", "CR 12:31 MAS 8", "RIGHT", "L")
    line_h = max(8, int(s / 9))
    for k, y in enumerate(range(line_h, s - 2, line_h)):
        cv2.putText(
            mask,
            words[(k + int(rng.integers(6))) % len(words)],
            (2, y),
            cv2.FONT_HERSHEY_SIMPLEX,
            scale,
            255,
            thick,
            cv2.LINE_AA,
        )
    alpha = mask.astype(np.float64) / 255.0
    return x * (1 - alpha) + alpha


def _encode_png(pixels: np.ndarray, compression: int) -> bytes:
    ok, buf = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, compression])
    assert ok
    return buf.tobytes()


def defective_examples(
    num_patients: int, *, seed: int = 0, image_size: int = 64, per_kind: int = 2
) -> tuple[list[dict], dict[str, str], dict[str, str], list[str]]:
    """(records, truth, origin, clean_ids): clean synthetic records plus the injected ones (see module doc)."""
    salt = anonymize.load_salt(allow_demo_salt=True)
    images = list(synthetic.iter_synthetic_images(num_patients, seed=seed, image_size=image_size))
    clean = [synthetic.to_record(img, salt) for img in images]
    rng = np.random.default_rng([seed, 8])
    truth: dict[str, str] = {}
    origin: dict[str, str] = {}
    injected: list[dict] = []

    def add(kind: str, base: dict, k: int, **changes) -> None:
        record = dict(base, **changes)
        record["image_id"] = anonymize.hash_id(f"{base['image_id']}:{kind}:{k}", salt)
        injected.append(record)
        truth[record["image_id"]] = EXPECTED_REASON[kind]
        origin[record["image_id"]] = base["image_id"]

    picks = rng.choice(len(clean), size=(len(EXPECTED_REASON), per_kind), replace=False)
    for row, kind in zip(picks, EXPECTED_REASON):
        for k, i in enumerate(row):
            base, x = clean[i], _to_unit(clean[i]["image"])
            if kind == "blank":
                add(kind, base, k, image=_to_u16(rng.uniform(0.1, 0.9) + rng.normal(0, 0.003, x.shape)))
            elif kind == "overexposed":
                add(kind, base, k, image=_to_u16(x * 0.2))
            elif kind == "underexposed":
                add(kind, base, k, image=_to_u16(0.65 + 0.35 * x))
            elif kind == "low_contrast":
                add(kind, base, k, image=_to_u16(0.35 + 0.08 * x))
            elif kind == "metal":
                add(kind, base, k, image=_to_u16(_metal_plate(x, rng)))
            elif kind == "text":
                add(kind, base, k, image=_to_u16(_burned_text(x, rng)))
            elif kind == "tiny_fov":  # a collimated close-up: centre crop, 0.1 mm pixels over 400 px
                c = x.shape[0] // 4
                crop = cv2.resize(x[c:-c, c:-c], x.shape[::-1], interpolation=cv2.INTER_LINEAR)
                add(
                    kind,
                    base,
                    k,
                    image=_to_u16(crop),
                    pixel_spacing_mm=np.float32([0.1, 0.1]),
                    orig_shape=np.int32([400, 400]),
                )
            elif kind == "exact_duplicate":  # same pixels, other PNG bytes; the first one under another patient
                other = clean[(i + 1) % len(clean)]["patient_id"] if k == 0 else base["patient_id"]
                add(kind, base, k, image=_encode_png(base["image"], 1 + k), patient_id=other)
            elif kind == "near_duplicate":  # re-noised and brightened; every second one also re-sampled
                y = (
                    x
                    if k % 2 == 0
                    else cv2.resize(
                        cv2.resize(x, None, fx=0.75, fy=0.75, interpolation=cv2.INTER_AREA),
                        x.shape[::-1],
                        interpolation=cv2.INTER_LINEAR,
                    )
                )
                add(kind, base, k, image=_to_u16(1.02 * y + rng.normal(0, 0.004, x.shape)))
            elif kind == "other_body_part":
                hand = next(synthetic.iter_synthetic_images(1, seed=seed + 1000 + k, image_size=image_size))
                add(kind, base, k, image=_to_u16(_to_unit(hand.pixels).T), body_part="HAND", view="PA")
    return clean + injected, truth, origin, [r["image_id"] for r in clean]


def build_defective_dataset(
    data_dir: str | os.PathLike,
    *,
    num_patients: int = 30,
    seed: int = 0,
    image_size: int = 64,
    per_kind: int = 2,
    name: str = "synthetic_defects",
    overwrite: bool = False,
) -> DefectiveDataset:
    """Writes the defective set as one `train` split (duplicates stay in one split) and returns it."""
    examples, truth, origin, clean_ids = defective_examples(
        num_patients, seed=seed, image_size=image_size, per_kind=per_kind
    )
    info = {
        "preprocessing": {
            "generator": "afm_jax.data.curation.synthetic_defects",
            "num_patients": num_patients,
            "seed": seed,
            "image_size": image_size,
            "per_kind": per_kind,
        }
    }
    path = records.write_dataset(
        examples, data_dir, name=name, split_fractions={"train": 1.0}, extra_info=info, overwrite=overwrite
    )
    return DefectiveDataset(path, truth, origin, clean_ids)
