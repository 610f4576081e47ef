import hashlib

import nibabel as nib
import numpy as np
import pytest

from brats.errors import BratsError
from brats.synthetic import class_counts, make_cohort


def digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.nii.gz")):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    shape = (32, 32, 20)
    make_cohort(tmp_path / "a", 4, seed=7, shape=shape, workers=1)
    make_cohort(tmp_path / "b", 4, seed=7, shape=shape, workers=2)
    make_cohort(tmp_path / "c", 4, seed=8, shape=shape, workers=1)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_files_look_like_brats(cohort18):
    f = next(cohort18.glob("HGG/*/*_flair.nii.gz"))
    img = nib.load(f)
    assert img.get_data_dtype() == np.int16
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    data = np.asarray(img.dataobj)
    assert data.shape == (40, 40, 28)
    assert data[0, 0, 0] == 0 and data.min() == 0  # skull-stripped, background exactly 0
    assert (data > 0).mean() > 0.2


def test_class_ratio_follows_brats18():
    assert class_counts(285) == (210, 75)
    assert class_counts(40) == (29, 11)
    assert class_counts(2) == (1, 1)
    with pytest.raises(BratsError, match="at least 2"):
        class_counts(1)


def test_grades_differ_in_t1ce_enhancement(cohort18):
    """HGG enhance more on T1ce relative to T1 (ring enhancement) than LGG, on average."""

    def enhancement(case_dir):
        t1 = np.asarray(nib.load(next(case_dir.glob("*_t1.nii.gz"))).dataobj).astype(float)
        t1ce = np.asarray(nib.load(next(case_dir.glob("*_t1ce.nii.gz"))).dataobj).astype(float)
        brain = t1 > 0
        ratio = t1ce[brain] / t1[brain] * (t1[brain].mean() / t1ce[brain].mean())
        return np.percentile(ratio, 99.5)

    hgg = [enhancement(d) for d in (cohort18 / "HGG").iterdir()]
    lgg = [enhancement(d) for d in (cohort18 / "LGG").iterdir()]
    assert np.mean(hgg) > np.mean(lgg)
