"""Embedded demo data: deterministic synthetic femur radiographs rendered by attenuation, and a DICOM writer.

Why: the real femur data (~500k DICOMs) is private, yet every part of the pipeline — DICOM
conversion, records, pretraining, probing, curation — needs realistic input in tests and in the
demo. This module draws synthetic patients whose radiographs carry the signs that define the
three classes, and vary in every other way a clinical femur series varies:

* ``normal``: an intact femur.
* ``nff`` (normal femoral fracture): an oblique, spiral or comminuted shaft fracture with a jagged
  line, the distal fragment displaced (shift, shortening with overlapping fragments, angulation)
  and, if comminuted, a split butterfly segment and loose cortical chips.
* ``aff`` (atypical femoral fracture): focal lateral cortical thickening ("beaking") with either a
  thin transverse lucency running in from the lateral cortex (incomplete) or a complete transverse /
  short-oblique line with an optional medial spike, little displacement and no comminution.

How (docs/synthetic.md): each pixel is a line integral ``A = sum(mu_i * L_i)`` through an analytic
leg — soft tissue (thigh, knee, calf), cortical and trabecular bone (femur from the head to the
condyles, pelvis, patella, tibia, fibula) and metal (intramedullary nails, plates and screws, hip
prostheses, the lead side marker). Bone attenuations are given relative to the soft tissue they
displace, so removing bone (a fracture gap, a displaced fragment) leaves exactly the soft-tissue
integral: a gap is as bright as soft tissue, never black. The detector sees ``exp(-A)`` through
the collimator, heel effect and anti-scatter grid, plus blurred scatter, focal-spot blur and quantum
noise; processing takes ``-log``, sharpens and maps it through a sigmoid LUT (bone bright,
MONOCHROME2 sense) to uint16. Everything is vectorised numpy/cv2.

Randomness is layered so that the fracture is the *only* class-dependent part:

* patient level (``default_rng([seed, i, 0])``): anatomy, laterality, number of images, fake
  identifiers, the implant of the follow-up study, fracture shape (its own stream, shared by all
  images of the patient);
* image level (``default_rng([seed, i, j, 1])``): framing (proximal / mid-shaft / distal with the
  knee) and magnification, pose, collimation, grid, exposure, scatter, noise, processing and the
  side marker's place — all drawn before, and independently of, the class;
* labels follow a low-discrepancy (Weyl) sequence over patient index, so class fractions hold
  closely for any number of patients and patient ``i`` never depends on ``num_patients``.

Canonical frame (used by all geometry below): a right femur, image x to the right (medial in AP;
posterior in LAT), y down, one unit = ``_FIELD_MM`` millimetres; the femoral head lies near
y = -0.3 and the knee joint near y = 1.5. An image is a square window of this frame (its framing).
Left femurs are mirrored images of right ones; the marker, collimator and grid are not mirrored.

CLI: ``python -m afm_jax.data.synthetic --out DIR [--num_patients N] [--seed S] [--image_size P]
[--dicom]`` writes the records dataset (default) or a DICOM tree with ``labels.csv``;
``--contact_sheet PNG`` draws the per class x view contact sheet (docs/synthetic_contact_sheet.png).
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
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import cv2
import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from afm_jax import errors, io
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
FRAMINGS = ("proximal", "mid", "distal")  # hip + proximal shaft; shaft; distal shaft + knee
IMPLANTS = ("none", "nail", "plate", "hip")  # intramedullary nail, plate and screws, hip prosthesis

_FIELD_MM = 240.0  # one canonical unit in millimetres
_SHAFT_X = -0.06  # shaft axis position at the top of the shaft (head lies to the right)
_SHAFT_TOP = -0.2  # where the shaft meets the neck
# Fracture level along the shaft: fracture_position 0 = sub-trochanteric, 1 = mid-shaft.
_FRACTURE_Y_RANGE = (-0.04, 0.55)
_FRAMING_P = (0.5, 0.3, 0.2)
_IMPLANT_P = 0.5  # fraction of follow-up studies with an implant (any class)
# Effective linear attenuation per canonical unit of path (1 unit = 240 mm). Bone and metal are given
# *relative to the soft tissue they displace* (so A = mu_soft * L_leg + sum (mu_i - mu_soft) L_i).
# Cortex 11/unit = 0.46/cm (cortical bone at ~60 keV effective: ~0.5/cm); soft tissue is set ~4x below
# its physical 0.2/cm, standing in for the dynamic-range compression (equalisation) of clinical
# processing that keeps the thigh grey rather than white; marrow ~ soft tissue.
_MU_CORTEX = 11.0
_MU_TRABECULAR = 0.3 * _MU_CORTEX
_MU_MARROW = 0.0
_MU_PELVIS = 0.30 * _MU_CORTEX
_MU_SOFT = 1.2
_MU_METAL = 7.0 * _MU_CORTEX  # steel / titanium alloy implants
_MARKER_ATTENUATION = 6.0  # a lead letter stops nearly the whole beam
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
    # Nuisance facts, for tests and the contact sheet only (not in the record schema):
    framing: str = "proximal"  # one of FRAMINGS
    implant: str = "none"  # one of IMPLANTS
    marker_xy: tuple[float, float] = (0.0, 0.0)  # side-marker centre, fraction of width / height


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
    fracture_seed: int  # seeds the fracture (and implant) shape, so all views show the same one
    knee_y: float = 1.5  # height of the knee joint line (femoral length)
    valgus: float = 0.1  # slope of the shaft in AP (the knee lies medial to the hip), radians

    @classmethod
    def sample(cls, rng: np.random.Generator) -> FemurAnatomy:
        """Draws a plausible adult femur."""
        return cls(
            shaft_radius=float(rng.uniform(0.052, 0.064)),
            cortex_fraction=float(rng.uniform(0.25, 0.38)),
            neck_shaft_angle_deg=float(rng.uniform(122.0, 136.0)),
            head_scale=float(rng.uniform(1.3, 1.5)),
            bow=float(rng.uniform(0.015, 0.04)),
            thigh_radius=float(rng.uniform(0.27, 0.35)),
            thigh_offset=float(rng.uniform(0.0, 0.06)),
            bone_density=float(rng.uniform(0.85, 1.15)),
            fracture_seed=int(rng.integers(2**62)),
            knee_y=float(rng.uniform(1.4, 1.6)),
            valgus=float(rng.uniform(0.07, 0.12)),
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


def _ellipsoid_path(
    x: np.ndarray,
    y: np.ndarray,
    centre: tuple[float, float],
    axes: tuple[float, float],
    depth: float,
    angle: float = 0.0,
) -> np.ndarray:
    """Projected path length through an ellipsoid with in-plane semi-axes `axes` and half-depth `depth`."""
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = x - centre[0], y - centre[1]
    q = np.square((c * dx + s * dy) / axes[0]) + np.square((-s * dx + c * dy) / axes[1])
    return 2.0 * depth * np.sqrt(np.maximum(1.0 - q, 0.0))


def _shell(full_path: np.ndarray, core_path: np.ndarray) -> np.ndarray:
    """Trabecular body with a cortical shell, from the paths through the whole and the core."""
    return _MU_TRABECULAR * core_path + _MU_CORTEX * (full_path - core_path)


def _shelled_ellipsoid(x, y, centre, axes, depth, angle=0.0, core=0.88) -> np.ndarray:
    return _shell(
        _ellipsoid_path(x, y, centre, axes, depth, angle),
        _ellipsoid_path(x, y, centre, (core * axes[0], core * axes[1]), core * depth, angle),
    )


def _capsule_distance(x, y, start: tuple[float, float], direction: tuple[float, float], length: float):
    """(distance to the segment start + t*length*direction, t in [0, 1]) for every point."""
    px, py = x - start[0], y - start[1]
    t = np.clip((px * direction[0] + py * direction[1]) / length, 0.0, 1.0)
    return np.hypot(px - t * length * direction[0], py - t * length * direction[1]), t


def _shaft_centre(y: np.ndarray | float, anat: FemurAnatomy, view: str) -> np.ndarray | float:
    """x of the shaft axis at height y: slanted medially in AP (valgus), bowed anteriorly (-x) in LAT."""
    t = np.clip((y - _SHAFT_TOP) / (anat.knee_y - _SHAFT_TOP), 0.0, 1.0)
    bow = anat.bow if view == "LAT" else anat.bow / 3.0
    slant = anat.valgus if view == "AP" else 0.0
    return _SHAFT_X + slant * (y - _SHAFT_TOP) - 4.0 * bow * t * (1.0 - t)


def _shaft_radii(y: np.ndarray, anat: FemurAnatomy, view: str):
    """(outer radius, inner radius, canal attenuation, proximal flare weight) of the shaft at height y."""
    r0 = anat.shaft_radius
    prox = _sigmoid((-0.1 - y) / 0.04)  # proximal metaphysis: wider, thinner cortex, trabecular canal
    dist = _sigmoid((y - (anat.knee_y - 0.21)) / 0.045)  # distal metaphysis flaring to the condyles
    outer = r0 * (1.0 + 0.45 * prox + (1.65 if view == "AP" else 1.05) * dist)
    inner = outer - anat.cortex_fraction * r0 * (1.0 - 0.65 * prox) * (1.0 - 0.8 * dist)
    canal_mu = _MU_MARROW + (_MU_TRABECULAR - _MU_MARROW) * np.maximum(prox, dist)
    return outer, inner, canal_mu, prox


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
    x_lt = float(_shaft_centre(-0.1, anat, view))
    if view == "AP":
        angle, length = math.radians(anat.neck_shaft_angle_deg), 2.6 * r0
        base = (x_top + 0.15 * r0, -0.20)
        gt_centre, gt_axes = (x_top - 0.55 * r0, -0.24), (0.85 * r0, 1.3 * r0)
        lt_centre, lt_axes = (x_lt + 1.1 * r0, -0.10), (0.45 * r0, 0.55 * r0)
    else:  # lateral: neck foreshortened, head over the trochanter, lesser trochanter posterior
        angle, length = math.radians(168.0), 2.2 * r0
        base = (x_top + 0.1 * r0, -0.21)
        gt_centre, gt_axes = (x_top + 0.2 * r0, -0.25), (1.0 * r0, 1.2 * r0)
        lt_centre, lt_axes = (x_lt + 1.05 * r0, -0.09), (0.35 * r0, 0.5 * r0)
    direction = (math.sin(angle), math.cos(angle))  # angle from the downward shaft axis
    head = (base[0] + length * direction[0], base[1] + length * direction[1])
    return _Proximal(base, direction, length, head, anat.head_scale * r0, gt_centre, gt_axes, lt_centre, lt_axes)


@dataclasses.dataclass(frozen=True)
class _Beak:
    """Focal lateral cortical thickening (AFF): a Gaussian bump of the outer lateral surface."""

    y: float
    height: float
    sigma: float


def _bone_attenuation(
    x: np.ndarray, y: np.ndarray, anat: FemurAnatomy, view: str, beak: _Beak | None = None, native_head: bool = True
) -> np.ndarray:
    """Attenuation (relative to soft tissue) of the intact femur and the bones of the knee at (x, y).

    Parts far from the points asked for are skipped (the arrays may be a band of the image)."""
    u = x - _shaft_centre(y, anat, view)
    outer, inner, canal_mu, _ = _shaft_radii(y, anat, view)
    outer_path, inner_path = _chord(outer, u), _chord(inner, u)
    bone = (_MU_CORTEX * (outer_path - inner_path) + canal_mu * inner_path) * (
        _soft_step(y + 0.23, 0.03) * _soft_step(anat.knee_y - 0.075 - y, 0.04)
    )
    if beak is not None:
        bone = bone + _beak_attenuation(u, y, outer, inner, beak)
    if float(y.min()) < 0.05:
        bone = np.maximum(bone, _proximal_attenuation(x, y, anat, view, native_head))
    if float(y.max()) > anat.knee_y - 0.3:
        bone = bone + _knee_attenuation(x, y, anat, view)
    return bone * anat.bone_density


def _proximal_attenuation(x, y, anat: FemurAnatomy, view: str, native_head: bool) -> np.ndarray:
    """Neck (a capsule narrowing towards the head), head and trochanters, each a shelled solid."""
    r0, prox = anat.shaft_radius, _proximal(anat, view)
    bone = np.zeros_like(x)
    if native_head:
        d, t = _capsule_distance(x, y, prox.neck_base, prox.neck_dir, prox.neck_length)
        neck_r = r0 * (1.3 - 0.55 * t)
        bone = _shell(_chord(neck_r, d), _chord(0.8 * neck_r, d))
        head_d = np.hypot(x - prox.head_centre[0], y - prox.head_centre[1])
        bone = np.maximum(bone, _shell(_chord(prox.head_radius, head_d), _chord(0.88 * prox.head_radius, head_d)))
    for centre, axes in ((prox.gt_centre, prox.gt_axes), (prox.lt_centre, prox.lt_axes)):
        bone = np.maximum(bone, _shelled_ellipsoid(x, y, centre, axes, 1.1 * min(axes), core=0.85))
    return bone


def _knee_attenuation(x, y, anat: FemurAnatomy, view: str) -> np.ndarray:
    """Femoral condyles, patella, tibia and fibula (they move with the distal femur)."""
    r0, ky = anat.shaft_radius, anat.knee_y
    cx = float(_shaft_centre(ky, anat, view))
    top = ky + 0.02  # tibial plateau, 5 mm below the condyles (joint space)
    if view == "AP":
        bone = np.maximum(
            _shelled_ellipsoid(x, y, (cx + 1.2 * r0, ky - 0.07), (1.55 * r0, 1.3 * r0), 1.5 * r0, core=0.93),
            _shelled_ellipsoid(x, y, (cx - 1.2 * r0, ky - 0.073), (1.5 * r0, 1.25 * r0), 1.45 * r0, core=0.93),
        )
        bone = bone + _shelled_ellipsoid(x, y, (cx + 0.1 * r0, ky - 0.11), (1.3 * r0, 1.55 * r0), 0.9 * r0)
        tx, plateau, fib_x = cx + 0.1 * r0, 1.75, cx - 2.2 * r0
    else:
        bone = _shelled_ellipsoid(x, y, (cx + 0.55 * r0, ky - 0.085), (1.85 * r0, 1.7 * r0), 1.9 * r0, core=0.93)
        bone = bone + _shelled_ellipsoid(x, y, (cx - 2.75 * r0, ky - 0.11), (0.7 * r0, 1.6 * r0), 1.5 * r0, 0.2)
        tx, plateau, fib_x = cx + 0.35 * r0, 1.3, cx + 1.3 * r0
    # Tibia: a shaft (radius 0.85 r0) flaring to the plateau, thin cortex and trabecular metaphysis.
    flare = _sigmoid(((top + 0.1) - y) / 0.035)
    outer = r0 * (0.85 + plateau * flare)
    inner = outer - 0.3 * r0 * (1.0 - 0.8 * flare)
    u = x - tx
    tibia = (
        _MU_CORTEX * (_chord(outer, u) - _chord(inner, u)) + _MU_TRABECULAR * flare * _chord(inner, u)
    ) * _soft_step(y - top - 0.002 * np.square(u / r0), 0.008)
    fibula = _chord(0.28 * r0, x - fib_x) * _MU_CORTEX * 0.6 * _soft_step(y - (top + 0.08), 0.01) + _shelled_ellipsoid(
        x, y, (fib_x, top + 0.075), (0.55 * r0, 0.7 * r0), 0.55 * r0
    )
    return bone + tibia + fibula


def _beak_attenuation(u: np.ndarray, y: np.ndarray, outer: np.ndarray, inner: np.ndarray, beak: _Beak) -> np.ndarray:
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
    if float(y.min()) > 0.0:
        return np.zeros_like(x)
    prox = _proximal(anat, view)
    hx, hy = prox.head_centre
    rh = prox.head_radius
    if view == "LAT":
        return _MU_PELVIS * 0.5 * _ellipsoid_path(x, y, (hx - 0.3 * rh, hy - 0.5 * rh), (2.6 * rh, 2.0 * rh), 0.6 * rh)
    r = np.hypot(x - hx, y - hy)
    roof = (
        _chord(0.22 * rh, r - 1.3 * rh)
        * 2.5
        * _soft_step(hy + 0.3 * rh - y, 0.3 * rh)
        * _soft_step(x - (hx - 1.15 * rh), 0.2 * rh)
    )
    ilium = _ellipsoid_path(x, y, (hx + 0.6 * rh, hy - 2.3 * rh), (2.6 * rh, 1.4 * rh), 0.3 * rh, -0.45)
    ring_c = (hx + 1.7 * rh, hy + 2.1 * rh)
    ring = _ellipsoid_path(x, y, ring_c, (1.3 * rh, 1.6 * rh), 0.5 * rh, 0.4) - _ellipsoid_path(
        x, y, ring_c, (0.85 * rh, 1.15 * rh), 0.5 * rh, 0.4
    )
    return _MU_PELVIS * (roof + ilium + np.maximum(ring, 0.0))


def _soft_tissue_attenuation(x: np.ndarray, y: np.ndarray, anat: FemurAnatomy, view: str) -> np.ndarray:
    """Leg silhouette: an elliptic cylinder (fat) with a denser muscle core, widest at the hip and
    narrowing over the knee to the calf; it follows half the shaft's slant."""
    slant = anat.valgus if view == "AP" else 0.0
    centre = _SHAFT_X + anat.thigh_offset * (1.0 if view == "AP" else -0.5) + 0.5 * slant * (y - _SHAFT_TOP)
    radius = (
        anat.thigh_radius
        * (1.0 + 0.3 * _sigmoid((-0.2 - y) / 0.08))
        * (1.0 - 0.32 * _sigmoid((y - (anat.knee_y - 0.35)) / 0.12))
    )
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


