from __future__ import annotations

import pytest

from mone.model import MoNEConfig


def test_variant_table() -> None:
    s = MoNEConfig.from_variant("S/16")
    assert (s.dim, s.depth, s.heads, s.patch_size, s.num_tokens) == (384, 12, 6, 16, 196)
    b = MoNEConfig.from_variant("B/16", num_classes=10, img_size=384)
    assert (b.dim, b.heads, b.num_classes, b.num_tokens) == (768, 12, 10, 576)
    mi = MoNEConfig.from_variant("Mi/4")
    assert (mi.img_size, mi.in_chans, mi.num_tokens, mi.mean) == (28, 1, 49, (0.5,))


@pytest.mark.parametrize(
    ("variant", "overrides", "needle"),
    [
        ("X/16", {}, "'X/16'"),
        ("S16", {}, "'S16'"),
        ("S/16", {"img_size": 225}, "225"),
        ("S/16", {"heads": 7}, "7"),
        ("S/16", {"num_experts": 0}, "0"),
        ("S/16", {"dim": 388}, "388"),
        ("S/16", {"depth": -1}, "-1"),
        ("S/16", {"bogus": 1}, "bogus"),
        ("S/16", {"in_chans": 2, "mean": (0.5,), "std": (0.5,)}, "mean"),
    ],
)
def test_bad_values_raise_naming_the_value(variant: str, overrides: dict[str, object], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        MoNEConfig.from_variant(variant, **overrides)


def test_dict_round_trip() -> None:
    cfg = MoNEConfig.from_variant("Mi/4", num_classes=7)
    assert MoNEConfig.from_dict(cfg.to_dict()) == cfg


def test_default_variant_tig2() -> None:
    cfg = MoNEConfig.from_variant("TiG/2", num_classes=10)
    assert (cfg.img_size, cfg.in_chans, cfg.patch_size, cfg.num_tokens) == (28, 1, 2, 196)
    assert (cfg.dim, cfg.depth, cfg.heads, cfg.num_experts, cfg.temporal_depth) == (192, 12, 3, 4, 1)
    assert cfg.expert_dims == (24, 48, 96, 192)
    assert cfg.mean == (0.5,)
    assert MoNEConfig.from_dict(cfg.to_dict()) == cfg
