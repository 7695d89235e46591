"""`omnivmed-serve`: an OpenAI-compatible chat completions API over a saved model.

    POST /v1/chat/completions   (stream or not; image_url, video_url and volume_url parts)
    GET  /v1/models, GET /health, GET / (the viewer)

Bad requests get a 4xx with an OpenAI-style error body (one short line, naming media as
the client sent them, never a server path) and never stop the server: malformed JSON 400,
a missing or wrong API key 401 (every /v1 route; the viewer page and /health are open), a
path outside the media root 403, a missing file 404, a body that does not arrive within
`read_timeout` 408, a body, media part, number of media parts or decoded pixels over its
limit 413, an unsupported media type 415, unreadable media or too many tokens 400/422, too
many requests in flight 429. A request takes a slot only once its body is read.
"""

import asyncio
import contextlib
import hmac
import json
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..inference.generate import build_prompt
from ..processing.errors import MediaError
from ..processing.processor import Media, OmniVMedProcessor
from .engine import Engine, Job
from .requests import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    MediaLimits,
    MediaResolver,
    ParsedRequest,
    RequestError,
    parse_messages,
    parse_model,
    parse_sampling,
)
from .resources import BudgetedProcessor, release_memory

MAX_ERROR_CHARS = 300  # an error message is one short line, whatever the request held


@dataclass
class ServeSettings:
    model_name: str = "omnivmed"
    media_root: Path | None = None
    api_key: str | None = None
    max_request_bytes: int = 64 * 2**20
    max_media_bytes: int = 48 * 2**20
    max_media_parts: int = 16  # media parts per request
    max_media_per_message: int = 8
    max_request_pixels: int = 2**27  # pixels of every image, slice and frame a request decodes
    read_timeout: float = 30.0  # seconds to deliver a request's headers, and then its body
    max_tokens: int = 1024  # completion tokens per request
    max_prompt_tokens: int = 16384  # text + visual tokens of the prompt
    max_concurrent: int = 64
    max_batch_size: int = 8
    max_wait_ms: float = 10.0


