"""Class activation maps: exact for this network, exportable to ONNX, and Grad-CAM agrees."""

from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import run_cli

from brats.errors import BratsError
from brats.explain import (
    DYNAMIC_AXES,
    HGG,
    LGG,
    OUTPUT_NAMES,
    ExplainedModel,
    class_activation_map,
    confident_right_and_wrong,
    explain,
    grad_cam,
    hgg_evidence_weights,
    write_cam_montage,
)
from brats.model import ResNet3D

# (layout, cube side): the strided layout pools 24^3 down to one voxel, the dilated one to 3^3,
# and 64^3 strided to 2^3, so the maps are not all constant.
SHAPES = [("strided", 24), ("medicalnet", 24), ("strided", 64)]


def model(layout: str = "medicalnet", seed: int = 0) -> ResNet3D:
    torch.manual_seed(seed)
    m = ResNet3D(depth=10, layout=layout)
    with torch.no_grad():  # a trained-looking head: a bias and different rows
        m.fc.bias.copy_(torch.tensor([0.3, -0.2]))
    return m.eval()


def batch(size: int, n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 4, size, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layout,size", SHAPES)
def test_cam_splits_the_logit_difference_exactly(layout, size):
    m, x = model(layout), batch(size)
    with torch.no_grad():
        cam = class_activation_map(m, x)
        logits = m(x)
    assert cam.shape == (2, size, size, size) and cam.dtype == torch.float32
    _, bias = hgg_evidence_weights(m)
    expected = logits[:, HGG] - logits[:, LGG] - bias
    torch.testing.assert_close(cam.mean(dim=(1, 3, 2)), expected, rtol=1e-5, atol=1e-5)
    if layout == "medicalnet":
        assert cam[0].std() > 1e-3 * cam[0].abs().max()  # a map, not a constant


def test_grad_cam_at_the_last_layer_is_the_cam_up_to_a_positive_scale():
    m, x = model(), batch(24)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        cam = class_activation_map(m, x)
    g = grad_cam(m, x, "layer4")
    ratio = g / cam
    assert ratio.min() > 0
    torch.testing.assert_close(ratio, torch.full_like(ratio, 1 / 27), rtol=1e-4, atol=0)  # 3^3 voxels
    torch.testing.assert_close(grad_cam(m, x, m.layer4), g)
    positive = grad_cam(m, x, "layer4", relu=True)
    torch.testing.assert_close(positive, torch.nn.functional.relu(g), rtol=1e-4, atol=1e-7)
    assert not m.training and all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert all(p.grad is None for p in m.parameters())


def test_grad_cam_at_an_earlier_layer():
    m, x = model(), batch(24)
    g = grad_cam(m, x, "layer2")
    assert g.shape == (2, 24, 24, 24) and torch.isfinite(g).all()
    with torch.no_grad():
        cam = class_activation_map(m, x)
    assert not torch.allclose(g / g.abs().max(), cam / cam.abs().max(), atol=1e-2)
    with pytest.raises(BratsError, match="changed in place later in the network"):
        grad_cam(m, x, "bn1")  # the stem's ReLU works in place on its output


def test_explained_model_is_the_ensemble_of_its_folds():
    folds = [model(seed=s) for s in (0, 1)]
    x = batch(24, n=3)
    with torch.no_grad():
        probabilities, logits, cam = ExplainedModel(folds).eval()(x)
        each = [f(x) for f in folds]
        cams = [class_activation_map(f, x) for f in folds]
    torch.testing.assert_close(probabilities, torch.stack([e.softmax(-1) for e in each]).mean(0))
    torch.testing.assert_close(logits, torch.stack(each).mean(0))
    torch.testing.assert_close(cam, torch.stack(cams).mean(0))
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(3))


