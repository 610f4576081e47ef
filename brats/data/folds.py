"""Stratified patient-level K-fold splits, written once to splits.json and reused.

Every patient is in exactly one validation fold and never in train and validation of the same
fold. An optional inner validation split (a stratified part of each fold's training patients)
drives early stopping and checkpoint choice so that the outer fold is used only for the report.
An optional test set (`test_fraction`, stratified) is held out of every fold: no fold model
trains on it or chooses its epoch on it, so it is the one place where the five folds together
(the exported ensemble) can be scored on patients none of them saw. `group_by` keeps each
group of patients (a data collection: brats.data.cohort.collection_of) in one validation fold
(StratifiedGroupKFold), for a leave-collection-out protocol.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from brats.errors import BratsError
from brats.io.atomic import read_json_object, write_json_atomic


def cohort_fingerprint(patient_ids: list[str], labels: list[int]) -> str:
    """16 hex digits over the sorted (patient id, label) pairs."""
    pairs = sorted(zip(patient_ids, (int(v) for v in labels)))
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Fold:
    train: list[str]  # patients that update the weights
    val: list[str]  # patients that choose the checkpoint (the outer fold, or the inner split)
    test: list[str]  # the outer validation fold: what the report scores

    @property
    def fingerprint(self) -> str:
        """16 hex digits over who trained, who chose the epoch and who is scored: stored in every
        checkpoint, so that a model is never scored on patients it trained on."""
        parts = [sorted(self.train), sorted(self.val), sorted(self.test)]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Splits:
    k: int
    seed: int
    inner_val: float  # 0 = early stopping on the outer fold (the training report's protocol)
    fingerprint: str  # of the cohort the splits were made for
    outer: list[list[str]]  # validation patients of each fold
    inner: list[list[str]] | None = None  # inner validation patients as stored in splits.json
    test: list[str] = field(default_factory=list)  # held out of every fold (the test set)
    test_fraction: float = 0.0
    group_by: str | None = None  # "collection": each collection within one validation fold

    def fold(self, k: int, patient_ids: list[str], labels: list[int]) -> Fold:
        """Train/val/test patient ids of fold k (0-based)."""
        if not 0 <= k < self.k:
            raise BratsError(f"--fold {k}: splits have folds 0..{self.k - 1}")
        test, held_out = set(self.outer[k]), set(self.test)
        train = [p for p in patient_ids if p not in test and p not in held_out]
        if self.inner_val <= 0:
            return Fold(train, sorted(test), sorted(test))
        if self.inner is not None:
            inner_val = set(self.inner[k])
        else:
            label_of = dict(zip(patient_ids, labels))
            ordered = sorted(train)
            seed = self.seed + 1000 * (k + 1)
            inner_val = inner_split(ordered, [label_of[p] for p in ordered], self.inner_val, seed)
        inner_train = [p for p in train if p not in inner_val]
        return Fold(sorted(inner_train), sorted(inner_val), sorted(test))

    def to_json(self, patient_ids: list[str], labels: list[int]) -> dict:
        folds = []
        for k in range(self.k):
            f = self.fold(k, patient_ids, labels)
            entry = {"fold": k, "val": f.test}
            if self.inner_val > 0:
                entry["inner_val"] = f.val
            folds.append(entry)
        return {
            "k": self.k,
            "seed": self.seed,
            "inner_val": self.inner_val,
            "protocol": protocol(self.inner_val),
            "cohort_fingerprint": self.fingerprint,
            "folds": folds,
            **({"test_fraction": self.test_fraction, "test": sorted(self.test)} if self.test else {}),
            **({"group_by": self.group_by} if self.group_by else {}),
        }


def inner_split(ids: list[str], labels: list[int], fraction: float, seed: int) -> set[str]:
    """A stratified `fraction` of `ids` that holds at least one patient of each grade with two or
    more patients (an inner split of one grade has no AUC, so it could never choose an epoch)."""
    rng = np.random.default_rng(seed)
    chosen: set[str] = set()
    for grade in sorted(set(labels)):
        members = [p for p, y in zip(ids, labels) if y == grade]
        n = min(max(1, round(fraction * len(members))), len(members) - 1)
        chosen.update(members[i] for i in rng.permutation(len(members))[:n])
    return chosen


def optimistic(inner_val: float, select: str = "best") -> bool:
    """Whether each fold's epoch is chosen on the patients the fold is scored on."""
    return select == "best" and inner_val <= 0