def _line_distance(
    x: np.ndarray,
    y: np.ndarray,
    anat: FemurAnatomy,
    view: str,
    y0: float,
    slope: float,
    wobble: float = 0.0,
    spike_start: float | None = None,
    spike_slope: float = 0.0,
    rough: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """Signed distance (approx.) from the fracture line y = y0 + slope*u [+ wobble, + medial spike,
    + jagged roughness]; > 0 distal."""
    # Beyond the shaft the line runs on transversely, so it never cuts the neck, head or knee.
    r0 = anat.shaft_radius
    u = np.clip(x - _shaft_centre(y, anat, view), -1.5 * r0, 1.5 * r0)
    offset = slope * u
    if wobble:  # spiral fractures project as an S-shaped steep line
        offset = offset + wobble * np.sin(np.pi * u / r0)
    if spike_start is not None:  # AFF medial spike: the line turns oblique near the medial cortex
        offset = offset + spike_slope * np.maximum(u - spike_start, 0.0)
    if rough[0]:  # interdigitating fracture surfaces
        offset = offset + rough[0] * (np.sin(9.0 * u / r0 + rough[1]) + 0.6 * np.sin(23.0 * u / r0 + rough[2]))
    return (y - y0 - offset) / math.sqrt(1.0 + slope * slope)


def _split_fragments(
    dist: Callable[[np.ndarray, np.ndarray], np.ndarray],
    gap: float,
    edge: float,
    shift: tuple[float, float],
    angle: float,
    pivot: tuple[float, float],
) -> tuple[_Fragment, ...]:
    """Proximal fragment in place, distal fragment displaced, a gap of width `gap` between them."""
    return (
        _Fragment(lambda x, y: _soft_step(-dist(x, y) - gap / 2, edge)),
        _Fragment(lambda x, y: _soft_step(dist(x, y) - gap / 2, edge), shift, angle, pivot),
    )


def _signed(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high) * rng.choice((-1.0, 1.0)))


