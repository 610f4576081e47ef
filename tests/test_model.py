import pytest
import torch

from brats.errors import BratsError
from brats.models.pretrained import load_pretrained
from brats.models.resnet import Conv3d, ResNet3D, param_groups


def bn(prefix, c):
    return {
        f"{prefix}.weight": (c,),
        f"{prefix}.bias": (c,),
        f"{prefix}.running_mean": (c,),
        f"{prefix}.running_var": (c,),
    }


def medicalnet_shapes(depth: int) -> dict[str, tuple]:
    """Key -> shape of Tencent MedicalNet's resnet_<depth> state dict, written out from the
    published architecture (not from brats.model): 1 input channel, 2-class segmentation head."""
    block, layers = {10: ("basic", [1, 1, 1, 1]), 50: ("bottleneck", [3, 4, 6, 3])}[depth]
    expansion = 4 if block == "bottleneck" else 1
    s = {"conv1.weight": (64, 1, 7, 7, 7), **bn("bn1", 64)}
    inplanes = 64
    for li, (planes, n) in enumerate(zip([64, 128, 256, 512], layers), start=1):
        for b in range(n):
            p = f"layer{li}.{b}"
            if block == "basic":
                s[f"{p}.conv1.weight"] = (planes, inplanes, 3, 3, 3)
                s.update(bn(f"{p}.bn1", planes))
                s[f"{p}.conv2.weight"] = (planes, planes, 3, 3, 3)
                s.update(bn(f"{p}.bn2", planes))
            else:
                s[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1, 1)
                s.update(bn(f"{p}.bn1", planes))
                s[f"{p}.conv2.weight"] = (planes, planes, 3, 3, 3)
                s.update(bn(f"{p}.bn2", planes))
                s[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1, 1)
                s.update(bn(f"{p}.bn3", planes * 4))
            if b == 0 and (li > 1 or inplanes != planes * expansion):  # shortcut B
                s[f"{p}.downsample.0.weight"] = (planes * expansion, inplanes, 1, 1, 1)
                s.update(bn(f"{p}.downsample.1", planes * expansion))
            inplanes = planes * expansion
    # segmentation head that the classifier drops
    s["conv_seg.0.weight"] = (inplanes, 32, 2, 2, 2)
    s["conv_seg.0.bias"] = (32,)
    s.update(bn("conv_seg.1", 32))
    s["conv_seg.3.weight"] = (32, 32, 3, 3, 3)
    s.update(bn("conv_seg.4", 32))
    s["conv_seg.6.weight"] = (2, 32, 1, 1, 1)
    return s


def write_medicalnet(path, depth, edit=None):
    """A file in MedicalNet's exact format: {'state_dict': {'module.<key>': tensor}}."""
    g = torch.Generator().manual_seed(depth)
    state = {f"module.{k}": torch.randn(shape, generator=g) for k, shape in medicalnet_shapes(depth).items()}
    if edit:
        edit(state)
    torch.save({"state_dict": state}, path)
    return state


@pytest.mark.parametrize("depth", [10, 50])
def test_medicalnet_checkpoint_loads_strictly(tmp_path, depth):
    path = tmp_path / f"resnet_{depth}_23dataset.pth"
    state = write_medicalnet(path, depth)
    model = ResNet3D(depth=depth, in_channels=4, layout="medicalnet")
    info = load_pretrained(model, path)
    assert info["dropped"] == sum(k.startswith("module.conv_seg.") for k in state)
    own = model.state_dict()
    assert torch.equal(own["layer1.0.conv1.weight"], state["module.layer1.0.conv1.weight"])
    assert torch.equal(
        own["layer4.0.downsample.1.running_var"], state["module.layer4.0.downsample.1.running_var"]
    )
    # conv1: 1 -> 4 channels, repeated and divided by 4
    w = state["module.conv1.weight"]
    assert own["conv1.weight"].shape == (64, 4, 7, 7, 7)
    torch.testing.assert_close(own["conv1.weight"].sum(dim=1, keepdim=True), w)
    # the strided layout has the same parameters: the weights load there too
    load_pretrained(ResNet3D(depth=depth, in_channels=4, layout="strided"), path)


