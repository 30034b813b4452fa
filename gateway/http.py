"""http.py serves the plain HTTP API: sessions (create, list, get, delete), a session's memory,
namespaces, info, health and readiness probes, Prometheus metrics, and the OpenAPI document
(web.py serves the page at `/`).

Every error is JSON `{"error": {"code", "message", "type"}}` with the same codes as the WebSocket
protocol. http.py never streams (ws.py and openai.py do) and never reads the environment.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from engine import EngineError, UnknownSession
from gateway.metrics import CONTENT_TYPE, exposition
from gateway.openapi import document
from gateway.protocol import ErrorCode, ProtocolError, check_name, decode_create, to_params
from gateway.sessions import Entry, Unauthorized

if TYPE_CHECKING:
    from gateway.app import Gateway

STATUS = {
    "bad_json": 400,
    "invalid_utf8": 400,
    "unknown_type": 400,
    "invalid_frame": 400,
    "invalid_base64": 400,
    "invalid_request": 400,
    "frame_too_large": 413,
    "input_too_large": 413,
    "wrong_state": 409,
    "busy": 429,
    "unknown_session": 404,
    "session_closed": 404,
    "unauthorized": 401,
    "forbidden": 403,
    "shutting_down": 503,
    "not_found": 404,
    "method_not_allowed": 405,
    "internal": 500,
}
KINDS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(status: int, code: str, message: str) -> Response:
    return JSON(
        {"error": {"code": code, "message": message, "type": KINDS.get(status, "server_error")}},
        status_code=status,
    )


def gateway(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


def fail(request: Request, code: str, message: str, status: int | None = None) -> Response:
    gateway(request).stats.error(code)
    return error_response(status or STATUS.get(code, 400), code, message)


def fail_engine(request: Request, e: EngineError) -> Response:
    if isinstance(e, Unauthorized):
        return fail(request, "forbidden", str(e), 403)
    return fail(request, e.code, str(e))


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than limit bytes before reading them all."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ProtocolError(
            ErrorCode.FRAME_TOO_LARGE, f"body of {declared} bytes; the limit is {limit}"
        )
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise ProtocolError(ErrorCode.FRAME_TOO_LARGE, f"body over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def owner(request: Request) -> str:
    return str(request.scope.get("bwr.owner", "anonymous"))


def session_token(request: Request) -> str | None:
    return request.headers.get("x-session-token") or request.query_params.get("token")


# ----- pages and probes -----


async def healthz(request: Request) -> Response:
    return JSON({"ok": True})


async def readyz(request: Request) -> Response:
    ready, detail = gateway(request).readiness()
    return JSON(detail, status_code=200 if ready else 503)


async def metrics(request: Request) -> Response:
    return Response(exposition(gateway(request).prometheus), media_type=CONTENT_TYPE)


async def openapi(request: Request) -> Response:
    return JSON(document(gateway(request).info.get("version", "0")))


async def info(request: Request) -> Response:
    gw = gateway(request)
    m = gw.engine.metrics
    return JSON(
        {
            **gw.info,
            "weights_version": m.weights_version,
            "nats_url": gw.config.nats_url,
            "nats": gw.readiness()[1]["nats"],
            "max_sessions": gw.config.max_sessions,
            "sessions": len(gw.registry.entries),
            "state_bytes_per_session": gw.model.state_bytes_per_row(),
            "detach_timeout_s": gw.config.detach_timeout_s,
            "uptime_s": round(time.time() - gw.started_at, 3),
        }
    )


async def training(request: Request) -> Response:
    """The trainer's recent reports on the bus (`events.train`: step, loss, bytes/s, ...), oldest
    first, for a loss curve; `[]` without a bus or a trainer. `?since=STEP` keeps later steps."""
    gw = gateway(request)
    try:
        since = int(request.query_params.get("since", "-1"))
    except ValueError:
        return fail(request, ErrorCode.INVALID_FRAME.value, "since must be an integer step")
    reports = [] if gw.events is None else [r for r in gw.events.training if r["step"] > since]
    return JSON({"reports": reports, "weights_version": gw.engine.metrics.weights_version})


# ----- sessions -----


async def create_session(request: Request) -> Response:
    gw = gateway(request)
    try:
        req = decode_create(await read_body(request, gw.config.max_frame_bytes))
        if req.sampling is not None:
            c = gw.config
            to_params(
                req.sampling,
                None,
                max_bytes=c.default_max_bytes,
                temperature=c.default_temperature,
                top_k=c.default_top_k,
                top_p=c.default_top_p,
                max_output=c.max_output_bytes,
                max_stop=c.max_stop,
                max_stop_bytes=c.max_stop_bytes,
            )
        entry, token = gw.registry.create(
            owner(request), binary=req.binary, namespace=req.namespace, defaults=req.sampling
        )
    except ProtocolError as e:
        return fail(request, e.code.value, e.message)
    except EngineError as e:
        return fail_engine(request, e)
    except ClientDisconnect:
        return Response(status_code=400)
    gw.session_opened(entry)
    sid = entry.id
    return JSON(
        {
            "session": sid,
            "token": token,
            "stream": f"/v1/sessions/{sid}/stream",
            "detach_timeout_s": gw.config.detach_timeout_s,
            **entry.describe(),
        },
        status_code=201,
    )


async def list_sessions(request: Request) -> Response:
    return JSON({"sessions": gateway(request).registry.listing(owner(request))})


def _entry(request: Request) -> Entry | Response:
    """The session named in the path, for its token or its owner; else the error response."""
    try:
        return gateway(request).registry.lookup(
            request.path_params["sid"], session_token(request), owner(request)
        )
    except EngineError as e:
        return fail_engine(request, e)


async def get_session(request: Request) -> Response:
    gw = gateway(request)
    entry = _entry(request)
    if isinstance(entry, Response):
        return entry
    return JSON({**entry.describe(), "memory_version": gw.engine.memory_versions.get(entry.id, 0)})


async def delete_session(request: Request) -> Response:
    gw = gateway(request)
    entry = _entry(request)
    if isinstance(entry, Response):
        return entry
    context = entry.session.context_bytes
    await gw.registry.close(entry, "deleted")
    return JSON({"session": entry.id, "closed": True, "context_bytes": context})


async def session_memory(request: Request) -> Response:
    """State bytes (fixed per session) plus memory bytes; levels from the memory inspector."""
    gw = gateway(request)
    entry = _entry(request)
    if isinstance(entry, Response):
        return entry
    state_bytes = gw.model.state_bytes_per_row()
    out: dict[str, Any] = {
        "session": entry.id,
        "context_bytes": entry.session.context_bytes,
        "state_bytes": state_bytes,
        "memory_bytes": 0,
        "levels": [],
        "version": gw.engine.memory_versions.get(entry.id, 0),
        "memory": "off" if gw.hooks.memory is None else "on",
    }
    if gw.hooks.memory is not None:
        try:
            detail = await gw.hooks.memory.inspect(entry.id)
        except Exception as e:  # the memory system is optional: report, keep serving
            out["memory_error"] = f"{type(e).__name__}: {e}"[:300]
        else:
            out.update({k: v for k, v in detail.items() if k != "session"})
    if out["memory"] == "on":
        with contextlib.suppress(UnknownSession):  # closed since the lookup: no last read
            out["last_read"] = await gw.engine.last_read(entry.id)
    memory_bytes = out.get("memory_bytes", 0)
    out["total_bytes"] = state_bytes + (memory_bytes if isinstance(memory_bytes, int) else 0)
    return JSON(out)


async def namespace(request: Request) -> Response:
    gw = gateway(request)
    try:
        name = check_name(request.path_params["ns"], "namespace")
    except ProtocolError as e:
        return fail(request, e.code.value, e.message)
    out: dict[str, Any] = {"namespace": name, "documents": 0, "bytes": 0, "ingest": "off"}
    if gw.hooks.namespaces is not None:
        out["ingest"] = "on"
        try:
            out.update(await gw.hooks.namespaces.namespace(name))
        except Exception as e:
            out["ingest_error"] = f"{type(e).__name__}: {e}"[:300]
    return JSON(out)
