"""Every picture the evaluation stage draws (matplotlib, Agg backend: no display needed).

The fold's ROC, PR and confusion plots (also drawn when a fold ends in training), the ROC of
every fold and the reliability diagram, each with its words (title, axis labels, legend) also in
the PNG's text chunks; and the CAM montage of evaluate.py --cam, drawn as predict draws its maps
(brats.deploy.cam, without matplotlib).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from brats.data.cohort import CLASSES
from brats.deploy.cam import labelled_planes, write_png
from brats.deploy.contract import Decision
from brats.errors import BratsError
from brats.io.atomic import atomic_path


def pyplot():
    """matplotlib.pyplot on the Agg backend (imported on first use: it is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """`fig` as a PNG at `path`, atomically, then closed; every word it shows also goes into the
    PNG's text chunks (Title: the axes' titles; Description: axis labels, legend entries, texts and
    named ticks), so that a test, or a reader without the picture, can tell what it says."""
    titles, words = [], []
    for ax in fig.axes:
        titles.append(ax.get_title())
        words += [ax.get_xlabel(), ax.get_ylabel()]
        if ax.get_legend() is not None:
            words += [t.get_text() for t in ax.get_legend().get_texts()]
        words += [t.get_text() for t in ax.texts]
        words += [
            t.get_text() for t in (*ax.get_xticklabels(), *ax.get_yticklabels()) if t.get_text().isalpha()
        ]
    meta = {"Title": " / ".join(t for t in titles if t), "Description": " | ".join(w for w in words if w)}
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            fig.savefig(f, format="png", dpi=100, metadata=meta)
    finally:
        pyplot().close(fig)
    return path


FPR, TPR = "false positive rate (LGG called HGG)", "true positive rate (HGG called HGG)"


def save_plots(
    folder: Path,
    labels: np.ndarray,
    p_hgg: np.ndarray,
    prefix: str = "",
    suffix: str = "",
    title: str = "",
    decision: Decision | None = None,
) -> list[Path]:
    """`{prefix}{roc_curve,pr_curve,confusion_matrix}{suffix}.png` (scikit-learn displays), the
    confusion matrix at `decision` (its calibration and threshold) or at p(HGG) >= 0.5."""
    plt = pyplot()
    from sklearn.metrics import ConfusionMatrixDisplay, PrecisionRecallDisplay, RocCurveDisplay

    folder.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(labels).astype(int)
    if decision is None:
        grade, rule = (np.asarray(p_hgg) >= 0.5).astype(int), "HGG when p(HGG) >= 0.5"
    else:
        grade = decision.grade(decision.calibrate(np.asarray(p_hgg)))
        calibrated = "" if decision.calibration == "none" else f" ({decision.calibration}-calibrated)"
        rule = f"HGG when p(HGG){calibrated} >= {decision.threshold:.3g}, the run's decision"
    plots = []
    if len(np.unique(labels)) == 2:

        def roc(ax):
            RocCurveDisplay.from_predictions(labels, p_hgg, pos_label=1, name="HGG", ax=ax)
            ax.set(xlabel=FPR, ylabel=TPR)

        def pr(ax):
            PrecisionRecallDisplay.from_predictions(labels, p_hgg, pos_label=1, name="HGG", ax=ax)
            ax.set(xlabel="recall (share of HGG found)", ylabel="precision (share of HGG calls right)")

        plots += [("roc_curve", "ROC", roc), ("pr_curve", "precision-recall", pr)]

    def confusion(ax):
        ConfusionMatrixDisplay.from_predictions(
            labels, grade, labels=[0, 1], display_labels=list(CLASSES), ax=ax, colorbar=False
        )
        ax.set(xlabel="graded", ylabel="true grade")

    plots.append(("confusion_matrix", f"confusion matrix\n{rule}", confusion))
    written = []
    for name, what, draw in plots:
        fig, ax = plt.subplots(figsize=(4.8, 4.8))
        draw(ax)
        ax.set_title(f"{title}: {what}" if title else what, fontsize=9)
        fig.tight_layout()
        written.append(save_figure(fig, folder / f"{prefix}{name}{suffix}.png"))
    return written


def roc_all_folds(folds: dict[int, tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    """One ROC curve per fold ({fold: (labels, p_hgg)}), dashed and in its own style so that
    overlapping folds stay visible, and the pooled out-of-fold curve over all of them."""
    plt = pyplot()
    from sklearn.metrics import RocCurveDisplay

    def curve(labels: np.ndarray, p_hgg: np.ndarray, name: str, **style) -> None:
        if len(np.unique(labels)) == 2:
            RocCurveDisplay.from_predictions(
                labels, p_hgg, pos_label=1, name=f"{name}, {len(labels)} patients", ax=ax, curve_kwargs=style
            )

    fig, ax = plt.subplots(figsize=(5.8, 5.8))
    styles = ["--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1))]
    for i, (k, (labels, p_hgg)) in enumerate(folds.items()):
        curve(labels, p_hgg, f"fold {k}", linestyle=styles[i % len(styles)], alpha=0.8, linewidth=1.4)
    labels = np.concatenate([np.asarray(y) for y, _ in folds.values()])
    p_hgg = np.concatenate([np.asarray(p) for _, p in folds.values()])
    curve(labels, p_hgg, "pooled out-of-fold", color="black", linewidth=2.5)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.set(xlabel=FPR, ylabel=TPR)
    ax.set_title("ROC of every fold and pooled out of fold (HGG positive)", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def reliability_diagram(path: Path, curves: dict[str, dict], title: str = "") -> None:
    """Fraction HGG against mean p(HGG) per bin, one line per set of probabilities
    ({name: probability_figures}: its reliability bins and Brier score), each point marked with
    its bin's patients, with the diagonal."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.plot([0, 1], [0, 1], "k:", lw=0.8, label="perfectly calibrated")
    for i, (name, figures) in enumerate(curves.items()):
        rows = figures["reliability"]
        x, y = [r["mean_p"] for r in rows], [r["fraction_hgg"] for r in rows]
        line = ax.plot(x, y, "o-" if i == 0 else "s--", label=f"{name} (Brier {figures['brier']:.3f})")[0]
        for r in rows:
            ax.annotate(
                f"n={r['n']}",
                (r["mean_p"], r["fraction_hgg"]),
                textcoords="offset points",
                xytext=(4, -10 if i == 0 else 6),
                fontsize=7,
                color=line.get_color(),
            )
    ax.set(
        xlabel="mean predicted p(HGG) in the bin",
        ylabel="fraction HGG in the bin",
        xlim=(0, 1),
        ylim=(-0.05, 1.1),
    )
    ax.set_title(title or "Reliability, pooled out of fold (n: patients per bin)", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def write_cam_montage(
    underlays: np.ndarray, cams: np.ndarray, p_hgg: np.ndarray, titles: list[str], path: str | Path
) -> None:
    """A PNG with one row per patient: three planes of its underlay (N, S, S, S), e.g. the
    preprocessed FLAIR, through the peak of the evidence for the predicted grade, its CAM
    (N, S, S, S) over them, titled `titles[i]` and its p(HGG) (N,) (wrapped to the row's width),
    the planes named and the colour bar ticked (brats.deploy.cam.labelled_planes); written
    atomically, every word also in the PNG's text chunks."""
    if len(titles) != len(underlays) or not len(underlays):
        raise BratsError(f"{path}: give one title per patient ({len(titles)} for {len(underlays)})")
    rows, said = [], []
    for v, cam, p, title in zip(underlays, cams, p_hgg, titles):
        full = f"{title}: p(HGG) {p:.3f}; red: evidence for HGG, blue: for LGG"
        rgb, words = labelled_planes(np.asarray(v, dtype=np.float32), cam, full, toward_hgg=bool(p >= 0.5))
        rows.append(rgb)
        said += words
    width = max(r.shape[1] for r in rows)
    separator = np.full((6, width, 3), 64, np.uint8)
    stacked = []
    for rgb in rows:
        stacked += [np.pad(rgb, ((0, 0), (0, width - rgb.shape[1]), (0, 0))), separator]
    write_png(
        path, np.concatenate(stacked[:-1]), {"Title": " / ".join(titles), "Description": " | ".join(said)}
    )
