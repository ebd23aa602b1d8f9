"""bench.model_speed: the rows it reports, its device and dtype options (CPU here; CUDA on a GPU)."""

from __future__ import annotations

import pytest
import torch

from bench import model_speed as ms


def test_rows_per_capacity_and_reference() -> None:
    rows = ms.run("Mi/4", 1, repeats=1)
    names = [(r["model"], r["capacity"]) for r in rows[:-1]]
    references = [
        ("dense_plain", 1.0),
        ("dense_fused", 1.0),
        ("dense_packed", 1.0),
    ]  # packed: oneDNN's kernels
    assert names == references + [("mone", c) for c in ms.CAPACITIES]
    ref = rows[0]["reference"]
    assert ref in ("dense_plain", "dense_fused", "dense_packed")
    assert next(r for r in rows if r["model"] == ref)["speedup"] == 1.0
    assert all("device" not in r and "dtype" not in r for r in rows)  # the default output is as it was
    assert rows[-1]["model"] == "memory"
    assert rows[-1]["weight_bytes_ratio"] == pytest.approx(1.0, abs=0.01)


def test_bf16_rows_name_their_dtype() -> None:
    rows = ms.run("Mi/4", 1, repeats=1, dtype=torch.bfloat16)
    assert {r.get("dtype") for r in rows[:-1]} == {"bf16"}
    assert {r.get("device") for r in rows[:-1]} == {"cpu"}
    assert rows[-1]["weight_bytes_ratio"] == pytest.approx(1.0, abs=0.01)  # against dense weights in bf16


def test_model_is_built_on_the_device_in_the_dtype() -> None:
    net = ms.build("Mi/4", ms.CPU, torch.bfloat16)
    assert {p.dtype for p in net.parameters()} == {torch.bfloat16}
    with torch.inference_mode():
        assert net(torch.randn(1, 1, 28, 28)).logits.dtype is torch.bfloat16


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--graphs"], "--graphs needs --device cuda"),
        (["--dtype", "fp16"], "fp16"),
    ],
)
def test_options_the_cpu_cannot_run_are_refused(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        ms.main(argv)
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        ms.main(["--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rows_with_graphs_and_peak_memory() -> None:
    rows = ms.run("Mi/4", 2, repeats=2, device=torch.device("cuda"), dtype=torch.bfloat16, graphs=True)
    assert {r["model"] for r in rows} >= {"mone", "mone_graphs", "memory"}
    assert rows[-1]["peak_gpu_mb_mone_1.0"] > 0


def test_unpacked_rows_run_the_forward_on_addmm(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []
    forward = ms.MoNE.forward

    def spy(self: ms.MoNE, *args: object, **kwargs: object) -> object:
        seen.append(ms.inference.PACKED)
        return forward(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ms.MoNE, "forward", spy)
    rows = ms.run("Mi/4", 1, repeats=1, unpacked=True)
    models = [r["model"] for r in rows[:-1]]
    assert models.count("mone_addmm") == len(ms.CAPACITIES) == models.count("mone")
    assert False in seen  # the addmm rows ran unpacked
    assert ms.inference.PACKED  # and the setting came back
