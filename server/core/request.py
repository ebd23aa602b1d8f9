"""One inference request as the engine sees it, whatever wire format it came in.

An adapter (native, Open Inference Protocol REST or gRPC) turns its wire format into `InferRequest`s, one
per sample; the request travels to the engine, which plans its token split and queues it (a `WorkItem` holds
it), and on to the runner, which forwards its input.  Its `kind` is what decoding found (an image, or a clip
of however many frames), never guessed from the frame count.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from torch import Tensor

from mone.server.core.budget import Budget
from mone.server.media.kinds import INPUT_KINDS


@dataclass(frozen=True, eq=False)
class InferRequest:
    """One sample to classify.

    Args:
        x: the decoded, normalised input, (T, C, H, W); an image has T = 1.
        kind: what the input is, as decoding found it: a name of `INPUT_KINDS` (an image, or a clip of any
            number of frames).
        budget: the budget asked for (server/core/budget.py).
        top_k: predictions to return.
        routing: return the expert map (which expert each token went to).
        deadline_ms: the hard deadline after `arrival`, if any (capped by the server's request timeout).
        arrival: when the request arrived (time.monotonic()); deadlines count from it.
        id: the request id (as the access log writes it), when known.
    """

    x: Tensor
    kind: str
    budget: Budget
    top_k: int = 5
    routing: bool = False
    deadline_ms: float | None = None
    arrival: float = field(default_factory=time.monotonic)
    id: str | None = None

    def __post_init__(self) -> None:
        if self.x.dim() != 4 or self.x.shape[0] < 1:
            raise ValueError(f"an input is (T, C, H, W) with T >= 1, got shape {tuple(self.x.shape)}")
        if self.kind not in INPUT_KINDS:
            raise ValueError(f"kind must be one of {', '.join(INPUT_KINDS)}, got {self.kind!r}")
        if self.kind == "image" and self.x.shape[0] != 1:
            raise ValueError(f"an image has one frame, got {self.x.shape[0]}")

    @property
    def frames(self) -> int:
        """Frames per sample: 1 for an image, the clip's length for a clip."""
        return int(self.x.shape[0])
