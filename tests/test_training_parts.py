import math
from pathlib import Path

import numpy as np
import pytest
import torch

from brats.errors import BratsError
from brats.evaluation.metrics import classification_metrics, mean_std
from brats.models.resnet import ResNet3D
from brats.training.augment import AugmentConfig, augment_batch
from brats.training.config import BASELINE, TrainConfig, make_config
from brats.training.ema import ModelEma
from brats.training.engine import warmup_cosine
from brats.training.losses import LDAMLoss, drw_weights


def test_final_policy_defaults_follow_seed_section_6():
    cfg = make_config(data="x")
    assert (
        cfg.modalities == ("t1", "t1ce", "t2", "flair") and cfg.loss == "ce" and cfg.sampler == "inverse_freq"
    )
    assert (cfg.batch_size, cfg.grad_accum, cfg.lr, cfg.classifier_lr_mult) == (4, 2, 1e-4, 2.0)
    assert (cfg.patience, cfg.min_epochs, cfg.dropout, cfg.weight_decay, cfg.ema_decay) == (
        10,
        15,
        0.4,
        1e-4,
        0.0,
    )
    assert cfg.drw_start_epoch == 0 and cfg.warmup_epochs == 3


def test_baseline_policy_follows_seed_section_1_and_overrides_win():
    cfg = make_config("baseline", data="x")
    assert cfg.modalities == ("flair",) and cfg.loss == "ldam" and (cfg.ldam_max_m, cfg.ldam_s) == (0.2, 15.0)
    assert (cfg.drw_start_epoch, cfg.classifier_lr_mult, cfg.batch_size, cfg.patience, cfg.min_epochs) == (
        25,
        10.0,
        2,
        7,
        10,
    )
    assert cfg.sampler == "inverse_freq"  # the sampler was kept in the baseline
    assert make_config("baseline", data="x", patience=3).patience == 3
    assert cfg.warmup == 6.0 and make_config("baseline", data="x", max_epochs=30).warmup == 3.0  # 10%
    assert make_config(data="x").warmup == 3.0
    assert make_config("baseline", data="x", warmup_epochs=2.0).warmup == 2.0
    assert set(BASELINE) <= set(TrainConfig.__dataclass_fields__)


def test_config_collects_every_problem():
    with pytest.raises(BratsError) as e:
        make_config(data="", depth=11, lr=-1.0, fold=7, modalities=("t1", "dwi"))
    msg = str(e.value)
    for part in ("--depth 11", "--lr -1.0", "--fold 7", "dwi", "--data is required"):
        assert part in msg
    with pytest.raises(BratsError, match="--policy 'best'"):
        make_config("best", data="x")


def test_config_round_trips_through_a_plain_dict():
    cfg = make_config("baseline", data="x", fold=2)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_ema_update_rule():
    model = ResNet3D(depth=10, in_channels=1)
    ema = ModelEma(model, decay=0.9)
    before = ema.module.fc.weight.clone()
    with torch.no_grad():
        model.fc.weight.add_(1.0)
        model.bn1.num_batches_tracked.fill_(7)
    ema.update(model)
    torch.testing.assert_close(ema.module.fc.weight, 0.9 * before + 0.1 * model.fc.weight)
    assert ema.module.bn1.num_batches_tracked.item() == 7  # integer buffers are copied
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())


def test_ldam_margins_and_loss():
    loss = LDAMLoss([75, 210], max_m=0.2, s=15.0)  # LGG rarer
    m = loss.margins.tolist()
    assert m[0] == pytest.approx(0.2) and m[1] == pytest.approx(0.2 * (75 / 210) ** 0.25)
    logits = torch.tensor([[2.0, 1.0], [0.5, 1.5]])
    target = torch.tensor([0, 1])
    expected = torch.nn.functional.cross_entropy(
        15 * (logits - torch.tensor([[m[0], 0.0], [0.0, m[1]]])), target
    )
    torch.testing.assert_close(loss(logits, target), expected)


def test_drw_weights_favour_the_minority_and_sum_to_classes():
    w = drw_weights([75, 210])
    assert w.sum().item() == pytest.approx(2.0) and w[0] > w[1]


def test_warmup_then_cosine():
    f = warmup_cosine(warmup=4, total=20)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(12) == pytest.approx(0.5) and f(20) == pytest.approx(0.0)


def brain_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, 16, generator=g)
    x[:, :, :3] = 0  # background slab
    return x


