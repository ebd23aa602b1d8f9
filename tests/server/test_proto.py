"""The committed gRPC stubs are what scripts/gen_proto.py makes of server/http/proto/inference.proto, and
they load beside other clients of the protocol that register the same `inference` package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "server" / "http" / "proto"


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)], check=True
    )
    for name in ("inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py"):
        assert (tmp_path / name).read_bytes() == (PROTO / name).read_bytes(), f"{name}: run `make proto`"


def test_stubs_load_beside_tritonclient() -> None:
    pytest.importorskip("tritonclient.grpc")
    code = (
        "import tritonclient.grpc\n"
        "from mone.server.http.proto import inference_pb2 as pb\n"
        "from tritonclient.grpc import service_pb2 as theirs\n"
        "m = pb.ModelInferRequest(model_name='mone', raw_input_contents=[b'x'])\n"
        "m.parameters['capacity'].double_param = 0.5\n"
        "t = theirs.ModelInferRequest.FromString(m.SerializeToString())\n"
        "assert t.model_name == 'mone' and t.parameters['capacity'].double_param == 0.5, t\n"
        "assert t.raw_input_contents == [b'x']\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT)})


def test_the_service_is_the_protocols() -> None:
    from mone.server.http.proto import inference_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert {m.name for m in service.methods} == {
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
    }
