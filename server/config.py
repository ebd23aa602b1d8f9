"""Server settings: one pydantic-settings class, environment prefix MONE_, mirrored by the command line.

Every limit of docs/reliability.md (section 1) is a field here with a safe default.  Settings are built by
`get_settings()` (cached), never at import time.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "default"
MB = 1024 * 1024


class Settings(BaseSettings):
    """Everything an operator can configure (env `MONE_<NAME>` or `mone-serve --<name>`)."""

    model_config = SettingsConfigDict(env_prefix="MONE_", extra="ignore")

    # -- process -----------------------------------------------------------------------------------------
    host: str = Field(default="127.0.0.1", description="bind address (loopback by default)")
    port: int = Field(default=8000, ge=0, le=65535)
    workers: int = Field(
        default=0,
        ge=0,
        le=64,
        description="uvicorn worker processes, one model each (0: auto, one per CPU core for a model of at "
        "most 1 GFLOP an image on a CPU, else one)",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    limit_concurrency: int = Field(default=512, ge=1, description="uvicorn: connections beyond this get 503")
    timeout_keep_alive: int = Field(
        default=5, ge=1, description="seconds an idle keep-alive connection stays open"
    )
    header_timeout_s: float = Field(
        default=10.0, gt=0.0, description="a connection must send its request headers within this (slowloris)"
    )
    body_timeout_s: float = Field(default=30.0, gt=0.0, description="and then its body within this")
    timeout_graceful_shutdown: int = Field(default=25, ge=1, description="seconds to drain before exit")
    health_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="port of a probe listener (/healthz, /readyz) on its own thread, off the main event "
        "loop, bound to the same host; 0 turns it off (the container image sets 8001)",
    )
    grpc_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="port of the Open Inference Protocol's gRPC API (inference.GRPCInferenceService), bound "
        "to the same host; 0 turns it off (the container image sets 8081, KServe's gRPC port)",
    )
    access_log: bool = Field(
        default=True,
        description="one JSON line per request on stderr (logger mone.access): request id, route, status, "
        "input kind, budget asked, capacity and GFLOPs served, decode/queue/compute ms; replaces uvicorn's",
    )
    otel_exporter: Literal["none", "otlp", "console"] = Field(
        default="none",
        description="OpenTelemetry traces (spans for decode, queue, batch and forward): none (off), otlp "
        "(OTLP over HTTP to OTEL_EXPORTER_OTLP_ENDPOINT; pip install 'mone-serve[tracing]'), "
        "console (stdout)",
    )
    otel_sample_ratio: float = Field(
        default=1.0, ge=0.0, le=1.0, description="share of traces kept when the caller has not decided"
    )
    health_stale_s: float = Field(
        default=10.0,
        gt=0.0,
        description="the probe listener's /healthz answers 503 once the main event loop's heartbeat is older",
    )
    stuck_batch_factor: float = Field(
        default=10.0,
        gt=1.0,
        description="/healthz answers 503 (stuck) once an inference batch has run this many times its "
        "predicted time, and at least stuck_batch_min_s",
    )
    stuck_batch_min_s: float = Field(
        default=10.0, gt=0.0, description="a batch is never stuck before it has run this long"
    )
    stuck_batch_ceiling_s: float = Field(
        default=120.0,
        ge=0.0,
        description="a batch running this long is stuck whatever its prediction (0: no ceiling)",
    )

    # -- model -------------------------------------------------------------------------------------------
    checkpoint: Path = Field(
        default=DEFAULT_CHECKPOINT, description="checkpoint directory (safetensors + JSON)"
    )
    checkpoint_sha256: str | None = Field(
        default=None,
        description="pin the checkpoint to this digest (the sha256 in its config.json and in GET /v1/models, "
        "which covers config, labels, profile and weights)",
    )
    allow_unverified_checkpoint: bool = Field(
        default=False,
        description="development only: load a checkpoint whose digests are missing or do not match "
        "(a pinned checkpoint_sha256 is still enforced)",
    )
    random_init: bool = Field(default=False, description="development: serve a randomly initialised model")
    random_variant: str = Field(default="Mi/4", description="variant for --random-init")
    random_classes: int = Field(default=10, ge=1, description="classes for --random-init")
    model_name: str = Field(default="mone", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    device: str = Field(default="auto", description="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    threads: int | None = Field(default=None, ge=1, description="torch intra-op threads (default: torch's)")
    inference_dtype: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32",
        description="dtype of the model's weights and activations: fp32; bf16 (CPU or CUDA); fp16 (CUDA "
        "only); the logits stay within the dtype's tolerance of fp32 (server/core/precision.py)",
    )
    cuda_graphs: bool = Field(
        default=True,
        description="on a CUDA device, capture the forward as CUDA graphs per batch size (padded to a power "
        "of two or max_batch_size), frames and token split, and replay them; ignored on the CPU",
    )
    cuda_graphs_max: int = Field(
        default=64, ge=1, le=4096, description="captured graphs kept at once (least recently used dropped)"
    )
    packed_weights: bool = Field(
        default=True,
        description="CPU, fp32: run each matrix product of at least 8 M multiply-adds through oneDNN on its "
        "weight slice packed at first use (model/inference.py); the packed copies take up to 1.9x the "
        "blocks' weights in memory",
    )
    compiled_plans: bool = Field(
        default=True,
        description="CPU, fp32, models of at most 1 GFLOP an image: compile the forward ahead of time "
        "(torch.export and AOTInductor) per batch size, frames and token split once a few batches of it "
        "have run, in a background child process, and serve it compiled from then on; packages are kept in "
        "compile_dir and loaded at start-up; without a C++ compiler only packages found there are used "
        "(server/core/compiled.py)",
    )
    compile_dir: str | None = Field(
        default=None,
        description="where compiled forwards are kept (default: $XDG_CACHE_HOME/mone/compiled, else "
        "~/.cache/mone/compiled)",
    )
    compile_max_batch: int = Field(
        default=8,
        ge=1,
        le=64,
        description="the largest batch size compiled (compiled_plans): it and the powers of two below it "
        "are, and a batch is padded to one of them or runs as several",
    )
    inference_streams: int = Field(
        default=0,
        ge=0,
        le=64,
        description="CPU: split a batch into up to this many sub-batches run side by side, each on its own "
        "thread with threads/streams intra-op threads (0: auto, min(threads, 4); 1: never split); "
        "always 1 on a GPU",
    )
    stream_min_gflops: float | None = Field(
        default=None,
        ge=0.0,
        description="least work of a sub-batch, in GFLOPs at capacity 1.0 whatever the capacities served: "
        "smaller batches run whole, where splitting would cost more in per-operation overhead than it saves "
        "(default: measured at start-up, the smallest batch that runs faster split than whole; 0.5 when "
        "start-up does not calibrate)",
    )
    serial_max_gflops: float | None = Field(
        default=None,
        ge=0.0,
        description="CPU: a batch that runs whole with at most this much work (GFLOPs at capacity 1.0) runs "
        "on one intra-op thread, where waking the others costs more than they save (default: measured at "
        "start-up; 0: never)",
    )
    inference_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="niceness added to the inference threads so that health checks and admission keep the "
        "CPU while the model saturates it (Linux; 0 leaves them alone)",
    )
    gil_switch_interval_ms: float = Field(
        default=1.0,
        gt=0.0,
        le=100.0,
        description="how long a thread may hold the GIL before one that waits asks for it (Python's "
        "default is 5): shorter lets the event loop and the probe listener in sooner while the inference "
        "and decoding threads run Python code",
    )
    release_memory_idle_s: float = Field(
        default=1.0,
        ge=0.0,
        description="give the allocator's free memory back to the OS once the queue has been empty this many "
        "seconds (glibc; 0: never)",
    )

    # -- budgets -----------------------------------------------------------------------------------------
    default_capacity: float = Field(
        default=1.0,
        gt=0.0,
        le=1.0,
        description="e_c when a request gives no budget (at least the model's lowest capacity, 1/2**(E-1) "
        "for E experts)",
    )
    default_top_k: int = Field(default=5, ge=1)

    # -- batching and overload ---------------------------------------------------------------------------
    max_batch_size: int = Field(default=32, ge=1, le=1024)
    max_batch_wait_ms: float = Field(default=5.0, ge=0.0, le=1000.0)
    batch_wait: Literal["incoming", "always"] = Field(
        default="incoming",
        description="incoming: a batch waits for more items only while requests are being decoded (a lone "
        "request on an idle server runs at once); always: the whole max_batch_wait_ms",
    )
    max_queue_size: int = Field(default=128, ge=1)
    overload_policy: Literal["reject", "degrade"] = "reject"
    degrade_start: float = Field(
        default=0.25, ge=0.0, lt=1.0, description="queue fill at which degrading begins"
    )
    degrade_floor: float = Field(
        default=0.25,
        gt=0.0,
        le=1.0,
        description="lowest e_c that degrading serves (raised to the model's lowest capacity when below it)",
    )
    request_timeout_s: float = Field(default=30.0, gt=0.0, description="hard deadline; 504 when it expires")

    # -- latency model -----------------------------------------------------------------------------------
    calibrate: bool = Field(default=True, description="measure the latency model at start-up")
    calibration_batch_sizes: list[int] = Field(default_factory=lambda: [1, 8, 32])
    calibration_capacities: list[float] = Field(
        default_factory=lambda: [0.125, 0.25, 0.5, 1.0],
        description="e_c measured at start-up; each is raised to the model's lowest capacity when below it",
    )
    calibration_repeats: int = Field(default=2, ge=1, le=20)
    warmup_iters: int = Field(default=2, ge=0, le=100)
    full_width_rows: float | None = Field(
        default=None,
        ge=0.0,
        description="what one more matrix product per projection costs the model, in token rows of "
        "full-width work: it decides which experts run as one product with masks (model/inference.py, "
        "plan_runs); default: measured at start-up (with calibrate; else the model's default)",
    )

    # -- input limits (docs/reliability.md section 1) ----------------------------------------------------
    max_body_bytes: int = Field(
        default=50 * MB, ge=1, description="any request body (video endpoint limit); 413"
    )
    max_image_bytes: int = Field(default=20 * MB, ge=1, description="encoded image; 413")
    max_image_pixels: int = Field(default=40_000_000, ge=1, description="decoded width x height; 413")
    max_image_side: int = Field(default=8192, ge=1)
    max_animated_frames: int = Field(
        default=1000, ge=1, description="GIF/WebP frames in an image upload; 422"
    )
    max_video_seconds: float = Field(default=30.0, gt=0.0)
    max_video_side: int = Field(default=4096, ge=1, description="longest side of a video frame (4K)")
    max_video_streams: int = Field(default=1, ge=1, description="video streams in a container")
    max_video_frames: int = Field(default=2000, ge=1, description="frames decoded from one clip")
    max_decode_seconds: float = Field(
        default=10.0, gt=0.0, description="wall-time budget to decode one clip; 422"
    )
    decode_isolation: Literal["process", "thread"] = Field(
        default="process",
        description="decode clips in killable worker processes (killed at the decode budget) or in a thread",
    )
    decode_workers: int = Field(
        default=2, ge=1, le=64, description="clip decode worker processes (decode_isolation=process)"
    )
    max_request_frames: int = Field(default=32, ge=1, description="compute cap: frames per request; 422")
    max_decode_pixels: int = Field(
        default=80_000_000,
        ge=1,
        description="pixels of images being decoded at once, across requests (memory); others wait, then 503",
    )
    inline_decode_pixels: int = Field(
        default=16_384,
        ge=0,
        description="images of at most this many pixels (by their header) and 64 KiB are decoded on the "
        "event loop, where handing them to a thread costs more than decoding them; 0: always in a thread",
    )

    # -- security ----------------------------------------------------------------------------------------
    api_key: SecretStr | None = Field(
        default=None, description="when set, inference and model routes need a Bearer"
    )
    allow_unauthenticated: bool = Field(
        default=False, description="allow binding a non-loopback address without an api_key"
    )
    metrics_public: bool = Field(
        default=False, description="serve /metrics without the api_key (when one is set)"
    )
    docs: bool = Field(default=True, description="serve OpenAPI docs at /docs")

    @field_validator("calibration_batch_sizes")
    @classmethod
    def _positive_sizes(cls, v: list[int]) -> list[int]:
        if not v or any(b < 1 for b in v):
            raise ValueError("calibration_batch_sizes must be positive integers")
        return sorted(set(v))

    @field_validator("calibration_capacities")
    @classmethod
    def _capacities(cls, v: list[float]) -> list[float]:
        if not v or any(not 0.0 < c <= 1.0 for c in v):
            raise ValueError("calibration_capacities must lie in (0, 1]")
        return sorted(set(v))

    @field_validator("api_key")
    @classmethod
    def _key(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value().strip()) < 8:
            raise ValueError("api_key must have at least 8 characters")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda", "mps") and not (v.startswith("cuda:") and v[5:].isdigit()):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {v!r}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.max_image_bytes > self.max_body_bytes:
            raise ValueError("max_image_bytes cannot exceed max_body_bytes")
        if self.degrade_floor > self.default_capacity:
            raise ValueError("degrade_floor cannot exceed default_capacity")
        if self.inference_dtype == "fp16" and self.device in ("cpu", "mps"):
            raise ValueError("inference_dtype fp16 needs a CUDA device; use bf16 or fp32")
        if self.health_port and self.health_port == self.port:
            raise ValueError("health_port must differ from port")
        if self.grpc_port and self.grpc_port in (self.port, self.health_port):
            raise ValueError("grpc_port must differ from port and health_port")
        loopback = self.host in ("127.0.0.1", "localhost", "::1")
        if not loopback and self.api_key is None and not self.allow_unauthenticated:
            raise ValueError(
                f"binding {self.host} without an api_key would expose inference to the network; "
                "set api_key, or allow_unauthenticated=true behind an authenticating proxy"
            )
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return Settings()