def test_bare_state_dict_and_single_channel(tmp_path):
    path = tmp_path / "bare.pth"
    state = {k: torch.zeros(s) for k, s in medicalnet_shapes(10).items()}
    torch.save(state, path)
    model = ResNet3D(depth=10, in_channels=1)
    load_pretrained(model, path)
    assert torch.count_nonzero(model.conv1.weight) == 0


def test_wrong_key_and_wrong_depth_fail_clearly(tmp_path):
    path = tmp_path / "bad.pth"
    write_medicalnet(
        path,
        10,
        edit=lambda s: s.update({"module.layer1.0.conv9.weight": s.pop("module.layer1.0.conv2.weight")}),
    )
    with pytest.raises(
        BratsError, match=r"missing 1 key\(s\): layer1.0.conv2.weight; unexpected 1 key\(s\): layer1.0.conv9"
    ):
        load_pretrained(ResNet3D(depth=10), path)
    deeper = tmp_path / "r50.pth"
    write_medicalnet(deeper, 50)
    with pytest.raises(BratsError, match="does not fit ResNet-10 .*check --depth"):
        load_pretrained(ResNet3D(depth=10), deeper)
    with pytest.raises(BratsError, match="file not found"):
        load_pretrained(ResNet3D(depth=10), tmp_path / "nope.pth")


@pytest.mark.parametrize("depth,shortcut_keys", [(10, True), (18, False), (34, False), (50, True)])
def test_depths_forward_and_shortcuts(depth, shortcut_keys):
    model = ResNet3D(depth=depth, in_channels=4).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 4, 32, 32, 32))
    assert out.shape == (2, 2)
    assert any(".downsample." in k for k in model.state_dict()) == shortcut_keys


def test_layouts_differ_only_in_stride():
    strided, dilated = ResNet3D(depth=10, layout="strided"), ResNet3D(depth=10, layout="medicalnet")
    assert strided.state_dict().keys() == dilated.state_dict().keys()
    x = torch.randn(1, 4, 32, 32, 32)
    f_s = strided.eval().layer4(
        strided.layer3(strided.layer2(strided.layer1(strided.maxpool(strided.conv1(x)))))
    )
    f_d = dilated.eval().layer4(
        dilated.layer3(dilated.layer2(dilated.layer1(dilated.maxpool(dilated.conv1(x)))))
    )
    assert f_s.shape[-1] == 1 and f_d.shape[-1] == 4  # /32 vs /8
    assert dilated.layer4[0].conv1.dilation == (4, 4, 4)


