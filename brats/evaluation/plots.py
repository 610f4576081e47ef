"""Every picture the evaluation stage draws (matplotlib, Agg backend: no display needed).

The fold's ROC, PR and confusion plots (also drawn when a fold ends in training), the ROC of
every fold, the reliability diagram, and the CAM montage of evaluate.py --cam. Predict draws
its own maps without matplotlib (brats.deploy.cam).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from brats.data.cohort import CLASSES
from brats.deploy.cam import render_planes
from brats.errors import BratsError
from brats.io.atomic import atomic_path


def pyplot():
    """matplotlib.pyplot on the Agg backend (imported on first use: it is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_plots(
    folder: Path, labels: np.ndarray, p_hgg: np.ndarray, prefix: str = "", suffix: str = "", title: str = ""
) -> list[Path]:
    """`{prefix}{roc_curve,pr_curve,confusion_matrix}{suffix}.png` (scikit-learn displays)."""
    plt = pyplot()
    from sklearn.metrics import ConfusionMatrixDisplay, PrecisionRecallDisplay, RocCurveDisplay

    folder.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(labels).astype(int)
    written = []
    plots = []
    if len(np.unique(labels)) == 2:
        plots += [
            (
                "roc_curve",
                lambda ax: RocCurveDisplay.from_predictions(labels, p_hgg, pos_label=1, name="HGG", ax=ax),
            ),
            (
                "pr_curve",
                lambda ax: PrecisionRecallDisplay.from_predictions(
                    labels, p_hgg, pos_label=1, name="HGG", ax=ax
                ),
            ),
        ]
    plots.append(
        (
            "confusion_matrix",
            lambda ax: ConfusionMatrixDisplay.from_predictions(
                labels,
                (p_hgg >= 0.5).astype(int),
                labels=[0, 1],
                display_labels=list(CLASSES),
                ax=ax,
                colorbar=False,
            ),
        )
    )
    for name, draw in plots:
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        draw(ax)
        ax.set_title(f"{title} {name.replace('_', ' ')}".strip())
        path = folder / f"{prefix}{name}{suffix}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def roc_all_folds(folds: dict[int, tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    """One ROC curve per fold: {fold: (labels, p_hgg)}."""
    plt = pyplot()
    from sklearn.metrics import RocCurveDisplay

    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    for k, (labels, p_hgg) in folds.items():
        if len(np.unique(labels)) == 2:
            RocCurveDisplay.from_predictions(labels, p_hgg, pos_label=1, name=f"fold {k}", ax=ax)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_title("ROC, every fold (HGG positive)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def reliability_diagram(path: Path, curves: dict[str, list[dict]], title: str = "") -> None:
    """Fraction HGG against mean p(HGG) per bin, one line per curve, with the diagonal."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k:", lw=0.8, label="perfectly calibrated")
    for name, rows in curves.items():
        ax.plot([r["mean_p"] for r in rows], [r["fraction_hgg"] for r in rows], "o-", label=name)
    ax.set(xlabel="mean predicted p(HGG)", ylabel="fraction HGG", xlim=(0, 1), ylim=(0, 1))
    ax.set_title(title or "Reliability, pooled out-of-fold")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_cam_montage(
    underlays: np.ndarray, cams: np.ndarray, p_hgg: np.ndarray, titles: list[str], path: str | Path
) -> None:
    """A PNG with one row per patient: three planes of its underlay (N, S, S, S), e.g. the
    preprocessed FLAIR, through the peak of the evidence for the predicted grade, its CAM
    (N, S, S, S) over them, titled `titles[i]` and its p(HGG) (N,); written atomically."""
    plt = pyplot()

    if len(titles) != len(underlays) or not len(underlays):
        raise BratsError(f"{path}: give one title per patient ({len(titles)} for {len(underlays)})")
    pictures = [
        render_planes(np.asarray(v, dtype=np.float32), cam, toward_hgg=bool(p >= 0.5))
        for v, cam, p in zip(underlays, cams, p_hgg)
    ]
    height, width = max(r.shape[0] for r, _ in pictures), max(r.shape[1] for r, _ in pictures)
    fig, axes = plt.subplots(
        len(pictures), 1, figsize=(width / 100, len(pictures) * (height / 100 + 0.35)), squeeze=False
    )
    for ax, (rgb, at), title, p in zip(axes[:, 0], pictures, titles, p_hgg):
        ax.imshow(rgb, interpolation="nearest")
        ax.set_title(
            f"{title}  p(HGG) {p:.3f}  (axial, coronal, sagittal through z, y, x = {at}; R on the left; "
            "red HGG, blue LGG evidence)",
            fontsize=7,
        )
        ax.set_axis_off()
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
    finally:
        plt.close(fig)