def test_augment_identity_when_switched_off_and_exact_flip():
    x = brain_batch()
    off = AugmentConfig(
        flip_lr=0.0, max_rotation_deg=0.0, scale=(1.0, 1.0), intensity_scale=(1.0, 1.0), intensity_shift=0.0
    )
    torch.testing.assert_close(augment_batch(x, torch.Generator().manual_seed(1), off), x, atol=1e-5, rtol=0)
    flip = AugmentConfig(
        flip_lr=1.0, max_rotation_deg=0.0, scale=(1.0, 1.0), intensity_scale=(1.0, 1.0), intensity_shift=0.0
    )
    torch.testing.assert_close(
        augment_batch(x, torch.Generator().manual_seed(1), flip), x.flip(-1), atol=1e-5, rtol=0
    )


def test_augment_shares_geometry_across_channels_and_keeps_background():
    x = brain_batch()
    x[:, 1] = x[:, 0] * 2  # channel 1 is a scaled copy of channel 0
    cfg = AugmentConfig(intensity_scale=(1.0, 1.0), intensity_shift=0.0)
    y = augment_batch(x, torch.Generator().manual_seed(3), cfg)
    torch.testing.assert_close(y[:, 1], 2 * y[:, 0], atol=1e-5, rtol=1e-5)  # same spatial transform
    y = augment_batch(x, torch.Generator().manual_seed(3))
    assert torch.equal(y == 0, (y == 0).all(dim=1, keepdim=True).expand_as(y))  # background 0 in all channels
    torch.testing.assert_close(y, augment_batch(x, torch.Generator().manual_seed(3)))  # seeded


def test_metrics_against_hand_computed_values():
    labels = np.array([1, 1, 1, 0, 0])
    p = np.array([0.9, 0.6, 0.4, 0.7, 0.1])
    m = classification_metrics(labels, p)
    # pred = [1, 1, 0, 1, 0]: TP 2, FN 1, FP 1, TN 1
    assert m["confusion_matrix"] == [[1, 1], [1, 2]]
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["accuracy"] == pytest.approx(3 / 5)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m["auc"] == pytest.approx(4 / 6)  # pairs (pos > neg): 0.9>both, 0.6>0.1, 0.4>0.1
    assert math.isnan(classification_metrics(np.array([1, 1]), np.array([0.2, 0.8]))["auc"])


def test_seed_table1_summary_arithmetic():
    """Seed 4.2/4.3: the five folds give AUC 0.8793 +- 0.0436 (sample std), F1 0.7619 +- 0.0677,
    accuracy 0.7860 +- 0.0717 (the seed printed 0.8794 from unrounded values)."""
    auc = [0.8079, 0.9016, 0.8952, 0.9206, 0.8714]
    f1 = [0.7077, 0.8081, 0.7970, 0.8246, 0.6720]
    acc = [0.7368, 0.8421, 0.8246, 0.8421, 0.6842]
    for values, (mean, std) in ((auc, (0.8793, 0.0436)), (f1, (0.7619, 0.0677)), (acc, (0.7860, 0.0717))):
        m, s = mean_std(values)
        assert (round(m, 4), round(s, 4)) == (mean, std)


def test_rank_auc_matches_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    from brats.evaluation.metrics import rank_auc

    rng = np.random.default_rng(0)
    y = np.array([1, 0] * 10)
    p = rng.integers(0, 5, (3, 20)) / 4  # many ties
    expected = [roc_auc_score(y, row) for row in p]
    np.testing.assert_allclose(rank_auc(np.tile(y, (3, 1)), p), expected)


def make_keeper(folder: Path, select: str = "best", ema: bool = False):
    from brats.runs.keeper import CheckpointKeeper, FoldRecord
    from brats.runs.paths import RunPaths

    ids = ["a", "b", "c", "d"]
    record = FoldRecord(
        config={"depth": 10},
        fold=0,
        splits_fingerprint="f",
        patients_fingerprint="g",
        protocol="p",
        val_patients=ids,
        preprocess={"size": 24},
        mixed_precision="no",
        val_ids=ids,
        val_labels=np.array([0, 1, 1, 0]),
    )
    return CheckpointKeeper(paths=RunPaths(folder), record=record, select=select, ema=ema)


def candidate(auc: float, loss: float = 1.0, ema: bool = False):
    from brats.runs.keeper import Candidate

    p = np.array([0.2, 0.7, 0.9, 0.4])
    return Candidate(ema=ema, weights=torch.nn.Linear(1, 1), metrics={"auc": auc, "loss": loss}, p_hgg=p)


