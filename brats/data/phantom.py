"""A BraTS-like phantom cohort: real-looking NIfTI files in the BraTS 2018 layout.

Each patient is a skull-stripped brain (white matter, grey matter, ventricles, a smooth bias
field, noise) with one tumour whose grade changes its look the way radiologists describe it:
- HGG: larger, a necrotic core with a ring that enhances on T1ce, wide T2/FLAIR oedema;
- LGG: smaller, non- or faintly enhancing, T2/FLAIR bright, little oedema.
Sizes, positions, contrasts and noise are random and the class distributions overlap (some LGG
enhance faintly, some HGG are solid or barely enhancing), so the task is learnable, not trivial.

Files: <out>/{HGG,LGG}/<case>/<case>_{t1,t1ce,t2,flair}.nii.gz, int16, 1 mm, LPS (SimpleITK
identity direction = nibabel affine diag(-1,-1,1)), background exactly 0. Same seed, same bytes.
`python -m brats.synthetic` is its command line.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from brats.data.cohort import CLASSES, MODALITIES
from brats.errors import BratsError
from brats.io.atomic import atomic_path

BRATS18_SHAPE = (240, 240, 155)  # x, y, z voxels, 1 mm
BRATS18_RATIO = (210, 75)  # HGG, LGG patients in BraTS 2018
ORIGIN = (0.0, -239.0, 0.0)  # x, y, z mm of voxel (0, 0, 0), as in real BraTS files

# Tissue intensities per modality (t1, t1ce, t2, flair), arbitrary units before scaling.
TISSUE = {
    "wm": (0.85, 0.85, 0.35, 0.40),
    "gm": (0.60, 0.62, 0.55, 0.55),
    "csf": (0.25, 0.25, 1.00, 0.10),
    "oedema": (0.55, 0.58, 0.78, 0.82),
    "tumour": (0.45, 0.50, 0.82, 0.86),
    "necrosis": (0.20, 0.22, 0.95, 0.35),
}


@dataclass(frozen=True)
class TumourLook:
    """Grade-dependent tumour appearance, drawn per patient."""

    radius: float  # fraction of the brain's mean semi-axis
    necrosis: float  # core radius as a fraction of the tumour radius (0 = solid)
    enhancement: float  # T1ce ring brightness added at the rim (0 = none)
    oedema: float  # oedema radius as a multiple of the tumour radius


def draw_look(rng: np.random.Generator, hgg: bool) -> TumourLook:
    if hgg:
        return TumourLook(
            radius=rng.uniform(0.13, 0.30),
            necrosis=rng.uniform(0.35, 0.7) if rng.random() < 0.8 else 0.0,
            enhancement=rng.uniform(0.45, 1.1) if rng.random() < 0.85 else rng.uniform(0.05, 0.3),
            oedema=rng.uniform(1.4, 2.2),
        )
    return TumourLook(
        radius=rng.uniform(0.08, 0.22),
        necrosis=rng.uniform(0.2, 0.4) if rng.random() < 0.15 else 0.0,
        enhancement=rng.uniform(0.1, 0.45) if rng.random() < 0.3 else 0.0,
        oedema=rng.uniform(1.05, 1.5),
    )


def smooth_field(
    rng: np.random.Generator, grids: tuple[np.ndarray, ...], waves: int, scale: float
) -> np.ndarray:
    """Sum of random low-frequency plane waves, built separably (outer products), in [-1, 1]-ish."""
    z, y, x = grids
    field = np.zeros((z.size, y.size, x.size), dtype=np.float32)
    for _ in range(waves):
        k = rng.normal(0, scale, 3)
        phase = rng.uniform(0, 2 * np.pi)
        ez = np.exp(1j * (k[0] * z + phase)).astype(np.complex64)
        ey = np.exp(1j * k[1] * y).astype(np.complex64)
        ex = np.exp(1j * k[2] * x).astype(np.complex64)
        field += (ez[:, None, None] * ey[None, :, None] * ex[None, None, :]).real
    return field / np.sqrt(waves)


def make_patient(seed: int, index: int, hgg: bool, shape_xyz: tuple[int, int, int]) -> list[np.ndarray]:
    """Four int16 (z, y, x) volumes for one phantom patient."""
    return make_patient_with_lesion(seed, index, hgg, shape_xyz)[0]


def add_ventricles(
    tissue: np.ndarray, brain: np.ndarray, dz: np.ndarray, dy: np.ndarray, dx: np.ndarray
) -> None:
    """Two CSF-filled ventricles either side of the midline, in brain coordinates (dz, dy, dx)."""
    for side in (-1, 1):
        vr = (
            ((dz[:, None, None] - 0.05) / 0.16) ** 2
            + ((dy[None, :, None] + 0.05) / 0.32) ** 2
            + ((dx[None, None, :] - side * 0.12) / 0.08) ** 2
        )
        vent = brain & (vr < 1.0)
        for c in range(4):
            tissue[c][vent] = TISSUE["csf"][c]


def make_patient_with_lesion(
    seed: int, index: int, hgg: bool, shape_xyz: tuple[int, int, int]
) -> tuple[list[np.ndarray], np.ndarray]:
    """`make_patient` and where its lesion is: uint8 (z, y, x), 1 tumour (with any necrotic
    core), 2 oedema, 0 elsewhere; known ground truth for checking where a model looks."""
    rng = np.random.default_rng([seed, index])
    nx, ny, nz = shape_xyz
    zz = np.arange(nz, dtype=np.float32)
    yy = np.arange(ny, dtype=np.float32)
    xx = np.arange(nx, dtype=np.float32)
    # Brain ellipsoid: semi-axes as a fraction of the field of view, centre jittered.
    semi = np.array([0.36 * nz * 1.25, 0.40 * ny, 0.33 * nx]) * rng.uniform(0.88, 1.05, 3)
    semi[0] = min(semi[0], 0.46 * nz)
    centre = np.array([nz, ny, nx]) / 2 + rng.normal(0, 0.02, 3) * np.array([nz, ny, nx])
    dz = (zz - centre[0]) / semi[0]
    dy = (yy - centre[1]) / semi[1]
    dx = (xx - centre[2]) / semi[2]
    r2 = dz[:, None, None] ** 2 + dy[None, :, None] ** 2 + dx[None, None, :] ** 2
    wobble = smooth_field(rng, (dz, dy, dx), 3, 2.0)
    r = np.sqrt(r2) * (1 + 0.04 * wobble)
    brain = r < 1.0

    tissue = np.zeros((4, nz, ny, nx), dtype=np.float32)
    gm = brain & (r > 0.82 + 0.05 * wobble)
    wm = brain & ~gm
    for c in range(4):
        tissue[c][wm] = TISSUE["wm"][c]
        tissue[c][gm] = TISSUE["gm"][c]
    add_ventricles(tissue, brain, dz, dy, dx)

    # Tumour: centre inside the brain, off the midline, irregular outline.
    look = draw_look(rng, hgg)
    mean_semi = float(semi.mean())
    t_rad = look.radius * mean_semi
    t_centre = centre + np.array(
        [
            rng.uniform(-0.3, 0.3) * semi[0],
            rng.uniform(-0.35, 0.35) * semi[1],
            rng.choice([-1, 1]) * rng.uniform(0.2, 0.45) * semi[2],
        ]
    )
    tz = (zz - t_centre[0]) / t_rad
    ty = (yy - t_centre[1]) / t_rad
    tx = (xx - t_centre[2]) / t_rad
    shape_noise = smooth_field(rng, (tz, ty, tx), 4, 0.6)
    stretch = rng.uniform(0.8, 1.25, 3)
    tr = np.sqrt(
        (tz[:, None, None] / stretch[0]) ** 2
        + (ty[None, :, None] / stretch[1]) ** 2
        + (tx[None, None, :] / stretch[2]) ** 2
    ) * (1 + 0.18 * shape_noise)
    oedema = brain & (tr < look.oedema) & (tr >= 1.0)
    tumour = brain & (tr < 1.0)
    for c in range(4):
        tissue[c][oedema] = TISSUE["oedema"][c] * rng.uniform(0.9, 1.1)
        tissue[c][tumour] = TISSUE["tumour"][c] * rng.uniform(0.85, 1.15)
    if look.necrosis > 0:
        core = brain & (tr < look.necrosis)
        for c in range(4):
            tissue[c][core] = TISSUE["necrosis"][c] * rng.uniform(0.85, 1.15)
    if look.enhancement > 0:
        # Ring enhancement peaks at the rim; a solid tumour enhances patchily instead.
        inner = look.necrosis if look.necrosis > 0 else 0.0
        ring = tumour & (tr >= inner)
        width = max(1.0 - inner, 0.2)
        profile = np.clip(1.0 - np.abs(tr[ring] - (inner + 0.7 * width)) / (0.6 * width), 0.0, 1.0)
        if inner == 0.0:
            profile = profile * np.clip(0.5 + 0.5 * shape_noise[ring], 0.0, 1.0)
        tissue[1][ring] += look.enhancement * profile

    bias = 1.0 + 0.08 * smooth_field(rng, (dz, dy, dx), 3, 1.5)
    lesion = np.where(tumour, 1, np.where(oedema, 2, 0)).astype(np.uint8)
    return render(rng, tissue, brain, bias), lesion


def render(
    rng: np.random.Generator, tissue: np.ndarray, brain: np.ndarray, bias: np.ndarray
) -> list[np.ndarray]:
    """Tissue intensities (4, z, y, x) -> four int16 scans: per-scan gain, contrast and noise,
    a shared bias field, background exactly 0 (skull-stripped)."""
    volumes = []
    for c in range(4):
        gain = rng.uniform(500, 1400)
        contrast = rng.uniform(0.9, 1.1)
        noise_sd = rng.uniform(0.02, 0.05)
        img = (tissue[c] ** contrast) * bias
        img += rng.normal(0.0, noise_sd, img.shape).astype(np.float32) * brain
        img = np.clip(img * gain, 1, 32000)
        img[~brain] = 0
        volumes.append(img.astype(np.int16))
    return volumes


# BraTS 2018's confound (its collections hold one grade each, but for the 2013 challenge's), as a
# site option: each grade's share of patients per collection, and each collection's scanner
# signature (an intensity gamma and extra noise, as another scanner and protocol would give).
SITE_MIX = {
    1: (("2013", 0.10), ("CBICA", 0.45), ("TCIA02", 0.25), ("TCIA08", 0.20)),
    0: (("2013", 0.15), ("TCIA10", 0.45), ("TCIA13", 0.40)),
}
SITE_LOOK = {
    "2013": (1.0, 0.0),
    "CBICA": (0.8, 0.03),
    "TCIA02": (0.9, 0.0),
    "TCIA08": (1.1, 0.02),
    "TCIA10": (1.3, 0.0),
    "TCIA13": (1.2, 0.04),
}


def apportion(mix: tuple[tuple[str, float], ...], n: int) -> list[str]:
    """n collection names in the shares of `mix` (largest remainders; the first, the 2013
    challenge's, holds at least one patient so that it holds both grades)."""
    names, shares = zip(*mix)
    exact = np.array(shares) * n
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts))[: n - counts.sum()]:
        counts[i] += 1
    if counts[0] == 0 and n > 1:
        counts[0], counts[int(np.argmax(counts))] = 1, counts[int(np.argmax(counts))] - 1
    return [name for name, c in zip(names, counts) for _ in range(c)]


