"""The input kinds in one registry (server/media/kinds.py): what each is decoded from, and what decoding does
with a container that belongs to another kind."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from PIL import Image

from mone.model import MoNEConfig
from mone.server.config import Settings
from mone.server.errors import BadInputError
from mone.server.media.decode import FORMAT_NAMES, decode, sniff
from mone.server.media.kinds import CONTENT_TYPES, INPUT_KINDS, kind_for
from tests.support.media import encode, encode_clip

CFG = MoNEConfig.from_variant("Mi/4", num_classes=10)


def test_every_kind_takes_known_containers_and_auto_is_unambiguous() -> None:
    assert list(INPUT_KINDS) == ["image", "clip"]
    for kind in INPUT_KINDS.values():
        assert set(kind.auto) <= set(kind.formats) <= set(CONTENT_TYPES) == set(FORMAT_NAMES)
    autos = [f for kind in INPUT_KINDS.values() for f in kind.auto]
    assert sorted(autos) == sorted(set(autos)) == sorted(CONTENT_TYPES)  # every container has one auto kind


@pytest.mark.parametrize(
    ("fmt", "asked", "kind"),
    [("png", "auto", "image"), ("gif", "auto", "image"), ("mp4", "auto", "clip"), ("gif", "clip", "clip")],
)
def test_the_kind_an_input_is_decoded_as(fmt: str, asked: str, kind: str) -> None:
    assert kind_for(fmt, asked).name == kind


def test_frames_and_description_come_from_the_model() -> None:
    assert INPUT_KINDS["image"].frames(CFG) == 1
    assert INPUT_KINDS["clip"].frames(CFG) == CFG.num_frames
    assert INPUT_KINDS["clip"].describe(CFG) == {
        "formats": ["video/mp4", "video/webm", "image/gif"],
        "frames": CFG.num_frames,
    }


def test_decoded_inputs_say_their_kind() -> None:
    png = encode(Image.new("L", (28, 28), 80), "PNG")
    assert sniff(png) == "png"
    image = decode(png, CFG, Settings())
    assert (image.kind, image.frames) == ("image", 1)
    clip = decode(encode_clip([np.full((16, 16, 3), 9 * i, np.uint8) for i in range(6)]), CFG, Settings())
    assert (clip.kind, clip.frames) == ("clip", CFG.num_frames)


def test_a_container_of_another_kind_names_the_kind_to_ask_for() -> None:
    png = encode(Image.new("L", (28, 28), 80), "PNG")
    with pytest.raises(BadInputError, match="png cannot be read as kind=clip; send it with kind=image"):
        decode(png, CFG, Settings(), kind="clip")
    mp4 = encode_clip([np.zeros((16, 16, 3), np.uint8)] * 4)
    with pytest.raises(BadInputError, match="mp4 cannot be read as kind=image; send it with kind=clip"):
        decode(mp4, CFG, Settings(), kind="image")


@pytest.mark.anyio
async def test_models_list_the_input_kinds(client: httpx.AsyncClient) -> None:
    info = (await client.get("/v1/models")).json()["models"][0]
    cfg = MoNEConfig.from_dict(info["config"])
    assert info["input"]["kinds"] == list(INPUT_KINDS)
    for kind in INPUT_KINDS.values():
        assert info["input"][kind.name] == kind.describe(cfg)
    assert info["input"]["image"]["size"] == [cfg.img_size, cfg.img_size]  # what clients read to resize
