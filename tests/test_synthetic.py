import hashlib

import nibabel as nib
import numpy as np
import pytest

from brats.data.phantom import class_counts, make_cohort
from brats.errors import BratsError


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


def run_synthetic(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "brats.synthetic", *args], capture_output=True, text=True)


@pytest.mark.parametrize(
    "args, named",
    [
        (["--patients", "1"], "--patients 1"),
        (["--shape", "0", "20", "20"], "--shape 0 20 20"),
        (["--shape", "20", "-4", "20"], "--shape 20 -4 20"),
        (["--workers", "-2"], "--workers -2"),
        (["--seed", "-1"], "--seed -1"),
        (["--prefix", "../up"], "--prefix '../up'"),
        (["--prefix", ""], "--prefix ''"),
        (["--corrupt", "blurry"], "--corrupt blurry"),
        (
            ["--patients", "2", "--corrupt", "lr_flip", "--corrupt", "scaled", "--corrupt", "scaled"],
            "--corrupt given 3",
        ),
    ],
)
def test_cli_bad_options_give_one_line_and_write_nothing(tmp_path, args, named):
    out = tmp_path / "syn"
    r = run_synthetic(str(out), "--shape", "24", "24", "16", *args)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {named}"), r.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["out is a file", "parent is a file"])
def test_cli_output_folder_checked_up_front(tmp_path, where):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" if where == "out is a file" else tmp_path / "file" / "syn"
    r = run_synthetic(str(out), "--patients", "2", "--shape", "24", "24", "16")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(out) in lines[0], r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