def site_look(volumes: list[np.ndarray], site: str, rng: np.random.Generator) -> list[np.ndarray]:
    """The collection's scanner signature on a patient's int16 scans (background stays 0)."""
    gamma, noise = SITE_LOOK[site]
    out = []
    for v in volumes:
        brain = v != 0
        top = float(v.max())
        x = (v.astype(np.float32) / top) ** gamma
        x += rng.normal(0.0, noise, x.shape).astype(np.float32) * brain
        x = np.clip(x * top, 1, 32000)
        x[~brain] = 0
        out.append(x.astype(np.int16))
    return out


def write_patient(args: tuple[Path, str, int, int, bool, tuple[int, int, int], str | None]) -> str:
    out, pid, seed, index, hgg, shape, site = args
    folder = out / CLASSES[int(hgg)] / pid
    volumes = make_patient(seed, index, hgg, shape)
    if site:
        volumes = site_look(volumes, site, np.random.default_rng([seed, index, 7]))
    images = []
    for vol in volumes:
        img = sitk.GetImageFromArray(vol)  # (z, y, x) -> image of size (x, y, z)
        img.SetSpacing((1.0, 1.0, 1.0))
        img.SetOrigin(ORIGIN)
        img.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))  # LPS
        images.append(img)
    write_images(folder, pid, images)
    return pid


