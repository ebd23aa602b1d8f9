"""The Open Inference Protocol's body as clients send it: JSON under any content type (or none), and Triton's
binary tensor data extension, in and out; malformed binary data gets a 400 that says what is wrong."""

from __future__ import annotations

import json
import struct
from typing import Any

import httpx
import numpy as np
import pytest

from mone.server.http.oip_tensors import deserialize_bytes, serialize_bytes
from tests.support.media import fashion_images, png

pytestmark = pytest.mark.anyio
URL = "/v2/models/mone/infer"


def binary_request(
    head: dict[str, Any], tail: bytes, length: int | None = None
) -> tuple[bytes, dict[str, str]]:
    header = json.dumps(head).encode()
    headers = {"Inference-Header-Content-Length": str(len(header) if length is None else length)}
    return header + tail, headers


def split_answer(r: httpx.Response) -> tuple[dict[str, Any], bytes]:
    n = int(r.headers["inference-header-content-length"])
    head: dict[str, Any] = json.loads(r.content[:n])
    return head, r.content[n:]


def test_bytes_serialisation_round_trips() -> None:
    elements = [b"", b"abc", bytes(range(256)) * 3]
    raw = serialize_bytes(elements)
    assert raw[:4] == struct.pack("<I", 0)
    assert deserialize_bytes(raw, "x") == elements


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/octet-stream"])
async def test_json_body_whatever_the_content_type(
    client: httpx.AsyncClient, content_type: str | None
) -> None:
    body = {
        "inputs": [{"name": "pixels", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.1] * 784}],
        "parameters": {"capacity": 0.5, "binary_data_output": False},
    }
    headers = {"content-type": content_type} if content_type else {}
    r = await client.post(URL, content=json.dumps(body).encode(), headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    assert {o["name"] for o in r.json()["outputs"]} == {"logits", "label", "capacity", "gflops"}


async def test_binary_in_and_out_equals_json(client: httpx.AsyncClient) -> None:
    image = png(fashion_images(1)[0])
    x = np.random.default_rng(1).standard_normal((1, 1, 28, 28)).astype(np.float32)
    inputs = [
        {
            "name": "input",
            "shape": [1],
            "datatype": "BYTES",
            "parameters": {"binary_data_size": len(image) + 4},
        },
        {
            "name": "pixels",
            "shape": [1, 1, 28, 28],
            "datatype": "FP32",
            "parameters": {"binary_data_size": 3136},
        },
    ]
    head = {"inputs": inputs, "parameters": {"capacity": 0.25, "binary_data_output": True}, "id": "b1"}
    content, headers = binary_request(head, serialize_bytes([image]) + x.tobytes())
    r = await client.post(URL, content=content, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    answer, tail = split_answer(r)
    assert answer["id"] == "b1"
    offsets, values = 0, {}
    for o in answer["outputs"]:
        size = o["parameters"]["binary_data_size"]
        values[o["name"]] = tail[offsets : offsets + size]
        offsets += size
    assert offsets == len(tail)
    logits = np.frombuffer(values["logits"], "<f4").reshape(2, 10)
    labels = [e.decode() for e in deserialize_bytes(values["label"], "label")]

    import base64

    as_json = {
        "inputs": [
            {"name": "input", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(image).decode()]},
            {"name": "pixels", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": x.ravel().tolist()},
        ],
        "parameters": {"capacity": 0.25},
    }
    want = {o["name"]: o for o in (await client.post(URL, json=as_json)).json()["outputs"]}
    np.testing.assert_allclose(logits.ravel(), want["logits"]["data"], rtol=1e-5, atol=1e-5)
    assert labels == want["label"]["data"]


async def test_outputs_choose_binary_one_by_one(client: httpx.AsyncClient) -> None:
    image = png(fashion_images(1)[0])
    inputs = [
        {
            "name": "input",
            "shape": [1],
            "datatype": "BYTES",
            "parameters": {"binary_data_size": len(image) + 4},
        }
    ]
    outputs = [
        {"name": "label", "parameters": {"binary_data": False}},
        {"name": "gflops", "parameters": {"binary_data": True}},
    ]
    content, headers = binary_request({"inputs": inputs, "outputs": outputs}, serialize_bytes([image]))
    r = await client.post(URL, content=content, headers=headers)
    assert r.status_code == 200, r.text
    answer, tail = split_answer(r)
    out = {o["name"]: o for o in answer["outputs"]}
    assert set(out) == {"label", "gflops"}
    assert isinstance(out["label"]["data"][0], str)
    assert "data" not in out["gflops"]
    assert out["gflops"]["parameters"]["binary_data_size"] == 4 == len(tail)
    assert np.frombuffer(tail, "<f4")[0] == pytest.approx(answer["parameters"]["gflops"], rel=1e-6)


def _bytes_input(size: int) -> dict[str, Any]:
    return {"name": "input", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": size}}


@pytest.mark.parametrize(
    ("inputs", "tail", "length", "message"),
    [
        ([_bytes_input(10)], b"\0" * 4, None, "runs past the end"),
        ([_bytes_input(4)], b"\0" * 8, None, "after the last input"),
        ([_bytes_input(8)], struct.pack("<I", 100) + b"abcd", None, "runs past the data"),
        ([_bytes_input(2)], b"ab", None, "inside an element's length"),
        ([_bytes_input(-1)], b"", None, "non-negative integer"),
        ([{**_bytes_input(4), "data": ["x"]}], b"\0" * 4, None, "not both"),
        (
            [
                {
                    "name": "pixels",
                    "shape": [1, 1, 28, 28],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 8},
                }
            ],
            b"\0" * 8,
            None,
            "bytes of FP32 data",
        ),
        ([{"name": "input", "shape": [1], "datatype": "BYTES"}], b"", None, "no data"),
        ([_bytes_input(4)], b"\0" * 4, 10**6, "Inference-Header-Content-Length"),
    ],
)
async def test_malformed_binary_data_is_400(
    client: httpx.AsyncClient, inputs: list[dict[str, Any]], tail: bytes, length: int | None, message: str
) -> None:
    content, headers = binary_request({"inputs": inputs}, tail, length)
    r = await client.post(URL, content=content, headers=headers)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]


async def test_unknown_output_and_bad_header_are_4xx(client: httpx.AsyncClient) -> None:
    body = {
        "inputs": [{"name": "input", "shape": [1], "datatype": "BYTES", "data": ["eA=="]}],
        "outputs": [{"name": "nope"}],
    }
    r = await client.post(URL, json=body)
    assert r.status_code == 400
    assert "no output named 'nope'" in r.json()["error"]
    r = await client.post(URL, content=b"{", headers={"Inference-Header-Content-Length": "abc"})
    assert r.status_code == 400
    assert "must be an integer" in r.json()["error"]
    r = await client.post(URL, content=b"{not json")
    assert r.status_code == 422
    assert r.json()["code"] == "validation_error"
