"""Real-timm parity: a randomly initialised timm ViT, converted to MoNE, gives the same logits at
capacity 1.0.

timm needs torchvision, which does not import beside the project's CPU torch build, so this runs in its own
environment (scripts/timm_parity.sh makes it).  No weights are downloaded.

    python scripts/timm_parity.py [--model vit_small_patch16_224] [--tolerance 1e-4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mone.model.timm_import import from_timm  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", nargs="+", default=["vit_small_patch16_224", "vit_tiny_patch16_224"])
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()
    worst = 0.0
    for name in args.model:
        torch.manual_seed(0)
        ref = timm.create_model(
            name, pretrained=False, global_pool="avg", class_token=False, num_classes=1000
        )
        ref.eval()
        with torch.no_grad():  # random weights with non-trivial norms, biases and a non-zero head
            for p in ref.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        net = from_timm(ref)
        x = torch.randn(4, 3, 224, 224)
        with torch.no_grad():
            diff = (net(x, capacity=1.0).logits - ref(x)).abs().max().item()
            spread = ref(x).abs().max().item()
        worst = max(worst, diff)
        print(
            f"{name}: timm {timm.__version__}, torch {torch.__version__}: max |logit diff| = {diff:.2e} "
            f"(logits up to {spread:.2f})"
        )
    ok = worst <= args.tolerance
    print("PASS" if ok else "FAIL", f"tolerance {args.tolerance:g}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
