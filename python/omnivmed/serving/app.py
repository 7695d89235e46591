"""`omnivmed-serve`: an OpenAI-compatible chat completions API over a saved model.

    POST /v1/chat/completions   (stream or not; image_url, video_url and volume_url parts)
    GET  /v1/models, GET /health

Bad requests get a 4xx with an OpenAI-style error body and never stop the server: malformed
JSON 400, a missing or wrong API key 401, a path outside the media root 403, a missing file
404, a body or media part over its limit 413, an unsupported media type 415, unreadable
media or too many tokens 400/422, too many requests in flight 429.
"""

import asyncio
import contextlib
import json
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..inference.prompting import prompt_ids
from ..processing.errors import MediaError
from ..processing.processor import Media, OmniVMedProcessor
from .engine import Engine, Job
from .requests import MediaResolver, ParsedRequest, RequestError, parse_messages, parse_sampling


@dataclass
class ServeSettings:
    model_name: str = "omnivmed"
    media_root: Path | None = None
    api_key: str | None = None
    max_request_bytes: int = 64 * 2**20
    max_media_bytes: int = 48 * 2**20
    max_tokens: int = 1024  # completion tokens per request
    max_prompt_tokens: int = 16384  # text + visual tokens of the prompt
    max_concurrent: int = 64
    max_batch_size: int = 8
    max_wait_ms: float = 10.0


def _error(status: int, message: str, code: str = "invalid_request_error"):
    from fastapi.responses import JSONResponse

    return JSONResponse(
        {"error": {"message": message, "type": code, "code": status}}, status_code=status
    )


def create_app(model, tokenizer, options, settings: ServeSettings):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    processor = OmniVMedProcessor(model.config, tokenizer, options)
    engine = Engine(model, tokenizer, settings.max_batch_size, settings.max_wait_ms)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        engine.close()  # the worker thread ends with the server

    app = FastAPI(title="omnivmed-serve", lifespan=lifespan)
    app.state.engine = engine
    in_flight = {"n": 0}

    def prepare(parsed: ParsedRequest):
        """Media read and pruned once; the prompt tokenised and checked against the limits."""
        counts, visual = [], None
        if parsed.media:
            try:
                visual = processor.encode_media([Media(k, p) for k, p in parsed.media], "request")
            except MediaError as exc:
                raise RequestError(400, str(exc)) from None
            counts = list(visual.token_counts)
        ids = prompt_ids(tokenizer, parsed.messages, counts, model.config.image_token, "request")
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

    async def read_json(request: Request) -> dict:
        """The API key checked, the body read within its byte limit, parsed as an object."""
        if (
            settings.api_key
            and request.headers.get("authorization") != f"Bearer {settings.api_key}"
        ):
            raise RequestError(
                401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error"
            )
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > settings.max_request_bytes:
            raise RequestError(
                413, f"the request is over the {settings.max_request_bytes}-byte limit"
            )
        body_bytes = bytearray()
        async for chunk in request.stream():
            body_bytes += chunk
            if len(body_bytes) > settings.max_request_bytes:
                raise RequestError(
                    413, f"the request is over the {settings.max_request_bytes}-byte limit"
                )
        try:
            body = json.loads(body_bytes)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(400, f"the body is not valid JSON ({exc})") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the body must be a JSON object")
        return body

    async def read_request(request: Request) -> ParsedRequest:
        body = await read_json(request)
        sampling = parse_sampling(body, settings.max_tokens)
        workdir = tempfile.TemporaryDirectory(prefix="omnivmed-serve-")
        try:
            resolver = MediaResolver(
                settings.media_root, settings.max_media_bytes, Path(workdir.name)
            )
            messages, media = await run_in_threadpool(
                parse_messages, body.get("messages"), resolver
            )
        except BaseException:
            workdir.cleanup()
            raise
        return ParsedRequest(messages, media, sampling, bool(body.get("stream", False)),
                             str(body.get("model") or settings.model_name), workdir)  # fmt: skip

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

        if in_flight["n"] >= settings.max_concurrent:
            return busy()
        in_flight["n"] += 1
        workdir = tempfile.TemporaryDirectory(prefix="omnivmed-preview-")
        try:
            body = await read_json(request)
            if body.get("type") not in PART_KINDS:
                raise RequestError(
                    400, f"expected {{'type': one of {sorted(PART_KINDS)}, 'url': ...}}"
                )
            kind = PART_KINDS[body["type"]]
            resolver = MediaResolver(
                settings.media_root, settings.max_media_bytes, Path(workdir.name)
            )
            path = await run_in_threadpool(resolver, kind, body.get("url"))
            try:
                return await run_in_threadpool(preview, processor, Media(kind, path))
            except MediaError as exc:
                raise RequestError(400, str(exc)) from None
        except RequestError as exc:
            return _error(exc.status, exc.message, exc.code)
        except Exception as exc:  # whatever a request can trigger is its own fault
            return _error(400, f"the request could not be processed: {exc}")
        finally:
            in_flight["n"] -= 1
            workdir.cleanup()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "in_flight": in_flight["n"], "batches": engine.batches}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model",
                                            "owned_by": "omnivmed", "created": 0}]}  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        if in_flight["n"] >= settings.max_concurrent:
            return busy()
        # The slot is freed when the engine is through with the job (or at once when the
        # request never reaches it), so queued work counts against the limit too.
        in_flight["n"] += 1
        parsed, prepared = None, False
        try:
            parsed = await read_request(request)
            ids, visual = await run_in_threadpool(prepare, parsed)
            prepared = True
        except RequestError as exc:
            return _error(exc.status, exc.message, exc.code)
        except Exception as exc:  # anything else a request can trigger is still its own fault
            return _error(400, f"the request could not be processed: {exc}")
        finally:
            if parsed is not None and parsed.workdir is not None:
                parsed.workdir.cleanup()  # media are read (or refused): the uploads can go
            if not prepared:  # refused, failed or cancelled: it never reaches the engine
                in_flight["n"] -= 1
        events: asyncio.Queue = asyncio.Queue()

        def release() -> None:
            in_flight["n"] -= 1

        job = Job(
            ids, visual, parsed.sampling, asyncio.get_running_loop(), events, on_finish=release
        )
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
