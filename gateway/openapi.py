"""openapi.py: the OpenAPI 3.1 document served at /openapi.json, written by hand from the routes
as built (the WebSocket protocol is described in docs/PROTOCOL.md and named here under
`x-websocket`). It owns the document only; nothing here serves a route.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]


def _obj(props: dict[str, Schema], required: tuple[str, ...] = ()) -> Schema:
    out: Schema = {"type": "object", "properties": props}
    if required:
        out["required"] = list(required)
    return out


INT, NUM, STR, BOOL = (
    {"type": "integer"},
    {"type": "number"},
    {"type": "string"},
    {"type": "boolean"},
)
STOP: Schema = {"oneOf": [STR, {"type": "array", "items": STR}]}
ERROR = _obj(
    {"error": _obj({"code": STR, "message": STR, "type": STR}, ("code", "message"))}, ("error",)
)
SAMPLING = _obj(
    {
        "max_bytes": INT,
        "temperature": NUM,
        "top_k": INT,
        "top_p": NUM,
        "seed": INT,
        "stop": {"type": "array", "items": STR},
        "ignore_eos": BOOL,
    }
)
SESSION = _obj(
    {
        "session": STR,
        "state": {"enum": ["attached", "detached"]},
        "context_bytes": INT,
        "generating": BOOL,
        "binary": BOOL,
        "namespace": {"type": ["string", "null"]},
        "created": NUM,
        "idle_s": NUM,
    },
    ("session", "state", "context_bytes", "generating"),
)
USAGE = _obj({"prompt_tokens": INT, "completion_tokens": INT, "total_tokens": INT})
COMMON = {
    "model": STR,
    "max_tokens": INT,
    "temperature": NUM,
    "top_p": NUM,
    "top_k": INT,
    "seed": INT,
    "stop": STOP,
    "ignore_eos": BOOL,
    "stream": BOOL,
    "stream_options": _obj({"include_usage": BOOL}),
    "n": {"const": 1},
}
COMPLETION_REQ = _obj(
    {
        "prompt": {"oneOf": [STR, {"type": "array", "items": STR, "maxItems": 1}]},
        "echo": BOOL,
        **COMMON,
    }
)
CHAT_REQ = _obj(
    {
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": _obj(
                {"role": STR, "content": {"type": ["string", "array", "null"]}}, ("role",)
            ),
        },
        "max_completion_tokens": INT,
        **COMMON,
    },
    ("messages",),
)
COMPLETION = _obj(
    {
        "id": STR,
        "object": {"const": "text_completion"},
        "created": INT,
        "model": STR,
        "usage": USAGE,
        "choices": {
            "type": "array",
            "items": _obj({"index": INT, "text": STR, "finish_reason": STR}),
        },
    }
)
CHAT = _obj(
    {
        "id": STR,
        "object": {"const": "chat.completion"},
        "created": INT,
        "model": STR,
        "usage": USAGE,
        "choices": {
            "type": "array",
            "items": _obj(
                {"index": INT, "message": _obj({"role": STR, "content": STR}), "finish_reason": STR}
            ),
        },
    }
)


def _json(schema: Schema, description: str = "OK") -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Schema]:
    return {str(c): _json(ERROR, "error") for c in codes}


def _op(
    summary: str,
    ok: Schema,
    *errors: int,
    body: Schema | None = None,
    status: str = "200",
    sse: bool = False,
) -> Schema:
    responses: dict[str, Schema] = {status: ok, **_errors(*errors)}
    if sse:
        responses[status] = {
            **ok,
            "content": {**ok["content"], "text/event-stream": {"schema": STR}},
        }
    op: Schema = {"summary": summary, "responses": responses}
    if body is not None:
        op["requestBody"] = {"required": False, "content": {"application/json": {"schema": body}}}
    return op


SID = {"name": "sid", "in": "path", "required": True, "schema": STR}
TOKEN = [
    {"name": "X-Session-Token", "in": "header", "required": False, "schema": STR},
    {"name": "token", "in": "query", "required": False, "schema": STR},
]


def document(version: str) -> Schema:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "BWR-DNC gateway",
            "version": version,
            "description": "Streaming byte-level LM sessions; the WebSocket protocol is in "
            "docs/PROTOCOL.md.",
        },
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": {
            "/healthz": {"get": {**_op("Liveness", _json(_obj({"ok": BOOL}))), "security": []}},
            "/readyz": {
                "get": {
                    **_op(
                        "Readiness: engine running, not draining, NATS state",
                        _json(
                            _obj(
                                {
                                    "ready": BOOL,
                                    "engine": BOOL,
                                    "closing": BOOL,
                                    "nats": {"enum": ["off", "connected", "disconnected"]},
                                }
                            )
                        ),
                        503,
                    ),
                    "security": [],
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {"200": {"description": "text exposition"}},
                }
            },
            "/v1/events": {
                "get": {
                    "summary": "The page's event feed: engine summaries and session events (SSE)",
                    "responses": {"200": {"content": {"text/event-stream": {"schema": STR}}}},
                }
            },
            "/v1/info": {
                "get": _op(
                    "Version, model, device, NATS URL, weights version",
                    _json(
                        _obj(
                            {
                                "version": STR,
                                "model": STR,
                                "device": STR,
                                "nats_url": {"type": ["string", "null"]},
                                "weights_version": INT,
                            }
                        )
                    ),
                    401,
                )
            },
            "/v1/training": {
                "get": _op(
                    "The trainer's recent reports from events.train (step, loss, bytes/s), oldest "
                    "first; ?since=STEP for later ones",
                    _json(
                        _obj(
                            {
                                "reports": {"type": "array", "items": {"type": "object"}},
                                "weights_version": INT,
                            }
                        )
                    ),
                    400,
                    401,
                )
            },
            "/v1/sessions": {
                "post": _op(
                    "Create a session (detached until a WebSocket attaches) -> its id and token",
                    _json(
                        _obj({"session": STR, "token": STR, "stream": STR}, ("session", "token")),
                        "created",
                    ),
                    400,
                    401,
                    413,
                    429,
                    503,
                    body=_obj({"binary": BOOL, "namespace": STR, "sampling": SAMPLING}),
                    status="201",
                ),
                "get": _op(
                    "The caller's live sessions",
                    _json(_obj({"sessions": {"type": "array", "items": SESSION}})),
                    401,
                ),
            },
            "/v1/sessions/{sid}": {
                "parameters": [SID, *TOKEN],
                "get": _op(
                    "One session (its token, or the key that created it)",
                    _json(SESSION),
                    401,
                    403,
                    404,
                ),
                "delete": _op(
                    "Close a session",
                    _json(_obj({"session": STR, "closed": BOOL, "context_bytes": INT})),
                    401,
                    403,
                    404,
                ),
            },
            "/v1/sessions/{sid}/memory": {
                "parameters": [SID, *TOKEN],
                "get": _op(
                    "Context, state and memory bytes, memory levels",
                    _json(
                        _obj(
                            {
                                "session": STR,
                                "context_bytes": INT,
                                "state_bytes": INT,
                                "memory_bytes": INT,
                                "total_bytes": INT,
                                "levels": {"type": "array", "items": {"type": "object"}},
                                "version": INT,
                                "last_read": _obj(
                                    {
                                        "at": INT,
                                        "heads": INT,
                                        "k": INT,
                                        "null": INT,
                                        "slots": {"type": "array", "items": {"type": "object"}},
                                        "earlier_version": BOOL,
                                    }
                                ),
                            }
                        )
                    ),
                    401,
                    403,
                    404,
                ),
            },
            "/v1/namespaces/{ns}": {
                "parameters": [
                    {
                        "name": "ns",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,128}$"},
                    }
                ],
                "get": _op(
                    "Documents and bytes ingested into a namespace",
                    _json(_obj({"namespace": STR, "documents": INT, "bytes": INT})),
                    400,
                    401,
                ),
            },
            "/v1/completions": {
                "post": _op(
                    "OpenAI-style completion (stream: SSE chunks, then [DONE])",
                    _json(COMPLETION),
                    400,
                    401,
                    413,
                    429,
                    503,
                    body=COMPLETION_REQ,
                    sse=True,
                )
            },
            "/v1/chat/completions": {
                "post": _op(
                    "OpenAI-style chat completion (stream: SSE chunks, then [DONE])",
                    _json(CHAT),
                    400,
                    401,
                    413,
                    429,
                    503,
                    body=CHAT_REQ,
                    sse=True,
                )
            },
        },
        "x-websocket": {
            "/v1/stream": "a new session; client frames auth, open, input, cancel, close",
            "/v1/sessions/{sid}/stream": "open or resume a session with its token"
            " (?token=, X-Session-Token, or open.token)",
            "server_frames": ["opened", "delta", "done", "memory", "error"],
        },
    }
