"""RUN/evaluation/summary.json: one schema, written and read through it.

evaluate.py writes it; export.py, the ablation table and evaluate.py --cam read it. The JSON
layout is the one earlier versions wrote (a fold's metrics flat in its row), so their files
still read; fields they lack take the defaults given here. Every figure read back is range
checked: a summary edited by hand, or damaged, never reaches an exported model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from brats.errors import BratsError
from brats.evaluation.metrics import METRICS
from brats.io.atomic import write_json_atomic


def _proportion(value: Any, name: str) -> float:
    v = float(value)
    if not (math.isnan(v) or 0.0 <= v <= 1.0):
        raise ValueError(f"{name} {v} is not in [0, 1]")
    return v


@dataclass(frozen=True, kw_only=True)
class FoldRow:
    """One fold's line of Table 1: the checkpoint the policy chose, its verification and its
    metrics on the scored fold."""

    fold: int  # 0-based fold index
    best_epoch: int  # the epoch kept (best by the policy, or the last with --select last)
    checkpoint: str  # file name within the fold folder
    is_ema: bool
    stored_val_auc: float  # stored in the checkpoint when it was saved
    rescored_val_auc: float  # re-computed now on the patients that chose the checkpoint
    metrics: dict[str, float]  # METRICS on the scored (outer) fold
    n: int  # patients scored
    validated_in: str | None = None  # precision of the stored figures ("no" = fp32)
    rescored_in: str | None = None  # precision of the re-score
    max_abs_dp: float | None = None  # per-patient |p stored - p re-scored|; None when not stored
    patients_compared: int = 0
    finished: bool | None = None  # the fold's training ended (None: not known, older runs)
    epochs_trained: int | None = None  # epochs the fold trained (None: not known)

    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "metrics"}
        for unknown in ("finished", "epochs_trained"):  # not known for older runs: not written
            if d[unknown] is None:
                del d[unknown]
        return {**d, **self.metrics}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FoldRow:
        if not isinstance(d, dict):
            raise ValueError(f"a fold row is a {type(d).__name__}")
        if type(d.get("fold")) is not int or d["fold"] < 0:
            raise ValueError(f"fold {d.get('fold')!r}")
        dp = d.get("max_abs_dp")
        return cls(
            fold=d["fold"],
            best_epoch=int(d["best_epoch"]),
            checkpoint=str(d["checkpoint"]),
            is_ema=bool(d.get("is_ema", False)),
            stored_val_auc=_proportion(d.get("stored_val_auc", math.nan), "stored_val_auc"),
            rescored_val_auc=_proportion(d["rescored_val_auc"], "rescored_val_auc"),
            metrics={m: _proportion(d[m], m) for m in METRICS},
            n=int(d.get("n", 0)),
            validated_in=d.get("validated_in"),
            rescored_in=d.get("rescored_in"),
            max_abs_dp=None if dp is None else float(dp),
            patients_compared=int(d.get("patients_compared", 0)),
            finished=d["finished"] if isinstance(d.get("finished"), bool) else None,
            epochs_trained=int(d["epochs_trained"]) if d.get("epochs_trained") is not None else None,
        )


@dataclass(frozen=True, kw_only=True)
class Summary:
    """What evaluate.py found: Table 1, mean +- sample std, the pooled out-of-fold figures, the
    protocol that produced them, and the decision fitted on them."""

    run: str  # the run folder evaluated
    protocol: str  # how each fold's epoch was chosen (brats.data.folds.protocol)
    optimistic: bool  # the epoch was chosen on the patients scored
    folds: list[FoldRow]
    mean_std: dict[str, dict[str, float]]  # metric -> {"mean", "std"} across folds (sample std)
    pooled: dict[str, Any]  # n, hgg, lgg, majority_class_accuracy, auc and auc_ci95 when defined
    calibration: dict[str, Any] | None = None  # brats.evaluation.calibration.summarize_calibration
    decision: dict[str, Any] = field(default_factory=dict)  # brats.deploy.contract.Decision.to_dict
    confound: dict[str, Any] | None = None  # brats.evaluation.confound.site_confound
    test_set: dict[str, Any] | None = None  # brats.evaluation.test_set.score_test_set (runs with one)
    # the decision an ensemble ships: fitted on its own test-set predictions (empty without a test set)
    ensemble_decision: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # results that may mean nothing, and why

    def fold(self, k: int) -> FoldRow:
        return next(row for row in self.folds if row.fold == k)

    def decision_options(self) -> dict[str, Any]:
        """The evaluate.py options this decision was fitted with (a calibration asked for and not
        kept included): evaluating the run again with them fits the same kind of decision."""
        calibration = self.calibration or {}
        method = self.decision.get("calibration", "none")
        if method == "none" and calibration.get("not_shipped"):
            method = calibration["not_shipped"]["method"]
        return {
            "calibrate": method,
            "threshold": str(self.decision.get("rule", "0.5")),
            "force_calibration": bool(calibration.get("forced")),
        }

    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["folds"] = [row.to_json() for row in self.folds]
        for optional in ("confound", "test_set", "ensemble_decision", "warnings"):  # absent from older files
            if not d[optional]:
                del d[optional]
        return d

    def write(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_json())

    @classmethod
    def from_json(cls, d: Any) -> Summary:
        """A parsed summary.json; raises ValueError/TypeError/KeyError saying what is wrong."""
        if not isinstance(d, dict):
            raise ValueError(f"a JSON {type(d).__name__}, not an object")
        rows = d["folds"]
        if not isinstance(rows, list) or not rows:
            raise ValueError("no folds")
        mean_std = {m: {k: float(d["mean_std"][m][k]) for k in ("mean", "std")} for m in METRICS}
        pooled, protocol = d["pooled"], d["protocol"]
        if not isinstance(pooled, dict) or not isinstance(protocol, str):
            raise ValueError("no pooled figures or protocol")
        if "auc" in pooled:
            _proportion(pooled["auc"], "pooled auc")
        decision = d.get("decision") or {}
        for name in ("decision", "ensemble_decision", "confound", "test_set"):
            if not isinstance(d.get(name) or {}, dict):
                raise ValueError(f"{name} is a {type(d[name]).__name__}")
        if d.get("test_set"):
            _proportion(d["test_set"]["ensemble"]["single_fold_decision"]["auc"], "test-set auc")
        return cls(
            run=str(d.get("run", "")),
            protocol=protocol,
            # files written before the field: outer-fold selection was the only protocol that
            # did not say otherwise in its name
            optimistic=bool(d.get("optimistic", not protocol.startswith(("inner", "last")))),
            folds=[FoldRow.from_json(row) for row in rows],
            mean_std=mean_std,
            pooled=pooled,
            calibration=d.get("calibration"),
            decision=decision,
            confound=d.get("confound"),
            test_set=d.get("test_set"),
            ensemble_decision=d.get("ensemble_decision") or {},
            warnings=[str(w) for w in d.get("warnings") or []],
        )

    @classmethod
    def read(cls, path: Path, fix: str) -> Summary:
        """summary.json at `path`; a missing or damaged file is one line ending in `fix`."""
        if not path.is_file():
            raise BratsError(f"{path.parent.parent}: not evaluated yet (no {path}): {fix}")
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (ValueError, TypeError, KeyError, AttributeError, OSError) as e:
            raise BratsError(f"{path} is corrupt ({type(e).__name__}: {str(e)[:120]}): {fix}") from e
