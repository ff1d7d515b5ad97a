#!/usr/bin/env python
"""Fleet-only TLS gateway in front of a Flower 1.41/1.42 SuperLink.

The open-source SuperLink serves the Fleet API (``/v1/fleet/...``, SuperNodes), the Control API
(``/v1/control/...``: ``flwr run``, ``flwr supernode register``, ``flwr ls``) and the Runtime API
(``/v1/runtime/...``, SuperExecs) on ONE port, and the Control API has no user authentication
outside Flower Enterprise: whoever reaches that port and trusts the CA can submit a run (code the
SuperExecs execute) or register a SuperNode key. This gateway is the only port a deployment exposes
to client hosts: it terminates TLS with the SuperLink's certificate and forwards requests whose path
starts with ``/v1/fleet/`` (and ``/health``) to the SuperLink over TLS (verified against the CA);
every other path is answered ``403`` without reaching the SuperLink. The SuperLink's own port stays
on loopback / an internal network for the operator.

    python deploy/fleet_gateway.py --upstream superlink:9093 --root-certificates ca.crt \\
        --ssl-certfile superlink.crt --ssl-keyfile superlink.key --host 0.0.0.0 --port 9092

Requests are forwarded as received (SuperNode authentication headers included: the SuperLink still
checks each node's signature); responses are streamed back. Uses only what ``flwr`` installs
(starlette, httpx, uvicorn).
"""

from __future__ import annotations

import argparse
import logging
import posixpath
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

ALLOWED_PREFIXES = ("/v1/fleet/",)
ALLOWED_PATHS = ("/health",)
# Hop-by-hop headers (RFC 9110 §7.6.1) and those the gateway sets itself.
_DROP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
}
log = logging.getLogger("fleet-gateway")


def allowed(path: str) -> bool:
    """True for the paths the gateway forwards: the Fleet API and the health probe, in canonical form only.

    ``path`` is the percent-decoded request path. A path with ``.``/``..`` or empty segments or a backslash is
    refused: HTTP clients (httpx included) remove dot segments when sending, so ``/v1/fleet/../control/...``
    would pass a prefix check here and reach the Control API upstream. What is checked is what is forwarded.
    """
    if "\\" in path or "//" in path or posixpath.normpath(path) != path:
        return False
    return path in ALLOWED_PATHS or any(path.startswith(p) for p in ALLOWED_PREFIXES)


def create_app(upstream: str, verify: ssl.SSLContext | bool) -> Starlette:
    """An ASGI app forwarding allowed paths to ``upstream`` (a base URL, ``https://host:port``)."""
    client = httpx.AsyncClient(
        base_url=upstream.rstrip("/"),
        verify=verify,
        timeout=httpx.Timeout(connect=10.0, read=None, write=60.0, pool=None),
    )

    async def forward(request: Request) -> Response:
        path = request.url.path
        if not allowed(path):
            log.warning("refused %s %s from %s", request.method, path, request.client)
            return PlainTextResponse(
                f"fleet-gateway: {path} is not served here (only the Fleet API)\n", status_code=403
            )
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _DROP]
        upstream_request = client.build_request(
            request.method,
            path + (f"?{request.url.query}" if request.url.query else ""),
            headers=headers,
            content=await request.body(),
        )
        try:
            upstream_response = await client.send(upstream_request, stream=True)
        except httpx.TransportError as exc:
            log.warning("upstream %s unreachable: %s", upstream, exc)
            return PlainTextResponse("fleet-gateway: SuperLink unreachable\n", status_code=502)
        out_headers = {k: v for k, v in upstream_response.headers.items() if k.lower() not in _DROP}
        return StreamingResponse(
            upstream_response.aiter_raw(),
            status_code=upstream_response.status_code,
            headers=out_headers,
            background=BackgroundTask(upstream_response.aclose),
        )

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)], lifespan=lifespan)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and serve the gateway with uvicorn."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--upstream", required=True, help="the SuperLink's HOST:PORT, e.g. superlink:9093")
    p.add_argument("--root-certificates", help="CA certificate that signed the SuperLink's certificate")
    p.add_argument("--ssl-certfile", help="certificate the gateway serves (SANs: the name nodes dial)")
    p.add_argument("--ssl-keyfile", help="its private key")
    p.add_argument("--insecure", action="store_true", help="plain HTTP on both sides (local tests only)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=9092)
    a = p.parse_args(argv)
    if a.insecure:
        verify: ssl.SSLContext | bool = False
    else:
        if not (a.root_certificates and a.ssl_certfile and a.ssl_keyfile):
            p.error("--root-certificates, --ssl-certfile and --ssl-keyfile are required (or --insecure)")
        verify = ssl.create_default_context(cafile=a.root_certificates)
    scheme = "http" if a.insecure else "https"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fleet-gateway %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per forwarded request otherwise
    uvicorn.run(
        create_app(f"{scheme}://{a.upstream}", verify),
        host=a.host,
        port=a.port,
        ssl_certfile=None if a.insecure else a.ssl_certfile,
        ssl_keyfile=None if a.insecure else a.ssl_keyfile,
        log_level="warning",
        timeout_keep_alive=30,
    )


if __name__ == "__main__":
    main()
