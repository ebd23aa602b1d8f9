"""The peer for `bench.serve`: LitServe serving the same checkpoint with the same preprocessing, dense.

Run as `python -m bench.litserve_peer --checkpoint DIR --port P --max-batch-size B --batch-timeout-ms W`.
It accepts the same multipart upload (`file`) as mone-serve and answers the top-5 labels.
"""

import argparse
import io
from typing import Any

import litserve as ls
import torch
from fastapi import Request
from PIL import Image

from mone.model import load_checkpoint
from mone.model.preprocess import pil_to_tensor
from mone.server.core.precision import cast_model, resolve_dtype


class MoNEAPI(ls.LitAPI):  # type: ignore[misc]
    def __init__(self, checkpoint: str, dtype: str = "fp32", threads: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.checkpoint = checkpoint
        self.dtype = dtype
        self.threads = threads

    def setup(self, device: str) -> None:
        if self.threads:  # several inference processes on a CPU: a share of the cores each
            torch.set_num_threads(self.threads)
        self.ck = load_checkpoint(self.checkpoint, device=device)
        self.torch_device = torch.device(device)
        # The same weights in the same dtype as mone-serve's (server/core/precision.py).
        self.model = cast_model(self.ck.model, resolve_dtype(self.dtype, self.torch_device))

    def decode_request(self, request: Request) -> torch.Tensor:
        # LitServe reads this annotation: `Request` makes it parse the multipart form for us.
        upload = request["file"]
        data = upload.file.read() if hasattr(upload, "file") else upload
        return pil_to_tensor(Image.open(io.BytesIO(data)), self.ck.config)

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(inputs)

    def predict(self, x: torch.Tensor) -> list[dict[str, Any]]:
        with torch.inference_mode():
            probs = self.model(x.to(self.torch_device), capacity=1.0).logits.float().softmax(-1)
            top = probs.topk(min(5, probs.shape[-1]), dim=-1)
        values, indices = top.values.cpu().tolist(), top.indices.cpu().tolist()
        return [
            {"top_k": [{"label": self.ck.labels[i], "prob": p} for i, p in zip(ix, vs, strict=True)]}
            for ix, vs in zip(indices, values, strict=True)
        ]

    def unbatch(self, output: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return output

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        return output


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-timeout-ms", type=float, default=5.0)
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--workers-per-device", type=int, default=1, help="LitServe's inference processes")
    p.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads of each (0: torch's default)"
    )
    args = p.parse_args()
    api = MoNEAPI(
        args.checkpoint,
        dtype=args.dtype,
        threads=args.threads,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout_ms / 1e3,
    )
    server = ls.LitServer(
        api, accelerator=args.accelerator, workers_per_device=args.workers_per_device, timeout=60
    )
    server.run(
        host="127.0.0.1", port=args.port, num_api_servers=1, generate_client_file=False, log_level="warning"
    )


if __name__ == "__main__":
    main()
