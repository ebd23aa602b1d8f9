"""Checkpoints: safetensors weights + a JSON file with the config, class labels and evaluation profile.

Layout of a checkpoint directory:
    model.safetensors   the state dict (never a pickle)
    config.json         {"format": "mone-checkpoint/2", "config": {...}, "labels": [...],
                         "profile": {...} | null, "meta": {...},
                         "weights_sha256": "<hex SHA-256 of model.safetensors>",
                         "sha256": "<hex SHA-256 of the rest of this document, canonical JSON>"}

The checkpoint digest `sha256` covers everything the checkpoint says: the config, the labels, the profile,
the meta and, through `weights_sha256`, the weights.  Loading requires it and verifies both digests before the
weights are parsed (`allow_unverified=True` skips that, for development only), checks the profile's structure,
rebuilds the model from the stored config and loads the weights strictly; every failure raises
CheckpointError naming the file and the problem.  A pinned digest (`expected_sha256`, the server's
`checkpoint_sha256`) is compared with the checkpoint digest.

Reading a checkpoint's config (`read_checkpoint_info`) needs no torch: the server's command line sizes its
worker processes from it before anything loads torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

from mone.model.config import MoNEConfig

if TYPE_CHECKING:
    import torch

    from mone.model.vit import MoNE

FORMAT = "mone-checkpoint/2"
OLD_FORMATS = ("mone-checkpoint/1",)
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
_MAX_JSON_BYTES = 16 * 1024 * 1024
# Series of the evaluation profile, one value per capacity; accuracies are percentages (None: not measured).
_PROFILE_SERIES = {
    "gflops": "gflops",
    "clip_gflops": "gflops",
    "accuracy": "accuracy",
    "clip_accuracy": "accuracy",
}
_PROFILE_COUNTS = ("test_images", "test_clips")

log = logging.getLogger(__name__)


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


def checkpoint_digest(doc: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a config.json document without its `sha256` key."""
    body = {k: v for k, v in doc.items() if k != "sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def check_profile(profile: object, cfg: MoNEConfig) -> None:
    """Raise ValueError saying what is wrong if `profile` is not None or a well-formed evaluation profile:
    {"capacities": [ascending e_c in [min_capacity, 1]], "gflops"|"clip_gflops": [positive numbers],
    "accuracy"|"clip_accuracy": [percentages or null], "test_images"|"test_clips": counts}."""
    if profile is None:
        return
    if not isinstance(profile, dict):
        raise ValueError(f"profile must be an object or null, got {type(profile).__name__}")
    unknown = sorted(set(profile) - {"capacities", *_PROFILE_SERIES, *_PROFILE_COUNTS})
    if unknown:
        raise ValueError(f"profile has unknown key(s) {unknown}")
    caps = profile.get("capacities")
    if not isinstance(caps, list) or not caps or not all(_is_number(c) for c in caps):
        raise ValueError(f"profile.capacities must be a non-empty list of numbers, got {caps!r:.80}")
    lo = cfg.min_capacity
    if any(not lo - 1e-9 <= c <= 1.0 + 1e-9 for c in caps):
        raise ValueError(
            f"profile.capacities must lie in [{lo:g}, 1] for {cfg.num_experts} experts, got {caps}"
        )
    if any(b <= a for a, b in zip(caps, caps[1:], strict=False)):
        raise ValueError(f"profile.capacities must be strictly ascending, got {caps}")
    for key, kind in _PROFILE_SERIES.items():
        if key not in profile:
            continue
        values = profile[key]
        if not isinstance(values, list) or len(values) != len(caps):
            raise ValueError(f"profile.{key} must be a list of {len(caps)} values (one per capacity)")
        for v in values:
            if kind == "gflops" and not (_is_number(v) and v > 0):
                raise ValueError(f"profile.{key} must hold positive numbers, got {v!r}")
            if kind == "accuracy" and v is not None and not (_is_number(v) and 0 <= v <= 100):
                raise ValueError(f"profile.{key} must hold percentages in [0, 100] or null, got {v!r}")
    for key in _PROFILE_COUNTS:
        v = profile.get(key, 0)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"profile.{key} must be a non-negative integer, got {v!r}")


