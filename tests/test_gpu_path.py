"""The branches that run only on CUDA, checked where the CPU can show them: the generator the
augmentation draws from, copies that do not wait for the device, the memory format reaching the
model, the resume state with fewer GPUs visible, Adam's moments after a layout change, fp16
overflow steps, deterministic algorithms, and fp32 scores from a model prepared for bf16."""

from __future__ import annotations

import copy
import types

import numpy as np
import pytest
import torch

from brats.models.resnet import ResNet3D
from brats.training.augment import augment_batch


def test_augmentation_refuses_a_generator_that_is_not_on_the_cpu():
    x = torch.randn(2, 4, 8, 8, 8)
    cuda_like = types.SimpleNamespace(device=torch.device("cuda"))  # what bench/train.py passed
    with pytest.raises(ValueError, match="CPU generator.*not a cuda one"):
        augment_batch(x, cuda_like)
    a = augment_batch(x, torch.Generator().manual_seed(3))
    b = augment_batch(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_host_to_device_copies_go_through_one_non_blocking_helper(monkeypatch, cache20):
    """Augmentation's parameters and a resident batch's index reach the device by `to_device`
    (pinned, non-blocking on a GPU), one copy each: no blocking copy per micro-batch."""
    import brats.training.augment as augment
    import brats.training.datasets as datasets
    from brats.data.cache_reader import open_cache
    from brats.training.config import make_config
    from brats.training.losses import LDAMLoss, apply_drw

    copies = []

    def spy(t, device):
        copies.append(tuple(t.shape))
        return t

    monkeypatch.setattr(augment, "to_device", spy)
    monkeypatch.setattr(datasets, "to_device", spy)
    augment_batch(torch.randn(3, 4, 8, 8, 8), torch.Generator())
    assert copies == [(3, 12 + 2 * 4)]  # theta (3 x 4) and intensity scale and shift per channel
    ds = datasets.ResidentVolumes(open_cache(cache20), [0, 1, 2], ("t1", "flair"), torch.device("cpu"))
    x, y = ds.collate([2, 0])
    assert copies[1:] == [(2,)] and x.dtype == torch.float32 and y.tolist() == ds.labels[[2, 0]].tolist()
    loss = LDAMLoss([10, 30])
    assert apply_drw(loss, make_config(data="x", drw_start_epoch=1, loss="ldam"), 1, [10, 30])
    assert loss.weight.device == loss.margins.device  # moved once, not at every step


def test_a_host_resident_fold_is_not_pinned_whole():
    """Pinning the store bought nothing (a gather returns new memory) and locked a fold's worth of
    memory in every process: a batch is gathered into pinned memory instead, on a GPU."""
    from brats.training.datasets import ResidentVolumes, resident_loader

    ds = ResidentVolumes.__new__(ResidentVolumes)
    ds.volumes, ds.labels, ds.on_device, ds.pin = (
        torch.zeros(4, 1, 2, 2, 2, dtype=torch.float16),
        torch.zeros(4, dtype=torch.int64),
        False,
        False,
    )
    assert not ds.volumes.is_pinned() and not resident_loader(ds, 2).pin_memory


def test_the_model_sees_channels_last_after_augmentation(monkeypatch, tmp_path, fresh_accelerate):
    from accelerate import Accelerator

    from brats.training import engine
    from brats.training.config import make_config

    accelerator = Accelerator(cpu=True)
    model = ResNet3D(depth=10, in_channels=1)
    seen = []
    model.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last_3d))
    )
    x, y = torch.randn(4, 1, 16, 16, 16), torch.tensor([0, 1, 0, 1])
    x[:, :, :2] = 0.0  # background
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    optimizer = torch.optim.Adam(model.parameters())
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    fold = types.SimpleNamespace(
        cfg=make_config(data="x", augment=True, progress=False, grad_accum=1, channels_last=True),
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer, lambda s: 1.0),
        criterion=torch.nn.CrossEntropyLoss(),
        augment_gen=torch.Generator(),
        ema=None,
        data=types.SimpleNamespace(train_loader=loader),
    )
    monkeypatch.setattr(engine, "memory_format", lambda device, on: torch.channels_last_3d)  # as on a GPU
    engine.train_epoch(fold, 1)
    assert seen == [True]


