"""Checkpoints: safetensors weights + a JSON file with the config, class labels and evaluation profile.

Layout of a checkpoint directory:
    model.safetensors   the state dict (never a pickle)
    config.json         {"format": "mone-checkpoint/1", "config": {...}, "labels": [...],
                         "profile": {...} | null, "sha256": "<hex digest of model.safetensors>",
                         "meta": {...}}

Loading verifies the digest before the weights are parsed, rebuilds the model from the stored config and
loads the weights strictly; every failure raises CheckpointError naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.config import MoNEConfig
from model.vit import MoNE

FORMAT = "mone-checkpoint/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
_MAX_JSON_BYTES = 16 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, truncated, tampered with or does not match its config."""


@dataclass
class Checkpoint:
    model: MoNE
    config: MoNEConfig
    labels: list[str]
    profile: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    sha256: str = ""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(
    path: str | os.PathLike[str],
    model: MoNE,
    labels: list[str] | None = None,
    profile: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write `model` (and its labels, profile and free-form meta) to the directory `path`."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    labels = list(labels) if labels is not None else [str(i) for i in range(cfg.num_classes)]
    if len(labels) != cfg.num_classes:
        raise ValueError(f"{len(labels)} labels for {cfg.num_classes} classes")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = out / (WEIGHTS + ".tmp")
    save_file(state, str(tmp), metadata={"format": FORMAT})
    tmp.replace(out / WEIGHTS)
    doc = {
        "format": FORMAT,
        "config": cfg.to_dict(),
        "labels": labels,
        "profile": profile,
        "sha256": _sha256(out / WEIGHTS),
        "meta": meta or {},
    }
    tmp_json = out / (CONFIG + ".tmp")
    tmp_json.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    tmp_json.replace(out / CONFIG)
    return out


def read_checkpoint_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed config.json of a checkpoint directory (no weights are read)."""
    root = Path(path)
    if root.is_file():
        root = root.parent
    cfg_path = root / CONFIG
    if not cfg_path.is_file():
        raise CheckpointError(f"{root}: not a checkpoint directory ({CONFIG} is missing)")
    if cfg_path.stat().st_size > _MAX_JSON_BYTES:
        raise CheckpointError(f"{cfg_path}: larger than {_MAX_JSON_BYTES} bytes")
    try:
        doc = json.loads(cfg_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise CheckpointError(f"{cfg_path}: unknown checkpoint format {found!r}, expected {FORMAT!r}")
    return doc


def load_checkpoint(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    expected_sha256: str | None = None,
) -> Checkpoint:
    """Load a checkpoint directory (or its model.safetensors) into an eval-mode MoNE on `device`.

    Args:
        path: the directory, or the weights file inside it.
        device: where to put the model.
        expected_sha256: pin the weights to this digest (on top of the digest in config.json).
    """
    root = Path(path)
    if root.is_file():
        root = root.parent
    doc = read_checkpoint_info(root)
    weights = root / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{root}: {WEIGHTS} is missing")
    digest = _sha256(weights)
    for want, source in ((doc.get("sha256"), CONFIG), (expected_sha256, "the pinned digest")):
        if want and digest != want:
            raise CheckpointError(
                f"{weights}: sha256 {digest} does not match {source} ({want}); refusing to load"
            )
    try:
        cfg = MoNEConfig.from_dict(doc.get("config"))  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{root / CONFIG}: bad config: {exc}") from exc
    labels = doc.get("labels") or [str(i) for i in range(cfg.num_classes)]
    if not isinstance(labels, list) or len(labels) != cfg.num_classes:
        raise CheckpointError(f"{root / CONFIG}: expected {cfg.num_classes} labels, got {labels!r:.80}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({exc})") from exc
    model = MoNE(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights}: weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{weights}: {name} has shape {tuple(tensor.shape)}, "
                f"the config needs {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    profile = doc.get("profile")
    meta = doc.get("meta") or {}
    return Checkpoint(model, cfg, [str(x) for x in labels], profile, meta, root, digest)
