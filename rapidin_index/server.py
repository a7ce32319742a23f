"""The serving stage: one opened `Index` behind a small JSON API and a page at ``/``.

``rapidin-index serve`` opens the index and its model once (`retrieval.Index.open`) and answers over HTTP
until stopped, so a query costs its gradients and search, not a model load. docs/serve-api.md is the
reference:

* ``POST /api/query``   one query ``{prompt, response | generate, ...}`` or several ``{queries: [rows]}``;
  the answer is the CLI's result schema (docs/query-result-schema.md), ``{"results": [...]}`` for several.
* ``GET /api/info``     the manifest's summary and this server's caps (`Limits`).
* ``GET /api/rows/ID``  one training row's text and source.
* ``GET /``             the page (rapidin_index/assets/serve.html, drawn with the HTML report's styles).

A request that would run unbounded is refused before any work, with a 4xx ``{"error": message}``
(`server_requests` checks the fields and `Limits`); a typed library error answers 422 with its one-line
message; a bug answers 500 with no traceback (that goes to the server's log). One log line per request.
Queries run one at a time in a worker thread (the model's gradient hooks are shared state), so the page
and ``/api/info`` stay responsive while one runs.
"""

from __future__ import annotations

import functools
import json
import logging
import socket
import threading
import time
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from rapidin_index.errors import RapidinIndexError, RequestError, ServeError
from rapidin_index.server_requests import Limits, QueryRequest, parse_query_request, prepare_queries
from rapidin_index.store import row_table

try:  # the `serve` extra; the rest of the package runs without it
    import uvicorn
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route
except ImportError as missing:
    raise ServeError(
        f"`rapidin-index serve` needs {missing.name or 'starlette and uvicorn'}, which is not installed: "
        "pip install 'rapidin-index[serve]'"
    ) from None

if TYPE_CHECKING:
    from starlette.requests import Request

    from rapidin_index.retrieval import Index

log = logging.getLogger("rapidin_index.server")

ROW_FIELDS = ("id", "prompt", "response", "source", "num_tokens", "num_response_tokens", "truncated", "loss")
LARGEST_ROW_ID = 2**63 - 1  # LanceDB's int64 id column


def create_app(index: Index, limits: Limits | None = None) -> Starlette:
    """The ASGI app answering for ``index`` (opened once, by the caller) within ``limits``."""
    endpoints = Endpoints(index, limits or Limits())
    routes = [
        Route("/", endpoints.page, methods=["GET"]),
        Route("/api/info", answers_json(endpoints.info), methods=["GET"]),
        Route("/api/query", answers_json(endpoints.query), methods=["POST"]),
        Route("/api/rows/{id}", answers_json(endpoints.row), methods=["GET"]),
        Route("/api/explain", answers_json(endpoints.explain), methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: http_error, Exception: internal_error},
        middleware=[Middleware(RequestLog)],
    )
    app.state.index = index  # for tests and embedding applications: the one Index this app answers with
    app.state.limits = endpoints.limits
    return app


class Endpoints:
    """The routes' handlers around one opened index."""

    def __init__(self, index: Index, limits: Limits):
        self.index = index
        self.limits = limits
        self.page_text = page_html()
        self.summary = index_summary(index, limits)
        self.query_lock = threading.Lock()  # one query at a time: the sketcher's hooks hold per-query state

    async def page(self, request: Request) -> HTMLResponse:
        return HTMLResponse(self.page_text)

    async def info(self, request: Request) -> JSONResponse:
        return JSONResponse(self.summary)

    async def query(self, request: Request) -> JSONResponse:
        body = await read_json_body(request, self.limits.max_body_bytes)
        parsed = parse_query_request(body, self.limits)  # refused here, before any work
        results = await run_in_threadpool(self.answer, parsed)  # the event loop stays free meanwhile
        values = [result.to_dict() for result in results]
        several = parsed.several and parsed.options.aggregate is None  # an aggregate is one answer
        return JSONResponse({"results": values} if several else values[0])

    def answer(self, parsed: QueryRequest) -> list:
        """The results: one per query, or one `AggregateResult` for the set (``aggregate``)."""
        with self.query_lock:
            prepared = prepare_queries(self.index, parsed, self.limits)
            options = parsed.options
            if options.aggregate is not None:
                found = self.index.aggregate_prepared(
                    prepared, options.aggregate, options.top_k, where=options.where
                )
                return [found]
            return self.index.query_prepared(
                prepared,
                options.top_k,
                options.explain,
                options.per_token,
                options.token_top_k,
                options.rerank,
                options.where,
            )

    async def explain(self, request: Request) -> JSONResponse:
        """One training row's token scores against a query (a hit outside the top ``explain``)."""
        body = await read_json_body(request, self.limits.max_body_bytes)
        row_id = body.pop("id", None)
        if isinstance(row_id, bool) or not isinstance(row_id, int) or row_id < 0:
            raise RequestError(f"'id' is the training row to explain, a whole number from 0, got {row_id!r}")
        parsed = parse_query_request(body, self.limits)  # refused here, before any work
        if parsed.several or parsed.options.generate:
            raise RequestError(
                "explain takes one query with its response: 'prompt' and 'response' (no generate)"
            )
        explanation = await run_in_threadpool(self.explanation, parsed, parse_row_id(str(row_id)))
        return JSONResponse({"id": row_id, "explanation": explanation})

    def explanation(self, parsed: QueryRequest, training_example_id: int) -> dict:
        from rapidin_index.retrieval import explain_row

        with self.query_lock:
            if training_example_id not in row_table.read_rows(self.index.table, [training_example_id]):
                raise RequestError(
                    f"no training row {training_example_id} in this index (rejected at build, or past its ids)",
                    404,
                )
            prepared = prepare_queries(self.index, parsed, self.limits)[0]
            return explain_row(self.index, prepared, training_example_id)

    async def row(self, request: Request) -> JSONResponse:
        training_example_id = parse_row_id(request.path_params["id"])
        found = await run_in_threadpool(row_table.read_rows, self.index.table, [training_example_id])
        if training_example_id not in found:
            raise RequestError(
                f"no training row {training_example_id} in this index (rejected at build, or past its ids)",
                404,
            )
        return JSONResponse({key: found[training_example_id][key] for key in ROW_FIELDS})


