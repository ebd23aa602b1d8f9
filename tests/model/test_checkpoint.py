from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from model import CheckpointError, MoNE, load_checkpoint, save_checkpoint
from tests.model.conftest import make_net


@pytest.fixture
def saved(tmp_path: Path) -> tuple[MoNE, Path]:
    net = make_net()
    path = save_checkpoint(
        tmp_path / "ck", net, labels=[f"c{i}" for i in range(10)], profile={"capacities": [1.0]}
    )
    return net, path


def test_round_trip_is_bit_exact(saved: tuple[MoNE, Path]) -> None:
    net, path = saved
    ck = load_checkpoint(path)
    assert ck.config == net.cfg
    assert ck.labels == [f"c{i}" for i in range(10)]
    assert ck.profile == {"capacities": [1.0]}
    for (name, a), (_, b) in zip(net.state_dict().items(), ck.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(net(x, 0.4).logits, ck.model(x, 0.4).logits)
    assert not ck.model.training


def test_weights_file_path_also_loads(saved: tuple[MoNE, Path]) -> None:
    _, path = saved
    assert load_checkpoint(path / "model.safetensors").config.variant == "Mi/4"


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_checkpoint(tmp_path)


def test_truncated_weights(saved: tuple[MoNE, Path]) -> None:
    _, path = saved
    w = path / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="sha256 .* does not match"):
        load_checkpoint(path)
    doc = json.loads((path / "config.json").read_text())
    doc["sha256"] = ""  # without the digest the parser itself must refuse it
    (path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(path)


def test_pinned_digest_mismatch(saved: tuple[MoNE, Path]) -> None:
    _, path = saved
    with pytest.raises(CheckpointError, match="pinned digest"):
        load_checkpoint(path, expected_sha256="0" * 64)


def test_pickle_is_never_loaded(saved: tuple[MoNE, Path], tmp_path: Path) -> None:
    _, path = saved
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (marker.touch, ())  # type: ignore[return-value]

    (path / "model.safetensors").write_bytes(pickle.dumps(Evil()))
    doc = json.loads((path / "config.json").read_text())
    doc["sha256"] = ""
    (path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(path)
    assert not marker.exists()


def test_corrupt_config(saved: tuple[MoNE, Path]) -> None:
    _, path = saved
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(path)
    (path / "config.json").write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load_checkpoint(path)


def test_config_that_does_not_match_weights(saved: tuple[MoNE, Path]) -> None:
    _, path = saved
    doc = json.loads((path / "config.json").read_text())
    doc["config"]["dim"] = 64
    doc["config"]["heads"] = 4
    (path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(path)
    doc["config"]["depth"] = 2
    doc["config"]["dim"] = 128
    (path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="unexpected"):
        load_checkpoint(path)
    doc["config"]["heads"] = 5
    (path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="bad config: dim 128 is not divisible by heads 5"):
        load_checkpoint(path)