def one_line(message: str, limit: int = MAX_ERROR_CHARS) -> str:
    """`message` on one line, cut at `limit` characters."""
    text = " ".join(message.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _error(status: int, message: str, code: str = "invalid_request_error", close: bool = False):
    from fastapi.responses import JSONResponse

    return JSONResponse(
        {"error": {"message": one_line(message), "type": code, "code": status}},
        status_code=status,
        # A client whose body never arrived must not keep its connection for another one.
        headers={"Connection": "close"} if close else None,
    )


class _Slots:
    """Requests being worked on (read, prepared, queued or generating), at most `limit`."""

    def __init__(self, limit: int):
        self.limit, self.n = limit, 0

    def take(self) -> bool:
        if self.n >= self.limit:
            return False
        self.n += 1
        return True

    def release(self) -> None:
        self.n -= 1


def _authorized(request, key: str | None) -> bool:
    if not key:
        return True
    given = request.headers.get("authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {key}".encode())


def _unauthorized() -> RequestError:
    return RequestError(
        401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error"
    )


def create_app(model, processor: OmniVMedProcessor, settings: ServeSettings):
    """The server's app over `model` and the processor saved with it (`load_for_inference`)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    engine = Engine(model, processor.tokenizer, settings.max_batch_size, settings.max_wait_ms)
    limits = MediaLimits(settings.max_media_parts, settings.max_media_per_message)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        engine.close()  # the worker thread ends with the server

    app = FastAPI(title="omnivmed-serve", lifespan=lifespan)
    app.state.engine = engine
    slots = _Slots(settings.max_concurrent)
    # Bodies still arriving hold at most what `max_concurrent` full requests would, in all.
    arriving = {"bytes": 0, "limit": settings.max_concurrent * settings.max_request_bytes}

    def prepare(parsed: ParsedRequest):
        """Media read and pruned once; the prompt tokenised and checked against the limits."""
        counts, visual = [], None
        if parsed.media:
            media = [Media(k, p) for k, p in parsed.media]
            budgeted = BudgetedProcessor(processor, settings.max_request_pixels)
            try:
                visual = budgeted.encode_media(media)
            except MediaError as exc:
                raise RequestError(400, str(exc)) from None
            counts = list(visual.token_counts)
        ids = build_prompt(processor, parsed.messages, visual).input_ids
        if ids.numel() > settings.max_prompt_tokens:
            raise RequestError(422, f"the prompt has {ids.numel()} tokens ({sum(counts)} visual); "
                                    f"this server allows {settings.max_prompt_tokens}")  # fmt: skip
        return ids, visual

    def busy():
        return _error(
            429,
            f"{settings.max_concurrent} requests are in flight; retry later",
            "rate_limit_error",
        )

    async def collect_body(request: Request) -> bytes:
        """The body, within its byte limit and the bytes all arriving bodies may hold."""
        body_bytes = bytearray()
        try:
            async for chunk in request.stream():
                body_bytes += chunk
                arriving["bytes"] += len(chunk)
                if len(body_bytes) > settings.max_request_bytes:
                    raise RequestError(
                        413, f"the request is over the {settings.max_request_bytes}-byte limit"
                    )
                if arriving["bytes"] > arriving["limit"]:
                    raise RequestError(503, "too many request bodies are arriving; retry later",
                                       "server_busy")  # fmt: skip
        finally:
            arriving["bytes"] -= len(body_bytes)
        return bytes(body_bytes)

    async def read_json(request: Request) -> dict:
        """The API key checked, the body read within its byte limit and its deadline (no
        slot is held meanwhile, so slow clients cannot lock others out), parsed as an
        object."""
        if not _authorized(request, settings.api_key):
            raise _unauthorized()
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > settings.max_request_bytes:
            raise RequestError(
                413, f"the request is over the {settings.max_request_bytes}-byte limit"
            )
        try:
            async with asyncio.timeout(settings.read_timeout):
                body_bytes = await collect_body(request)
        except TimeoutError:
            raise RequestError(
                408, f"the request body did not arrive within {settings.read_timeout:g} s"
            ) from None
        try:
            body = json.loads(body_bytes)
        except ValueError as exc:  # also an integer too long to convert, a bad encoding
            raise RequestError(400, f"the body is not valid JSON ({exc})") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the body must be a JSON object")
        return body

    async def parse_request(body: dict, resolver: MediaResolver) -> ParsedRequest:
        sampling = parse_sampling(body, settings.max_tokens)
        messages, media = await run_in_threadpool(
            parse_messages, body.get("messages"), resolver, limits
        )
        return ParsedRequest(messages, media, sampling, bool(body.get("stream", False)),
                             parse_model(body, settings.model_name))  # fmt: skip

    def request_media(prefix: str) -> tuple[tempfile.TemporaryDirectory, MediaResolver]:
        """A request's private folder for uploads and the resolver that writes there."""
        workdir = tempfile.TemporaryDirectory(prefix=prefix)
        resolver = MediaResolver(settings.media_root, settings.max_media_bytes, Path(workdir.name))
        return workdir, resolver

    def refusal(exc: Exception, resolver: MediaResolver):
        """The error answer of a refused request, naming media as the client named them."""
        if isinstance(exc, RequestError):
            return _error(exc.status, resolver.public(exc.message), exc.code)
        # Anything else a request can trigger is still its own fault.
        return _error(400, resolver.public(f"the request could not be processed: {exc}"))

    def after_refusal(resolver: MediaResolver) -> None:
        """A refused request that got as far as its media may have left decoded arrays
        in the allocator: hand them back, off the event loop."""
        if resolver.names:
            asyncio.get_running_loop().run_in_executor(None, release_memory)

    async def read_or_refuse(request: Request):
        """(body, None), or (None, the error answer)."""
        try:
            return await read_json(request), None
        except RequestError as exc:
            return None, _error(exc.status, exc.message, exc.code, close=exc.status == 408)

    @app.get("/")
    async def viewer():
        from fastapi.responses import HTMLResponse

        return HTMLResponse(
            (Path(__file__).parent / "static" / "index.html").read_text(encoding="utf-8")
        )

    @app.post("/v1/omnivmed/preview")
    async def preview_media(request: Request):
        """One medium as the model sees it: frames with pruned patches shaded, counts."""
        from .preview import preview
        from .requests import PART_KINDS

        body, refused = await read_or_refuse(request)
        if refused is not None:
            return refused
        if not slots.take():
            return busy()
        workdir, resolver = request_media("omnivmed-preview-")
        try:
            if body.get("type") not in PART_KINDS:
                raise RequestError(
                    400, f"expected {{'type': one of {sorted(PART_KINDS)}, 'url': ...}}"
                )
            kind = PART_KINDS[body["type"]]
            path = await run_in_threadpool(resolver, kind, body.get("url"))
            budgeted = BudgetedProcessor(processor, settings.max_request_pixels)
            try:
                return await run_in_threadpool(preview, budgeted, Media(kind, path))
            except MediaError as exc:
                raise RequestError(400, str(exc)) from None
        except Exception as exc:
            after_refusal(resolver)
            return refusal(exc, resolver)
        finally:
            slots.release()
            workdir.cleanup()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "in_flight": slots.n, "batches": engine.batches}

    @app.get("/v1/models")
    async def models(request: Request):
        if not _authorized(request, settings.api_key):
            exc = _unauthorized()
            return _error(exc.status, exc.message, exc.code)
        # What a request gets when it names no sampling settings: sampled answers.
        defaults = {"temperature": DEFAULT_TEMPERATURE, "top_p": DEFAULT_TOP_P,
                    "max_tokens": min(DEFAULT_MAX_TOKENS, settings.max_tokens)}  # fmt: skip
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model",
                                            "owned_by": "omnivmed", "created": 0,
                                            "defaults": defaults}]}  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body, refused = await read_or_refuse(request)
        if refused is not None:
            return refused
        # A slot is taken once the request is read, and freed when the engine is through
        # with the job (or at once when the request never reaches it), so queued work
        # counts against the limit too.
        if not slots.take():
            return busy()
        workdir, resolver = request_media("omnivmed-serve-")
        prepared = False
        try:
            parsed = await parse_request(body, resolver)
            ids, visual = await run_in_threadpool(prepare, parsed)
            prepared = True
        except Exception as exc:
            return refusal(exc, resolver)
        finally:
            workdir.cleanup()  # media are read (or refused): the uploads can go
            if not prepared:  # refused, failed or cancelled: it never reaches the engine
                slots.release()
                after_refusal(resolver)
        del body
        events: asyncio.Queue = asyncio.Queue()
        job = Job(ids, visual, parsed.sampling, asyncio.get_running_loop(), events,
                  on_finish=slots.release)  # fmt: skip
        engine.submit(job)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        visual_tokens = sum(visual.token_counts) if visual is not None else 0
        unpruned = sum(visual.unpruned_counts) if visual is not None else 0

        def usage(result) -> dict[str, int]:
            return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                    "total_tokens": result.prompt_tokens + result.completion_tokens,
                    "visual_tokens": visual_tokens, "visual_tokens_unpruned": unpruned}  # fmt: skip

        def chunk(delta: dict, finish: str | None = None, extra: dict | None = None) -> str:
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": parsed.model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **(extra or {})}  # fmt: skip
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        if parsed.stream:

            async def stream():
                try:
                    yield chunk({"role": "assistant", "content": ""})
                    while True:
                        kind, value = await events.get()
                        if kind == "delta":
                            yield chunk({"content": value})
                        elif kind == "done":
                            yield chunk({}, value.finish_reason, {"usage": usage(value)})
                            break
                        else:
                            yield f"data: {json.dumps({'error': {'message': value, 'code': 500}})}\n\n"
                            break
                    yield "data: [DONE]\n\n"
                finally:
                    job.cancelled = True  # a client that left stops its row; no-op when done

            return StreamingResponse(stream(), media_type="text/event-stream")
        try:
            while True:
                kind, value = await events.get()
                if kind == "done":
                    break
                if kind == "error":
                    return _error(500, value, "server_error")
        except BaseException:
            job.cancelled = True  # the client went away while waiting
            raise
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": created, "model": parsed.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": value.text},
                         "finish_reason": value.finish_reason}],
            "usage": usage(value),
        })  # fmt: skip

    return app