def _plan_fracture(
    anat: FemurAnatomy, view: str, fracture_type: str, position: float, edge: float, fixed: bool = False
) -> _FracturePlan:
    """Fracture geometry for one view. Shapes come from the patient's fracture seed; both views are
    always drawn (in a fixed order) so AP and LAT of one patient show the same fracture. A `fixed`
    fracture (an implant holds it) keeps a sixth of its displacement."""
    rng = np.random.default_rng(anat.fracture_seed)
    r0, y0 = anat.shaft_radius, _fracture_y(position)
    draws = [_draw_fracture_params(rng, fracture_type, r0) for _ in VIEWS]
    p = draws[VIEWS.index(view)]
    keep = 1.0 / 6.0 if fixed else 1.0
    pivot = (float(_shaft_centre(y0, anat, view)), y0)

    def moved(shift, angle):
        return dict(shift=(keep * shift[0], keep * shift[1]), angle=keep * angle, pivot=pivot)

    disp = moved(p.get("shift", (0.0, 0.0)), p.get("angle", 0.0))
    rough = p["rough"]

    if fracture_type in ("oblique", "spiral"):

        def dist(x, y):
            return _line_distance(x, y, anat, view, y0, p["slope"], wobble=p.get("wobble", 0.0), rough=rough)

        return _FracturePlan(_split_fragments(dist, p["gap"], edge, **disp))

    if fracture_type == "comminuted":

        def dist_a(x, y):
            return _line_distance(x, y, anat, view, y0 - p["half_zone"], p["slope_a"], rough=rough)

        def dist_b(x, y):
            return _line_distance(
                x, y, anat, view, y0 + p["half_zone"], p["slope_b"], rough=(rough[0], rough[2], rough[1])
            )

        def dist_c(x, y):  # longitudinal split of the middle zone into a lateral and a medial piece
            return (x - _shaft_centre(y, anat, view)) - p["split_u"] - p["split_slope"] * (y - y0)

        g = p["gap"] / 2

        def middle(x, y):
            return _soft_step(dist_a(x, y) - g, edge) * _soft_step(-dist_b(x, y) - g, edge)

        fragments = (
            _Fragment(lambda x, y: _soft_step(-dist_a(x, y) - g, edge)),
            _Fragment(lambda x, y: _soft_step(dist_b(x, y) - g, edge), **disp),
            _Fragment(
                lambda x, y: middle(x, y) * _soft_step(-dist_c(x, y) - g, edge),
                **moved(p["lateral_shift"], p["lateral_angle"]),
            ),
            _Fragment(
                lambda x, y: middle(x, y) * _soft_step(dist_c(x, y) - g, edge),
                **moved(p["medial_shift"], p["medial_angle"]),
            ),
        )
        chips = tuple((pivot[0] + cx, y0 + cy, ax, ay, a) for cx, cy, ax, ay, a in p["chips"])
        return _FracturePlan(fragments, chips)

    if fracture_type == "transverse":
        beak = _Beak(y0 + p["beak_offset"], p["beak_height"], p["beak_sigma"])
        if p["complete"]:

            def dist(x, y):
                return _line_distance(
                    x,
                    y,
                    anat,
                    view,
                    y0,
                    p["slope"],
                    spike_start=p["spike_start"],
                    spike_slope=p["spike_slope"],
                    rough=(0.3 * rough[0], *rough[1:]),
                )

            return _FracturePlan(_split_fragments(dist, p["gap"], edge, **disp), beak=beak)
        tip = -r0 + p["extent"] * 2.0 * r0  # incomplete: the crack runs in from the lateral cortex, then stops

        def intact_except_crack(x, y):
            u = x - _shaft_centre(y, anat, view)
            half_width = p["gap"] / 2 * np.clip((tip - u) / (0.5 * r0), 0.0, 1.0)
            dist = _line_distance(x, y, anat, view, y0, p["slope"])
            return 1.0 - _soft_step(half_width - np.abs(dist), edge)

        return _FracturePlan((_Fragment(intact_except_crack),), beak=beak)

    raise ValueError(f"Unknown fracture_type {fracture_type!r}; expected one of {sum(FRACTURE_TYPES.values(), ())}.")


