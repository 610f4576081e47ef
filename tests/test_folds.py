import json

import pytest

from brats.data.folds import (
    cohort_fingerprint,
    load_or_make_splits,
    make_splits,
    stored_fold,
    stored_test_set,
)
from brats.errors import BratsError


def cohort(n_hgg=42, n_lgg=15):
    ids = [f"P{i:03d}" for i in range(n_hgg + n_lgg)]
    labels = [1] * n_hgg + [0] * n_lgg
    return ids, labels


def test_folds_partition_and_are_stratified():
    ids, labels = cohort()
    s = make_splits(ids, labels, k=5, seed=42)
    vals = [v for fold in s.outer for v in fold]
    assert sorted(vals) == sorted(ids)  # every patient in exactly one validation fold
    label_of = dict(zip(ids, labels))
    for k in range(5):
        f = s.fold(k, ids, labels)
        assert not set(f.train) & set(f.test)
        assert sorted(f.train + f.test) == sorted(ids)
        n_lgg = sum(1 for p in f.test if label_of[p] == 0)
        assert n_lgg in (3, 4)  # 15 LGG over 5 folds
        assert len(f.test) in (11, 12)


def test_same_seed_same_splits_other_seed_differs():
    ids, labels = cohort()
    assert (
        make_splits(ids, labels, seed=42).outer
        == make_splits(list(reversed(ids)), list(reversed(labels)), seed=42).outer
    )
    assert make_splits(ids, labels, seed=42).outer != make_splits(ids, labels, seed=1).outer


def test_inner_validation_split():
    ids, labels = cohort()
    s = make_splits(ids, labels, seed=42, inner_val=0.2)
    label_of = dict(zip(ids, labels))
    for k in range(5):
        f = s.fold(k, ids, labels)
        assert not (set(f.train) & set(f.val)) and not (set(f.val) & set(f.test))
        assert len(f.train) + len(f.val) + len(f.test) == len(ids)
        assert 0 < sum(label_of[p] == 0 for p in f.val) < len(f.val)
        assert f == s.fold(k, ids, labels)


def test_splits_file_reused_and_checked(tmp_path):
    ids, labels = cohort()
    path = tmp_path / "splits.json"
    a = load_or_make_splits(path, ids, labels)
    d = json.loads(path.read_text())
    assert d["cohort_fingerprint"] == cohort_fingerprint(ids, labels) and len(d["folds"]) == 5
    mtime = path.stat().st_mtime_ns
    assert load_or_make_splits(path, ids, labels).outer == a.outer and path.stat().st_mtime_ns == mtime
    with pytest.raises(BratsError, match="made for another cohort"):
        load_or_make_splits(path, ids[:-1], labels[:-1])
    with pytest.raises(BratsError, match="has seed=42 but this run asks seed=7: use a new --run"):
        load_or_make_splits(path, ids, labels, seed=7)


def test_too_few_patients_per_class():
    with pytest.raises(BratsError, match="at least 5 patients of each grade"):
        make_splits(*cohort(10, 3))
    assert [len(f) for f in make_splits(*cohort(5, 5)).outer] == [2, 2, 2, 2, 2]


def test_small_inner_split_holds_both_grades_and_is_reread_as_stored(tmp_path):
    # 10 training patients, 2 of them LGG: a plain stratified 25% split can hold no LGG (no AUC)
    ids = [f"P{i:02d}" for i in range(20)]
    labels = [0, 0, 0, 0] + [1] * 16
    path = tmp_path / "splits.json"
    s = load_or_make_splits(path, ids, labels, k=2, seed=7, inner_val=0.25)
    for k in range(2):
        fold = s.fold(k, ids, labels)
        grades = {labels[ids.index(p)] for p in fold.val}
        assert grades == {0, 1}, fold.val
        assert not set(fold.val) & set(fold.train) and not set(fold.val) & set(fold.test)
    # read back in another patient order: the stored inner splits are used as they are
    again = load_or_make_splits(path, ids[::-1], labels[::-1], k=2, seed=7, inner_val=0.25)
    assert [again.fold(k, ids[::-1], labels[::-1]).val for k in range(2)] == [
        s.fold(k, ids, labels).val for k in range(2)
    ]