def test_best_keeper_never_regresses_and_leaves_no_temp_files(tmp_path):
    from brats.runs.keeper import AUC_EPS, Best

    keeper = make_keeper(tmp_path)
    path, folder = tmp_path / "fold_0" / "best.pt", tmp_path / "fold_0"
    saved = []
    for epoch, auc in enumerate([0.5, 0.8, 0.8 + AUC_EPS / 2, float("nan"), 0.7, 0.9], start=1):
        if keeper.consider(epoch, [candidate(auc)]):
            assert keeper.write(epoch, due=False) == [path]
            saved.append(epoch)
        else:
            assert keeper.write(epoch, due=True) == []
    assert saved == [1, 2, 6]  # float noise, NaN and a worse AUC never replace the best
    best = keeper.bests["best"]
    assert (best.best_auc, best.best_epoch) == (0.9, 6)
    stored = torch.load(path, weights_only=True)
    assert stored["epoch"] == 6 and stored["val_probabilities"] == {"a": 0.2, "b": 0.7, "c": 0.9, "d": 0.4}
    assert stored["fold"] == 0 and stored["config"] == {"depth": 10}
    assert not list(folder.glob("*.png"))  # drawn once, for the best epoch, when the fold is done
    keeper.plot()
    assert {p.name for p in folder.glob("*_epoch_*.png")} == {
        f"{n}_epoch_6.png" for n in ("roc_curve", "pr_curve", "confusion_matrix")
    }
    assert not list(folder.glob(".tmp-*"))
    restored = Best(path, is_ema=False, title="fold 0")
    restored.load_state_dict(best.state_dict())
    assert (restored.labels, restored.p_hgg) == ([0, 1, 1, 0], [0.2, 0.7, 0.9, 0.4])  # a resumed fold plots
    assert not restored.beats(0.9, 1.0) and restored.beats(0.95, 1.0)


def test_select_last_keeps_every_epoch_and_writes_it_with_the_resume_state(tmp_path):
    keeper = make_keeper(tmp_path, select="last", ema=True)
    for epoch, auc in enumerate([0.9, 0.5, 0.7], start=1):
        assert keeper.consider(epoch, [candidate(auc), candidate(auc, ema=True)])  # never stops early
        assert keeper.write(epoch, due=epoch == 3) == (
            []
            if epoch < 3
            else [
                tmp_path / "fold_0" / "best.pt",
                tmp_path / "fold_0" / "best_ema.pt",
            ]
        )
    assert keeper.outcome() == {"best_epoch": 3, "best_auc": 0.7, "best_ema_epoch": 3, "best_ema_auc": 0.7}
    assert torch.load(tmp_path / "fold_0" / "best_ema.pt", weights_only=True)["is_ema"] is True


def test_an_auc_tie_is_broken_by_the_lower_validation_loss(tmp_path):
    from brats.runs.keeper import Best

    keeper = make_keeper(tmp_path)
    seen = [(1.0, 0.6), (1.0, 0.7), (1.0, 0.4), (0.95, 0.1), (1.0, 0.4)]  # (AUC, val loss) of epochs 1-5
    assert [keeper.consider(epoch, [candidate(auc, loss)]) for epoch, (auc, loss) in enumerate(seen, 1)] == [
        True,
        False,  # same AUC, higher loss
        True,  # same AUC, lower loss: the better-trained model of the two
        False,  # a lower AUC never wins on loss
        False,  # an exact repeat is no improvement
    ]
    restored = Best(tmp_path / "best.pt", is_ema=False, title="fold 0")
    restored.load_state_dict(keeper.bests["best"].state_dict())
    assert (restored.best_epoch, restored.best_loss) == (3, 0.4)
    assert not restored.beats(1.0, 0.5) and restored.beats(1.0, 0.3)
    # a state written before the tie-break holds no loss: its best was kept on ties, and still is
    older = Best(tmp_path / "best.pt", is_ema=False, title="fold 0")
    older.load_state_dict({"best_auc": 1.0, "best_epoch": 3})
    assert not older.beats(1.0, 0.01) and older.beats(1.0 + 0.01, 0.9)