def _draw_fracture_params(rng: np.random.Generator, fracture_type: str, r0: float) -> dict:
    """Random shape parameters of one fracture type (one view), in canonical units (r0 = shaft radius).

    NFF: wide, jagged, displaced (shift up to ~1.3 shaft radii, shortening that overlaps the fragments,
    angulation up to 12 degrees). AFF: 0.4-1.2 mm (incomplete) or 0.7-1.7 mm (complete) lines, nearly
    undisplaced, with a lateral beak."""
    deg = math.radians
    rough = (rng.uniform(0.04, 0.12) * r0, rng.uniform(0, 2 * math.pi), rng.uniform(0, 2 * math.pi))
    if fracture_type == "oblique":
        return dict(
            slope=math.tan(_signed(rng, deg(30), deg(60))),
            gap=rng.uniform(0.004, 0.01),
            shift=(_signed(rng, 0.4, 1.3) * r0, rng.uniform(-1.2, 0.1) * r0),
            angle=_signed(rng, 0.0, deg(12)),
            rough=rough,
        )
    if fracture_type == "spiral":
        return dict(
            slope=math.tan(_signed(rng, deg(50), deg(68))),
            wobble=rng.uniform(0.25, 0.45) * r0,
            gap=rng.uniform(0.004, 0.01),
            shift=(_signed(rng, 0.3, 1.1) * r0, rng.uniform(-1.2, 0.1) * r0),
            angle=_signed(rng, 0.0, deg(10)),
            rough=rough,
        )
    if fracture_type == "comminuted":
        slope_a = _signed(rng, 0.15, 0.8)
        slope_b = slope_a + rng.uniform(-0.6, 0.6)
        chips = tuple(
            (
                rng.uniform(-1.7, 1.7) * r0,
                rng.uniform(-1.3, 1.3) * r0,
                rng.uniform(0.1, 0.3) * r0,
                rng.uniform(0.06, 0.16) * r0,
                rng.uniform(0, math.pi),
            )
            for _ in range(rng.integers(3, 8))
        )
        return dict(
            slope_a=slope_a,
            slope_b=slope_b,
            gap=rng.uniform(0.004, 0.01),
            half_zone=(0.55 * abs(slope_a - slope_b) + rng.uniform(0.4, 0.8)) * r0,
            split_u=rng.uniform(-0.3, 0.3) * r0,
            split_slope=rng.uniform(-0.4, 0.4),
            shift=(_signed(rng, 0.3, 1.1) * r0, rng.uniform(-1.0, 0.1) * r0),
            angle=_signed(rng, 0.0, deg(12)),
            lateral_shift=(-rng.uniform(0.25, 0.8) * r0, rng.uniform(-0.3, 0.3) * r0),
            lateral_angle=_signed(rng, deg(5), deg(25)),
            medial_shift=(rng.uniform(0.25, 0.8) * r0, rng.uniform(-0.3, 0.3) * r0),
            medial_angle=_signed(rng, deg(5), deg(25)),
            chips=chips,
            rough=rough,
        )
    if fracture_type == "transverse":
        complete = bool(rng.random() < 0.5)
        return dict(
            slope=math.tan(_signed(rng, 0.0, deg(20) if complete else deg(6))),
            gap=rng.uniform(0.003, 0.007) if complete else rng.uniform(0.0017, 0.005),
            complete=complete,
            extent=rng.uniform(0.15, 0.55),
            spike_start=(rng.uniform(0.1, 0.5) * r0 if rng.random() < 0.7 else None),
            spike_slope=_signed(rng, 1.2, 2.2),
            shift=(_signed(rng, 0.0, 0.25) * r0, rng.uniform(-0.1, 0.05) * r0),
            angle=_signed(rng, 0.0, deg(2.5)),
            beak_height=rng.uniform(0.3, 0.55) * r0,
            beak_sigma=rng.uniform(0.6, 1.0) * r0,
            beak_offset=rng.uniform(-0.15, 0.15) * r0,
            rough=rough,
        )
    raise ValueError(f"No fracture parameters for fracture_type {fracture_type!r}.")


def _fractured_bone(
    x: np.ndarray, y: np.ndarray, anat: FemurAnatomy, view: str, plan: _FracturePlan | None, native_head: bool = True
) -> np.ndarray:
    """Bone attenuation with each fragment moved rigidly (sampled at its undisplaced coordinates).

    A fragment's bone is evaluated only on the image rows where its membership is non-zero."""
    if plan is None:
        return _bone_attenuation(x, y, anat, view, native_head=native_head)
    total = np.zeros_like(x)
    for frag in plan.fragments:
        c, s = math.cos(frag.angle), math.sin(frag.angle)
        px, py = x - frag.pivot[0] - frag.shift[0], y - frag.pivot[1] - frag.shift[1]
        sx, sy = c * px + s * py + frag.pivot[0], -s * px + c * py + frag.pivot[1]  # inverse rotation
        inside = frag.inside(sx, sy)
        rows = np.flatnonzero(inside.max(axis=1) > 0)
        if rows.size == 0:
            continue
        band = slice(int(rows[0]), int(rows[-1]) + 1)
        total[band] += _bone_attenuation(sx[band], sy[band], anat, view, plan.beak, native_head) * inside[band]
    for cx, cy, ax, ay, angle in plan.chips:
        total += _MU_CORTEX * anat.bone_density * _ellipsoid_path(x, y, (cx, cy), (ax, ay), 1.5 * max(ax, ay), angle)
    return total


# ======================================================================================
# Implants (metal, in the canonical frame of the undisplaced femur)
# ======================================================================================


