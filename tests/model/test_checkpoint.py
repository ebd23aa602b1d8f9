from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch

from mone.model import CheckpointError, MoNE, load_checkpoint, save_checkpoint
from mone.model.checkpoint import checkpoint_digest
from tests.support.models import make_net


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


def _edit(path: Path, **changes: object) -> None:
    """Change keys of config.json (None deletes the key) without updating its digests."""
    doc = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    (path / "config.json").write_text(json.dumps(doc))


def test_truncated_weights(saved: tuple[MoNE, Path]) -> None:
    _, path = saved
    w = path / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="the weights do not match"):
        load_checkpoint(path)
    # Even unverified (development), the parser itself refuses a truncated file.
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(path, allow_unverified=True)


@pytest.mark.parametrize("key", ["sha256", "weights_sha256"])
@pytest.mark.parametrize("value", [None, "", 0, []], ids=["deleted", "blank", "zero", "list"])
def test_a_missing_or_blank_digest_is_refused(saved: tuple[MoNE, Path], key: str, value: object) -> None:
    """Deleting or blanking a digest does not turn verification off, with the weights intact or altered."""
    _, path = saved
    _edit(path, **{key: value})
    with pytest.raises(CheckpointError, match=f"{key} is missing or blank.*refusing to load"):
        load_checkpoint(path)
    w = path / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="missing or blank"):
        load_checkpoint(path)


