"""Tensors of the Open Inference Protocol as they travel: read from the JSON body, from Triton's binary tensor
data extension or from gRPC messages into one form (`InputTensor`), and written back from one form
(`OutputTensor`).  No FastAPI and no gRPC here, so that both transports share it.

Binary tensor data (HTTP): the body is the JSON inference header followed by the tensors' bytes.  The
`Inference-Header-Content-Length` header gives the JSON's length; each input whose values follow it says how
many bytes they take in its `binary_data_size` parameter, in the order of the inputs.  FP32 values are
little-endian float32 in row-major order; a BYTES tensor is its elements one after another, each preceded by
its length as a 4-byte little-endian unsigned integer (gRPC's `raw_input_contents` use the same layout).
Outputs come back that way when the request asks for `binary_data_output` (every output) or an output asks
for `binary_data`; the answer then carries `Inference-Header-Content-Length` too.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from torch import Tensor

from mone.server.errors import BadInputError, InvalidParamsError
from mone.server.http.schemas import InferInputTensor, InferRequest, Parameters

HEADER_LENGTH = "inference-header-content-length"
BINARY_CONTENT_TYPE = "application/octet-stream"
_LENGTH = struct.Struct("<I")


@dataclass(slots=True)
class InputTensor:
    """One input, whatever the transport: `elements` (BYTES: the encoded images/clips) or `values` (FP32)."""

    name: str
    datatype: str
    shape: list[int]
    parameters: Parameters
    elements: list[bytes] | None = None
    values: Tensor | None = None


@dataclass(slots=True)
class OutputTensor:
    """One output: FP32 `values` (row-major) or BYTES `elements`."""

    name: str
    datatype: str
    shape: list[int]
    values: list[float] | None = None
    elements: list[bytes] | None = None

    def json_data(self) -> list[Any]:
        if self.values is not None:
            return self.values
        return [e.decode("utf-8", "replace") for e in self.elements or []]

    def raw(self) -> bytes:
        """The bytes of the binary extension (and of gRPC's `raw_output_contents`)."""
        if self.values is not None:
            return np.asarray(self.values, dtype="<f4").tobytes()
        return serialize_bytes(self.elements or [])


# -- reading -------------------------------------------------------------------------------------------------
def parse_http_body(body: bytes, header_length: str | None) -> tuple[InferRequest, list[InputTensor]]:
    """The inference request of a POST body: JSON, or JSON followed by binary tensor data.  The content type
    is not looked at (clients send none, or `application/octet-stream` with binary data)."""
    if header_length is None:
        header, rest = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise BadInputError(
                f"Inference-Header-Content-Length must be an integer, got {header_length!r}"
            ) from None
        if not 0 < n <= len(body):
            raise BadInputError(f"Inference-Header-Content-Length is {n}, the body has {len(body)} bytes")
        header, rest = body[:n], body[n:]
    try:
        request = InferRequest.model_validate_json(header)
    except ValidationError as exc:
        errors = [{"field": ".".join(map(str, e["loc"])), "message": e["msg"]} for e in exc.errors()]
        raise InvalidParamsError("request does not match the schema", errors=errors) from None
    inputs, offset = [], 0
    for t in request.inputs:
        size = t.parameters.get("binary_data_size") if t.parameters else None
        if size is None:
            inputs.append(_json_input(t))
            continue
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise BadInputError(f"input {t.name!r}: binary_data_size must be a non-negative integer")
        if t.data is not None:
            raise BadInputError(f"input {t.name!r}: give either data or binary_data_size, not both")
        if offset + size > len(rest):
            raise BadInputError(
                f"input {t.name!r}: binary_data_size {size} runs past the end of the body "
                f"({len(rest) - offset} bytes left)"
            )
        inputs.append(raw_input(t.name, t.datatype, t.shape, _params(t), rest[offset : offset + size]))
        offset += size
    if offset != len(rest):
        raise BadInputError(f"{len(rest) - offset} bytes of binary data after the last input")
    return request, inputs


def _params(t: InferInputTensor) -> Parameters:
    return {k: v for k, v in (t.parameters or {}).items() if k != "binary_data_size"}


def _json_input(t: InferInputTensor) -> InputTensor:
    if t.data is None:
        raise BadInputError(f"input {t.name!r}: no data (give data, or binary_data_size with binary data)")
    p = t.parameters or {}
    if t.datatype == "BYTES":
        flat = _flatten(t.data)
        _check_count(t.name, len(flat), t.shape)
        return InputTensor(t.name, t.datatype, t.shape, p, elements=[_b64(e, t.name) for e in flat])
    if t.datatype == "FP32":
        flat = _flatten(t.data)
        _check_count(t.name, len(flat), t.shape)
        try:
            x = torch.tensor(flat, dtype=torch.float32).view(t.shape)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise BadInputError(f"input {t.name!r}: data must be numbers ({exc})") from None
        return InputTensor(t.name, t.datatype, t.shape, p, values=x)
    raise unsupported(t.name, t.datatype)


def raw_input(name: str, datatype: str, shape: list[int], params: Parameters, raw: bytes) -> InputTensor:
    """An input whose values are raw bytes (binary extension, gRPC `raw_input_contents`)."""
    if any(d < 0 for d in shape):
        raise BadInputError(f"input {name!r}: negative dimension in shape {shape}")
    if datatype == "BYTES":
        elements = deserialize_bytes(raw, name)
        _check_count(name, len(elements), shape)
        return InputTensor(name, datatype, shape, params, elements=elements)
    if datatype == "FP32":
        n = math.prod(shape)
        if len(raw) != 4 * n:
            raise BadInputError(f"input {name!r}: {len(raw)} bytes of FP32 data for shape {shape} ({4 * n})")
        x = torch.from_numpy(np.frombuffer(raw, dtype="<f4").astype(np.float32)).view(shape)
        return InputTensor(name, datatype, shape, params, values=x)
    raise unsupported(name, datatype)


def unsupported(name: str, datatype: str) -> BadInputError:
    return BadInputError(f"input {name!r}: datatype {datatype} is not supported (BYTES or FP32)")


def deserialize_bytes(raw: bytes, name: str) -> list[bytes]:
    """Length-prefixed elements of a BYTES tensor."""
    out, i, n = [], 0, len(raw)
    view = memoryview(raw)
    while i < n:
        if i + 4 > n:
            raise BadInputError(f"input {name!r}: BYTES data ends inside an element's length")
        (size,) = _LENGTH.unpack_from(raw, i)
        i += 4
        if i + size > n:
            raise BadInputError(f"input {name!r}: a BYTES element of {size} bytes runs past the data")
        out.append(bytes(view[i : i + size]))
        i += size
    return out


def serialize_bytes(elements: list[bytes]) -> bytes:
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


def _check_count(name: str, count: int, shape: list[int]) -> None:
    if count != math.prod(shape):
        raise BadInputError(f"input {name!r}: {count} elements for shape {shape}")


def _flatten(data: list[Any]) -> list[Any]:
    if data and isinstance(data[0], list):
        return [v for row in data for v in _flatten(row)]
    return data


def _b64(element: Any, name: str) -> bytes:
    if isinstance(element, dict) and "b64" in element:
        element = element["b64"]
    if not isinstance(element, str):
        raise BadInputError(f"input {name!r}: BYTES elements in JSON must be base64 strings")
    try:
        return base64.b64decode(element, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadInputError(f"input {name!r}: not valid base64 ({exc})") from None


# -- writing -------------------------------------------------------------------------------------------------
def http_body(
    head: dict[str, Any], outputs: list[OutputTensor], binary: list[bool]
) -> tuple[bytes, int | None]:
    """The answer's body and, when some output travels as binary data, the length of its JSON header."""
    tensors, tail = [], []
    for out, as_binary in zip(outputs, binary, strict=True):
        t: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        if as_binary:
            raw = out.raw()
            t["parameters"] = {"binary_data_size": len(raw)}
            tail.append(raw)
        else:
            t["data"] = out.json_data()
        tensors.append(t)
    header = json.dumps({**head, "outputs": tensors}, separators=(",", ":")).encode()
    if not tail:
        return header, None
    return header + b"".join(tail), len(header)


def wants_binary(flag: object) -> bool:
    """A `binary_data` / `binary_data_output` parameter: JSON true (or "true", as some clients write it)."""
    return flag is True or (isinstance(flag, str) and flag.lower() == "true")