def _metal_rod(x, y, anat: FemurAnatomy, view: str, top: float, end: float, radius, bore: float = 0.0):
    """A rod (tube if `bore` > 0) along the shaft axis between heights `top` and `end`."""
    u = x - _shaft_centre(y, anat, view)
    path = _chord(radius, u) - (_chord(bore * radius, u) if bore else 0.0)
    return path * _soft_step(y - top, 0.004) * _soft_step(end - y, 0.004)


def _transverse_screw(x, y, anat: FemurAnatomy, view: str, ys: float, radius: float, u_from: float, u_to: float):
    """A screw across the shaft at height ys (mediolateral): a bar in AP, an end-on disc in LAT."""
    u = x - _shaft_centre(y, anat, view)
    if view == "AP":
        return _chord(radius, y - ys) * _soft_step(u - u_from, 0.003) * _soft_step(u_to - u, 0.003)
    return (u_to - u_from) * _soft_step(radius - np.hypot(u, y - ys), 0.003)


def _implant_attenuation(x: np.ndarray, y: np.ndarray, anat: FemurAnatomy, view: str, kind: str) -> np.ndarray:
    """Metal path length x mu_metal of the implant `kind`; its shape comes from the patient's seed."""
    if kind == "none":
        return np.zeros_like(x)
    rng = np.random.default_rng([anat.fracture_seed, 1])
    r0, prox = anat.shaft_radius, _proximal(anat, view)
    metal = np.zeros_like(x)
    if kind == "nail":
        end = float(rng.uniform(0.4, anat.knee_y - 0.15))
        radius = float(rng.uniform(0.38, 0.5)) * r0
        metal += _metal_rod(x, y, anat, view, -0.27, end, radius, bore=0.45)
        if rng.random() < 0.6:  # cephalomedullary: a lag screw up the neck into the head
            start = (float(_shaft_centre(-0.17, anat, view)), -0.17)
            hx, hy = prox.head_centre[0] - 0.25 * prox.head_radius * prox.neck_dir[0], prox.head_centre[1]
            length = math.hypot(hx - start[0], hy - start[1])
            d, _ = _capsule_distance(x, y, start, ((hx - start[0]) / length, (hy - start[1]) / length), length)
            metal += _chord(0.3 * r0, d)
        else:
            metal += _transverse_screw(x, y, anat, view, -0.12, 0.16 * r0, -1.4 * r0, 1.4 * r0)
        for k in range(2):  # distal locking screws
            metal += _transverse_screw(x, y, anat, view, end - 0.025 - 0.04 * k, 0.16 * r0, -1.6 * r0, 1.6 * r0)
    elif kind == "plate":
        length = float(rng.uniform(0.35, 0.8))
        centre = float(rng.uniform(0.0, anat.knee_y - 0.25 - length / 2))
        top, end = centre - length / 2, centre + length / 2
        u = x - _shaft_centre(y, anat, view)
        outer = _shaft_radii(y, anat, view)[0]
        along = _soft_step(y - top, 0.004) * _soft_step(end - y, 0.004)
        thick, width = 0.022, 0.065  # 5 mm x 16 mm
        if view == "AP":  # edge-on along the lateral cortex
            metal += width * _soft_step(-u - outer, 0.003) * _soft_step(outer + thick + u, 0.003) * along
        else:  # face-on over the shaft
            metal += thick * _soft_step(width / 2 - np.abs(u), 0.003) * along
        holes = int(rng.integers(4, 9))
        for k in range(holes):
            if rng.random() < 0.8:
                ys = top + (k + 0.5) * length / holes
                metal += _transverse_screw(x, y, anat, view, ys, 0.15 * r0, -1.15 * r0 - thick, 1.25 * r0)
    elif kind == "hip":
        end = float(rng.uniform(0.1, 0.3))
        t = np.clip((y + 0.2) / (end + 0.2), 0.0, 1.0)
        metal += _metal_rod(x, y, anat, view, -0.21, end, r0 * (0.8 - 0.45 * t))
        neck_len = prox.neck_length * 1.05
        d, _ = _capsule_distance(x, y, prox.neck_base, prox.neck_dir, neck_len)
        metal += _chord(0.4 * r0, d)
        ball = np.hypot(x - prox.head_centre[0], y - prox.head_centre[1])
        metal += _chord(0.82 * prox.head_radius, ball)
        if view == "AP":  # acetabular cup: a hemispherical shell open downwards and medially
            rc = 1.08 * prox.head_radius
            shell = _chord(rc, ball) - _chord(0.88 * rc, ball)
            metal += 0.5 * shell * _soft_step(prox.head_centre[1] + 0.2 * rc - y, 0.004)
    else:
        raise ValueError(f"implant {kind!r} is not one of {IMPLANTS}.")
    return _MU_METAL * metal


# ======================================================================================
# Image formation: framing, detector, processing
# ======================================================================================


@dataclasses.dataclass(frozen=True)
class _Acquisition:
    """Per-image framing, pose, acquisition and processing parameters (class independent)."""

    framing: str
    framing_level: float  # in [0, 1]: where, within its framing's range, the window sits
    field: float  # window size, canonical units (1/magnification)
    shift_x: float
    rotation: float
    blur_px: float  # focal spot + detector blur at 256 px
    photons: float  # unattenuated quanta per pixel at 256 px
    scatter: float  # scatter-to-primary ratio behind the grid (or without it)
    grid: int  # -1 none, 0 vertical lines, 1 horizontal lines
    grid_freq: float  # cycles per pixel
    grid_amp: float
    grid_phase: float
    heel: float
    collimation: tuple[float, float, float, float]  # left, right, top, bottom (image fractions, centred)
    collimation_angle: float
    shutter: bool  # processing blacks out the collimated border
    lut_centre: float
    lut_width: float
    black: float
    white: float
    sharpen: float
    sharpen_px: float
    texture_amount: float
    marker_edge: int  # 0 top, 1 bottom, 2 left, 3 right (of the collimated field)
    marker_along: float
    marker_inset: float
    marker_scale: float

    @classmethod
    def sample(cls, rng: np.random.Generator) -> _Acquisition:
        """Draws every image-level parameter in a fixed order (the stream never depends on the class)."""
        framing = FRAMINGS[int(np.searchsorted(np.cumsum(_FRAMING_P), rng.random(), side="right"))]
        level, field_u = float(rng.random()), float(rng.random())
        field = {"proximal": 1.2 + 0.3 * field_u, "mid": 1.0 + 0.4 * field_u, "distal": 0.95 + 0.4 * field_u}[framing]
        grid = int(rng.integers(-1, 2))
        collimated = rng.random() < 0.7
        sides = (-rng.uniform(0.26, 0.47), rng.uniform(0.26, 0.47), -rng.uniform(0.4, 0.5), rng.uniform(0.4, 0.5))
        if not collimated:
            sides = (-1.0, 1.0, -1.0, 1.0)
        elif rng.random() < 0.6:  # top/bottom leaves open
            sides = (sides[0], sides[1], -1.0, 1.0)
        return cls(
            framing=framing,
            framing_level=level,
            field=field,
            shift_x=float(rng.uniform(-0.05, 0.05)),
            rotation=math.radians(rng.uniform(-10.0, 10.0)),
            blur_px=float(rng.uniform(0.5, 1.0)),
            photons=float(np.exp(rng.uniform(math.log(400.0), math.log(5000.0)))),
            scatter=float(rng.uniform(0.03, 0.12) if grid >= 0 else rng.uniform(0.15, 0.4)),
            grid=grid,
            grid_freq=float(rng.uniform(0.3, 0.48)),
            grid_amp=float(rng.uniform(0.01, 0.05)),
            grid_phase=float(rng.uniform(0.0, 2 * math.pi)),
            heel=float(rng.uniform(-0.15, 0.15)),
            collimation=tuple(float(s) for s in sides),
            collimation_angle=math.radians(rng.uniform(-3.0, 3.0)),
            shutter=bool(rng.random() < 0.3),
            lut_centre=float(rng.uniform(0.75, 1.05)),
            lut_width=float(rng.uniform(0.32, 0.48)),
            black=float(rng.uniform(0.0, 0.04)),
            white=float(rng.uniform(0.9, 0.97)),
            sharpen=float(rng.uniform(0.0, 0.8)),
            sharpen_px=float(rng.uniform(1.0, 2.5)),
            texture_amount=float(rng.uniform(0.04, 0.1)),
            marker_edge=int(rng.integers(4)),
            marker_along=float(rng.uniform(0.08, 0.92)),
            marker_inset=float(rng.uniform(0.02, 0.1)),
            marker_scale=float(rng.uniform(0.8, 1.3)),
        )

    def window_centre(self, anat: FemurAnatomy, view: str) -> tuple[float, float]:
        """Canonical centre of the image for this patient: the framing's range, and the shaft under it."""
        half = self.field / 2
        if self.framing == "proximal":  # top edge 0.1-0.2 above the head
            cy = -0.55 + 0.13 * self.framing_level + half
        elif self.framing == "mid":
            cy = 0.35 + 0.35 * self.framing_level
        else:  # bottom edge below the knee joint
            cy = anat.knee_y + 0.12 + 0.22 * self.framing_level - half
        return float(_shaft_centre(cy, anat, view)) + 0.03 + self.shift_x, cy


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, roughly unit-variance smooth noise (bicubic upsampling of a cells x cells grid)."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


