"""The site confound: when a data collection nearly determines the grade, a model can separate
the grades by site (scanner, protocol) alone.

In BraTS 2018 LGG cases come only from the 2013 challenge's subset and TCIA09/10/12/13, HGG from
the 2013 subset, CBICA and TCIA01-08 (brats.data.cohort.collection_of reads the collection from
the patient id). The report shows the grade x collection table, the AUC within every collection
that holds both grades (the only place where the site cannot be the signal), and how well the
collection alone would grade a patient (each patient scored by the share of HGG in its
collection). `train.py --group-by collection` keeps each collection in one
validation fold, so that no fold is scored on a site it trained on.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from brats.evaluation.metrics import rank_auc

SITE_ONLY_AUC_FLAG = 0.75  # the collection alone grades this well: the section is flagged


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    return float(rank_auc(np.asarray(labels)[None], np.asarray(scores, dtype=np.float64)[None])[0])


def site_only_scores(collections: list[str], labels: np.ndarray) -> np.ndarray:
    """Each patient's score by site alone: the share of HGG in its collection (in-sample: what
    the best model of the site alone could reach, an upper bound)."""
    labels = np.asarray(labels).astype(float)
    total, hgg = Counter(collections), Counter(c for c, y in zip(collections, labels) if y == 1)
    return np.array([hgg[c] / total[c] for c in collections])


def site_confound(collections: list[str], labels: np.ndarray, p_hgg: np.ndarray) -> dict:
    """The confound section's figures over the scored patients (pooled out of fold)."""
    labels, p_hgg = np.asarray(labels).astype(int), np.asarray(p_hgg, dtype=np.float64)
    names = sorted(set(collections))
    table = {
        c: {
            "hgg": int(sum(y == 1 for x, y in zip(collections, labels) if x == c)),
            "lgg": int(sum(y == 0 for x, y in zip(collections, labels) if x == c)),
        }
        for c in names
    }
    within = {}
    for c in names:
        members = np.array([x == c for x in collections])
        if table[c]["hgg"] and table[c]["lgg"]:
            within[c] = {"n": int(members.sum()), "auc": auc(labels[members], p_hgg[members])}
    one_grade = sum(t["hgg"] + t["lgg"] for c, t in table.items() if c not in within)
    figures = {
        "collections": table,
        "within": within,
        "one_grade_share": one_grade / max(len(labels), 1),
    }
    if len(names) > 1 and len(np.unique(labels)) == 2:
        figures["site_only_auc"] = auc(labels, site_only_scores(collections, labels))
        figures["flagged"] = figures["site_only_auc"] >= SITE_ONLY_AUC_FLAG
    else:
        figures["flagged"] = False
    return figures