def write_images(folder: Path, pid: str, images: list[sitk.Image]) -> None:
    """The four scans (MODALITIES order) as FOLDER/PID_<modality>.nii.gz, each written whole or not at all."""
    folder.mkdir(parents=True, exist_ok=True)
    for mod, img in zip(MODALITIES, images):
        with atomic_path(folder / f"{pid}_{mod}.nii.gz") as tmp:
            # the temp name must end in .nii.gz for ITK to pick its writer
            gz = tmp.with_name(tmp.name + ".nii.gz")
            sitk.WriteImage(img, str(gz), useCompression=True)
            gz.replace(tmp)


def class_counts(n: int, ratio: tuple[int, int] = BRATS18_RATIO) -> tuple[int, int]:
    """(HGG, LGG) counts for n patients at the BraTS 2018 ratio, at least one of each."""
    if n < 2:
        raise BratsError(f"--patients {n}: need at least 2 (one HGG and one LGG)")
    n_hgg = round(n * ratio[0] / sum(ratio))
    n_hgg = min(max(n_hgg, 1), n - 1)
    return n_hgg, n - n_hgg


def make_cohort(
    out: str | Path,
    patients: int,
    seed: int = 0,
    shape: tuple[int, int, int] = BRATS18_SHAPE,
    prefix: str = "Brats18_SYN",
    workers: int | None = None,
    sites: bool = False,
) -> list[tuple[str, int]]:
    """Write a synthetic BraTS 2018 tree; returns [(patient_id, label)]. With `sites`, each
    patient comes from a collection of SITE_MIX, named in its id as in BraTS 2018
    (Brats18_CBICA_0003_1; the prefix's first word starts it) and marked by its scanner signature."""
    out = Path(out)
    n_hgg, n_lgg = class_counts(patients)
    labels = np.array([1] * n_hgg + [0] * n_lgg)
    np.random.default_rng(seed).shuffle(labels)
    collections: list[str | None] = [None] * patients
    if sites:
        rng = np.random.default_rng([seed, 2018])
        for grade, mix in SITE_MIX.items():
            members = np.flatnonzero(labels == grade)
            for i, site in zip(rng.permutation(members), apportion(mix, len(members))):
                collections[i] = site
    ids = [
        f"{prefix.split('_')[0]}_{c}_{i:04d}_1" if c else f"{prefix}_{i:04d}_1"
        for i, c in enumerate(collections)
    ]
    jobs = [(out, ids[i], seed, i, bool(labels[i]), tuple(shape), collections[i]) for i in range(patients)]
    workers = workers or os.cpu_count() or 1
    if workers > 1 and patients > 1:
        with ProcessPoolExecutor(min(workers, patients)) as pool:
            list(pool.map(write_patient, jobs))
    else:
        for job in jobs:
            write_patient(job)
    return [(job[1], int(job[4])) for job in jobs]