def test_onnx_export_reproduces_the_cam(tmp_path):
    import onnxruntime as ort

    wrapper = ExplainedModel([model(seed=s) for s in (0, 1)]).eval()
    path = tmp_path / "explained.onnx"
    torch.onnx.export(
        wrapper,
        (batch(24),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=list(OUTPUT_NAMES),
        dynamic_axes=DYNAMIC_AXES,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == list(OUTPUT_NAMES)
    for n in (1, 3):  # traced with 2: the batch axis is dynamic
        x = batch(24, n=n, seed=10 + n)
        with torch.no_grad():
            expected = [t.numpy() for t in wrapper(x)]
        got = session.run(None, {"input": x.numpy()})
        for name, e, g in zip(OUTPUT_NAMES, expected, got):
            assert g.shape == e.shape, name
            np.testing.assert_allclose(g, e, atol=1e-4 * max(1.0, float(np.abs(e).max())), err_msg=name)


def test_montage_png_and_the_models_keep_their_mode(tmp_path):
    folds = [model(seed=s) for s in (0, 1)]
    folds[1].train()
    volumes = batch(24, n=2).numpy()
    volumes[:, :, :4] = 0.0  # background, as preprocessing leaves it
    p_hgg = write_cam_montage(folds, volumes, ["P1 (HGG)", "P2 (LGG)"], tmp_path / "m" / "fold.png")
    assert [f.training for f in folds] == [False, True]
    with torch.no_grad():
        expected = ExplainedModel(folds).eval()(torch.from_numpy(volumes))[0][:, HGG]
    np.testing.assert_allclose(p_hgg, expected.numpy(), atol=1e-6)
    png = tmp_path / "m" / "fold.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in png.parent.iterdir()] == ["fold.png"]
    with pytest.raises(BratsError, match="one title per patient"):
        write_cam_montage(folds, volumes, ["P1"], tmp_path / "x.png")


def test_explain_batches_like_one_pass():
    folds = [model(seed=s) for s in (0, 1)]
    volumes = batch(24, n=3).numpy()
    p_hgg, cams = explain(folds, volumes, batch=2)
    with torch.no_grad():
        probabilities, _, cam = ExplainedModel(folds).eval()(torch.from_numpy(volumes))
    np.testing.assert_allclose(p_hgg, probabilities[:, HGG].numpy(), atol=1e-6)
    np.testing.assert_allclose(cams, cam.numpy(), atol=1e-5)


def test_confident_right_and_wrong_are_farthest_from_one_half_on_the_predicted_side():
    rows = [
        {"patient_id": "a", "label": "1", "p_hgg": "0.9"},  # right, 0.40 from 1/2
        {"patient_id": "b", "label": "1", "p_hgg": "0.2"},  # wrong, 0.30
        {"patient_id": "c", "label": "0", "p_hgg": "0.05"},  # right, 0.45
        {"patient_id": "d", "label": "0", "p_hgg": "0.7"},  # wrong, 0.20
        {"patient_id": "e", "label": "0", "p_hgg": "0.5"},  # p = 1/2 grades HGG: wrong, 0
    ]
    picks = confident_right_and_wrong(rows)
    assert [(kind, r["patient_id"]) for kind, r in picks] == [("right", "c"), ("wrong", "b")]
    assert confident_right_and_wrong(rows[:1]) == [("right", rows[0])]
    assert confident_right_and_wrong([rows[4]]) == [("wrong", rows[4])]


def test_evaluate_cam_draws_each_folds_most_confident_right_and_wrong(cv_copy, cache20, capsys, monkeypatch):
    import csv

    import brats.explain as explain
    from brats.cache import open_cache

    drawn = {}
    real = explain.write_cam_montage

    def recording(models, volumes, titles, path, underlay_channel=-1):
        p_hgg = real(models, volumes, titles, path, underlay_channel)
        drawn[Path(path).parent.name] = (volumes, titles, p_hgg, underlay_channel)
        return p_hgg

    monkeypatch.setattr(explain, "write_cam_montage", recording)
    r = run_cli(capsys, "evaluate.py", "--run", cv_copy, "--folds", "0,2", "--cam")
    assert r.code == 0, r.err[-3000:]
    assert "wrote 2 CAM montage(s)" in r.out
    evaluation = cv_copy / "evaluation"
    assert not (evaluation / "fold_1" / "cam_montage.png").exists()
    with open(evaluation / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    cached = open_cache(cache20)
    assert sorted(drawn) == ["fold_0", "fold_2"]
    for k in (0, 2):
        png = evaluation / f"fold_{k}" / "cam_montage.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        picks = confident_right_and_wrong([row for row in rows if row["fold"] == str(k)])
        volumes, titles, p_hgg, underlay = drawn[f"fold_{k}"]
        assert underlay == 3  # the FLAIR channel
        assert len(titles) == len(picks) >= 1
        for (kind, row), title, volume, p in zip(picks, titles, volumes, p_hgg):
            assert f"most confident {kind}: {row['patient_id']}" in title
            stored = cached.volumes[cached.patient_ids.index(row["patient_id"])]
            np.testing.assert_array_equal(volume, np.asarray(stored, dtype=np.float32))
            assert p == pytest.approx(float(row["p_hgg"]), abs=1e-4)  # the fold model evaluation scored
