"""Class activation maps: exact for this network, exportable to ONNX, and Grad-CAM agrees."""

from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import run_cli

from brats.deploy.contract import DYNAMIC_AXES, OUTPUT_NAMES
from brats.errors import BratsError
from brats.evaluation.cam_montage import confident_right_and_wrong
from brats.evaluation.plots import write_cam_montage
from brats.models.explained import (
    HGG,
    LGG,
    ExplainedModel,
    class_activation_map,
    explain,
    grad_cam,
    hgg_evidence_weights,
)
from brats.models.resnet import ResNet3D

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

    from brats.models.explained import FeatureReference

    torch.manual_seed(0)
    references = [FeatureReference.fit(torch.randn(30, 512)) for _ in range(2)]  # with the doubt outputs
    wrapper = ExplainedModel([model(seed=s) for s in (0, 1)], references).eval()
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
    p_hgg, cams = explain(folds, volumes)
    assert [f.training for f in folds] == [False, True]
    write_cam_montage(volumes[:, -1], cams, p_hgg, ["P1 (HGG)", "P2 (LGG)"], tmp_path / "m" / "fold.png")
    with torch.no_grad():
        expected = ExplainedModel(folds).eval()(torch.from_numpy(volumes))[0][:, HGG]
    np.testing.assert_allclose(p_hgg, expected.numpy(), atol=1e-6)
    png = tmp_path / "m" / "fold.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in png.parent.iterdir()] == ["fold.png"]
    with pytest.raises(BratsError, match="one title per patient"):
        write_cam_montage(volumes[:, -1], cams, p_hgg, ["P1"], tmp_path / "x.png")


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

    import brats.evaluation.cam_montage as montage
    from brats.data.cache_reader import open_cache

    drawn = {}
    real = montage.write_cam_montage

    def recording(underlays, cams, p_hgg, titles, path):
        real(underlays, cams, p_hgg, titles, path)
        drawn[Path(path).parent.name] = (underlays, titles, p_hgg)

    monkeypatch.setattr(montage, "write_cam_montage", recording)
    r = run_cli(capsys, "evaluate.py", "--run", cv_copy, "--folds", "0,2", "--cam")
    assert r.code == 0, r.err[-3000:]
    evaluation = cv_copy / "evaluation"
    listed = [line.split()[0] for line in r.out.splitlines() if line.endswith("with their CAM")]
    assert listed == [str(evaluation / f"fold_{k}" / "cam_montage.png") for k in (0, 2)]
    from PIL import Image

    with Image.open(evaluation / "fold_0" / "cam_montage.png") as picture:
        words = dict(picture.text)
    assert words["Title"].startswith("fold 0, most confident ")
    titles = drawn["fold_0"][1]
    assert words["Title"] == " / ".join(titles) and words["Description"].count("axial z=") == len(titles)
    assert all(f"{title}: p(HGG) " in words["Description"] for title in titles)
    assert not (evaluation / "fold_1" / "cam_montage.png").exists()
    with open(evaluation / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    cached = open_cache(cache20)
    assert sorted(drawn) == ["fold_0", "fold_2"]
    for k in (0, 2):
        png = evaluation / f"fold_{k}" / "cam_montage.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        picks = confident_right_and_wrong([row for row in rows if row["fold"] == str(k)])
        underlays, titles, p_hgg = drawn[f"fold_{k}"]
        assert len(titles) == len(picks) >= 1
        for (kind, row), title, underlay, p in zip(picks, titles, underlays, p_hgg):
            assert f"most confident {kind}: {row['patient_id']}" in title
            stored = cached.volumes[cached.patient_ids.index(row["patient_id"])]
            np.testing.assert_array_equal(underlay, np.asarray(stored[3], dtype=np.float32))  # the FLAIR
            assert p == pytest.approx(float(row["p_hgg"]), abs=1e-4)  # the fold model evaluation scored


# --- where a trained model looks, on phantoms whose lesion is known

LOOK_SHAPE = (48, 48, 36)  # x, y, z voxels of each phantom
LOOK_SIZE, LOOK_CROP = 64, 24  # CAM cube side (8^3 cells in the dilated layout) / training crop side


def lesion_in_cube(lesion: np.ndarray, reference, grid) -> np.ndarray:
    """The phantom's lesion mask (z, y, x on `reference`'s grid) on the preprocessing cube."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(lesion)
    image.CopyInformation(reference)
    size, identity = (grid.size,) * 3, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    cube = sitk.Resample(
        image,
        size,
        sitk.Transform(),
        sitk.sitkNearestNeighbor,
        grid.origin,
        (grid.spacing_mm,) * 3,
        identity,
        0,
    )
    return sitk.GetArrayFromImage(cube)


def train_on_lesion_crops(
    volumes: list[np.ndarray], lesions: list[np.ndarray], labels: np.ndarray, steps: int, seed: int, crop: int
) -> ResNet3D:
    """A depth-10 dilated ResNet trained on `crop`^3 crops of the (C, S, S, S) `volumes` that
    hold part of the lesion (`lesions`, on the same cubes), at random places in the crop and
    flipped at random, two patients of each grade per step. Eval mode on return.

    Why crops: every cell of the last feature map of a model trained on whole 32^3 cubes sees the
    whole cube, so its CAM follows position, not the lesion (measured: peak in the lesion no
    more often than chance); whole 64^3 cubes are too slow to train in a test. The grade is
    the patient's; the crop only decides what the model sees."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    m = ResNet3D(depth=10, layout="medicalnet", dropout=0.0)
    optimizer = torch.optim.Adam(m.parameters(), lr=1e-3)
    y = torch.as_tensor(labels)
    by_grade = [np.flatnonzero(labels == grade) for grade in (0, 1)]
    m.train()
    for _ in range(steps):
        chosen = np.concatenate([rng.choice(patients, 2, replace=False) for patients in by_grade])
        crops = []
        for i in chosen:
            inside = np.argwhere(lesions[i] > 0)
            centre = inside[rng.integers(len(inside))]
            lo = np.clip(centre - rng.integers(4, crop - 4, 3), 0, LOOK_SIZE - crop)
            patch = volumes[i][:, lo[0] : lo[0] + crop, lo[1] : lo[1] + crop, lo[2] : lo[2] + crop]
            for axis in (1, 2, 3):
                if rng.random() < 0.5:
                    patch = np.flip(patch, axis)
            crops.append(np.ascontiguousarray(patch))
        loss = torch.nn.functional.cross_entropy(m(torch.from_numpy(np.stack(crops))), y[chosen])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return m.eval()


def cam_peaks_in_lesion(
    seed: int, n_train: int, n_val: int, steps: int, crop: int = LOOK_CROP
) -> tuple[list[float], list[float]]:
    """Train on phantoms of cohort `seed`, then for each HGG validation patient: how far (mm)
    from its lesion (tumour or oedema; 0 inside) is the peak of HGG evidence, its CAM mapped
    back onto its own FLAIR grid, within the brain? And how likely a voxel drawn at random in its
    brain is to lie in the lesion: the lesion's share of the brain."""
    import SimpleITK as sitk
    from scipy import ndimage

    from brats.data.cohort import MODALITIES, Case
    from brats.data.phantom import class_counts, make_patient_with_lesion
    from brats.data.preprocess import PreprocessConfig, preprocess_images
    from brats.deploy.cam import cam_on_reference, peak_index

    n_hgg, n_lgg = class_counts(n_train + n_val)
    labels = np.array([1] * n_hgg + [0] * n_lgg)
    np.random.default_rng(seed).shuffle(labels)
    volumes, cube_lesions, places = [], [], []
    for i, label in enumerate(labels):
        scans, lesion = make_patient_with_lesion(seed, i, bool(label), LOOK_SHAPE)
        images = [sitk.GetImageFromArray(scan) for scan in scans]  # 1 mm, LPS, as make_cohort writes
        case = Case(f"P{i}", int(label), tuple(Path(f"P{i}_{m}.nii.gz") for m in MODALITIES))
        volume, grid = preprocess_images(case, images, PreprocessConfig(size=LOOK_SIZE))
        volumes.append(volume)
        cube_lesions.append(lesion_in_cube(lesion, images[0], grid))
        places.append((grid, images[MODALITIES.index("flair")], lesion > 0))
    model = train_on_lesion_crops(volumes[n_val:], cube_lesions[n_val:], labels[n_val:], steps, seed, crop)
    hgg = [i for i in range(n_val) if labels[i] == 1]
    _, cams = explain([model], np.stack([volumes[i] for i in hgg]))
    distances, chance = [], []
    for i, cam in zip(hgg, cams):
        grid, flair, lesion = places[i]
        back = sitk.GetArrayFromImage(cam_on_reference(cam, grid, flair))
        brain = sitk.GetArrayFromImage(flair) != 0
        to_lesion = ndimage.distance_transform_edt(~lesion)  # mm: the phantoms are 1 mm
        distances.append(float(to_lesion[peak_index(back, toward_hgg=True, within=brain)]))
        chance.append(float(np.mean(lesion[brain])))  # a brain voxel drawn at random hits the lesion
    return distances, chance


def test_a_trained_models_cam_peaks_inside_the_tumour_for_most_patients():
    """Phantoms whose lesion (tumour and oedema) is known: a small model trained to grade them,
    then, for each HGG validation patient, the peak of its HGG evidence, the map mapped back
    onto the patient's own grid as predict maps it, inside the brain, must lie in the lesion for
    most of them, where a voxel drawn at random in the brain would for 6-10% of them.

    Measured with these settings (72 steps, 32 training and 16 validation phantoms, 24^3 crops)
    on cohort seeds 0-7: the peak was inside the lesion for 14/15, 14/14, 11/11, 8/12, 6/9, 7/13,
    7/8 and 6/10 HGG patients; more than half for every seed. Fewer steps are not reliable (seed
    3 at 50 steps: 1/12). Everything is seeded, so a run repeats; seed 0 is the one tested."""
    distances, chance = cam_peaks_in_lesion(seed=0, n_train=32, n_val=16, steps=72)
    hits = [d == 0 for d in distances]
    assert len(hits) >= 8, len(hits)  # enough HGG patients to say "most"
    assert np.mean(chance) < 0.15
    assert sum(hits) > len(hits) / 2, (distances, np.mean(chance))