def test_checkpoint_schema_round_trips_and_fills_defaults_for_older_files(tmp_path):
    from brats.runs.checkpoint import Checkpoint

    full = Checkpoint(
        model_state_dict={"w": torch.ones(2)},
        val_metrics={"auc": 0.75},
        epoch=3,
        is_ema=True,
        config={"depth": 10},
        fold=1,
        splits_fingerprint="abc",
        protocol="p",
        val_patients=["a"],
    )
    again = Checkpoint.from_payload(full.to_payload(), tmp_path / "best.pt")
    assert again.to_payload().keys() == full.to_payload().keys() and again.is_ema and again.epoch == 3
    older = {"model_state_dict": {"w": torch.ones(2)}, "val_metrics": {}, "args_note": "ignored"}
    ema = Checkpoint.from_payload(older, tmp_path / "best_ema.pt")
    raw = Checkpoint.from_payload(older, tmp_path / "best.pt")
    assert ema.is_ema and not raw.is_ema  # decided by the file name when the field is missing
    assert (raw.epoch, raw.config, raw.splits_fingerprint, raw.val_patients) == (-1, None, None, [])
    assert math.isnan(raw.val_auc)
    with pytest.raises(BratsError, match="lacks val_metrics"):
        Checkpoint.from_payload({"model_state_dict": {}}, tmp_path / "best.pt")


def test_ema_follows_only_real_optimizer_updates(tmp_path, monkeypatch, fresh_accelerate):
    """A step the fp16 grad scaler skipped moves neither the EMA nor the scheduler."""
    from accelerate import Accelerator

    from brats.training import engine

    accelerator = Accelerator(cpu=True)
    model = ResNet3D(depth=10, in_channels=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(8, 1, 16, 16, 16), torch.tensor([0, 1] * 4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer, lambda s: 1.0)
    ema = ModelEma(accelerator.unwrap_model(model), 0.5)
    cfg = make_config(data="x", augment=False, progress=False, grad_accum=1)
    data = engine.FoldData(
        train_loader=loader,
        val_loader=loader,
        sample_gen=torch.Generator(),
        class_counts=[4, 4],
        splits_fingerprint="f",
        patients_fingerprint="g",
        val_patients=[],
        preprocess={},
        val_ids=[],
        val_labels=np.array([]),
    )
    fold = engine.Fold(
        cfg=cfg,
        accelerator=accelerator,
        paths=engine.RunPaths(tmp_path),
        data=data,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        criterion=torch.nn.CrossEntropyLoss(),
        augment_gen=torch.Generator(),
        ema=ema,
        keeper=make_keeper(tmp_path),
    )
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    monkeypatch.setattr(type(accelerator), "optimizer_step_was_skipped", property(lambda self: True))
    engine.train_epoch(fold, 1)
    assert scheduler.last_epoch == 0
    assert all(torch.equal(before[k], v) for k, v in ema.state_dict().items())
    monkeypatch.undo()
    engine.train_epoch(fold, 2)
    assert scheduler.last_epoch == 2
    assert not torch.equal(before["fc.weight"], ema.state_dict()["fc.weight"])


@pytest.mark.parametrize("lr", [float("inf"), float("nan"), 1e38, 0.0])
def test_learning_rates_that_cannot_train_are_refused_up_front(lr):
    with pytest.raises(BratsError, match="--lr"):
        make_config(data="cache", lr=lr)


def test_with_ema_patience_counts_only_the_evaluated_checkpoint(tmp_path):
    """Raw weights improving every epoch must not keep a run going whose EMA checkpoint (the one
    evaluated) stopped improving after epoch 2; without EMA the raw checkpoint is the judge."""
    from brats.training.engine import FoldState

    cfg = make_config(data="x", min_epochs=3, patience=2, max_epochs=20, ema_decay=0.9)
    keeper = make_keeper(tmp_path, ema=True)
    assert keeper.policy is keeper.bests["best_ema"]
    state = FoldState()
    for epoch in range(1, 21):
        raw_auc, ema_auc = 0.5 + epoch / 100, min(0.6 + epoch / 100, 0.62)  # EMA flat after epoch 2
        improved = keeper.consider(epoch, [candidate(raw_auc), candidate(ema_auc, ema=True)])
        state.record(epoch, {"epoch": epoch}, improved, cfg, keeper.policy.is_ema)
        if state.finished:
            break
    assert state.epoch == 4 and state.stop_reason == "early stop: no new best EMA val AUC for 2 epochs"
    assert keeper.bests["best"].best_epoch == 4 and keeper.bests["best_ema"].best_epoch == 2
    assert make_keeper(tmp_path).policy.is_ema is False
