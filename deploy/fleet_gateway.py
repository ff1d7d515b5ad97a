#!/usr/bin/env python
"""Fleet-only TLS gateway in front of a Flower 1.41/1.42 SuperLink.

The open-source SuperLink serves the Fleet API (``/v1/fleet/...``, SuperNodes), the Control API
(``/v1/control/...``: ``flwr run``, ``flwr supernode register``, ``flwr ls``) and the Runtime API
(``/v1/runtime/...``, SuperExecs) on ONE port, and the Control API has no user authentication
outside Flower Enterprise: whoever reaches that port and trusts the CA can submit a run (code the
SuperExecs execute) or register a SuperNode key. This gateway is the only port a deployment exposes
to client hosts: it terminates TLS with the SuperLink's certificate and forwards Fleet API requests to
the SuperLink over TLS (verified against the CA). The SuperLink's own port stays on loopback / an
internal network for the operator.

    python deploy/fleet_gateway.py --upstream superlink:9093 --root-certificates ca.crt \\
        --ssl-certfile superlink.crt --ssl-keyfile superlink.key --host 0.0.0.0 --port 9092

Rules, checked on the request target **as received** (never on a decoded or normalised copy):

* ``400`` unless the target is origin-form and canonical: ``/segment/segment...`` of unreserved characters
  (``A-Z a-z 0-9 - . _ ~``), no ``.``/``..``/empty segment, no ``%`` at all (so no percent-encoded ``.``, ``/``,
  ``\\``, NUL, and no double encoding), no ``;`` parameters, no backslash; a query of ``A-Z a-z 0-9 - . _ ~ = &``
  only. Absolute-form (``GET http://host/...``), authority-form and ``*`` targets are 400, and so is any
  ``Upgrade`` request (``h2c``): the gateway speaks HTTP/1.1 only.
* ``403`` for a canonical path outside ``/v1/fleet/...`` and ``/health``; ``405`` for a method other than
  GET/HEAD/POST. Refused requests never reach the SuperLink.
* ``413`` for a body over ``--max-body-bytes`` (a ``Content-Length`` over it is refused before reading; a
  chunked body when it passes the limit). Default: Flower's array chunk size
  (``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE``, 5 MiB — Flower 1.42 sends every model in objects of at most one
  chunk, so no honest request is larger, however big the model) plus 1 MiB for a message's envelope and
  object tree; ``--model-bytes`` lowers it for models smaller than a chunk.
* ``413`` for a message whose objects together pass ``--max-message-bytes`` (default, with ``--model-bytes``:
  2 × the model, fedfuse's default reply bound ``max_reply_factor``, plus the envelope). Flower 1.42 sends a
  reply as a ``push-messages`` request declaring its object tree, then one ``push-object`` request per object
  (the SuperLink stores only declared objects); the gateway charges every object to the message that declared
  it, so a reply cannot make the SuperLink, and then the ServerApp, hold more than that. Flower itself offers
  no such cap: its SuperLink has no message-size flag (the gRPC limit is a hard-coded 2 GiB, HTTP has none).
* Bounded memory: request and response bodies are streamed through (64 KiB flow-control windows), never held;
  only ``push-messages``/``push-object`` bodies (at most ``--max-body-bytes``) are read whole to be checked.
* Never ``500``: an upstream failure is ``502``, anything unexpected is logged and answered ``502``.

Requests are forwarded with their headers (SuperNode authentication headers included: the SuperLink still
checks each node's signature), minus hop-by-hop headers. Uses only what ``flwr`` installs (httpx, uvicorn, h11).
Why not nginx/Envoy: see docs/deployment.md ("The Fleet gateway").
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from typing import Any

import httpx
import uvicorn

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

ALLOWED_PREFIXES = ("/v1/fleet/",)
ALLOWED_PATHS = ("/health",)
METHODS = ("GET", "HEAD", "POST")
CHUNK = int(os.environ.get("FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE", str(5 * 1024 * 1024)))  # Flower's own setting
ENVELOPE = 1024 * 1024
MAX_REPLY_FACTOR = 2.0  # fedfuse.validation.MAX_REPLY_FACTOR (this script runs without fedfuse)
DECLARE, CHARGE = "/v1/fleet/push-messages", "/v1/fleet/push-object"
_PATH = re.compile(rb"(?:/[A-Za-z0-9._~-]+)+")
_QUERY = re.compile(rb"[A-Za-z0-9._~=&-]*")
# Hop-by-hop headers (RFC 9110 §7.6.1) and those the gateway sets itself.
_DROP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
         "trailer", "transfer-encoding", "upgrade", "host"}  # fmt: skip
log = logging.getLogger("fleet-gateway")


def default_max_body(model_bytes: int | None = None) -> int:
    """The largest body an honest SuperNode sends: one array chunk (at most the model) plus the envelope."""
    return min(CHUNK, model_bytes if model_bytes else CHUNK) + ENVELOPE


def refusal(method: str, raw_path: bytes, query: bytes, headers: Sequence[tuple[bytes, bytes]]) -> tuple[int, str]:
    """``(status, reason)`` for a request the gateway does not forward, ``(0, "")`` for one it does."""
    if not _PATH.fullmatch(raw_path) or any(seg.strip(b".") == b"" for seg in raw_path[1:].split(b"/")):
        return 400, "the request target is not a canonical origin-form path"
    if not _QUERY.fullmatch(query):
        return 400, "the query holds characters outside A-Z a-z 0-9 - . _ ~ = &"
    if any(name.lower() == b"upgrade" for name, _ in headers):
        return 400, "protocol upgrades are not served"
    path = raw_path.decode("ascii")
    if not (path in ALLOWED_PATHS or path.startswith(ALLOWED_PREFIXES)):
        return 403, f"{path} is not served here (only the Fleet API)"
    if method not in METHODS:
        return 405, f"method {method} is not served here"
    return 0, ""


def default_max_message(model_bytes: int | None) -> int | None:
    """The largest reply (all its objects) for a model of ``model_bytes``; None (no cap) when unknown."""
    return int(MAX_REPLY_FACTOR * model_bytes) + ENVELOPE if model_bytes else None


class MessageBudget:
    """Bytes a message may still bring in, shared by the object ids its ``push-messages`` declared.

    Object ids are content hashes, declared before their ``push-object``; at most ``max_ids`` of them are
    remembered (the oldest are forgotten, so memory stays bounded; a forgotten id is forwarded unchecked, and
    the SuperLink still refuses an undeclared one)."""

    def __init__(self, max_message: int, max_ids: int = 200_000) -> None:
        self.max_message, self.max_ids = max_message, max_ids
        self.left: collections.OrderedDict[str, list[int]] = collections.OrderedDict()

    def declare(self, body: bytes) -> tuple[int, str]:
        """Register the object trees of a ``PushMessagesRequest``; ``(status, why)`` if refused, else ``(0, "")``."""
        from flwr.proto.fleet_pb2 import PushMessagesRequest

        request = PushMessagesRequest()
        try:
            request.ParseFromString(body)
        except Exception:  # noqa: BLE001 — protobuf's DecodeError and friends
            return 400, "push-messages body is not a PushMessagesRequest"
        for tree in request.message_object_trees:
            budget, todo = [self.max_message], [tree]
            while todo:
                node = todo.pop()
                self.left[node.object_id] = budget
                self.left.move_to_end(node.object_id)
                todo.extend(node.children)
        while len(self.left) > self.max_ids:
            self.left.popitem(last=False)
        return 0, ""

    def charge(self, body: bytes) -> tuple[int, str]:
        """Charge a ``PushObjectRequest`` to its message; ``(status, why)`` if refused, else ``(0, "")``."""
        from flwr.proto.message_pb2 import PushObjectRequest

        request = PushObjectRequest()
        try:
            request.ParseFromString(body)
        except Exception:  # noqa: BLE001
            return 400, "push-object body is not a PushObjectRequest"
        budget = self.left.pop(request.object_id, None)
        if budget is not None:
            budget[0] -= len(request.object_content)
            if budget[0] < 0:
                return 413, f"the message is over the gateway's limit of {self.max_message} bytes"
        return 0, ""


class TooLarge(Exception):
    """The request body passed the limit."""


class Disconnected(Exception):
    """The client went away mid-request."""


async def _answer(send: Send, status: int, text: str) -> None:
    body = f"fleet-gateway: {text}\n".encode()
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def create_app(
    upstream: str, verify: ssl.SSLContext | bool, max_body: int | None = None, max_message: int | None = None
) -> Callable[..., Any]:
    """An ASGI app forwarding canonical Fleet API requests to ``upstream`` (``https://host:port``)."""
    limit = max_body if max_body is not None else default_max_body()
    budget = MessageBudget(max_message) if max_message else None
    client = httpx.AsyncClient(
        base_url=upstream.rstrip("/"),
        verify=verify,
        timeout=httpx.Timeout(connect=10.0, read=None, write=60.0, pool=None),
    )

    async def body(receive: Receive) -> AsyncIterator[bytes]:
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise Disconnected
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                raise TooLarge
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return

    async def forward(scope: Scope, receive: Receive, send: Send) -> None:
        method, raw_path, query = scope["method"], scope.get("raw_path") or b"", scope.get("query_string", b"")
        status, reason = refusal(method, raw_path, query, scope["headers"])
        if status:
            log.warning("refused (%d) %s %r from %s: %s", status, method, raw_path[:200], scope.get("client"), reason)
            return await _answer(send, status, reason)
        names = {name.lower() for name, _ in scope["headers"]}
        length = next((v for k, v in scope["headers"] if k.lower() == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await _answer(send, 413, f"body over the gateway's limit of {limit} bytes")
        dropped = _DROP | {
            token.strip().decode("latin-1").lower()
            for k, v in scope["headers"] if k.lower() == b"connection" for token in v.split(b",")
        }  # fmt: skip
        headers = [(k, v) for k, v in scope["headers"] if k.decode("latin-1").lower() not in dropped]
        streamed = length is not None or b"transfer-encoding" in names
        started = False
        try:
            content: bytes | AsyncIterator[bytes] = body(receive) if streamed else b""
            if budget is not None and raw_path in (DECLARE.encode(), CHARGE.encode()):
                content = b"".join([chunk async for chunk in body(receive)])  # at most `limit` bytes
                status, why = (budget.declare if raw_path == DECLARE.encode() else budget.charge)(content)
                if status:
                    log.warning("refused (%d) %s from %s: %s", status, raw_path.decode(), scope.get("client"), why)
                    return await _answer(send, status, why)
            request = client.build_request(
                method,
                raw_path.decode("ascii") + (f"?{query.decode('ascii')}" if query else ""),
                headers=headers,
                content=content,
            )
            response = await client.send(request, stream=True)
            try:
                out = [(k, v) for k, v in response.headers.raw if k.decode("latin-1").lower() not in _DROP]
                await send({"type": "http.response.start", "status": response.status_code, "headers": out})
                started = True
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            finally:
                await response.aclose()
        except TooLarge:
            if not started:
                await _answer(send, 413, f"body over the gateway's limit of {limit} bytes")
        except Disconnected:
            pass
        except httpx.TransportError as exc:
            log.warning("upstream %s: %s", upstream, exc)
            if not started:
                await _answer(send, 502, "SuperLink unreachable")
        except Exception:  # noqa: BLE001 — never a 500: log it, answer 502
            log.exception("forwarding %s %r failed", method, raw_path[:200])
            if not started:
                await _answer(send, 502, "the request could not be forwarded")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await client.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        elif scope["type"] == "http":
            await forward(scope, receive, send)

    return app


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and serve the gateway with uvicorn (HTTP/1.1 through h11, no WebSocket)."""
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--upstream", required=True, help="the SuperLink's HOST:PORT, e.g. superlink:9093")
    p.add_argument("--root-certificates", help="CA certificate that signed the SuperLink's certificate")
    p.add_argument("--ssl-certfile", help="certificate the gateway serves (SANs: the name nodes dial)")
    p.add_argument("--ssl-keyfile", help="its private key")
    p.add_argument("--insecure", action="store_true", help="plain HTTP on both sides (local tests only)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=9092)
    p.add_argument("--max-body-bytes", type=int, help=f"largest request body (default {default_max_body()})")
    model_env = os.environ.get("FLEET_MODEL_BYTES", "").strip()  # compose: FLEET_MODEL_BYTES=... docker compose up
    p.add_argument(
        "--model-bytes",
        type=int,
        default=int(model_env) if model_env.isdigit() else None,
        help="the model's size in bytes (e.g. of a saved model.pt; env FLEET_MODEL_BYTES): sets the message limit",
    )
    p.add_argument("--max-message-bytes", type=int, help="largest message (default 2 × --model-bytes + 1 MiB)")
    a = p.parse_args(argv)
    for name in ("max_body_bytes", "model_bytes", "max_message_bytes"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(a, name)}: allowed: a positive number of bytes")
    if a.insecure:
        verify: ssl.SSLContext | bool = False
    else:
        if not (a.root_certificates and a.ssl_certfile and a.ssl_keyfile):
            p.error("--root-certificates, --ssl-certfile and --ssl-keyfile are required (or --insecure)")
        verify = ssl.create_default_context(cafile=a.root_certificates)
    scheme = "http" if a.insecure else "https"
    limit = a.max_body_bytes or default_max_body(a.model_bytes)
    max_message = a.max_message_bytes or default_max_message(a.model_bytes)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fleet-gateway %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per forwarded request otherwise
    log.info(
        "forwarding the Fleet API to %s; request bodies up to %d bytes, messages up to %s",
        a.upstream, limit, f"{max_message} bytes" if max_message else "any size (no --model-bytes)",
    )  # fmt: skip
    uvicorn.run(
        create_app(f"{scheme}://{a.upstream}", verify, limit, max_message),
        host=a.host,
        port=a.port,
        ssl_certfile=None if a.insecure else a.ssl_certfile,
        ssl_keyfile=None if a.insecure else a.ssl_keyfile,
        http="h11",  # strict RFC 9112 parsing; no httptools upgrade paths
        ws="none",
        lifespan="on",
        log_level="warning",
        timeout_keep_alive=30,
        server_header=False,
    )


if __name__ == "__main__":
    main()
