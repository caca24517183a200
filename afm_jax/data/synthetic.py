"""Embedded demo data: deterministic procedural femur radiographs, and a DICOM writer for them.

Why: the real femur data (~500k DICOMs) is private, yet every part of the pipeline — DICOM
conversion, records, pretraining, probing, curation — needs realistic input in tests and in the
demo. This module draws synthetic patients whose radiographs carry the signs that define the
three classes, so that a small self-supervised ViT has something real to learn:

* ``normal``: an intact femur.
* ``nff`` (normal femoral fracture): an oblique, spiral or comminuted shaft fracture, with the
  distal fragment displaced (shift, shortening, angulation) and, if comminuted, loose fragments.
* ``aff`` (atypical femoral fracture): a transverse line that starts at the lateral cortex and runs
  part way or fully across, focal lateral cortical thickening ("beaking") at the line, an optional
  medial spike, no comminution and no displacement.

How: each image is a projection of an analytic 3-D-ish model. Bone and soft tissue contribute
path lengths (hollow cylinder for the shaft with cortex and medullary canal, ellipsoids and a
capsule for head, neck and trochanters, an elliptic cylinder for the thigh), which are turned
into a processed radiograph (``1 - exp(-k A)``, gamma, unsharp mask, noise) and stored as uint16,
bone bright (MONOCHROME2 sense). Fractures cut the bone into rigid fragments evaluated in their
own (undisplaced) coordinates. Everything is vectorised numpy/cv2 (~20 ms per 256² image).

Randomness is layered so that class signs are the *only* class-dependent part:

* patient level (``default_rng([seed, i, 0])``): anatomy, laterality, number of images, fake
  identifiers, fracture shape (its own stream, shared by all images of the patient);
* image level (``default_rng([seed, i, j, 1])``): pose, magnification, exposure, contrast,
  noise, side marker — drawn identically whatever the class;
* labels follow a low-discrepancy (Weyl) sequence over patient index, so class fractions hold
  closely for any number of patients and patient ``i`` never depends on ``num_patients``.

Canonical frame (used by all geometry below): a right femur, AP view, image centre at the origin,
x to the right (medial in AP; posterior in LAT), y down, one unit = the image width at
magnification 1 (``_FIELD_MM`` millimetres). Left femurs are mirrored images of right ones.

CLI: ``python -m afm_jax.data.synthetic --out DIR [--num_patients N] [--seed S] [--image_size P]
[--dicom]`` writes the records dataset (default) or a DICOM tree with ``labels.csv``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import hashlib
import math
import os
import pathlib
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import cv2
import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from afm_jax import errors
from afm_jax.data import anonymize, records

if TYPE_CHECKING:
    import pydicom

LABEL_NAMES = ("normal", "nff", "aff")  # label ints 0, 1, 2
FRACTURE_TYPES: dict[str, tuple[str, ...]] = {
    "normal": ("none",),
    "nff": ("oblique", "spiral", "comminuted"),
    "aff": ("transverse",),
}
VIEWS = ("AP", "LAT")
LATERALITIES = ("L", "R")

_FIELD_MM = 240.0  # width of the canonical field of view at magnification 1
_SHAFT_X = -0.06  # shaft axis position in the canonical frame (head lies to the right)
# Fracture level along the shaft: fracture_position 0 = sub-trochanteric, 1 = mid-shaft.
_FRACTURE_Y_RANGE = (-0.04, 0.34)
# Attenuation per canonical unit of path (display-tuned, not physical constants).
_MU_CORTEX = 11.0
_MU_TRABECULAR = 0.35 * _MU_CORTEX
_MU_MARROW = 0.06 * _MU_CORTEX
_MU_PELVIS = 0.30 * _MU_CORTEX
_MU_SOFT = 0.75
_WHITE_ATTENUATION = 1.7
_UID_ROOT = "afm-jax synthetic femur"
_GOLDEN = 0.6180339887498949  # Weyl sequence step for class assignment
_DEFAULT_FRACTIONS = (0.34, 0.33, 0.33)


# ======================================================================================
# Public data types
# ======================================================================================


@dataclasses.dataclass(frozen=True)
class SyntheticImage:
    """One synthetic radiograph with the (fake) metadata a DICOM file of it would carry."""

    pixels: np.ndarray  # uint16 (H, W), bone bright, full 16-bit range used
    patient_id: str  # raw fake ID; hashed by to_record, never stored raw
    patient_name: str  # fake, DICOM header only
    birth_date: str  # fake YYYYMMDD, DICOM header only
    accession_number: str  # fake, DICOM header only
    study_uid: str
    series_uid: str
    sop_uid: str
    view: str  # "AP" or "LAT"
    laterality: str  # "L" or "R"
    body_part: str  # "FEMUR"
    modality: str  # "CR" or "DX"
    pixel_spacing_mm: tuple[float, float]
    label: int  # 0 normal, 1 nff, 2 aff
    label_name: str
    fracture_type: str  # "none", "oblique", "spiral", "comminuted", "transverse"


@dataclasses.dataclass(frozen=True)
class FemurAnatomy:
    """Patient-level anatomy, shared by all images of one patient (canonical units)."""

    shaft_radius: float
    cortex_fraction: float  # cortical thickness / shaft radius
    neck_shaft_angle_deg: float
    head_scale: float  # head radius / shaft radius
    bow: float  # anterior bow of the shaft (seen in LAT; a third of it in AP)
    thigh_radius: float
    thigh_offset: float  # thigh centre relative to the shaft axis
    bone_density: float
    fracture_seed: int  # seeds the fracture shape, so all views show the same fracture

    @classmethod
    def sample(cls, rng: np.random.Generator) -> FemurAnatomy:
        """Draws a plausible adult femur."""
        return cls(
            shaft_radius=float(rng.uniform(0.052, 0.066)),
            cortex_fraction=float(rng.uniform(0.25, 0.38)),
            neck_shaft_angle_deg=float(rng.uniform(122.0, 136.0)),
            head_scale=float(rng.uniform(1.3, 1.5)),
            bow=float(rng.uniform(0.015, 0.04)),
            thigh_radius=float(rng.uniform(0.27, 0.35)),
            thigh_offset=float(rng.uniform(0.0, 0.06)),
            bone_density=float(rng.uniform(0.85, 1.15)),
            fracture_seed=int(rng.integers(2**62)),
        )


# ======================================================================================
# Geometry helpers (canonical frame)
# ======================================================================================


def _soft_step(signed: np.ndarray, edge: float) -> np.ndarray:
    """Anti-aliased indicator of ``signed > 0`` with a ramp one `edge` wide."""
    return np.clip(0.5 + signed / edge, 0.0, 1.0)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _chord(radius: np.ndarray | float, dist: np.ndarray) -> np.ndarray:
    """Path length through a cylinder/sphere of `radius` at distance `dist` from its axis."""
    return 2.0 * np.sqrt(np.maximum(np.square(radius) - np.square(dist), 0.0))


def _ellipsoid_path(x: np.ndarray, y: np.ndarray, centre: tuple[float, float], axes: tuple[float, float],
                    depth: float, angle: float = 0.0) -> np.ndarray:
    """Projected path length through an ellipsoid with in-plane semi-axes `axes` and half-depth `depth`."""
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = x - centre[0], y - centre[1]
    q = np.square((c * dx + s * dy) / axes[0]) + np.square((-s * dx + c * dy) / axes[1])
    return 2.0 * depth * np.sqrt(np.maximum(1.0 - q, 0.0))


def _shaft_centre(y: np.ndarray | float, anat: FemurAnatomy, view: str) -> np.ndarray | float:
    """x of the shaft axis at height y; the bow points to -x (anterior in LAT)."""
    bow = anat.bow if view == "LAT" else anat.bow / 3.0
    return _SHAFT_X - bow * (1.0 - np.square((y - 0.3) / 0.8))


@dataclasses.dataclass(frozen=True)
class _Proximal:
    """Proximal femur landmarks for one view (canonical units)."""

    neck_base: tuple[float, float]
    neck_dir: tuple[float, float]
    neck_length: float
    head_centre: tuple[float, float]
    head_radius: float
    gt_centre: tuple[float, float]  # greater trochanter
    gt_axes: tuple[float, float]
    lt_centre: tuple[float, float]  # lesser trochanter
    lt_axes: tuple[float, float]


def _proximal(anat: FemurAnatomy, view: str) -> _Proximal:
    r0 = anat.shaft_radius
    x_top = float(_shaft_centre(-0.2, anat, view))
    if view == "AP":
        angle, length = math.radians(anat.neck_shaft_angle_deg), 2.6 * r0
        base = (x_top + 0.15 * r0, -0.20)
        gt_centre, gt_axes = (x_top - 0.55 * r0, -0.24), (0.85 * r0, 1.3 * r0)
        lt_centre, lt_axes = (float(_shaft_centre(-0.1, anat, view)) + 1.1 * r0, -0.10), (0.45 * r0, 0.55 * r0)
    else:  # lateral: neck foreshortened, head over the trochanter, lesser trochanter posterior
        angle, length = math.radians(168.0), 2.2 * r0
        base = (x_top + 0.1 * r0, -0.21)
        gt_centre, gt_axes = (x_top + 0.2 * r0, -0.25), (1.0 * r0, 1.2 * r0)
        lt_centre, lt_axes = (float(_shaft_centre(-0.1, anat, view)) + 1.05 * r0, -0.09), (0.35 * r0, 0.5 * r0)
    direction = (math.sin(angle), math.cos(angle))  # angle from the downward shaft axis
    head = (base[0] + length * direction[0], base[1] + length * direction[1])
    return _Proximal(base, direction, length, head, anat.head_scale * r0, gt_centre, gt_axes, lt_centre, lt_axes)


@dataclasses.dataclass(frozen=True)
class _Beak:
    """Focal lateral cortical thickening (AFF): a Gaussian bump of the outer lateral surface."""

    y: float
    height: float
    sigma: float


def _bone_attenuation(x: np.ndarray, y: np.ndarray, anat: FemurAnatomy, view: str,
                      beak: _Beak | None = None) -> np.ndarray:
    """Attenuation of the intact femur (shaft, neck, head, trochanters, optional beak) at (x, y)."""
    r0, prox = anat.shaft_radius, _proximal(anat, view)
    u = x - _shaft_centre(y, anat, view)
    proximal_flare = _sigmoid((-0.1 - y) / 0.04)  # metaphysis: wider, thinner cortex, trabecular canal
    outer = r0 * (1.0 + 0.45 * proximal_flare + 0.25 * _sigmoid((y - 0.5) / 0.06))
    inner = outer - anat.cortex_fraction * r0 * (1.0 - 0.65 * proximal_flare)
    canal_mu = _MU_MARROW + (_MU_TRABECULAR - _MU_MARROW) * proximal_flare
    outer_path, inner_path = _chord(outer, u), _chord(inner, u)
    bone = (_MU_CORTEX * (outer_path - inner_path) + canal_mu * inner_path) * _soft_step(y + 0.23, 0.03)

    # Neck: a capsule narrowing towards the head; thin cortical shell around trabecular bone.
    px, py = x - prox.neck_base[0], y - prox.neck_base[1]
    t = np.clip((px * prox.neck_dir[0] + py * prox.neck_dir[1]) / prox.neck_length, 0.0, 1.0)
    d = np.hypot(px - t * prox.neck_length * prox.neck_dir[0], py - t * prox.neck_length * prox.neck_dir[1])
    neck_r = r0 * (1.3 - 0.55 * t)
    bone = np.maximum(bone, _shell(_chord(neck_r, d), _chord(0.8 * neck_r, d)))
    head_d = np.hypot(x - prox.head_centre[0], y - prox.head_centre[1])
    bone = np.maximum(bone, _shell(_chord(prox.head_radius, head_d), _chord(0.88 * prox.head_radius, head_d)))
    for centre, axes in ((prox.gt_centre, prox.gt_axes), (prox.lt_centre, prox.lt_axes)):
        depth = 1.1 * min(axes)
        full = _ellipsoid_path(x, y, centre, axes, depth)
        core = _ellipsoid_path(x, y, centre, (0.85 * axes[0], 0.85 * axes[1]), 0.85 * depth)
        bone = np.maximum(bone, _shell(full, core))

    if beak is not None:
        bone = bone + _beak_attenuation(u, y, outer, inner, beak)
    return bone * anat.bone_density


def _shell(full_path: np.ndarray, core_path: np.ndarray) -> np.ndarray:
    """Trabecular body with a cortical shell, from the paths through the whole and the core."""
    return _MU_TRABECULAR * core_path + _MU_CORTEX * (full_path - core_path)


def _beak_attenuation(u: np.ndarray, y: np.ndarray, outer: np.ndarray, inner: np.ndarray,
                      beak: _Beak) -> np.ndarray:
    """Dense lens on the lateral (-u) surface whose thickness follows a Gaussian along the shaft."""
    bump = beak.height * np.exp(-np.square((y - beak.y) / beak.sigma))
    inward = 0.5 * (outer - inner)  # the thickening also densifies the outer half of the cortex
    out_dist = -u - outer  # > 0 outside the lateral surface
    mid, half = 0.5 * (bump - inward), 0.5 * (bump + inward)
    lens = np.sqrt(np.clip(1.0 - np.square((out_dist - mid) / half), 0.0, 1.0))
    edge_path = _chord(outer, inner)  # tangential path through the normal cortex
    return 1.1 * _MU_CORTEX * edge_path * lens * (bump / beak.height)


def _pelvis_attenuation(x: np.ndarray, y: np.ndarray, anat: FemurAnatomy, view: str) -> np.ndarray:
    """Acetabular roof, ilium and ischiopubic ring around the head (faint overlap in LAT)."""
    prox = _proximal(anat, view)
    hx, hy = prox.head_centre
    rh = prox.head_radius
    if view == "LAT":
        return _MU_PELVIS * 0.5 * _ellipsoid_path(x, y, (hx - 0.3 * rh, hy - 0.5 * rh), (2.6 * rh, 2.0 * rh), 0.6 * rh)
    r = np.hypot(x - hx, y - hy)
    roof = _chord(0.22 * rh, r - 1.3 * rh) * 2.5 * _soft_step(hy + 0.3 * rh - y, 0.3 * rh) \
        * _soft_step(x - (hx - 1.15 * rh), 0.2 * rh)
    ilium = _ellipsoid_path(x, y, (hx + 0.6 * rh, hy - 2.3 * rh), (2.6 * rh, 1.4 * rh), 0.3 * rh, -0.45)
    ring_c = (hx + 1.7 * rh, hy + 2.1 * rh)
    ring = _ellipsoid_path(x, y, ring_c, (1.3 * rh, 1.6 * rh), 0.5 * rh, 0.4) \
        - _ellipsoid_path(x, y, ring_c, (0.85 * rh, 1.15 * rh), 0.5 * rh, 0.4)
    return _MU_PELVIS * (roof + ilium + np.maximum(ring, 0.0))


def _soft_tissue_attenuation(x: np.ndarray, y: np.ndarray, anat: FemurAnatomy, view: str) -> np.ndarray:
    """Thigh silhouette: elliptic cylinder (fat) with a denser muscle core, widening to the hip."""
    centre = _SHAFT_X + anat.thigh_offset * (1.0 if view == "AP" else -0.5)
    radius = anat.thigh_radius * (1.0 + 0.3 * _sigmoid((-0.2 - y) / 0.08))
    dx = x - centre
    return _MU_SOFT * (0.7 * _chord(radius, dx) + 0.4 * _chord(0.75 * radius, dx))


# ======================================================================================
# Fractures: rigid fragments with their own membership, evaluated in undisplaced coordinates
# ======================================================================================


@dataclasses.dataclass(frozen=True)
class _Fragment:
    inside: Callable[[np.ndarray, np.ndarray], np.ndarray]  # membership in [0, 1], own coordinates
    shift: tuple[float, float] = (0.0, 0.0)
    angle: float = 0.0  # radians, about pivot
    pivot: tuple[float, float] = (0.0, 0.0)


@dataclasses.dataclass(frozen=True)
class _FracturePlan:
    fragments: tuple[_Fragment, ...]
    chips: tuple[tuple[float, float, float, float, float], ...] = ()  # loose pieces: cx, cy, ax, ay, angle
    beak: _Beak | None = None


def _fracture_y(position: float) -> float:
    return _FRACTURE_Y_RANGE[0] + position * (_FRACTURE_Y_RANGE[1] - _FRACTURE_Y_RANGE[0])


def _line_distance(x: np.ndarray, y: np.ndarray, anat: FemurAnatomy, view: str, y0: float, slope: float,
                   wobble: float = 0.0, spike_start: float | None = None, spike_slope: float = 0.0) -> np.ndarray:
    """Signed distance (approx.) from the fracture line y = y0 + slope*u [+ wobble, + medial spike]; > 0 distal."""
    # Beyond the shaft the line runs on transversely, so it never cuts the neck or head.
    u = np.clip(x - _shaft_centre(y, anat, view), -1.5 * anat.shaft_radius, 1.5 * anat.shaft_radius)
    offset = slope * u
    if wobble:  # spiral fractures project as an S-shaped steep line
        offset = offset + wobble * np.sin(np.pi * u / anat.shaft_radius)
    if spike_start is not None:  # AFF medial spike: the line turns oblique near the medial cortex
        offset = offset + spike_slope * np.maximum(u - spike_start, 0.0)
    return (y - y0 - offset) / math.sqrt(1.0 + slope * slope)


def _split_fragments(dist: Callable[[np.ndarray, np.ndarray], np.ndarray], gap: float, edge: float,
                     shift: tuple[float, float], angle: float, pivot: tuple[float, float]) -> tuple[_Fragment, ...]:
    """Proximal fragment in place, distal fragment displaced, a gap of width `gap` between them."""
    return (
        _Fragment(lambda x, y: _soft_step(-dist(x, y) - gap / 2, edge)),
        _Fragment(lambda x, y: _soft_step(dist(x, y) - gap / 2, edge), shift, angle, pivot),
    )


def _signed(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high) * rng.choice((-1.0, 1.0)))


def _plan_fracture(anat: FemurAnatomy, view: str, fracture_type: str, position: float, edge: float) -> _FracturePlan:
    """Fracture geometry for one view. Shapes come from the patient's fracture seed; both views are
    always drawn (in a fixed order) so AP and LAT of one patient show the same fracture."""
    rng = np.random.default_rng(anat.fracture_seed)
    r0, y0 = anat.shaft_radius, _fracture_y(position)
    draws = [_draw_fracture_params(rng, fracture_type, r0) for _ in VIEWS]
    p = draws[VIEWS.index(view)]
    pivot = (float(_shaft_centre(y0, anat, view)), y0)
    disp = dict(shift=p.get("shift", (0.0, 0.0)), angle=p.get("angle", 0.0), pivot=pivot)

    if fracture_type in ("oblique", "spiral"):
        def dist(x, y):
            return _line_distance(x, y, anat, view, y0, p["slope"], wobble=p.get("wobble", 0.0))
        return _FracturePlan(_split_fragments(dist, p["gap"], edge, **disp))

    if fracture_type == "comminuted":
        def dist_a(x, y):
            return _line_distance(x, y, anat, view, y0 - p["half_zone"], p["slope_a"])

        def dist_b(x, y):
            return _line_distance(x, y, anat, view, y0 + p["half_zone"], p["slope_b"])

        def dist_c(x, y):  # longitudinal split of the middle zone into a lateral and a medial piece
            return (x - _shaft_centre(y, anat, view)) - p["split_u"] - p["split_slope"] * (y - y0)

        g = p["gap"] / 2

        def middle(x, y):
            return _soft_step(dist_a(x, y) - g, edge) * _soft_step(-dist_b(x, y) - g, edge)

        fragments = (
            _Fragment(lambda x, y: _soft_step(-dist_a(x, y) - g, edge)),
            _Fragment(lambda x, y: _soft_step(dist_b(x, y) - g, edge), **disp),
            _Fragment(lambda x, y: middle(x, y) * _soft_step(-dist_c(x, y) - g, edge),
                      p["lateral_shift"], p["lateral_angle"], pivot),
            _Fragment(lambda x, y: middle(x, y) * _soft_step(dist_c(x, y) - g, edge),
                      p["medial_shift"], p["medial_angle"], pivot),
        )
        chips = tuple((pivot[0] + cx, y0 + cy, ax, ay, a) for cx, cy, ax, ay, a in p["chips"])
        return _FracturePlan(fragments, chips)

    if fracture_type == "transverse":
        beak = _Beak(y0 + p["beak_offset"], p["beak_height"], p["beak_sigma"])
        if p["complete"]:
            def dist(x, y):
                return _line_distance(x, y, anat, view, y0, p["slope"], spike_start=p["spike_start"],
                                      spike_slope=p["spike_slope"])
            # AFFs are shown undisplaced: the sign is the line and the beak, not fragment position.
            return _FracturePlan(_split_fragments(dist, p["gap"], edge, (0.0, 0.0), 0.0, pivot), beak=beak)
        tip = -r0 + p["extent"] * 2.0 * r0  # incomplete: the crack stops part way across

        def intact_except_crack(x, y):
            u = x - _shaft_centre(y, anat, view)
            half_width = p["gap"] / 2 * np.clip((tip - u) / (0.4 * r0), 0.0, 1.0)
            dist = _line_distance(x, y, anat, view, y0, p["slope"])
            return 1.0 - _soft_step(half_width - np.abs(dist), edge)
        return _FracturePlan((_Fragment(intact_except_crack),), beak=beak)

    raise ValueError(f"Unknown fracture_type {fracture_type!r}; expected one of {sum(FRACTURE_TYPES.values(), ())}.")


def _draw_fracture_params(rng: np.random.Generator, fracture_type: str, r0: float) -> dict:
    """Random shape parameters of one fracture type (one view), in canonical units."""
    deg = math.radians
    if fracture_type == "oblique":
        return dict(slope=math.tan(_signed(rng, deg(30), deg(55))), gap=rng.uniform(0.008, 0.016),
                    shift=(_signed(rng, 0.3, 1.0) * r0, rng.uniform(-0.35, 0.2) * r0),
                    angle=_signed(rng, 0.0, deg(10)))
    if fracture_type == "spiral":
        return dict(slope=math.tan(_signed(rng, deg(50), deg(66))), wobble=rng.uniform(0.25, 0.45) * r0,
                    gap=rng.uniform(0.008, 0.016),
                    shift=(_signed(rng, 0.25, 0.8) * r0, rng.uniform(-0.4, 0.1) * r0),
                    angle=_signed(rng, 0.0, deg(8)))
    if fracture_type == "comminuted":
        slope_a = _signed(rng, 0.15, 0.7)
        slope_b = slope_a + rng.uniform(-0.5, 0.5)
        chips = tuple((rng.uniform(-1.6, 1.6) * r0, rng.uniform(-1.2, 1.2) * r0, rng.uniform(0.15, 0.35) * r0,
                       rng.uniform(0.1, 0.22) * r0, rng.uniform(0, math.pi)) for _ in range(rng.integers(2, 5)))
        return dict(slope_a=slope_a, slope_b=slope_b, gap=rng.uniform(0.008, 0.016),
                    half_zone=(0.55 * abs(slope_a - slope_b) + rng.uniform(0.35, 0.7)) * r0,
                    split_u=rng.uniform(-0.3, 0.3) * r0, split_slope=rng.uniform(-0.3, 0.3),
                    shift=(_signed(rng, 0.2, 0.8) * r0, rng.uniform(-0.3, 0.1) * r0),
                    angle=_signed(rng, 0.0, deg(10)),
                    lateral_shift=(-rng.uniform(0.25, 0.7) * r0, rng.uniform(-0.2, 0.2) * r0),
                    lateral_angle=_signed(rng, deg(5), deg(20)),
                    medial_shift=(rng.uniform(0.25, 0.7) * r0, rng.uniform(-0.2, 0.2) * r0),
                    medial_angle=_signed(rng, deg(5), deg(20)), chips=chips)
    if fracture_type == "transverse":
        return dict(slope=math.tan(_signed(rng, 0.0, deg(8))), gap=rng.uniform(0.012, 0.02),
                    complete=bool(rng.random() < 0.5), extent=rng.uniform(0.4, 0.8),
                    spike_start=(rng.uniform(0.1, 0.5) * r0 if rng.random() < 0.6 else None),
                    spike_slope=_signed(rng, 1.2, 2.0),
                    beak_height=rng.uniform(0.35, 0.6) * r0, beak_sigma=rng.uniform(0.6, 1.0) * r0,
                    beak_offset=rng.uniform(-0.15, 0.15) * r0)
    raise ValueError(f"No fracture parameters for fracture_type {fracture_type!r}.")


def _fractured_bone(x: np.ndarray, y: np.ndarray, anat: FemurAnatomy, view: str,
                    plan: _FracturePlan | None) -> np.ndarray:
    """Bone attenuation with each fragment moved rigidly (sampled at its undisplaced coordinates)."""
    if plan is None:
        return _bone_attenuation(x, y, anat, view)
    total = np.zeros_like(x)
    for frag in plan.fragments:
        c, s = math.cos(frag.angle), math.sin(frag.angle)
        px, py = x - frag.pivot[0] - frag.shift[0], y - frag.pivot[1] - frag.shift[1]
        sx, sy = c * px + s * py + frag.pivot[0], -s * px + c * py + frag.pivot[1]  # inverse rotation
        total += _bone_attenuation(sx, sy, anat, view, plan.beak) * frag.inside(sx, sy)
    for cx, cy, ax, ay, angle in plan.chips:
        total += 0.8 * _MU_CORTEX * anat.bone_density * _ellipsoid_path(x, y, (cx, cy), (ax, ay), min(ax, ay), angle)
    return total


# ======================================================================================
# Image formation
# ======================================================================================


@dataclasses.dataclass(frozen=True)
class _Exposure:
    """Per-image pose and acquisition/processing parameters (class independent)."""

    rotation: float
    centre: tuple[float, float]
    magnification: float
    contrast: float
    gamma: float
    blur_px: float
    unsharp_amount: float
    unsharp_sigma: float  # fraction of the image size
    heel: float
    noise: float
    black: float
    white: float
    texture_amount: float
    marker_corner: int
    marker_scale: float
    marker_level: float

    @classmethod
    def sample(cls, rng: np.random.Generator) -> _Exposure:
        return cls(
            rotation=math.radians(rng.uniform(-12.0, 12.0)),
            centre=(float(rng.uniform(-0.05, 0.05)), float(rng.uniform(-0.04, 0.04))),
            magnification=float(rng.uniform(0.85, 1.15)),
            contrast=float(rng.uniform(0.5, 0.9)),
            gamma=float(rng.uniform(1.2, 1.8)),
            blur_px=float(rng.uniform(0.4, 0.9)),
            unsharp_amount=float(rng.uniform(0.0, 0.5)),
            unsharp_sigma=float(rng.uniform(0.02, 0.04)),
            heel=float(rng.uniform(-0.08, 0.08)),
            noise=float(rng.uniform(0.004, 0.015)),
            black=float(rng.uniform(0.0, 2500.0)),
            white=float(rng.uniform(56000.0, 65535.0)),
            texture_amount=float(rng.uniform(0.04, 0.1)),
            marker_corner=int(rng.integers(4)),
            marker_scale=float(rng.uniform(0.8, 1.2)),
            marker_level=float(rng.uniform(0.85, 1.0)),
        )


def _canonical_grid(size: int, exp: _Exposure) -> tuple[np.ndarray, np.ndarray]:
    """Canonical (x, y) of every pixel centre, after undoing pose and magnification."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    gx, gy = np.meshgrid(coords - exp.centre[0], coords - exp.centre[1])
    c, s = math.cos(exp.rotation), math.sin(exp.rotation)
    return (c * gx + s * gy) / exp.magnification, (-s * gx + c * gy) / exp.magnification


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, roughly unit-variance smooth noise (bicubic upsampling of a cells x cells grid)."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