# --------------------------------------------------------------------------- errors and the log


def error_response(message: str, status: int) -> JSONResponse:
    """``{"error": message}``, the message on one line (a library hint may span two)."""
    return JSONResponse({"error": " ".join(message.split())}, status_code=status)


def answers_json(endpoint):
    """An endpoint whose refusals are JSON: RequestError with its status, a typed library error 422, a bug
    500 without its traceback (logged here instead)."""

    @functools.wraps(endpoint)
    async def answer(request: Request):
        try:
            return await endpoint(request)
        except RequestError as error:
            return error_response(str(error), error.status)
        except RapidinIndexError as error:
            return error_response(str(error), 422)
        except Exception:
            log.exception("%s %s failed", request.method, request.url.path)
            return error_response("internal error; the server's log has the details", 500)

    return answer


async def http_error(request: Request, error: HTTPException) -> JSONResponse:
    """Routing's own refusals (404 no such path, 405 wrong method) as JSON too."""
    return error_response(f"{error.detail}: {request.method} {request.url.path}", error.status_code)


async def internal_error(request: Request, error: Exception) -> JSONResponse:
    return error_response("internal error; the server's log has the details", 500)


class RequestLog:
    """ASGI middleware: one log line per HTTP request (method, path, status, milliseconds)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]  # 500 unless a response starts

        async def send_noting_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            elapsed_ms = (time.perf_counter() - started) * 1000
            log.info("%s %s %d %.1f ms", scope["method"], scope["path"], status[0], elapsed_ms)


# --------------------------------------------------------------------------- request pieces


async def read_json_body(request: Request, limit: int) -> dict:
    """The body as a JSON object, refused (413) past ``limit`` bytes whether or not it declares its size."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(
            f"the request body is {int(declared):,} bytes, over this server's cap of {limit:,}", 413
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(f"the request body is over this server's cap of {limit:,} bytes", 413)
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RequestError(f"the request body is not JSON ({error})") from None
    if not isinstance(body, dict):
        raise RequestError('the request body must be a JSON object, e.g. {"prompt": ..., "response": ...}')
    return body


def parse_row_id(text: str) -> int:
    if not text.isdigit():
        raise RequestError(f"a training row id is a whole number from 0, got {text!r}")
    training_example_id = int(text)
    if training_example_id > LARGEST_ROW_ID:
        raise RequestError(f"no training row {training_example_id} in this index", 404)
    return training_example_id


def index_summary(index: Index, limits: Limits) -> dict:
    """What ``GET /api/info`` answers: the manifest's facts a user asks first, and the caps."""
    from rapidin_index.query import query_template

    manifest = index.manifest
    sketch = manifest.sketch
    return {
        "path": str(index.path),
        "row_count": manifest.row_count,
        "rejected_count": manifest.rejected_count,
        "token_count": manifest.token_count,
        "model": {key: manifest.model.get(key) for key in ("name_or_path", "fingerprint", "dtype")},
        "adapter": manifest.adapter,
        "sketch": {
            "algorithm": sketch.get("algorithm", "rapidgrad-v1"),
            "sketch_dim": sketch["sketch_dim"],
            "gradient_dim": sketch.get("gradient_dim"),
        },
        "normalize": manifest.normalize,
        "template": manifest.template,
        "query_template": query_template(manifest).name,  # "chat": a query may carry a system turn
        "tokenization": manifest.tokenization,
        "device": str(index.device),
        "limits": asdict(limits),
    }


def page_html() -> str:
    """The page, its placeholder filled with the report's styles (one look for both)."""
    from rapidin_index.report import CSS

    page = resources.files("rapidin_index.assets").joinpath("serve.html").read_text(encoding="utf-8")
    return page.replace("/* REPORT_CSS */", CSS)


# --------------------------------------------------------------------------- serving


def serve_index(
    index_path: str | Path,
    model: str | None = None,
    adapter: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    limits: Limits | None = None,
    max_memory: int | None = None,
) -> None:
    """Open the index and its model once, then answer on http://host:port/ until interrupted
    (``max_memory``: `retrieval.Index.open`'s cap on what a search holds)."""
    from rapidin_index.retrieval import Index

    log_to_stderr()
    check_port_free(host, port)  # before the model loads: a taken port should not cost a minute
    started = time.perf_counter()
    index = Index.open(index_path, model=model, adapter=adapter, device=device, max_memory=max_memory)
    log.info(
        "opened %s (%s rows, model %s, %s) in %.1f s",
        index_path,
        f"{index.manifest.row_count:,}",
        index.manifest.model["name_or_path"],
        index.device,
        time.perf_counter() - started,
    )
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: anyone who can reach it can query (there is no authentication)", host)
    log.info("serving on http://%s:%d/ (Ctrl+C stops)", f"[{host}]" if ":" in host else host, port)
    uvicorn.run(create_app(index, limits), host=host, port=port, access_log=False, log_level="warning")


def log_to_stderr() -> None:
    """The request lines on stderr, once, without touching other libraries' loggers."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.create_server((host, port), family=family):
            pass
    except OSError as error:
        raise ServeError(
            f"cannot listen on {host}:{port} ({error.strerror or error}): pick another --port or --host"
        ) from None