def protocol(inner_val: float, select: str = "best") -> str:
    if select == "last":
        return "last epoch of each fold (no epoch is chosen on validation data: the scored fold is unseen)"
    if not optimistic(inner_val, select):
        return (
            f"inner-validation ({inner_val:g} of each training fold chooses the epoch; "
            "the outer fold is only scored)"
        )
    return "outer-fold selection (the epoch is chosen on the scored fold: optimistic)"


def make_splits(
    patient_ids: list[str],
    labels: list[int],
    k: int = 5,
    seed: int = 42,
    inner_val: float = 0.0,
    test_fraction: float = 0.0,
    groups: list[str] | None = None,
    group_by: str | None = None,
) -> Splits:
    """Stratified K-fold over patients (after a stratified test set is held out, when asked);
    deterministic for the same ids, labels, groups and seed."""
    order = sorted(range(len(patient_ids)), key=lambda i: patient_ids[i])
    ids = [patient_ids[i] for i in order]
    y = np.array([labels[i] for i in order])
    held_out: set[str] = set()
    if test_fraction > 0:
        held_out = inner_split(ids, y.tolist(), test_fraction, seed + 7919)
    rest = [i for i, p in enumerate(ids) if p not in held_out]
    counts = np.bincount(y[rest], minlength=2)
    if counts.min() < k:
        kept = f" after holding out a test set of {len(held_out)}" if held_out else ""
        raise BratsError(
            f"{k}-fold cross-validation needs at least {k} patients of each grade; "
            f"the cohort has {counts[1]} HGG and {counts[0]} LGG{kept} (use fewer folds)"
        )
    y_rest = y[rest]
    if group_by:
        g = np.array([groups[order[i]] for i in rest])
        names = sorted(set(g.tolist()))
        if len(names) < k:
            raise BratsError(
                f"--group-by {group_by}: the cohort has {len(names)} {group_by}s ({', '.join(names)}), "
                f"too few for {k} folds: use fewer folds, or no --group-by"
            )
        skf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        parts = [val for _, val in skf.split(np.zeros(len(rest)), y_rest, g)]
        check_grouped(parts, y_rest, g, k, group_by)
    else:
        skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        parts = [val for _, val in skf.split(np.zeros(len(rest)), y_rest)]
    outer = [sorted(ids[rest[i]] for i in val) for val in parts]
    if inner_val > 0:
        check_inner(outer, [ids[i] for i in rest], y_rest, inner_val)
    fp = cohort_fingerprint(patient_ids, labels)
    return Splits(k, seed, inner_val, fp, outer, None, sorted(held_out), test_fraction, group_by)


def check_inner(outer: list[list[str]], ids: list[str], y: np.ndarray, inner_val: float) -> None:
    """Every fold's training patients can spare inner validation patients of both grades (each
    grade needs two: one to validate, one to train), so that no fold stops after an epoch for
    want of validation patients."""
    label = dict(zip(ids, y.tolist()))
    for k, val in enumerate(outer):
        held = set(val)
        counts = np.bincount([label[p] for p in ids if p not in held], minlength=2)
        if counts.min() < 2:
            raise BratsError(
                f"--inner-val {inner_val:g}: fold {k}'s training patients hold {counts[1]} HGG and "
                f"{counts[0]} LGG, too few to set inner validation patients of both grades aside; "
                "use more patients, fewer folds (--k-folds), or --inner-val 0"
            )


def check_grouped(parts: list[np.ndarray], y: np.ndarray, groups: np.ndarray, k: int, group_by: str) -> None:
    """Every validation fold of a grouped split holds both grades (else it has no AUC)."""
    for fold, val in enumerate(parts):
        if len(np.unique(y[val])) < 2:
            grade = "HGG" if y[val][0] == 1 else "LGG"
            names = ", ".join(sorted(set(groups[val].tolist()))[:6])
            raise BratsError(
                f"--group-by {group_by}: fold {fold}'s validation patients are all {grade} (its "
                f"{group_by}s: {names}): the grades are not spread over enough {group_by}s for "
                f"{k} folds; use fewer folds, or no --group-by"
            )