@pytest.mark.parametrize("key", ["labels", "profile", "profile-removed", "meta", "config"])
def test_any_change_to_config_json_is_refused(saved: tuple[MoNE, Path], key: str) -> None:
    """Weights intact, but what the checkpoint says about them changed: each is refused; the development
    opt-out loads what the file now says."""
    _, path = saved
    doc = json.loads((path / "config.json").read_text())
    changed: dict[str, object] = {
        "labels": [f"x{i}" for i in range(10)],
        "profile": {"capacities": [0.5]},
        "profile-removed": None,
        "meta": {"note": "swapped"},
        "config": {**doc["config"], "mean": [0.25], "std": [0.75]},  # still fits the weights
    }
    field = key.split("-")[0]
    doc[field] = changed[key]
    (path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(
        CheckpointError, match="does not match the recorded .*config, labels, profile or meta"
    ):
        load_checkpoint(path)
    ck = load_checkpoint(path, allow_unverified=True)
    loaded = {
        "labels": ck.labels,
        "profile": ck.profile,
        "meta": ck.meta,
        "config": json.loads(ck.config.to_json()),
    }
    assert loaded[field] == changed[key]


def test_swapped_weights_with_the_old_digest_are_refused(saved: tuple[MoNE, Path], tmp_path: Path) -> None:
    """Weights of another model of the same shape, under the original config.json."""
    _, path = saved
    other = save_checkpoint(tmp_path / "other", make_net(seed=1))
    (path / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="the weights do not match"):
        load_checkpoint(path)
    # Copying the other checkpoint's weight digest in too breaks the checkpoint digest.
    _edit(path, weights_sha256=json.loads((other / "config.json").read_text())["weights_sha256"])
    with pytest.raises(CheckpointError, match="config, labels, profile or meta were changed"):
        load_checkpoint(path)


def test_the_old_format_is_refused_with_a_way_out(saved: tuple[MoNE, Path], tmp_path: Path) -> None:
    _, path = saved
    doc = json.loads((path / "config.json").read_text())
    old = {k: v for k, v in doc.items() if k not in ("sha256", "weights_sha256")}
    old.update(format="mone-checkpoint/1", sha256=doc["weights_sha256"])
    (path / "config.json").write_text(json.dumps(old))
    with pytest.raises(CheckpointError, match="mone-checkpoint/1.*allow_unverified=True and save it again"):
        load_checkpoint(path)
    ck = load_checkpoint(path, allow_unverified=True)
    resaved = save_checkpoint(tmp_path / "resaved", ck.model, labels=ck.labels, profile=ck.profile)
    assert load_checkpoint(resaved).labels == ck.labels


@pytest.mark.parametrize(
    ("profile", "says"),
    [
        ([1.0], "must be an object or null"),
        ({"gflops": [0.1]}, "capacities must be a non-empty list"),
        ({"capacities": []}, "capacities must be a non-empty list"),
        ({"capacities": ["0.5"]}, "capacities must be a non-empty list of numbers"),
        ({"capacities": [0.0625, 1.0]}, r"must lie in \[0.125, 1\] for 4 experts"),
        ({"capacities": [1.0, 0.5]}, "strictly ascending"),
        ({"capacities": [0.5, 1.0], "accuracy": [80.0]}, "accuracy must be a list of 2 values"),
        ({"capacities": [0.5, 1.0], "accuracy": [80.0, 120.0]}, r"percentages in \[0, 100\]"),
        ({"capacities": [0.5, 1.0], "gflops": [0.1, -1.0]}, "positive numbers"),
        ({"capacities": [0.5, 1.0], "test_images": -3}, "non-negative integer"),
        ({"capacities": [0.5, 1.0], "latency": [1, 2]}, r"unknown key\(s\) \['latency'\]"),
    ],
)
def test_a_malformed_profile_is_refused(saved: tuple[MoNE, Path], profile: object, says: str) -> None:
    net, path = saved
    with pytest.raises(ValueError, match=says):
        save_checkpoint(path, net, profile=profile)  # type: ignore[arg-type]
    # Written by hand with valid digests, it is refused at load, naming the problem.
    doc = json.loads((path / "config.json").read_text())
    doc["profile"] = profile
    doc["sha256"] = checkpoint_digest(doc)
    (path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="bad profile: .*" + says):
        load_checkpoint(path)


def test_a_well_formed_profile_loads(saved: tuple[MoNE, Path]) -> None:
    net, path = saved
    profile = {
        "capacities": [0.125, 0.5, 1.0],
        "gflops": [0.02, 0.06, 0.12],
        "accuracy": [70.0, None, 85.5],
        "test_images": 10,
    }
    save_checkpoint(path, net, profile=profile)
    assert load_checkpoint(path).profile == profile


def test_pinned_digest_mismatch(saved: tuple[MoNE, Path]) -> None:
    _, path = saved
    with pytest.raises(CheckpointError, match="pinned digest"):
        load_checkpoint(path, expected_sha256="0" * 64)
    # The opt-out does not lift a pin.
    with pytest.raises(CheckpointError, match="pinned digest"):
        load_checkpoint(path, expected_sha256="0" * 64, allow_unverified=True)
    # The pin is the checkpoint digest, which the loaded checkpoint reports.
    digest = load_checkpoint(path).sha256
    assert digest == json.loads((path / "config.json").read_text())["sha256"]
    assert load_checkpoint(path, expected_sha256=digest).sha256 == digest


def test_pickle_is_never_loaded(saved: tuple[MoNE, Path], tmp_path: Path) -> None:
    _, path = saved
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (marker.touch, ())  # type: ignore[return-value]

    (path / "model.safetensors").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="the weights do not match"):
        load_checkpoint(path)
    # With digests re-computed for the pickle, the safetensors parser refuses it, and never unpickles.
    doc = json.loads((path / "config.json").read_text())
    doc["weights_sha256"] = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    doc["sha256"] = checkpoint_digest(doc)
    (path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
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


def _reseal(path: Path, doc: dict[str, object]) -> None:
    """Write config.json with its checkpoint digest recomputed: a consistent, but wrong, checkpoint."""
    doc["sha256"] = checkpoint_digest(doc)
    (path / "config.json").write_text(json.dumps(doc))


def test_config_that_does_not_match_weights(saved: tuple[MoNE, Path]) -> None:
    _, path = saved
    doc = json.loads((path / "config.json").read_text())
    doc["config"]["dim"] = 64
    doc["config"]["heads"] = 4
    _reseal(path, doc)
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(path)
    doc["config"]["depth"] = 2
    doc["config"]["dim"] = 128
    _reseal(path, doc)
    with pytest.raises(CheckpointError, match="unexpected"):
        load_checkpoint(path)
    doc["config"]["heads"] = 5
    _reseal(path, doc)
    with pytest.raises(CheckpointError, match="bad config: dim 128 is not divisible by heads 5"):
        load_checkpoint(path)