@pytest.mark.parametrize(
    "content",
    ["{not json", "[]", '{"k": 5}', '{"cohort_fingerprint": "x", "k": 5, "seed": 42, "folds": [{}]}'],
)
def test_damaged_splits_file_is_one_line_and_deleting_it_makes_the_same_splits(tmp_path, content):
    ids, labels = cohort()
    path = tmp_path / "splits.json"
    original = load_or_make_splits(path, ids, labels, inner_val=0.15)
    path.write_text(content)
    with pytest.raises(BratsError, match=f"^{path} is damaged .*delete it and rerun"):
        load_or_make_splits(path, ids, labels, inner_val=0.15)
    path.unlink()
    again = load_or_make_splits(path, ids, labels, inner_val=0.15)
    assert again.outer == original.outer and again.inner == original.inner


def test_a_test_set_is_held_out_of_every_fold_stratified_and_stored(tmp_path):
    ids, labels = cohort()
    s = make_splits(ids, labels, seed=42, inner_val=0.15, test_fraction=0.2)
    label_of = dict(zip(ids, labels))
    assert len(s.test) == 11 and sum(label_of[p] == 0 for p in s.test) == 3  # 20% of 42 HGG and 15 LGG
    assert sorted([p for fold in s.outer for p in fold] + s.test) == sorted(ids)
    for k in range(5):
        f = s.fold(k, ids, labels)
        assert not set(s.test) & (set(f.train) | set(f.val) | set(f.test))
        assert len(f.train) + len(f.val) + len(f.test) + len(s.test) == len(ids)
    assert make_splits(ids, labels, seed=42, inner_val=0.15, test_fraction=0.2) == s
    path = tmp_path / "splits.json"
    written = load_or_make_splits(path, ids, labels, inner_val=0.15, test_fraction=0.2)
    d = json.loads(path.read_text())
    assert d["test"] == written.test and d["test_fraction"] == 0.2
    assert stored_fold(path, 2) == written.fold(2, ids, labels) and stored_test_set(path) == written.test
    with pytest.raises(BratsError, match="has test_fraction=0.2 but this run asks test_fraction=0.0"):
        load_or_make_splits(path, ids, labels, inner_val=0.15)
    # a fold's fingerprint changes with the test set: a checkpoint of a run without one is refused
    assert (
        make_splits(ids, labels, seed=42).fold(0, ids, labels).fingerprint
        != s.fold(0, ids, labels).fingerprint
    )


def test_group_by_keeps_each_collection_in_one_validation_fold_and_refuses_one_grade_folds():
    ids, labels = cohort(40, 20)
    groups = [f"SITE{i % 10}" for i in range(60)]  # ten sites, each with both grades
    s = make_splits(ids, labels, seed=3, groups=groups, group_by="collection")
    site = dict(zip(ids, groups))
    assert all(len({site[p] for p in fold}) >= 1 for fold in s.outer)
    for a in range(5):
        for b in range(a + 1, 5):
            assert not {site[p] for p in s.outer[a]} & {site[p] for p in s.outer[b]}
    # sites that hold one grade each, too few to give every fold both grades
    one_grade = [f"HGG_SITE{i % 4}" if y else f"LGG_SITE{i % 2}" for i, y in enumerate(labels)]
    with pytest.raises(BratsError, match=r"--group-by collection: fold \d's validation patients are all"):
        make_splits(ids, labels, seed=3, groups=one_grade, group_by="collection")
    with pytest.raises(BratsError, match="the cohort has 3 collections .* too few for 5 folds"):
        make_splits(ids, labels, seed=3, groups=[f"S{i % 3}" for i in range(60)], group_by="collection")