def _draw_marker(image: np.ndarray, letter: str, exp: _Exposure) -> np.ndarray:
    """Burns in the lead side marker (bright letter) in one corner."""
    size = image.shape[0]
    mask = np.zeros_like(image, dtype=np.uint8)
    scale = size / 256.0 * 1.3 * exp.marker_scale
    thickness = max(1, round(size / 256.0 * 3))
    (w, h), _ = cv2.getTextSize(letter, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    margin = max(2, size // 24)
    x = margin if exp.marker_corner % 2 == 0 else size - margin - w
    y = margin + h if exp.marker_corner < 2 else size - margin
    cv2.putText(mask, letter, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thickness, cv2.LINE_AA)
    alpha = mask.astype(np.float32) / 255.0
    return image * (1.0 - alpha) + exp.marker_level * alpha


def _render(rng: np.random.Generator, *, label_name: str, fracture_type: str, size: int, view: str,
            laterality: str, fracture_position: float, anatomy: FemurAnatomy | None) -> tuple[np.ndarray, float]:
    """render_femur plus the pixel spacing (mm) implied by the drawn magnification."""
    _check_render_args(label_name, fracture_type, size, view, laterality, fracture_position)
    anat = anatomy if anatomy is not None else FemurAnatomy.sample(rng)
    # All image-level randomness is drawn here, before and independently of the class.
    exp = _Exposure.sample(rng)
    texture = _smooth_noise(rng, size, 24) + 0.5 * _smooth_noise(rng, size, max(8, size // 4))
    noise = rng.standard_normal((size, size), dtype=np.float32)

    x, y = _canonical_grid(size, exp)
    edge = 1.0 / (size * exp.magnification)  # one pixel in canonical units
    plan = None if fracture_type == "none" else _plan_fracture(anat, view, fracture_type, fracture_position, edge)
    trabecular = 0.3 + _sigmoid((-0.05 - y) / 0.05)  # texture mostly in the proximal (trabecular) femur
    bone = _fractured_bone(x, y, anat, view, plan) * (1.0 + exp.texture_amount * trabecular * texture)
    atten = bone + _pelvis_attenuation(x, y, anat, view) + _soft_tissue_attenuation(x, y, anat, view)
    atten = cv2.GaussianBlur(atten, (0, 0), exp.blur_px * size / 256.0)

    # Film-like response normalised so that a thick cortex (attenuation ~_WHITE_ATTENUATION) is white.
    response = (1.0 - np.exp(-exp.contrast * atten)) / (1.0 - math.exp(-exp.contrast * _WHITE_ATTENUATION))
    img = np.power(np.clip(response, 0.0, 1.0), exp.gamma)
    if exp.unsharp_amount > 0:
        img = img + exp.unsharp_amount * (img - cv2.GaussianBlur(img, (0, 0), exp.unsharp_sigma * size))
    rows = (np.arange(size, dtype=np.float32) / size - 0.5)[:, None]
    img = img * (1.0 + exp.heel * rows) + exp.noise * (0.5 + np.clip(img, 0.0, 1.0)) * noise
    if laterality == "L":
        img = img[:, ::-1]
    img = _draw_marker(np.clip(img, 0.0, 1.0), laterality, exp)
    pixels = np.round(exp.black + (exp.white - exp.black) * img).astype(np.uint16)
    return pixels, _FIELD_MM / (size * exp.magnification)


def _check_render_args(label_name: str, fracture_type: str, size: int, view: str, laterality: str,
                       fracture_position: float) -> None:
    if label_name not in FRACTURE_TYPES:
        raise ValueError(f"label_name {label_name!r} is not one of {LABEL_NAMES}.")
    if fracture_type not in FRACTURE_TYPES[label_name]:
        raise ValueError(f"fracture_type {fracture_type!r} does not fit label {label_name!r}; "
                         f"use one of {FRACTURE_TYPES[label_name]}.")
    if view not in VIEWS:
        raise ValueError(f"view {view!r} is not one of {VIEWS}.")
    if laterality not in LATERALITIES:
        raise ValueError(f"laterality {laterality!r} is not one of {LATERALITIES}.")
    if size < 32:
        raise ValueError(f"size {size} is too small; use at least 32 pixels.")
    if not 0.0 <= fracture_position <= 1.0:
        raise ValueError(f"fracture_position {fracture_position} must lie in [0, 1] "
                         "(0 = sub-trochanteric, 1 = mid-shaft).")


def render_femur(rng: np.random.Generator, *, label_name: str, fracture_type: str, size: int, view: str,
                 laterality: str, fracture_position: float, anatomy: FemurAnatomy | None = None) -> np.ndarray:
    """Renders one femur radiograph: uint16 (size, size), bone bright, most of the 16-bit range used.

    `fracture_position` in [0, 1] runs from sub-trochanteric (0) to mid-shaft (1). `anatomy`
    fixes the patient (and its fracture shape) across images; if None it is drawn from `rng`.
    For a fixed `rng` state and anatomy, images of different classes differ only where the
    fracture changes the bone: pose, exposure and noise are drawn independently of the class.
    """
    pixels, _ = _render(rng, label_name=label_name, fracture_type=fracture_type, size=size, view=view,
                        laterality=laterality, fracture_position=fracture_position, anatomy=anatomy)
    return pixels


# ======================================================================================
# Synthetic patients
# ======================================================================================

_FIRST_NAMES = ("JANE", "MARY", "ANNA", "ELSA", "INGRID", "KARIN", "MAJA", "ASTRID", "LINNEA", "SARA",
                "JOHN", "ERIK", "LARS", "PER", "OLOF")
_LAST_NAMES = ("DOE", "ROE", "SMITH", "ANDERSSON", "JOHANSSON", "KARLSSON", "NILSSON", "ERIKSSON",
               "LARSSON", "OLSSON", "PERSSON", "SVENSSON", "GUSTAFSSON", "PETTERSSON", "LINDBERG")


@dataclasses.dataclass(frozen=True)
class _PatientPlan:
    """Everything about patient i except the pixels; cheap to compute."""

    patient_id: str
    patient_name: str
    birth_date: str
    label: int
    fracture_type: str
    fracture_position: float
    laterality: str
    anatomy: FemurAnatomy
    images: tuple[tuple[str, int], ...]  # (view, study index) per image
    studies: tuple[tuple[str, str], ...]  # (accession number, modality) per study


def _label_for(index: int, seed: int, class_fractions: Sequence[float]) -> int:
    """Low-discrepancy class assignment: fractions hold closely for every prefix of patients."""
    phase = (index * _GOLDEN + seed * 0.7548776662466927) % 1.0
    cumulative = np.cumsum(class_fractions) / float(np.sum(class_fractions))
    return int(min(np.searchsorted(cumulative, phase, side="right"), len(LABEL_NAMES) - 1))


def _plan_patient(index: int, seed: int, class_fractions: Sequence[float]) -> _PatientPlan:
    rng = np.random.default_rng([seed, index, 0])
    label = _label_for(index, seed, class_fractions)
    types = FRACTURE_TYPES[LABEL_NAMES[label]]
    fracture_type = types[int(rng.random() * len(types))]  # one draw whatever the class
    views = [("AP", 0), ("LAT", 0)]
    n_followup = int(rng.choice(3, p=(0.4, 0.4, 0.2)))  # a follow-up study with 0-2 more images
    views += [(VIEWS[k], 1) for k in range(n_followup)]
    studies = tuple((f"ACC{rng.integers(10**8):08d}", str(rng.choice(("CR", "DX"))))
                    for _ in range(2 if n_followup else 1))
    birth = f"{rng.integers(1925, 1970)}{rng.integers(1, 13):02d}{rng.integers(1, 29):02d}"
    name = f"{rng.choice(_LAST_NAMES)}^{rng.choice(_FIRST_NAMES)}"
    return _PatientPlan(
        patient_id=f"SYN{seed:03d}{index:06d}",
        patient_name=name,
        birth_date=birth,
        label=label,
        fracture_type=fracture_type,
        fracture_position=float(rng.uniform(0.0, 1.0)),
        laterality=str(rng.choice(LATERALITIES)),
        anatomy=FemurAnatomy.sample(rng),
        images=tuple(views),
        studies=studies,
    )


def _uid(*parts: object) -> str:
    from pydicom.uid import generate_uid  # pydicom: slow to import, only the DICOM writer needs it

    return str(generate_uid(entropy_srcs=[_UID_ROOT, *map(str, parts)]))


def _check_fractions(class_fractions: Sequence[float]) -> None:
    if len(class_fractions) != len(LABEL_NAMES) or min(class_fractions) < 0 or sum(class_fractions) <= 0:
        raise ValueError(f"class_fractions {tuple(class_fractions)} must be {len(LABEL_NAMES)} non-negative "
                         f"numbers (for {LABEL_NAMES}) with a positive sum.")


def iter_synthetic_images(num_patients: int, *, seed: int = 0, image_size: int = 256,
                          class_fractions: Sequence[float] = _DEFAULT_FRACTIONS) -> Iterator[SyntheticImage]:
    """Yields the images of `num_patients` synthetic patients (2-4 AP/LAT images each, one label each).

    Deterministic for (num_patients, seed, image_size); patient i's images don't depend on
    num_patients, so a larger dataset extends a smaller one.
    """
    _check_fractions(class_fractions)
    for i in range(num_patients):
        plan = _plan_patient(i, seed, class_fractions)
        label_name = LABEL_NAMES[plan.label]
        study_uids = [_uid("study", seed, i, k) for k in range(len(plan.studies))]
        for j, (view, study) in enumerate(plan.images):
            pixels, spacing = _render(
                np.random.default_rng([seed, i, j, 1]), label_name=label_name, fracture_type=plan.fracture_type,
                size=image_size, view=view, laterality=plan.laterality, fracture_position=plan.fracture_position,
                anatomy=plan.anatomy)
            yield SyntheticImage(
                pixels=pixels,
                patient_id=plan.patient_id,
                patient_name=plan.patient_name,
                birth_date=plan.birth_date,
                accession_number=plan.studies[study][0],
                study_uid=study_uids[study],
                series_uid=_uid("series", seed, i, study, j),
                sop_uid=_uid("sop", seed, i, study, j, image_size),  # other pixels, other instance
                view=view,
                laterality=plan.laterality,
                body_part="FEMUR",
                modality=plan.studies[study][1],
                pixel_spacing_mm=(round(spacing, 6), round(spacing, 6)),
                label=plan.label,
                label_name=label_name,
                fracture_type=plan.fracture_type,
            )


def count_synthetic_images(num_patients: int, *, seed: int = 0,
                           class_fractions: Sequence[float] = _DEFAULT_FRACTIONS) -> int:
    """Number of images iter_synthetic_images yields, without rendering them."""
    return sum(len(_plan_patient(i, seed, class_fractions).images) for i in range(num_patients))


# ======================================================================================
# Records
# ======================================================================================


def to_record(img: SyntheticImage, salt: bytes) -> dict:
    """The record-schema dict for one image, identifiers hashed with `salt` (no raw ID, name or date)."""
    return {
        "image": img.pixels,
        "patient_id": anonymize.hash_id(img.patient_id, salt),
        "study_id": anonymize.hash_id(img.study_uid, salt),
        "series_id": anonymize.hash_id(img.series_uid, salt),
        "image_id": anonymize.hash_id(img.sop_uid, salt),
        "body_part": img.body_part,
        "view": img.view,
        "laterality": img.laterality,
        "modality": img.modality,
        "pixel_spacing_mm": np.asarray(img.pixel_spacing_mm, dtype=np.float32),
        "orig_shape": np.asarray(img.pixels.shape, dtype=np.int32),
        "label": int(img.label),
        "label_name": img.label_name,
        "fracture_type": img.fracture_type,
    }


def build_synthetic_dataset(data_dir: str | os.PathLike, *, num_patients: int = 300, seed: int = 0,
                            image_size: int = 256, name: str = "synthetic_femur",
                            overwrite: bool = False) -> pathlib.Path:
    """Renders the synthetic dataset and writes it with records.write_dataset; returns its directory.

    Identifiers are hashed with `anonymize.load_salt(allow_demo_salt=True)`: the user's salt if
    one is configured, else the public demo salt (the identifiers are fake anyway).
    """
    salt = anonymize.load_salt(allow_demo_salt=True)
    examples = (to_record(img, salt) for img in iter_synthetic_images(num_patients, seed=seed, image_size=image_size))
    parameters = {"num_patients": num_patients, "seed": seed, "image_size": image_size,
                  "class_fractions": list(_DEFAULT_FRACTIONS)}
    info = {"preprocessing": {"generator": "afm_jax.data.synthetic", **parameters},
            "source_fingerprint": "synthetic:" + ",".join(f"{k}={v}" for k, v in parameters.items())}
    return records.write_dataset(examples, data_dir, name=name, extra_info=info, overwrite=overwrite,
                                 num_examples_hint=count_synthetic_images(num_patients, seed=seed))


def ensure_synthetic_dataset(data_dir: str | os.PathLike, *, num_patients: int = 300, seed: int = 0,
                             image_size: int = 256) -> pathlib.Path:
    """The synthetic dataset for these parameters under `data_dir`, built only if it is not there yet.

    Each parameter set gets its own folder, so a rerun (e.g. a resumed demo) reuses the dataset its
    checkpoints were trained on, and a changed parameter never silently reuses a different one.
    """
    name = f"synthetic_femur_p{num_patients}_s{seed}_i{image_size}"
    existing = pathlib.Path(data_dir) / name
    if existing.is_dir():
        try:
            return records.resolve_dataset_dir(existing)
        except errors.DatasetNotFoundError:
            pass  # an interrupted build leaves no dataset_info.json; write_dataset starts over
    return build_synthetic_dataset(data_dir, num_patients=num_patients, seed=seed, image_size=image_size,
                                   name=name)


def prepare_dataset(config, workdir: str) -> None:
    """Builds the embedded synthetic dataset into `<workdir>/data` when the config asks for it
    (`data.synthetic.enabled` and no `data.path`), and sets `config.data.path` to it.

    In a multi-process job process 0 writes the dataset while the others wait, then they find it."""
    if config.data.path or not config.data.synthetic.enabled:
        return
    syn = config.data.synthetic
    data_root = os.path.join(workdir, "data")

    def ensure() -> str:
        return os.fspath(ensure_synthetic_dataset(data_root, num_patients=syn.num_patients, seed=syn.seed,
                                                  image_size=syn.image_size))

    if jax.process_index() != 0:
        multihost_utils.sync_global_devices("afm_jax:synthetic_dataset")
    path = ensure()
    if jax.process_index() == 0 and jax.process_count() > 1:
        multihost_utils.sync_global_devices("afm_jax:synthetic_dataset")
    with config.unlocked():
        config.data.path = path


# ======================================================================================
# DICOM
# ======================================================================================


@dataclasses.dataclass(frozen=True)
class _DicomStyle:
    """How one study's device stores its images (drawn per study, independent of class)."""

    photometric: str  # MONOCHROME1 stores inverted pixels
    bits_stored: int  # 12 or 16
    rescale: tuple[float, float]  # slope, intercept
    body_part: str
    study_date: str  # follow-up studies come 3 weeks to a year after the first
    study_time: str
    also_pixel_spacing: bool  # DX: write PixelSpacing beside ImagerPixelSpacing
    sex: str


def _hash_rng(*parts: str) -> np.random.Generator:
    digest = hashlib.sha256("\x00".join(parts).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _dicom_style(img: SyntheticImage, study_index: int) -> _DicomStyle:
    patient_rng, rng = _hash_rng("patient", img.patient_id), _hash_rng("style", img.study_uid)
    first_year = min(int(img.birth_date[:4]) + int(patient_rng.integers(55, 90)), 2022)
    first = datetime.date(first_year, 1, 1) + datetime.timedelta(days=int(patient_rng.integers(365)))
    date = first + datetime.timedelta(days=study_index * int(rng.integers(21, 365)))
    return _DicomStyle(
        photometric=str(rng.choice(("MONOCHROME1", "MONOCHROME2"))),
        bits_stored=int(rng.choice((12, 16))),
        rescale=(1.0, 0.0) if rng.random() < 0.8 else (0.5, 0.0),
        body_part="LEG" if rng.random() < 0.15 else img.body_part,
        study_date=date.strftime("%Y%m%d"),
        study_time=f"{rng.integers(7, 19):02d}{rng.integers(60):02d}{rng.integers(60):02d}",
        also_pixel_spacing=bool(rng.random() < 0.5),
        sex="F" if patient_rng.random() < 0.85 else "M",
    )


def stored_pixels(pixels: np.ndarray, photometric: str, bits_stored: int) -> np.ndarray:
    """The stored DICOM pixel values for a bone-bright uint16 image at the given bit depth."""
    top = (1 << bits_stored) - 1
    scaled = np.round(pixels.astype(np.float64) * (top / 65535.0)).astype(np.uint16)
    return (top - scaled).astype(np.uint16) if photometric == "MONOCHROME1" else scaled


def _to_dicom(img: SyntheticImage, study_index: int, instance_number: int,
              style: _DicomStyle | None = None) -> "pydicom.Dataset":
    """The DICOM dataset of one image; pixels stored as the study's device would store them
    (or as `style` says, for twins that differ only in storage)."""
    import pydicom  # pydicom: slow to import, only the DICOM writer needs it
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import (PYDICOM_IMPLEMENTATION_UID, ComputedRadiographyImageStorage,
                             DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)

    style = style or _dicom_style(img, study_index)
    sop_class = ComputedRadiographyImageStorage if img.modality == "CR" else DigitalXRayImageStorageForPresentation
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = img.sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, img.sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = img.study_uid, img.series_uid
    ds.PatientName, ds.PatientID = img.patient_name, img.patient_id
    ds.PatientBirthDate, ds.PatientSex = img.birth_date, style.sex
    ds.AccessionNumber = img.accession_number
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = style.study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = style.study_time
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = str(study_index + 1), instance_number, 1  # a series per image
    ds.ReferringPhysicianName = "WELBY^MARCUS"
    ds.InstitutionName = "SYNTHETIC GENERAL HOSPITAL"
    ds.Manufacturer = "AFM-JAX SYNTHETIC"
    ds.StudyDescription = f"FEMUR {img.laterality}"
    ds.SeriesDescription = f"FEMUR {img.view}"
    ds.Modality = img.modality
    ds.ImageType = ["DERIVED", "PRIMARY"] if img.modality == "CR" else ["ORIGINAL", "PRIMARY"]
    ds.BodyPartExamined = style.body_part
    ds.ViewPosition = img.view
    ds.ImageLaterality = img.laterality
    if img.modality == "CR":
        ds.Laterality = img.laterality
        ds.PixelSpacing = list(img.pixel_spacing_mm)
    else:
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImagerPixelSpacing = list(img.pixel_spacing_mm)
        if style.also_pixel_spacing:
            ds.PixelSpacing = list(img.pixel_spacing_mm)
        ds.PresentationLUTShape = "INVERSE" if style.photometric == "MONOCHROME1" else "IDENTITY"
        ds.RescaleType = "US"

    stored = stored_pixels(img.pixels, style.photometric, style.bits_stored)
    ds.set_pixel_data(stored, style.photometric, style.bits_stored, generate_instance_uid=False)
    slope, intercept = style.rescale
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    lo, hi = np.percentile(stored, (1.0, 99.5)) * slope + intercept
    ds.WindowCenter, ds.WindowWidth = round(float(lo + hi) / 2, 1), round(max(float(hi - lo), 1.0), 1)
    return ds


def write_dicom_twin(img: SyntheticImage, path: str | os.PathLike, *, photometric: str, bits_stored: int = 12,
                     rescale: tuple[float, float] = (1.0, 0.0)) -> pathlib.Path:
    """Writes `img` as one DICOM file with the given storage (MONOCHROME1/2, bits, rescale), all else
    as `write_dicom_files` would write it; for tests that two storages of one image read the same.

    The window is mirrored with the pixels: for MONOCHROME1 the stored values are inverted, and its
    window centre is placed at the same pixels (c1 = top - c2 + 1, see the LINEAR window's
    half-step), so windowed outputs of both twins must be equal too."""
    base = _dicom_style(img, 0)
    style = dataclasses.replace(base, photometric=photometric, bits_stored=int(bits_stored), rescale=tuple(rescale))
    ds = _to_dicom(img, study_index=0, instance_number=1, style=style)
    if photometric == "MONOCHROME1":  # mirror the window of the MONOCHROME2 twin
        twin = _to_dicom(img, 0, 1, dataclasses.replace(style, photometric="MONOCHROME2"))
        slope, intercept = rescale
        top = ((1 << int(bits_stored)) - 1) * slope + 2 * intercept
        ds.WindowCenter = float(top - float(twin.WindowCenter) + 1)
        ds.WindowWidth = twin.WindowWidth
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


def write_dicom_files(out_dir: str | os.PathLike, *, num_patients: int = 10, seed: int = 0, image_size: int = 256,
                      progress: bool = False) -> list[pathlib.Path]:
    """Writes the same images as DICOM in `out_dir/<patient>/<accession>/IM####[.dcm]`; returns the paths.

    A realistic raw input for the DICOM converter: CR and DX, MONOCHROME1 (inverted pixels) and
    MONOCHROME2, 12- and 16-bit stored, fake names/IDs/dates in the header, some files without
    extension. Also writes `labels.csv` (path relative to `out_dir`, label_name).
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[tuple[pathlib.Path, str]] = []
    images_in_study: dict[str, int] = {}
    studies_of_patient: dict[str, list[str]] = {}
    images: Iterable[SyntheticImage] = iter_synthetic_images(num_patients, seed=seed, image_size=image_size)
    if progress:
        images = tqdm(images, total=count_synthetic_images(num_patients, seed=seed), desc="writing DICOM", unit="img")
    for img in images:
        number = images_in_study[img.study_uid] = images_in_study.get(img.study_uid, 0) + 1
        studies = studies_of_patient.setdefault(img.patient_id, [])
        if img.study_uid not in studies:
            studies.append(img.study_uid)
        suffix = "" if _hash_rng("extension", img.sop_uid).random() < 0.35 else ".dcm"
        path = out / img.patient_id / img.accession_number / f"IM{number:04d}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds = _to_dicom(img, study_index=studies.index(img.study_uid), instance_number=number)
        ds.save_as(path, enforce_file_format=True)
        paths.append((path, img.label_name))
    with open(out / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("path", "label_name"))
        writer.writerows((p.relative_to(out).as_posix(), label) for p, label in paths)
    return [p for p, _ in paths]


# ======================================================================================
# CLI
# ======================================================================================


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num_patients", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--dicom", action="store_true", help="write a DICOM tree (+ labels.csv) instead of records")
    args = parser.parse_args(argv)
    if args.dicom:
        paths = write_dicom_files(args.out, num_patients=args.num_patients, seed=args.seed,
                                  image_size=args.image_size, progress=True)
        print(f"Wrote {len(paths)} DICOM files and labels.csv under {pathlib.Path(args.out).resolve()}")
    else:
        path = build_synthetic_dataset(args.out, num_patients=args.num_patients, seed=args.seed,
                                       image_size=args.image_size)
        print(f"Wrote synthetic dataset to {path}")


if __name__ == "__main__":
    main()
