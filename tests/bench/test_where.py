"""`bench.where`: samples charged to the innermost stage they are in, per thread, and one short real run."""

from __future__ import annotations

import re
import shutil

import pytest

from bench.where import ORDER, main, stage_of, summarise, table
from tests.system import missing

LOOP = "thread (1): MainThread"
INFER = "thread (2): mone-infer_0"


def test_the_innermost_stage_wins() -> None:
    route = "post_classify (/srv/server/http/routes.py:100)"
    assert stage_of(["run (/x/uvicorn/server.py:1)", "app (/x/fastapi/routing.py:2)", route]) == "framework"
    decode = "decode_image (/srv/server/media/decode.py:97)"
    assert (
        stage_of(["run (/x/uvicorn/server.py:1)", route, decode, "load (/x/PIL/ImageFile.py:3)"]) == "decode"
    )
    assert stage_of(["_loop (server/core/engine.py:1)", "plan (server/core/scheduling.py:2)"]) == "batching"
    assert stage_of(["app (fastapi/routing.py:1)", "Request.form (starlette/requests.py:2)"]) == "framework"
    assert stage_of(["run (/srv/server/core/runner.py:9)", "forward (/srv/model/vit.py:4)"]) == "forward"
    compiled = ["run (/srv/server/core/runner.py:9)", "AotiModel.__call__ (/srv/server/core/compiled.py:2)"]
    assert stage_of(compiled) == "forward"
    assert stage_of([route, decode, "normalised_array (/srv/model/preprocess.py:7)"]) == "decode"
    assert stage_of(["main (/srv/other.py:1)"]) == "other"


def test_samples_add_up_per_thread_and_stage() -> None:
    raw = "\n".join(
        [
            f"{LOOP};run (/x/uvicorn/server.py:1);select (/x/asyncio/base_events.py:2) 30",
            f"{LOOP};run (/x/uvicorn/server.py:1);decode_image (/srv/server/media/decode.py:97) 10",
            f"{INFER};run (/srv/server/core/runner.py:1);forward (/srv/model/vit.py:2) 60",
            "garbage",
        ]
    )
    samples = summarise(raw)
    assert samples["event loop"]["http"] == 30
    assert samples["event loop"]["decode"] == 10
    assert samples["inference"]["forward"] == 60
    text = table(samples, rate=100, requests=10)
    loop_row = next(line for line in text.splitlines() if line.startswith("| event loop"))
    assert loop_row.endswith("| 40.00 |")  # 40 samples at 100/s over 10 requests: 40 ms each
    assert "30.0 % (30.00)" in loop_row
    assert text.splitlines()[0].count("|") == len(ORDER) + 3


@pytest.mark.slow
def test_a_short_profile_of_a_real_server(capsys: pytest.CaptureFixture[str]) -> None:
    if shutil.which("hey") is None:
        missing("hey", "hey")
    assert main(["--variant", "Mi/4", "--clients", "4", "--seconds", "2", "--rate", "100"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\d+\.\d req/s", out)
    loop_row = next(line for line in out.splitlines() if line.startswith("| event loop"))
    infer_row = next(line for line in out.splitlines() if line.startswith("| inference"))
    assert float(loop_row.rsplit("|", 2)[1]) > 0  # the event loop was sampled
    assert float(infer_row.rsplit("|", 2)[1]) > 0  # and so was the forward
