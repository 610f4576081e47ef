"""The preprocessing contract: written and read by PreprocessConfig only, without torch."""

import subprocess
import sys
from pathlib import Path

import pytest

from brats.data.preprocess import ORIENTATION, PREPROCESS_VERSION, PreprocessConfig
from brats.errors import BratsError

ROOT = Path(__file__).resolve().parents[1]


def test_contract_round_trip():
    cfg = PreprocessConfig(size=48, modalities=("flair", "t1ce"))
    contract = cfg.to_contract()
    assert contract == {
        "size": 48,
        "modalities": ["flair", "t1ce"],
        "orientation": ORIENTATION,
        "normalization": "zscore-brain",
        "version": PREPROCESS_VERSION,
    }
    assert PreprocessConfig.from_contract(contract, "m.onnx") == cfg


def test_contract_of_models_exported_before_still_reads():
    """Models exported so far store the version as `preprocess_version`, plus an `input` note."""
    old = {
        "modalities": ["t1", "t1ce", "t2", "flair"],
        "size": 24,
        "orientation": "LPS",
        "normalization": "zscore-brain",
        "preprocess_version": 1,
        "input": "float32 (B, C, S, S, S), channels in `modalities` order",
    }
    assert PreprocessConfig.from_contract(old, "old.onnx") == PreprocessConfig(size=24)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"version": 99}, f"preprocessing version 99 \\(this code implements {PREPROCESS_VERSION}\\)"),
        ({"orientation": "RAS"}, "orientation RAS"),
        ({"normalization": "minmax"}, "normalisation minmax"),
        ({"modalities": ["t1", "dwi"]}, "modalities \\('t1', 'dwi'\\)"),
        ({"modalities": []}, "modalities \\(\\)"),
        ({"size": 0}, "size 0"),
        ({"size": "big"}, "size 'big'"),
    ],
)
def test_unknown_contract_is_refused_naming_what(change, message):
    contract = {**PreprocessConfig(size=24).to_contract(), **change}
    with pytest.raises(BratsError, match=f"^m.onnx: unknown preprocessing contract \\(.*{message}"):
        PreprocessConfig.from_contract(contract, "m.onnx")


def test_contract_that_is_not_a_mapping_is_refused():
    with pytest.raises(BratsError, match="^m.onnx: unknown preprocessing contract"):
        PreprocessConfig.from_contract(["size", 24], "m.onnx")


def test_differences_name_both_sides_channels_aside():
    a = PreprocessConfig(size=24).to_contract()
    b = PreprocessConfig(size=32, modalities=("flair",)).to_contract()
    assert PreprocessConfig.differences(a, b) == [("size", 24, 32)]
    assert PreprocessConfig.differences(a, dict(a)) == []
    legacy = {**a, "preprocess_version": a["version"]}
    del legacy["version"]
    assert PreprocessConfig.differences(a, legacy) == []


def test_contract_key_defined_once():
    """The metadata key is defined in one module; the exporter and the reader share it."""
    sources = [p.read_text() for p in (ROOT / "brats").rglob("*.py")]
    assert sum(s.count('"brats_contract"') for s in sources) == 1
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.modules['torch'] = None; "
            "from brats.deploy.contract import CONTRACT_KEY; "
            "from brats.data.preprocess import PreprocessConfig; "
            "print(CONTRACT_KEY)",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0 and r.stdout.strip() == "brats_contract", r.stderr
