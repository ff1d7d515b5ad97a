"""The Fleet-only gateway (deploy/fleet_gateway.py) as deployed: its own process on loopback, raw HTTP/1.1 request
lines sent over a socket (no client-side normalisation, as an attacker sends them), a recording upstream stub."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 1_000_000
MESSAGE = 3_000


class Upstream:
    """A stand-in SuperLink: records (method, raw target, body length) of every request that reaches it."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bytes, int]] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        size = 0
        while True:
            message = await receive()
            size += len(message.get("body", b""))  # counted, never kept
            if not message.get("more_body"):
                break
        target = scope["raw_path"] + (b"?" + scope["query_string"] if scope["query_string"] else b"")
        self.seen.append((scope["method"], target, size))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"gateway exited: {proc.stdout.read()}")
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


@pytest.fixture(scope="module")
def gateway() -> Iterator[tuple[int, Upstream, subprocess.Popen]]:
    stub, up_port, gw_port = Upstream(), _free_port(), _free_port()
    server = uvicorn.Server(uvicorn.Config(stub, host="127.0.0.1", port=up_port, log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "deploy" / "fleet_gateway.py"), "--insecure", "--upstream", f"127.0.0.1:{up_port}",
         "--host", "127.0.0.1", "--port", str(gw_port), "--max-body-bytes", str(LIMIT),
         "--max-message-bytes", str(MESSAGE)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        _wait_port(up_port)
        _wait_port(gw_port, proc)
        yield gw_port, stub, proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        server.should_exit = True
        thread.join(timeout=10)


def _raw(port: int, head: bytes, body: bytes = b"") -> int:
    """Send ``head`` (request line + headers, CRLF-terminated) and ``body``; the response's status code."""
    with socket.create_connection(("127.0.0.1", port), 10) as s:
        s.sendall(head + b"\r\n" + body)
        reply = b""
        while b"\r\n" not in reply:
            data = s.recv(4096)
            if not data:
                break
            reply += data
    return int(reply.split(b" ", 2)[1])


def _post(target: bytes, extra: bytes = b"") -> bytes:
    return b"POST " + target + b" HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n" + extra


SPELLINGS = [
    # dot segments, raw and percent-encoded (once and twice), any case
    b"/v1/fleet/../control/start-run", b"/v1/fleet/./../control/start-run", b"/v1/fleet/%2e%2e/control/start-run",
    b"/v1/fleet/%2E%2E/control/list-runs", b"/v1/fleet/%252e%252e/control/start-run", b"/v1/fleet/..%2fcontrol/x",
    b"/v1/fleet/..%252fcontrol/start-run", b"/v1/fleet/%2e/push-object", b"/v1/fleet/.../push-object",
    # encoded or raw separators, empty segments, parameters, NUL
    b"/v1/fleet%2fpush-object", b"/v1/fleet/push-object%2F", b"/v1/fleet//../../v1/control/x", b"/v1//fleet/x",
    b"/v1/fleet\\..\\control", b"/v1/fleet/%5c..%5ccontrol", b"/v1/fleet/..;/control/start-run",
    b"/v1/fleet/push-object;x=1", b"/v1/fleet/push-object%3bx=1", b"/v1/fleet/push-object%00", b"/v1/fleet/%00/x",
    b"/v1/fleet/", b"/v1/fleet/push-object/", b"/v1/fleet/push object",
    # not origin-form
    b"http://superlink:9093/v1/control/start-run", b"https://gw/v1/fleet/push-object", b"//gw/v1/fleet/x", b"*",
    b"superlink:9093", b"v1/fleet/push-object",
    # a query outside the allowed characters
    b"/v1/fleet/push-object?a=%00", b"/v1/fleet/push-object?x=../../control", b"/v1/fleet/push-object?a;b",
]  # fmt: skip


@pytest.mark.parametrize(
    ("request_head", "status"),
    [(_post(t), 400) for t in SPELLINGS]
    + [
        (_post(b"/v1/control/start-run"), 403),
        (_post(b"/v1/runtime/pull-messages"), 403),
        (_post(b"/health/../v1/control/start-run"), 400),
        (b"PUT /v1/fleet/push-object HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n", 405),
        (b"CONNECT superlink:9093 HTTP/1.1\r\nHost: superlink:9093\r\n", 400),
        (b"OPTIONS * HTTP/1.1\r\nHost: gw\r\n", 400),
        (_post(b"/v1/fleet/push-object", b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"), 400),
        (_post(b"/v1/fleet/push-object", b"Upgrade: websocket\r\n"), 400),
        (b"POST /v1/fleet/push-object\x00 HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n", 400),  # raw NUL
        (b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\nContent-Length: 3\r\n", 400),
        (b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: gw\r\nContent-Length: -1\r\n", 400),
        (b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: gw\r\n" + b"Content-Length: %d\r\n" % (LIMIT + 1), 413),
    ],
)
def test_only_canonical_fleet_requests_reach_the_superlink(gateway, request_head: bytes, status: int) -> None:
    """A refused request is answered 400/403/405/413 (never 500) and nothing reaches the upstream; a canonical
    Fleet API request on the same gateway is forwarded exactly as sent."""
    port, stub, proc = gateway
    stub.seen.clear()
    assert _raw(port, request_head, b"{}") == status, request_head
    assert stub.seen == [], (request_head, stub.seen)
    assert _raw(port, _post(b"/v1/fleet/pull-messages?run=1&x=y"), b"{}") == 200
    assert stub.seen == [("POST", b"/v1/fleet/pull-messages?run=1&x=y", 2)]
    assert proc.poll() is None


def test_a_message_is_capped_across_its_objects(gateway) -> None:
    """Flower 1.42 declares a reply's object tree (push-messages), then pushes each object (push-object): the
    gateway charges every object to its message and refuses the one that takes it past --max-message-bytes."""
    from flwr.proto.fleet_pb2 import PushMessagesRequest
    from flwr.proto.message_pb2 import ObjectTree, PushObjectRequest

    port, stub, _ = gateway
    stub.seen.clear()

    def post(path: bytes, body: bytes) -> int:
        return _raw(port, b"POST %s HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n" % (path, len(body)), body)

    tree = ObjectTree(object_id="m", children=[ObjectTree(object_id="a"), ObjectTree(object_id="b")])
    declared = PushMessagesRequest(message_object_trees=[tree]).SerializeToString()
    push = [PushObjectRequest(object_id=o, object_content=b"x" * 1_400).SerializeToString() for o in "abm"]
    assert post(b"/v1/fleet/push-messages", declared) == 200
    assert post(b"/v1/fleet/push-object", push[0]) == 200  # 1,400 of 3,000
    assert post(b"/v1/fleet/push-object", push[1]) == 200  # 2,800
    assert post(b"/v1/fleet/push-object", push[2]) == 413  # 4,200 > 3,000: never reaches the SuperLink
    assert [size for _, _, size in stub.seen] == [len(declared), len(push[0]), len(push[1])]
    undeclared = PushObjectRequest(object_id="z", object_content=b"x" * 5_000).SerializeToString()
    assert post(b"/v1/fleet/push-object", undeclared) == 200  # the SuperLink stores declared objects only
    assert post(b"/v1/fleet/push-object", b"\xff" * 10) == 400
    assert post(b"/v1/fleet/push-messages", b"\xff" * 10) == 400


def _vm_hwm(pid: int) -> int:
    """Peak resident memory of ``pid`` in bytes (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the gateway's peak memory from /proc")
def test_bodies_are_limited_and_streamed_with_bounded_memory(tmp_path) -> None:
    """A chunked body over the limit is cut off with 413 (Content-Length over it: the parametrized case above); a
    64 MB body under a 100 MB limit passes through whole while the gateway's peak memory grows < 16 MB."""
    stub, up_port, gw_port = Upstream(), _free_port(), _free_port()
    server = uvicorn.Server(uvicorn.Config(stub, host="127.0.0.1", port=up_port, log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "deploy" / "fleet_gateway.py"), "--insecure", "--upstream", f"127.0.0.1:{up_port}",
         "--host", "127.0.0.1", "--port", str(gw_port), "--max-body-bytes", str(100_000_000)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        _wait_port(up_port)
        _wait_port(gw_port, proc)
        assert _raw(gw_port, _post(b"/v1/fleet/push-object"), b"{}") == 200  # warmed up: imports, first request
        before = _vm_hwm(proc.pid)

        async def send_chunked(total: int) -> int:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw_port)
            head = b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
            writer.write(head)
            piece = b"x" * (1 << 20)
            try:
                for _ in range(total >> 20):
                    writer.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
                await writer.drain()
            except ConnectionError:  # cut off by a 413
                pass
            line = await reader.readline()
            writer.close()
            return int(line.split(b" ", 2)[1])

        stub.seen.clear()
        assert asyncio.run(send_chunked(64 << 20)) == 200
        assert stub.seen == [("POST", b"/v1/fleet/push-object", 64 << 20)]
        grew = _vm_hwm(proc.pid) - before
        print(f"gateway peak memory: {before >> 20} MB before, +{grew / 2**20:.1f} MB for a 64 MB body")
        assert grew < 16 << 20, f"the gateway's peak memory grew {grew >> 20} MB for a 64 MB body"
        stub.seen.clear()
        assert asyncio.run(send_chunked(101 << 20)) == 413
        assert not any(size > 100_000_000 for _, _, size in stub.seen)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        server.should_exit = True
        thread.join(timeout=10)


def test_the_default_limit_follows_flowers_chunk_size_and_the_model() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("fleet_gateway", ROOT / "deploy" / "fleet_gateway.py")
    gw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gw)  # type: ignore[union-attr]
    from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE

    assert gw.CHUNK == FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
    assert gw.default_max_body() == FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE + gw.ENVELOPE
    assert gw.default_max_body(model_bytes=40_000) == 40_000 + gw.ENVELOPE
    assert gw.default_max_body(model_bytes=10**10) == gw.default_max_body()