def save_checkpoint(
    path: str | os.PathLike[str],
    model: MoNE,
    labels: list[str] | None = None,
    profile: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write `model` (and its labels, profile and free-form meta) to the directory `path`."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    labels = list(labels) if labels is not None else [str(i) for i in range(cfg.num_classes)]
    if len(labels) != cfg.num_classes:
        raise ValueError(f"{len(labels)} labels for {cfg.num_classes} classes")
    check_profile(profile, cfg)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = out / (WEIGHTS + ".tmp")
    save_file(state, str(tmp), metadata={"format": FORMAT})
    tmp.replace(out / WEIGHTS)
    doc: dict[str, Any] = {
        "format": FORMAT,
        "config": cfg.to_dict(),
        "labels": labels,
        "profile": profile,
        "meta": meta or {},
        "weights_sha256": _sha256(out / WEIGHTS),
    }
    doc["sha256"] = checkpoint_digest(doc)
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
    if isinstance(doc, dict) and doc.get("format") in OLD_FORMATS:
        raise CheckpointError(
            f"{cfg_path}: format {doc['format']!r} has no digest of its config, labels and profile; "
            f"load it with allow_unverified=True and save it again to write {FORMAT!r}"
        )
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise CheckpointError(f"{cfg_path}: unknown checkpoint format {found!r}, expected {FORMAT!r}")
    return doc


def load_checkpoint(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    expected_sha256: str | None = None,
    allow_unverified: bool = False,
) -> Checkpoint:
    """Load a checkpoint directory (or its model.safetensors) into an eval-mode MoNE on `device`.

    Args:
        path: the directory, or the weights file inside it.
        device: where to put the model.
        expected_sha256: pin the checkpoint to this digest (on top of the digests in config.json).
        allow_unverified: development only: load without the digests in config.json (a missing, blank or
            mismatching one is logged, not refused); a pinned `expected_sha256` is still enforced.
    """
    root = Path(path)
    if root.is_file():
        root = root.parent
    cfg_path = root / CONFIG
    doc = _read_json(root) if allow_unverified else read_checkpoint_info(root)
    weights = root / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{root}: {WEIGHTS} is missing")
    weights_digest = _sha256(weights)
    try:
        digest = checkpoint_digest({**doc, "weights_sha256": weights_digest})
    except ValueError as exc:  # NaN or infinity, which canonical JSON cannot hold
        raise CheckpointError(f"{cfg_path}: {exc}") from exc
    problem = _verify(doc, weights_digest)
    if problem and not allow_unverified:
        raise CheckpointError(f"{cfg_path}: {problem}; refusing to load")
    if problem:
        log.warning("%s: %s; loading it UNVERIFIED (development only)", cfg_path, problem)
    if expected_sha256 and digest != expected_sha256:
        raise CheckpointError(
            f"{root}: checkpoint sha256 {digest} does not match the pinned digest ({expected_sha256}); "
            "refusing to load"
        )
    try:
        cfg = MoNEConfig.from_dict(doc.get("config"))  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{root / CONFIG}: bad config: {exc}") from exc
    labels = doc.get("labels") or [str(i) for i in range(cfg.num_classes)]
    if not isinstance(labels, list) or len(labels) != cfg.num_classes:
        raise CheckpointError(f"{root / CONFIG}: expected {cfg.num_classes} labels, got {labels!r:.80}")
    if not all(isinstance(x, str) for x in labels):
        raise CheckpointError(f"{root / CONFIG}: labels must be strings, got {labels!r:.80}")
    profile = doc.get("profile")
    try:
        check_profile(profile, cfg)
    except ValueError as exc:
        raise CheckpointError(f"{root / CONFIG}: bad profile: {exc}") from exc
    try:
        from safetensors.torch import load_file

        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({exc})") from exc
    from mone.model.vit import MoNE

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
    meta = doc.get("meta") or {}
    if not isinstance(meta, dict):
        raise CheckpointError(f"{cfg_path}: meta must be an object, got {type(meta).__name__}")
    return Checkpoint(model, cfg, [str(x) for x in labels], profile, meta, root, digest)


def _verify(doc: dict[str, Any], weights_digest: str) -> str | None:
    """What is wrong with the digests of a parsed config.json, or None when both match."""
    for key in ("weights_sha256", "sha256"):
        value = doc.get(key)
        if not isinstance(value, str) or not value:
            return f"{key} is missing or blank: the checkpoint cannot be verified"
    if doc["weights_sha256"] != weights_digest:
        return (
            f"{WEIGHTS} has sha256 {weights_digest}, config.json records {doc['weights_sha256']}: "
            "the weights do not match"
        )
    digest = checkpoint_digest(doc)
    if doc["sha256"] != digest:
        return (
            f"checkpoint sha256 {digest} does not match the recorded {doc['sha256']}: "
            "config, labels, profile or meta were changed"
        )
    return None


def _read_json(root: Path) -> dict[str, Any]:
    """config.json parsed, of any format (unverified loading only)."""
    cfg_path = root / CONFIG
    if not cfg_path.is_file():
        raise CheckpointError(f"{root}: not a checkpoint directory ({CONFIG} is missing)")
    try:
        doc = json.loads(cfg_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object, got {type(doc).__name__}")
    return doc
