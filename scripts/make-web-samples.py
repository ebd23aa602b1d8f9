"""Write the web page's samples (clients/web/samples/): four Fashion-MNIST test images and a generated clip.

Fashion-MNIST (MIT licence) comes from the Debian package `dataset-fashion-mnist`; the clip is an animated
GIF of a bright bar sweeping across a dark frame (8 frames, 28x28), which the page sends with kind=clip.
Usage: python scripts/make-web-samples.py
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image

FASHION = Path("/usr/share/datasets/fashion-mnist")
OUT = Path(__file__).resolve().parent.parent / "clients" / "web" / "samples"
PICKS = {"ankle-boot": 0, "pullover": 1, "trouser": 2, "shirt": 4}  # index in the test set per sample


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with gzip.open(FASHION / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    for name, i in PICKS.items():
        Image.fromarray(images[i]).save(OUT / f"{name}.png", optimize=True)
    frames = []
    for t in range(8):
        arr = np.full((28, 28), 16, dtype=np.uint8)
        x = 2 + t * 3
        arr[6:22, x : x + 4] = 240
        frames.append(Image.fromarray(arr))
    frames[0].save(OUT / "sweep.gif", save_all=True, append_images=frames[1:], duration=125, loop=0)


if __name__ == "__main__":
    main()