def _image_axes(size: int) -> np.ndarray:
    return (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5


def _collimator(size: int, acq: _Acquisition) -> np.ndarray:
    """Primary-beam transmission of the collimator blades (1 inside the field, 0 behind the blades)."""
    g = _image_axes(size)
    gx, gy = np.meshgrid(g, g)
    c, s = math.cos(acq.collimation_angle), math.sin(acq.collimation_angle)
    rx, ry = c * gx + s * gy, -s * gx + c * gy
    left, right, top, bottom = acq.collimation
    pen = 2.0 / size  # penumbra about two pixels
    return (
        _soft_step(rx - left, pen)
        * _soft_step(right - rx, pen)
        * _soft_step(ry - top, pen)
        * _soft_step(bottom - ry, pen)
    ).astype(np.float32)


def _marker_mask(size: int, letter: str, acq: _Acquisition) -> tuple[np.ndarray, tuple[float, float]]:
    """The lead side marker (a letter) inside the collimated field, and its centre (fractions)."""
    mask = np.zeros((size, size), dtype=np.uint8)
    scale = size / 256.0 * 0.9 * acq.marker_scale
    thickness = max(1, round(size / 256.0 * 3))
    (w, h), _ = cv2.getTextSize(letter, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    left, right, top, bottom = (min(max(s + 0.5, 0.0), 1.0) * size for s in acq.collimation)
    inset = acq.marker_inset * size + 2
    lo_x, hi_x = left + inset, max(left + inset, right - inset - w)
    lo_y, hi_y = top + inset + h, max(top + inset + h, bottom - inset)
    if acq.marker_edge < 2:  # along the top or bottom edge
        px = lo_x + acq.marker_along * (hi_x - lo_x)
        py = lo_y if acq.marker_edge == 0 else hi_y
    else:  # along the left or right edge
        px = lo_x if acq.marker_edge == 2 else hi_x
        py = lo_y + acq.marker_along * (hi_y - lo_y)
    cv2.putText(
        mask, letter, (int(round(px)), int(round(py))), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thickness, cv2.LINE_AA
    )
    return mask.astype(np.float32) / 255.0, ((px + w / 2) / size, (py - h / 2) / size)


@dataclasses.dataclass(frozen=True)
class _Rendered:
    pixels: np.ndarray
    spacing_mm: float
    framing: str
    marker_xy: tuple[float, float]
    layers: dict[str, np.ndarray] | None = None  # line integrals in image orientation (tests)


def _render(
    rng: np.random.Generator,
    *,
    label_name: str,
    fracture_type: str,
    size: int,
    view: str,
    laterality: str,
    fracture_position: float,
    anatomy: FemurAnatomy | None = None,
    framing: str | None = None,
    implant: str = "none",
    layers: bool = False,
) -> _Rendered:
    """render_femur plus the pixel spacing, framing and marker place (and, if asked, the layers)."""
    if label_name not in FRACTURE_TYPES:
        raise ValueError(f"label_name {label_name!r} is not one of {LABEL_NAMES}.")
    if fracture_type not in FRACTURE_TYPES[label_name]:
        raise ValueError(
            f"fracture_type {fracture_type!r} does not fit label {label_name!r}; "
            f"use one of {FRACTURE_TYPES[label_name]}."
        )
    if view not in VIEWS:
        raise ValueError(f"view {view!r} is not one of {VIEWS}.")
    if laterality not in LATERALITIES:
        raise ValueError(f"laterality {laterality!r} is not one of {LATERALITIES}.")
    if size < 32:
        raise ValueError(f"size {size} is too small; use at least 32 pixels.")
    if not 0.0 <= fracture_position <= 1.0:
        raise ValueError(
            f"fracture_position {fracture_position} must lie in [0, 1] (0 = sub-trochanteric, 1 = mid-shaft)."
        )
    if framing is not None and framing not in FRAMINGS:
        raise ValueError(f"framing {framing!r} is not one of {FRAMINGS} (or None to draw one).")
    if implant not in IMPLANTS:
        raise ValueError(f"implant {implant!r} is not one of {IMPLANTS}.")
    anat = anatomy if anatomy is not None else FemurAnatomy.sample(rng)
    # All image-level randomness is drawn here, before and independently of the class.
    acq = _Acquisition.sample(rng)
    if framing is not None:
        acq = dataclasses.replace(acq, framing=framing)
    texture = _smooth_noise(rng, size, 24) + 0.5 * _smooth_noise(rng, size, max(8, size // 4))
    noise = rng.standard_normal((size, size), dtype=np.float32)

    # ---- the leg: line integrals on the canonical grid of this window
    cx, cy = acq.window_centre(anat, view)
    g = _image_axes(size)
    gx, gy = np.meshgrid(g, g)
    c, s = math.cos(acq.rotation), math.sin(acq.rotation)
    x = (cx + acq.field * (c * gx + s * gy)).astype(np.float32)
    y = (cy + acq.field * (-s * gx + c * gy)).astype(np.float32)
    edge = acq.field / size  # one pixel in canonical units
    plan = (
        None
        if fracture_type == "none"
        else _plan_fracture(anat, view, fracture_type, fracture_position, edge, fixed=implant != "none")
    )
    trabecular = 0.3 + _sigmoid((-0.05 - y) / 0.05) + _sigmoid((y - anat.knee_y + 0.3) / 0.05)
    bone = _fractured_bone(x, y, anat, view, plan, native_head=implant != "hip") * (
        1.0 + acq.texture_amount * trabecular * texture
    ) + _pelvis_attenuation(x, y, anat, view)
    soft = _soft_tissue_attenuation(x, y, anat, view)
    metal = _implant_attenuation(x, y, anat, view, implant)

    # ---- detector: primary through collimator, heel effect, grid; focal-spot blur; scatter; quanta
    primary = np.exp(-(soft + bone + metal))
    primary = cv2.GaussianBlur(primary, (0, 0), acq.blur_px * size / 256.0)
    if laterality == "L":  # a left femur is the mirror image; what follows belongs to the detector
        primary = np.ascontiguousarray(primary[:, ::-1])
    marker, marker_xy = _marker_mask(size, laterality, acq)
    beam = _collimator(size, acq) * (1.0 + acq.heel * g[:, None]) * np.exp(-_MARKER_ATTENUATION * marker)
    if acq.grid >= 0:
        phase = 2 * math.pi * acq.grid_freq * np.arange(size, dtype=np.float32) + acq.grid_phase
        lines = 1.0 - acq.grid_amp * (0.5 + 0.5 * np.cos(phase))
        beam = beam * (lines[None, :] if acq.grid == 0 else lines[:, None])
    primary = primary * beam
    small = cv2.resize(primary, (32, 32), interpolation=cv2.INTER_AREA)
    scatter = cv2.resize(cv2.GaussianBlur(small, (0, 0), 4.0), (size, size), interpolation=cv2.INTER_LINEAR)
    signal = primary + acq.scatter * scatter + 0.002
    quanta = acq.photons * (256.0 / size) ** 2
    signal = signal + np.sqrt(signal / quanta) * noise

    # ---- processing: log, unsharp masking, sigmoid LUT (bone bright), shutter
    log = -np.log(np.maximum(signal, 1e-3))
    if acq.sharpen > 0:
        log = log + acq.sharpen * (log - cv2.GaussianBlur(log, (0, 0), acq.sharpen_px * size / 256.0))
    floor = float(_sigmoid(np.float32(-acq.lut_centre / acq.lut_width)))
    img = (_sigmoid((log - acq.lut_centre) / acq.lut_width) - floor) / (1.0 - floor)
    img = acq.black + (acq.white - acq.black) * np.clip(img, 0.0, 1.0)
    if acq.shutter:
        img = img * _collimator(size, acq)
    pixels = np.round(65535.0 * np.clip(img, 0.0, 1.0)).astype(np.uint16)
    out_layers = None
    if layers:
        flip = (lambda a: np.ascontiguousarray(a[:, ::-1])) if laterality == "L" else (lambda a: a)
        out_layers = {
            "soft": flip(soft),
            "bone": flip(bone),
            "metal": flip(metal),
            "collimator": _collimator(size, acq),
            "marker": marker,
        }
    return _Rendered(pixels, _FIELD_MM * acq.field / size, acq.framing, marker_xy, out_layers)


def render_femur(rng: np.random.Generator, **shot: Any) -> np.ndarray:
    """Renders one femur radiograph: uint16 (size, size), bone bright, most of the 16-bit range used.

    Keyword arguments (those of `_render`, which checks them): `label_name`, `fracture_type` (one of
    FRACTURE_TYPES[label_name]), `size` (pixels, at least 32), `view` (one of VIEWS), `laterality` (one of
    LATERALITIES), `fracture_position`; optional `anatomy`, `framing`, `implant`.
    `fracture_position` in [0, 1] runs from sub-trochanteric (0) to mid-shaft (1). `anatomy`
    fixes the patient (and its fracture shape) across images; if None it is drawn from `rng`.
    `framing` (one of FRAMINGS) fixes the window, else it is drawn; `implant` is one of IMPLANTS.
    For a fixed `rng` state and anatomy, images of different classes differ only where the
    fracture changes the bone: framing, pose, exposure and noise are drawn independently of the class.
    """
    return _render(rng, **shot).pixels


# ======================================================================================
# Synthetic patients
# ======================================================================================

_FIRST_NAMES = (
    "JANE",
    "MARY",
    "ANNA",
    "ELSA",
    "INGRID",
    "KARIN",
    "MAJA",
    "ASTRID",
    "LINNEA",
    "SARA",
    "JOHN",
    "ERIK",
    "LARS",
    "PER",
    "OLOF",
)
_LAST_NAMES = (
    "DOE",
    "ROE",
    "SMITH",
    "ANDERSSON",
    "JOHANSSON",
    "KARLSSON",
    "NILSSON",
    "ERIKSSON",
    "LARSSON",
    "OLSSON",
    "PERSSON",
    "SVENSSON",
    "GUSTAFSSON",
    "PETTERSSON",
    "LINDBERG",
)


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
    followup_implant: str = "none"  # implant seen in the follow-up study (drawn whatever the class)


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
    studies = tuple(
        (f"ACC{rng.integers(10**8):08d}", str(rng.choice(("CR", "DX")))) for _ in range(2 if n_followup else 1)
    )
    birth = f"{rng.integers(1925, 1970)}{rng.integers(1, 13):02d}{rng.integers(1, 29):02d}"
    name = f"{rng.choice(_LAST_NAMES)}^{rng.choice(_FIRST_NAMES)}"
    has_implant, implant_u = rng.random() < _IMPLANT_P, rng.random()
    implant = IMPLANTS[1 + int(implant_u * (len(IMPLANTS) - 1))] if has_implant and n_followup else "none"
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
        followup_implant=implant,
    )


def _uid(*parts: object) -> str:
    from pydicom.uid import generate_uid  # pydicom: slow to import, only the DICOM writer needs it

    return str(generate_uid(entropy_srcs=[_UID_ROOT, *map(str, parts)]))


def _check_fractions(class_fractions: Sequence[float]) -> None:
    if len(class_fractions) != len(LABEL_NAMES) or min(class_fractions) < 0 or sum(class_fractions) <= 0:
        raise ValueError(
            f"class_fractions {tuple(class_fractions)} must be {len(LABEL_NAMES)} non-negative "
            f"numbers (for {LABEL_NAMES}) with a positive sum."
        )


def iter_synthetic_images(
    num_patients: int, *, seed: int = 0, image_size: int = 256, class_fractions: Sequence[float] = _DEFAULT_FRACTIONS
) -> Iterator[SyntheticImage]:
    """Yields the images of `num_patients` synthetic patients (2-4 AP/LAT images each, one label each).

    Deterministic for (num_patients, seed, image_size); patient i's images don't depend on
    num_patients, so a larger dataset extends a smaller one.
    """
    return _iter_images(num_patients, seed=seed, image_size=image_size, class_fractions=class_fractions)


def _iter_images(
    num_patients: int, *, seed: int, image_size: int, class_fractions: Sequence[float], fractures: bool = True
) -> Iterator[SyntheticImage]:
    """iter_synthetic_images; with `fractures=False` every image is drawn as its patient's *normal twin*
    (same anatomy, framing, implant, exposure, noise and marker; no fracture, labels kept) — what the
    class-independence test reads to show that nothing outside the fracture carries the class."""
    _check_fractions(class_fractions)
    for i in range(num_patients):
        plan = _plan_patient(i, seed, class_fractions)
        label_name = LABEL_NAMES[plan.label]
        study_uids = [_uid("study", seed, i, k) for k in range(len(plan.studies))]
        for j, (view, study) in enumerate(plan.images):
            implant = plan.followup_implant if study == 1 else "none"
            out = _render(
                np.random.default_rng([seed, i, j, 1]),
                label_name=label_name if fractures else "normal",
                fracture_type=plan.fracture_type if fractures else "none",
                size=image_size,
                view=view,
                laterality=plan.laterality,
                fracture_position=plan.fracture_position,
                anatomy=plan.anatomy,
                implant=implant,
            )
            spacing = out.spacing_mm
            yield SyntheticImage(
                pixels=out.pixels,
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
                framing=out.framing,
                implant=implant,
                marker_xy=(round(out.marker_xy[0], 4), round(out.marker_xy[1], 4)),
            )


def count_synthetic_images(
    num_patients: int, *, seed: int = 0, class_fractions: Sequence[float] = _DEFAULT_FRACTIONS
) -> int:
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


def build_synthetic_dataset(
    data_dir: str | os.PathLike,
    *,
    num_patients: int = 300,
    seed: int = 0,
    image_size: int = 256,
    name: str = "synthetic_femur",
    overwrite: bool = False,
) -> pathlib.Path:
    """Renders the synthetic dataset and writes it with records.write_dataset; returns its directory.

    Identifiers are hashed with `anonymize.load_salt(allow_demo_salt=True)`: the user's salt if
    one is configured, else the public demo salt (the identifiers are fake anyway).
    """
    salt = anonymize.load_salt(allow_demo_salt=True)
    examples = (to_record(img, salt) for img in iter_synthetic_images(num_patients, seed=seed, image_size=image_size))
    parameters = {
        "num_patients": num_patients,
        "seed": seed,
        "image_size": image_size,
        "class_fractions": list(_DEFAULT_FRACTIONS),
    }
    info = {
        "preprocessing": {"generator": "afm_jax.data.synthetic", **parameters},
        "source_fingerprint": "synthetic:" + ",".join(f"{k}={v}" for k, v in parameters.items()),
    }
    return records.write_dataset(
        examples,
        data_dir,
        name=name,
        extra_info=info,
        overwrite=overwrite,
        num_examples_hint=count_synthetic_images(num_patients, seed=seed),
    )


def ensure_synthetic_dataset(
    data_dir: str | os.PathLike, *, num_patients: int = 300, seed: int = 0, image_size: int = 256
) -> pathlib.Path:
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
    return build_synthetic_dataset(data_dir, num_patients=num_patients, seed=seed, image_size=image_size, name=name)


def prepare_dataset(config, workdir: str) -> None:
    """Builds the embedded synthetic dataset into `<workdir>/data` when the config asks for it
    (`data.synthetic.enabled` and no `data.path`), and sets `config.data.path` to it.

    In a multi-process job process 0 writes the dataset while the others wait, then they find it."""
    if config.data.path or not config.data.synthetic.enabled:
        return
    syn = config.data.synthetic
    data_root = os.path.join(workdir, "data")

    def ensure() -> str:
        return os.fspath(
            ensure_synthetic_dataset(data_root, num_patients=syn.num_patients, seed=syn.seed, image_size=syn.image_size)
        )

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


def _to_dicom(
    img: SyntheticImage, study_index: int, instance_number: int, style: _DicomStyle | None = None
) -> "pydicom.Dataset":
    """The DICOM dataset of one image; pixels stored as the study's device would store them
    (or as `style` says, for twins that differ only in storage)."""
    import pydicom  # pydicom: slow to import, only the DICOM writer needs it
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import (
        PYDICOM_IMPLEMENTATION_UID,
        ComputedRadiographyImageStorage,
        DigitalXRayImageStorageForPresentation,
        ExplicitVRLittleEndian,
    )

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


def write_dicom_twin(
    img: SyntheticImage,
    path: str | os.PathLike,
    *,
    photometric: str,
    bits_stored: int = 12,
    rescale: tuple[float, float] = (1.0, 0.0),
) -> pathlib.Path:
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


def write_dicom_files(
    out_dir: str | os.PathLike, *, num_patients: int = 10, seed: int = 0, image_size: int = 256, progress: bool = False
) -> list[pathlib.Path]:
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
# Contact sheet
# ======================================================================================


def contact_sheet(
    path: str | os.PathLike, *, seed: int = 0, image_size: int = 256, tile: int = 128, columns: int = 6
) -> pathlib.Path:
    """Writes an 8-bit PNG: one row per class x view, the first `columns` images of that kind in
    patient order (no picking), each `tile` px, captioned with fracture type, framing and implant."""
    rows = [(name, view) for name in LABEL_NAMES for view in VIEWS]
    found: dict[tuple[str, str], list[SyntheticImage]] = {r: [] for r in rows}
    for img in iter_synthetic_images(400, seed=seed, image_size=image_size):
        cell = found[(img.label_name, img.view)]
        if len(cell) < columns:
            cell.append(img)
        if all(len(v) == columns for v in found.values()):
            break
    label_w = 54
    sheet = np.full((len(rows) * tile, label_w + columns * tile), 255, np.uint8)
    for r, key in enumerate(rows):
        cv2.putText(
            sheet, key[0].upper(), (4, r * tile + tile // 2 - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.45, 0, 1, cv2.LINE_AA
        )
        cv2.putText(sheet, key[1], (4, r * tile + tile // 2 + 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, 0, 1, cv2.LINE_AA)
        for k, img in enumerate(found[key]):
            small = cv2.resize(img.pixels.astype(np.float32) / 257.0, (tile, tile), interpolation=cv2.INTER_AREA)
            cell = np.clip(np.round(small), 0, 255).astype(np.uint8)
            caption = " ".join(
                t
                for t in (
                    img.fracture_type if img.fracture_type != "none" else "",
                    img.framing[:4],
                    img.implant if img.implant != "none" else "",
                )
                if t
            )
            cv2.putText(cell, caption, (3, tile - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.3, 0, 2, cv2.LINE_AA)
            cv2.putText(cell, caption, (3, tile - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.3, 255, 1, cv2.LINE_AA)
            x0 = label_w + k * tile
            sheet[r * tile : (r + 1) * tile, x0 : x0 + tile] = cell
    ok, png = cv2.imencode(".png", sheet, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:
        raise RuntimeError("PNG encoding of the contact sheet failed.")
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    io.write_bytes(out, png.tobytes())
    return out


# ======================================================================================
# CLI
# ======================================================================================


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--out", help="output directory")
    parser.add_argument("--contact_sheet", metavar="PNG", help="write the class x view contact sheet PNG instead")
    parser.add_argument("--num_patients", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--dicom", action="store_true", help="write a DICOM tree (+ labels.csv) instead of records")
    args = parser.parse_args(argv)
    if args.contact_sheet:
        print(f"Wrote {contact_sheet(args.contact_sheet, seed=args.seed, image_size=args.image_size)}")
        return
    if not args.out:
        parser.error("--out is required (or --contact_sheet PNG)")
    if args.dicom:
        paths = write_dicom_files(
            args.out, num_patients=args.num_patients, seed=args.seed, image_size=args.image_size, progress=True
        )
        print(f"Wrote {len(paths)} DICOM files and labels.csv under {pathlib.Path(args.out).resolve()}")
    else:
        path = build_synthetic_dataset(
            args.out, num_patients=args.num_patients, seed=args.seed, image_size=args.image_size
        )
        print(f"Wrote synthetic dataset to {path}")


if __name__ == "__main__":
    main()
