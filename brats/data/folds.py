"""Stratified patient-level K-fold splits, written once to splits.json and reused.

Every patient is in exactly one validation fold and never in train and validation of the same
fold. An optional inner validation split (a stratified part of each fold's training patients)
drives early stopping and checkpoint choice so that the outer fold is used only for the report.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedKFold

from brats.errors import BratsError
from brats.io.atomic import write_json_atomic


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

    def fold(self, k: int, patient_ids: list[str], labels: list[int]) -> Fold:
        """Train/val/test patient ids of fold k (0-based)."""
        if not 0 <= k < self.k:
            raise BratsError(f"--fold {k}: splits have folds 0..{self.k - 1}")
        test = set(self.outer[k])
        train = [p for p in patient_ids if p not in test]
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
    patient_ids: list[str], labels: list[int], k: int = 5, seed: int = 42, inner_val: float = 0.0
) -> Splits:
    """Stratified K-fold over patients; deterministic for the same ids, labels and seed."""
    order = sorted(range(len(patient_ids)), key=lambda i: patient_ids[i])
    ids = [patient_ids[i] for i in order]
    y = np.array([labels[i] for i in order])
    counts = np.bincount(y, minlength=2)
    if counts.min() < k:
        raise BratsError(
            f"{k}-fold cross-validation needs at least {k} patients of each grade; "
            f"the cohort has {counts[1]} HGG and {counts[0]} LGG (use fewer folds)"
        )
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    outer = [sorted(ids[i] for i in val) for _, val in skf.split(np.zeros(len(ids)), y)]
    return Splits(k, seed, inner_val, cohort_fingerprint(patient_ids, labels), outer)


def read_splits(path: Path) -> dict:
    """splits.json, checked for the fields a run reads; a damaged file is one line (the splits
    follow from the cohort and the seed, so deleting it makes the same ones again)."""
    try:
        text = path.read_text()
    except OSError as e:
        raise BratsError(f"cannot read {path} ({e.strerror}): check its permissions") from e
    try:
        d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError(f"a JSON {type(d).__name__}, not an object")
        str(d["cohort_fingerprint"]), int(d["k"]), int(d["seed"])
        for f in d["folds"]:
            if not isinstance(f["val"], list) or not isinstance(f.get("inner_val", []), list):
                raise ValueError("a fold without a list of patients")
    except (ValueError, TypeError, KeyError) as e:  # JSONDecodeError is a ValueError
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
    ids = sorted({p for fold in outer for p in fold})
    splits = Splits(len(outer), int(d["seed"]), inner_val, str(d["cohort_fingerprint"]), outer, inner)
    return splits.fold(k, ids, [0] * len(ids))  # labels choose an inner split only when none is stored


def load_or_make_splits(
    path: str | Path,
    patient_ids: list[str],
    labels: list[int],
    k: int = 5,
    seed: int = 42,
    inner_val: float = 0.0,
    write: bool = True,
) -> Splits:
    """Reuse `path` when present (it must match the cohort and the settings), else make the
    splits and, with `write`, write them (training does; evaluation never writes a run's splits)."""
    path = Path(path)
    fp = cohort_fingerprint(patient_ids, labels)
    if path.exists():
        d = read_splits(path)
        if d["cohort_fingerprint"] != fp:
            raise BratsError(
                f"{path} was made for another cohort (fingerprint {d['cohort_fingerprint']}, "
                f"this cohort {fp}): give --data the cohort (or cache) this run was made for, or use a "
                "new --run folder"
            )
        if (d["k"], d["seed"], d.get("inner_val", 0.0)) != (k, seed, inner_val):
            raise BratsError(
                f"{path} has k={d['k']}, seed={d['seed']}, inner_val={d.get('inner_val', 0.0)} "
                "but this run asks "
                f"k={k}, seed={seed}, inner_val={inner_val}: use a new --run folder or the same settings"
            )
        inner = [f["inner_val"] for f in d["folds"]] if all("inner_val" in f for f in d["folds"]) else None
        return Splits(d["k"], d["seed"], d.get("inner_val", 0.0), fp, [f["val"] for f in d["folds"]], inner)
    splits = make_splits(patient_ids, labels, k, seed, inner_val)
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, splits.to_json(patient_ids, labels))
    return splits