# Ways a new patient's scans can be unlike BraTS space, to check that predict notices (bench/qc.py,
# tests): each maps the four images (MODALITIES order) to corrupted ones.
CORRUPTIONS = (
    "skull_on",
    "thick_slices",
    "other_grid",
    "swapped_t1_flair",
    "cut_by_fov",
    "lr_flip",
    "scaled",
    "not_a_brain",
)


def corrupt(images: list[sitk.Image], kind: str, rng: np.random.Generator) -> list[sitk.Image]:
    """The four scans as a hospital might send them instead of BraTS space."""
    if kind not in CORRUPTIONS:
        raise BratsError(f"corruption {kind!r}: one of {', '.join(CORRUPTIONS)}")
    if kind == "swapped_t1_flair":
        return [images[3], images[1], images[2], images[0]]
    if kind == "other_grid":  # the T2 resampled onto a 1.5 mm grid of its own
        t2 = images[2]
        size = [int(n / 1.5) for n in t2.GetSize()]
        moved = sitk.Resample(
            t2, size, sitk.Transform(), sitk.sitkLinear, t2.GetOrigin(), (1.5,) * 3, t2.GetDirection()
        )
        return [images[0], images[1], moved, images[3]]
    if kind == "thick_slices":  # 5.5 mm slices, as acquired
        out = []
        for img in images:
            sx, sy, sz = img.GetSpacing()
            nz = max(2, int(img.GetSize()[2] * sz / 5.5))
            size = (img.GetSize()[0], img.GetSize()[1], nz)
            out.append(
                sitk.Resample(
                    img,
                    size,
                    sitk.Transform(),
                    sitk.sitkLinear,
                    img.GetOrigin(),
                    (sx, sy, 5.5),
                    img.GetDirection(),
                )
            )
        return out
    arrays = [sitk.GetArrayFromImage(img).astype(np.float32) for img in images]  # (z, y, x)
    brain = np.any([a != 0 for a in arrays], axis=0)
    if kind == "cut_by_fov":  # the top third of the brain outside the field of view
        zs = np.flatnonzero(brain.any(axis=(1, 2)))
        top = zs[0] + (zs[-1] - zs[0]) * 2 // 3
        arrays = [a[:top] for a in arrays]
    elif kind == "lr_flip":
        arrays = [a[:, :, ::-1] for a in arrays]
    elif kind == "scaled":
        arrays = [a * rng.uniform(3, 8) for a in arrays]
    elif kind == "skull_on":  # a shell of scalp and bone around the brain, and the scanner's noise in the air
        from scipy import ndimage

        head = ndimage.binary_dilation(brain, iterations=6)
        for a in arrays:
            level = float(np.percentile(a[brain], 75))
            noise = np.abs(rng.normal(0.0, 0.03 * level, a.shape)).astype(np.float32)
            a[head & ~brain] = level * rng.uniform(0.6, 1.2)
            a[~head] = noise[~head]
    elif kind == "not_a_brain":  # a smooth blob of tissue where the brain was
        blob = smooth_field(rng, tuple(np.linspace(-1, 1, n, dtype=np.float32) for n in brain.shape), 4, 3.0)
        arrays = [np.where(brain, (1.2 + blob) * float(np.percentile(a[brain], 50)), 0.0) for a in arrays]
    out = []
    for img, a in zip(images, arrays):
        new = sitk.GetImageFromArray(np.ascontiguousarray(a).astype(np.float32))
        new.SetSpacing(img.GetSpacing())
        new.SetOrigin(img.GetOrigin())
        new.SetDirection(img.GetDirection())
        out.append(new)
    return out


def check_corruptions(kinds: list[str], patients: int) -> None:
    bad = [k for k in kinds if k not in CORRUPTIONS]
    if bad:
        raise BratsError(f"--corrupt {bad[0]}: one of {', '.join(CORRUPTIONS)}")
    if len(kinds) > patients:
        raise BratsError(
            f"--corrupt given {len(kinds)} times for {patients} patients: at most one per patient"
        )


def corrupt_patients(out: Path, kinds: list[str], seed: int) -> list[tuple[str, str]]:
    """Corrupt the first len(kinds) patients of the cohort at OUT in place, one kind each (the
    demo's new patients include some a hospital might send); returns [(patient_id, kind)]."""
    from brats.data.cohort import find_cases
    from brats.data.preprocess import read_image

    cases = find_cases(out).cases
    check_corruptions(kinds, len(cases))
    rng = np.random.default_rng(seed)
    done = []
    for case, kind in zip(cases, kinds):
        images = corrupt([read_image(case, m) for m in MODALITIES], kind, rng)
        write_images(case.path(MODALITIES[0]).parent, case.patient_id, images)
        done.append((case.patient_id, kind))
    return done