def read_splits(path: Path) -> dict:
    """splits.json, checked for the fields a run reads; a damaged file is one line (the splits
    follow from the cohort and the seed, so deleting it makes the same ones again)."""
    try:
        d = read_json_object(path)
        str(d["cohort_fingerprint"]), int(d["k"]), int(d["seed"])
        for f in d["folds"]:
            if not isinstance(f["val"], list) or not isinstance(f.get("inner_val", []), list):
                raise ValueError("a fold without a list of patients")
        if not isinstance(d.get("test", []), list):
            raise ValueError("a test set that is not a list of patients")
    except (ValueError, TypeError, KeyError) as e:
        raise BratsError(
            f"{path} is damaged ({type(e).__name__}: {str(e)[:120]}): delete it and rerun; the same "
            "cohort and --split-seed make the same splits"
        ) from e
    return d


def stored_fold(path: Path, k: int) -> Fold | None:
    """Fold k as splits.json at `path` stores it (the cohort is the union of the validation folds),
    or None when the file does not hold what is needed (inner validation lists of older files)."""
    d = read_splits(path)
    if not 0 <= k < len(d["folds"]):
        raise BratsError(
            f"{path} has folds 0..{len(d['folds']) - 1}, not fold {k}: is it this run's splits.json?"
        )
    outer = [list(f["val"]) for f in d["folds"]]
    inner = [list(f["inner_val"]) for f in d["folds"]] if all("inner_val" in f for f in d["folds"]) else None
    inner_val = float(d.get("inner_val", 0.0))
    if inner_val > 0 and inner is None:
        return None
    test = [str(p) for p in d.get("test", [])]
    ids = sorted({p for fold in outer for p in fold} | set(test))
    splits = Splits(
        len(outer),
        int(d["seed"]),
        inner_val,
        str(d["cohort_fingerprint"]),
        outer,
        inner,
        test,
        float(d.get("test_fraction", 0.0)),
        d.get("group_by"),
    )
    return splits.fold(k, ids, [0] * len(ids))  # labels choose an inner split only when none is stored


def stored_test_set(path: Path) -> list[str]:
    """The patients splits.json at `path` holds out of every fold (none when it has no test set)."""
    return sorted(str(p) for p in read_splits(path).get("test", []))


def load_or_make_splits(
    path: str | Path,
    patient_ids: list[str],
    labels: list[int],
    k: int = 5,
    seed: int = 42,
    inner_val: float = 0.0,
    write: bool = True,
    test_fraction: float = 0.0,
    groups: list[str] | None = None,
    group_by: str | None = None,
) -> Splits:
    """Reuse `path` when present (it must match the cohort and the settings), else make the
    splits and, with `write`, write them (training does; evaluation never writes a run's splits)."""
    path = Path(path)
    fp = cohort_fingerprint(patient_ids, labels)
    asked = {
        "k": k,
        "seed": seed,
        "inner_val": inner_val,
        "test_fraction": test_fraction,
        "group_by": group_by,
    }
    if path.exists():
        d = read_splits(path)
        if d["cohort_fingerprint"] != fp:
            raise BratsError(
                f"{path} was made for another cohort (fingerprint {d['cohort_fingerprint']}, "
                f"this cohort {fp}): give --data the cohort (or cache) this run was made for, or use a "
                "new --run folder"
            )
        stored = {
            "k": d["k"],
            "seed": d["seed"],
            "inner_val": d.get("inner_val", 0.0),
            "test_fraction": d.get("test_fraction", 0.0),
            "group_by": d.get("group_by"),
        }
        if stored != asked:
            differ = [name for name in asked if stored[name] != asked[name]]
            has = ", ".join(f"{n}={stored[n]}" for n in differ)
            wants = ", ".join(f"{n}={asked[n]}" for n in differ)
            raise BratsError(
                f"{path} has {has} but this run asks {wants}: use a new --run folder or the same settings"
            )
        inner = [f["inner_val"] for f in d["folds"]] if all("inner_val" in f for f in d["folds"]) else None
        return Splits(
            d["k"],
            d["seed"],
            stored["inner_val"],
            fp,
            [f["val"] for f in d["folds"]],
            inner,
            [str(p) for p in d.get("test", [])],
            stored["test_fraction"],
            stored["group_by"],
        )
    splits = make_splits(patient_ids, labels, k, seed, inner_val, test_fraction, groups, group_by)
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, splits.to_json(patient_ids, labels))
    return splits