def test_param_groups_split_classifier():
    model = ResNet3D(depth=10)
    groups = param_groups(model, 1e-4, 2.0, 1e-4)
    assert [g["lr"] for g in groups] == [1e-4, 2e-4]
    assert {id(p) for p in groups[1]["params"]} == {id(model.fc.weight), id(model.fc.bias)}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def hub_cache(root, depth):
    """A Hugging Face cache holding MedicalNet's weights for `depth`, as hf_hub_download leaves it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--TencentMedicalNet--MedicalNet-Resnet{depth}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    write_medicalnet(snapshot / f"resnet_{depth}_23dataset.pth", depth)
    return snapshot / f"resnet_{depth}_23dataset.pth"


def test_pretrained_medicalnet_comes_from_the_hub_cache(tmp_path):
    from brats.models.pretrained import resolve_pretrained

    cached = hub_cache(tmp_path / "hub", 10)
    path = resolve_pretrained("medicalnet", 10, cache_dir=tmp_path / "hub")
    assert path.resolve() == cached.resolve()
    info = load_pretrained(ResNet3D(depth=10, in_channels=4, layout="medicalnet"), path)
    assert info["loaded"] > 0
    assert resolve_pretrained(str(cached), 10) == cached  # a local path works as before
    with pytest.raises(BratsError, match="--pretrained nope.pth: file not found: .*resnet_10_23dataset.pth"):
        resolve_pretrained("nope.pth", 10)


def test_with_weights_the_default_layout_is_medicalnet():
    from brats.training.config import make_config

    assert make_config(data="x").layout == "strided"
    assert make_config(data="x", pretrained="medicalnet").layout == "medicalnet"
    assert make_config(data="x", pretrained="w.pth").layout == "medicalnet"
    assert make_config(data="x", pretrained="medicalnet", layout="strided").layout == "strided"


# (in channels, input side, kernel, stride, padding, dilation, takes the one-voxel product)
GEOMETRIES = [
    (32, 1, 3, 1, 1, 1, True),  # layer4's second conv at 32^3 input: only the centre tap meets the input
    (16, 2, 3, 2, 1, 1, True),  # layer4's first conv: 8 of the 27 taps
    (16, 2, 1, 2, 0, 1, True),  # its 1x1x1 strided shortcut
    (8, 4, 3, 4, 1, 1, True),  # a window that covers part of the input
    (8, 1, 3, 1, 4, 4, True),  # dilated (the medicalnet layout)
    (8, 3, 3, 2, 1, 1, False),  # two output voxels a side: the ordinary convolution
    (8, 2, 2, 1, 1, 3, False),  # the one output voxel meets only padding
]


@pytest.mark.parametrize("cin, side, k, stride, pad, dil, fast", GEOMETRIES)
def test_conv3d_on_one_output_voxel_equals_the_convolution(cin, side, k, stride, pad, dil, fast):
    torch.manual_seed(0)
    ref = torch.nn.Conv3d(cin, 12, k, stride, pad, dil, bias=True).double()
    conv = Conv3d(cin, 12, k, stride, pad, dil, bias=True).double()
    conv.load_state_dict(ref.state_dict())
    x = torch.randn(3, cin, side, side, side, dtype=torch.double, requires_grad=True)
    assert (conv.window(x.shape[2:]) is not None) == fast
    outs = []
    for m in (ref, conv):
        y = m(x)
        weighted = (y * torch.arange(y.numel()).view_as(y)).sum()
        outs.append((y, *torch.autograd.grad(weighted, [x, m.weight, m.bias])))
    for a, b in zip(*outs):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_conv3d_on_an_unbatched_input_is_the_convolution():
    torch.manual_seed(0)
    ref = torch.nn.Conv3d(4, 8, 1)
    conv = Conv3d(4, 8, 1)
    conv.load_state_dict(ref.state_dict())
    x = torch.randn(4, 4, 1, 1)  # (C, D, H, W): one voxel in H and W, four in D
    torch.testing.assert_close(conv(x), ref(x))


def test_resnet_layer4_at_32_cubed_takes_the_one_voxel_product():
    model = ResNet3D(depth=10, in_channels=4).eval()
    seen = {}

    def record(name):
        return lambda conv, args: seen.__setitem__(name, conv.window(args[0].shape[2:]))

    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, Conv3d)]
    hooks = [m.register_forward_pre_hook(record(n)) for n, m in convs]
    model(torch.zeros(1, 4, 32, 32, 32))
    for h in hooks:
        h.remove()
    fast = {name for name, window in seen.items() if window is not None}
    assert fast == {"layer4.0.conv1", "layer4.0.conv2", "layer4.0.downsample.0"}


def test_pretrained_medicalnet_offline_is_one_line_at_once(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE is obeyed without touching the network; an unreachable hub is found by one
    short probe, not by the download's retries; the cache still serves when offline."""
    import huggingface_hub

    from brats.models import pretrained

    def no_download(*args, local_files_only=False, **kwargs):
        if not local_files_only:
            raise AssertionError("the download was tried")
        raise FileNotFoundError("not cached")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BratsError) as e:
        pretrained.resolve_pretrained("medicalnet", 10, cache_dir=tmp_path / "empty")
    assert str(e.value) == (
        "--pretrained medicalnet: resnet_10_23dataset.pth is not in the Hugging Face cache and cannot be "
        "fetched (HF_HUB_OFFLINE is set): download it on a connected machine "
        "(huggingface.co/TencentMedicalNet/MedicalNet-Resnet10, or MedicalNet's release) and pass "
        "--pretrained PATH/resnet_10_23dataset.pth"
    )
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    with pytest.raises(
        BratsError, match=r"cannot be fetched \(127\.0\.0\.1 unreachable: Connection refused\)"
    ):
        pretrained.resolve_pretrained("medicalnet", 10, cache_dir=tmp_path / "empty")
    monkeypatch.undo()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cached = hub_cache(tmp_path / "hub", 10)
    assert (
        pretrained.resolve_pretrained("medicalnet", 10, cache_dir=tmp_path / "hub").resolve()
        == cached.resolve()
    )
    assert pretrained.pretrained_problem(None, 10) is None