def test_resume_with_fewer_gpus_visible_restores_this_devices_generator(monkeypatch):
    """A state written with two GPUs visible, resumed on one (make cv GPUS=...): no IndexError."""
    from brats.runs.checkpoint import RngState

    restored = []
    fake = types.SimpleNamespace(
        is_available=lambda: True,
        current_device=lambda: 0,
        get_rng_state=lambda: torch.tensor([7], dtype=torch.uint8),
        set_rng_state=lambda state: restored.append(int(state[0])),
    )
    monkeypatch.setattr(torch, "cuda", fake)
    saved = RngState().state_dict()
    assert [int(s[0]) for s in saved["cuda"]] == [7]  # this device's only
    older = {
        "cpu": torch.get_rng_state(),
        "cuda": [torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)],
    }
    RngState().load_state_dict(older)
    RngState().load_state_dict(saved)
    assert restored == [1, 7]


def test_adam_moments_follow_their_parameters_layout_after_a_resume():
    """Saved from a contiguous model, resumed into channels_last_3d: the fused kernel must see
    moments laid out like their parameters (on the CPU it ignores strides and updates wrong)."""
    from brats.training.speed import match_state_layout

    torch.manual_seed(0)
    a = torch.nn.Conv3d(3, 4, 3)
    b = torch.nn.Conv3d(3, 4, 3).to(memory_format=torch.channels_last_3d)
    b.load_state_dict(a.state_dict())
    grads = [[torch.randn_like(p) for p in a.parameters()] for _ in range(2)]

    def step(model, opt, g):
        for p, grad in zip(model.parameters(), g):
            p.grad = torch.empty_like(p).copy_(grad)  # laid out like the parameter, as autograd gives
        opt.step()

    opt_a = torch.optim.Adam(a.parameters(), lr=0.1, fused=True)
    step(a, opt_a, grads[0])
    b.load_state_dict(a.state_dict())
    opt_b = torch.optim.Adam(b.parameters(), lr=0.1, fused=True)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as read back: the strides it was saved with
    match_state_layout(opt_b)
    assert all(
        s.stride() == p.stride() for p in b.parameters() for s in opt_b.state[p].values() if s.dim() > 0
    )
    step(a, opt_a, grads[1])
    step(b, opt_b, grads[1])
    np.testing.assert_allclose(b.weight.detach().numpy(), a.weight.detach().numpy(), atol=1e-6)


def test_an_fp16_overflow_step_is_seen_though_the_fused_optimizer_ran():
    from brats.training.engine import update_skipped

    class Scaler:
        def __init__(self, scale):
            self.scale = scale

        def get_scale(self):
            return self.scale

    accelerator = types.SimpleNamespace(optimizer_step_was_skipped=False, scaler=Scaler(2.0**15))
    assert update_skipped(accelerator, 2.0**16)  # halved: that step overflowed
    assert not update_skipped(accelerator, 2.0**15)
    assert not update_skipped(types.SimpleNamespace(optimizer_step_was_skipped=False, scaler=None), None)


def test_deterministic_turns_torch_deterministic_algorithms_on_and_off_again():
    from brats.training.speed import configure_backends

    try:
        configure_backends(torch.device("cpu"), deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        configure_backends(torch.device("cpu"), deterministic=False)
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_validation_scores_in_fp32_a_model_prepared_for_bf16(fresh_accelerate):
    """accelerator.prepare wraps the forward in bf16 autocast; validation and the re-score run
    the module's own fp32 forward, so that they agree exactly (here, on the CPU's bf16 autocast)."""
    from accelerate import Accelerator

    from brats.evaluation.scoring import own_forward

    torch.manual_seed(0)
    plain = ResNet3D(depth=10, in_channels=2).eval()
    x = torch.randn(2, 2, 16, 16, 16)
    with torch.no_grad():
        fp32 = plain(x)
        prepared = Accelerator(cpu=True, mixed_precision="bf16").prepare(plain)
        bf16 = prepared(x)
        with own_forward(prepared) as model:
            again = model(x)
        after = prepared(x)
    assert not torch.allclose(bf16, fp32, atol=1e-4)  # the prepared forward runs in bf16
    assert torch.equal(again, fp32)
    assert torch.equal(after, bf16)  # and is put back


def test_predict_on_cuda_without_onnxruntime_gpu_is_one_line_saying_what_to_install(
    exported, tmp_path, capsys
):
    from clitools import one_line_error, run_cli

    from brats.deploy.inference import execution_providers

    err = one_line_error(run_cli(capsys, "predict.py", exported[1], tmp_path, "--device", "cuda"))
    assert (
        "--device cuda: this onnxruntime has no CUDA provider" in err and "pip install onnxruntime-gpu" in err
    )
    assert (
        execution_providers("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"])[0]
        == "CUDAExecutionProvider"
    )
