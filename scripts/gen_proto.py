"""Generate the Python stubs of server/http/proto/inference.proto (`make proto`; needs grpcio-tools, in the
dev extra at the pinned version, so that the output is byte for byte what is committed).

    python scripts/gen_proto.py            # rewrites server/http/proto/inference_pb2{.py,.pyi,_grpc.py}
    python scripts/gen_proto.py --out DIR  # writes them under DIR instead (tests compare the two)

The message classes are built in a descriptor pool of their own, not protobuf's default one: the protocol's
package name, `inference`, is also what tritonclient's and KServe's generated modules register, and two
different files defining the same names in one pool refuse to load in the same process.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# protoc names the stubs' imports after the proto's path below its include root: the installed package names,
# as the links in .namespace/ spell them.
INCLUDE = ROOT / ".namespace"
PROTO = "mone/server/http/proto/inference.proto"
OUTPUTS = ("inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py")
DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
OWN_POOL = (
    "_POOL = _descriptor_pool.DescriptorPool()  # not the default pool: see scripts/gen_proto.py\n"
    "DESCRIPTOR = _POOL.AddSerializedFile("
)


def generate(out: Path) -> None:
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{INCLUDE}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
        ]
        if protoc.main([*args, str(INCLUDE / PROTO)]) != 0:
            raise SystemExit("protoc failed")
        made = Path(tmp) / Path(PROTO).parent
        pb2 = (made / "inference_pb2.py").read_text()
        if DEFAULT_POOL not in pb2:
            raise SystemExit("unexpected protoc output: no default-pool registration to replace")
        (made / "inference_pb2.py").write_text(pb2.replace(DEFAULT_POOL, OWN_POOL))
        out.mkdir(parents=True, exist_ok=True)
        for name in OUTPUTS:
            shutil.copyfile(made / name, out / name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "server" / "http" / "proto")
    args = parser.parse_args(argv)
    generate(args.out)
    print(f"wrote {', '.join(OUTPUTS)} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
