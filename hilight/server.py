"""An OpenAI-compatible HTTP API: ``POST /v1/chat/completions`` (streaming or not),
``GET /v1/models``, ``GET /health``.

Messages carry text parts and video parts ``{"type": "video_url", "video_url": {"url": ...}}``
with ``data:video/...;base64,`` URLs or, when the server was started with an allowed
directory, ``file://`` paths inside it. Each video part becomes a ``<video>`` at its place in
the text. Which frames are read is the model's own choice unless the request asks, in vLLM's
shapes: ``mm_processor_kwargs`` or ``media_io_kwargs: {"video": {...}}`` for every video, or
the same keys beside a part's ``url`` for that video alone (``num_frames``, ``fps``,
``max_frames``, ``start``, ``end``). The response's ``hilight.videos`` says what each video
was read as: its segments and the time of every frame shown. Generations run one at a time per model (``max_concurrent``) behind a bounded queue;
a full queue answers 503, a client that disconnects frees its slot.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import tempfile
import threading
import time
import urllib.parse
import uuid
import weakref
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from hilight.errors import ConfigError
from hilight.inference.batching import Batcher, Job
from hilight.inference.engine import Clip, Conversation, Engine, GenerationSettings, place_videos, stream_reply
from hilight.sampling import Sampling
from hilight.text import VIDEO_TOKEN, ConversationError, Message
from hilight.video import VideoError

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


class VideoURL(BaseModel):
    """A media URL; for a video, sampling options may stand beside it (``start``, ``end``...)."""

    model_config = ConfigDict(extra="allow")
    url: str


class Part(BaseModel):
    """OpenAI content parts; an ``image_url`` (a still image) is read as a one-frame clip."""

    type: Literal["text", "video_url", "image_url"]
    text: str | None = None
    video_url: VideoURL | None = None
    image_url: VideoURL | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str | list[Part]
    name: str | None = None  # a participant's name (OpenAI): not shown to the model


# OpenAI parameters HiLight does not implement: refused by name unless they ask for what it does
# anyway (the value here), never silently ignored
UNSUPPORTED = {"tools": None, "tool_choice": "none", "functions": None, "function_call": "none",
               "response_format": {"type": "text"}, "logprobs": False, "top_logprobs": None,
               "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None, "stop": None,
               "parallel_tool_calls": None, "audio": None, "modalities": ["text"], "prediction": None}


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # checked by unsupported(): named, not a pydantic dump
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=4096)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=1000)
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: dict | None = None  # the last chunk always carries usage
    seed: int | None = None  # greedy answers are the same every time; sampling with a seed is refused
    user: str | None = None
    # HiLight's own field (OpenAI clients send it with extra_body): answer a conversation that
    # holds no video; without it such a request is refused, never answered blind
    allow_no_video: bool = False
    # vLLM's per-request media options (extra_body): how every video of the request is sampled
    mm_processor_kwargs: dict | None = None
    media_io_kwargs: dict[str, dict] | None = None


def unsupported(req: ChatRequest) -> APIError | None:
    """The first parameter of ``req`` HiLight would otherwise ignore, as a 400 naming it."""
    for key, value in (req.model_extra or {}).items():
        if key not in UNSUPPORTED:
            return APIError(400, f"{key}: unknown parameter", param=key)
        if value is not None and value != UNSUPPORTED[key] and value not in ([], {}):
            return APIError(400, f"{key}: not supported by HiLight (supported: model, messages, max_tokens, "
                                 "max_completion_tokens, temperature, top_p, top_k, n=1, stream, seed with "
                                 "temperature 0, mm_processor_kwargs, media_io_kwargs)", param=key)
    if req.seed is not None and req.temperature > 0:
        return APIError(400, "seed: sampling with a seed is not supported (with temperature 0 every answer is "
                             "the same)", param="seed")
    return None


def strip_markers(text: str) -> str:
    """``text`` without any ``<video>`` marker, also those that removing one would form
    (``<vid<video>eo>``): in the API a video is a part, never typed."""
    while VIDEO_TOKEN in text:
        text = text.replace(VIDEO_TOKEN, "")
    return text


def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(status_code=exc.status, headers={"Retry-After": "1"} if exc.status == 503 else None, content={
        "error": {"message": exc.message, "type": exc.kind, "param": exc.param, "code": exc.status}})


def _openai_usage(usage: dict) -> dict:
    """The engine's token counts in OpenAI's shape (each request is a fresh conversation here,
    so no prompt token comes from a conversation's cache)."""
    return {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
            "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": usage["cached_tokens"]}}


class Gate:
    """At most ``concurrent`` generations at once and ``queue`` waiting; more get 503 when they
    arrive, before any answer starts."""

    def __init__(self, concurrent: int, queue: int):
        self.slots = asyncio.Semaphore(concurrent)
        self.limit = concurrent + queue
        self.inside = 0

    def admit(self, workdir: Path) -> Admission:
        if self.inside >= self.limit:
            raise APIError(503, "the server is busy: too many requests are waiting", "server_busy")
        self.inside += 1
        return Admission(self, workdir)


class Admission:
    """One admitted request: its place at the gate, the slot it runs in, and its temp directory,
    all given back exactly once however the request ends (answered, refused, client gone)."""

    def __init__(self, gate: Gate, workdir: Path):
        self.gate, self.workdir = gate, workdir
        self.running = self.closed = self.started = False

    async def run(self) -> None:
        """Wait for a generation slot."""
        self.started = True
        await self.gate.slots.acquire()
        self.running = True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.running:
            self.gate.slots.release()
        self.gate.inside -= 1
        _cleanup(self.workdir)

    def abandon(self) -> None:
        """A response dropped before its answer began (its client went away first)."""
        if not self.started:
            self.close()


def create_app(engine: Engine, name: str, allowed_dir: Path | None = None, max_video_bytes: int = 64 << 20,
               max_request_bytes: int = 96 << 20, max_concurrent: int = 1, queue_limit: int = 32,
               card: dict | None = None, max_batch: int = 8, api_key: str | None = None) -> FastAPI:
    """The API for ``engine``'s model, served as ``name``; ``card`` (the checkpoint's model card)
    is shown by ``/v1/models``; with ``api_key`` every route but ``/health`` needs it as a bearer
    token. Requests that wait together are generated together, up to
    ``max_batch`` at once (:class:`hilight.inference.batching.Batcher`; beam search runs alone,
    ``max_concurrent`` at a time)."""
    app = FastAPI(title="HiLight", version="1")
    app.state.gate = Gate(max(max_concurrent, max_batch), queue_limit)
    state: dict = {}
    settings_cap = 4096

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"][1:])
        return _error(APIError(400, f"{where}: {first['msg']}", param=where or None))

    app.add_middleware(BodyLimit, limit=max_request_bytes)
    if api_key:
        app.add_middleware(APIKey, key=api_key)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name}

    @app.get("/v1/models")
    async def models():
        entry = {"id": name, "object": "model", "created": 0, "owned_by": "hilight"}
        if card:
            entry["card"] = card
        return {"object": "list", "data": [entry]}

    def video_file(url: str, workdir: Path) -> Path:
        if url.startswith("data:"):
            header, _, payload = url.partition(",")
            if not header.endswith(";base64") or not header[5:].startswith(("video/", "image/", "application/")):
                raise APIError(400, "video_url: only base64 data URLs of videos (data:video/...;base64,...)")
            if len(payload) * 3 // 4 > max_video_bytes:
                raise APIError(413, f"video larger than {max_video_bytes} bytes", "request_too_large")
            try:
                data = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise APIError(400, "video_url: invalid base64 data") from None
            path = workdir / f"video-{uuid.uuid4().hex}"
            path.write_bytes(data)
            return path
        if url.startswith("file://"):
            if allowed_dir is None:
                raise APIError(400, "video_url: file:// URLs are disabled (start the server with --allow-dir)")
            named = urllib.parse.unquote(url.removeprefix("file://"))
            if "\x00" in named:
                raise APIError(400, "video_url: a file:// path cannot hold a NUL byte")
            try:
                path = Path(named).resolve()
            except (OSError, RuntimeError) as exc:  # a symlink loop, a name too long
                raise APIError(400, f"video_url: {url}: cannot be resolved ({type(exc).__name__})") from None
            if not path.is_relative_to(allowed_dir.resolve()):
                raise APIError(400, f"video_url: {url} is outside the allowed directory")
            return path
        raise APIError(400, "video_url: use a data: URL or an allowed file:// path")

    def request_sampling(req: ChatRequest) -> dict:
        """The sampling options asked for every video of ``req``."""
        media = req.media_io_kwargs or {}
        unknown = sorted(set(media) - {"video", "image"})
        if unknown:
            raise APIError(400, f"media_io_kwargs: unknown modality {unknown[0]!r} (video, image)",
                           param="media_io_kwargs")
        options = dict(media.get("video") or {})
        for key, value in (req.mm_processor_kwargs or {}).items():
            if key in options and options[key] != value:
                raise APIError(400, f"mm_processor_kwargs.{key} contradicts media_io_kwargs.video.{key}",
                               param="mm_processor_kwargs")
            options[key] = value
        try:
            Sampling.from_options(options, where="mm_processor_kwargs")
        except ConfigError as exc:
            raise APIError(400, str(exc), param="mm_processor_kwargs") from None
        return options

    def to_conversation(req: ChatRequest, workdir: Path) -> tuple[Conversation, str, list[Clip], list[str]]:
        """Earlier turns become the conversation; the last user message is the new turn. Also
        returns how each video of the request is named to its sender (in order)."""
        shared = request_sampling(req)
        system, turns, videos, sources = [], [], [], []
        for i, m in enumerate(req.messages):
            parts = [Part(type="text", text=m.content)] if isinstance(m.content, str) else m.content
            text = []
            for j, part in enumerate(parts):
                if part.type == "text":
                    text.append(strip_markers(part.text or ""))  # no smuggled markers
                else:
                    media = part.video_url if part.type == "video_url" else part.image_url
                    where = f"messages[{i}].content[{j}].{part.type}"
                    if media is None:
                        raise APIError(400, f"a {part.type} part needs a {part.type} object", param=where)
                    if m.role != "user":
                        raise APIError(400, "videos and images may only appear in user messages", param=where)
                    try:
                        sampling = Sampling.from_options({**shared, **(media.model_extra or {})}, where=where)
                    except ConfigError as exc:
                        raise APIError(400, str(exc), param=where) from None
                    videos.append(Clip(video_file(media.url, workdir), sampling))
                    sources.append(f"{where} (data: URL)" if media.url.startswith("data:") else media.url)
                    text.append(f"{VIDEO_TOKEN}\n")
            content = "".join(text).strip()
            if m.role == "system":
                system.append(content)
            else:
                turns.append(Message("user" if m.role == "user" else "model", content))
        if not turns or turns[-1].role != "user":
            raise APIError(400, "messages must end with a user message")
        if system:
            turns[0] = Message(turns[0].role, "\n".join(system) + "\n" + turns[0].content)
        last_count = turns[-1].content.count(VIDEO_TOKEN)
        earlier = Conversation(turns[:-1], videos[: len(videos) - last_count])
        return earlier, turns[-1].content, videos[len(videos) - last_count:], sources

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        limit = req.max_completion_tokens or req.max_tokens or 256
        settings = GenerationSettings.from_request(min(limit, settings_cap), req.temperature, req.top_p, req.top_k)
        workdir = Path(tempfile.mkdtemp(prefix="hilight-req-"))
        created, rid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
        gate: Gate = app.state.gate
        batcher: Batcher | None = None
        if max_batch > 1 and settings.num_beams == 1:
            if "batcher" not in state:
                state["batcher"] = app.state.batcher = Batcher(engine, max_batch)
            batcher = state["batcher"]
        try:
            refused = unsupported(req)
            if refused is not None:
                raise refused
            if req.model is not None and req.model != name:
                raise APIError(404, f"The model `{req.model}` does not exist; this server serves `{name}`",
                               param="model")
            conversation, text, videos, sources = to_conversation(req, workdir)
            if not videos and not conversation.videos and not req.allow_no_video:
                raise APIError(400, "no video in this conversation: add a video_url part to a user message "
                                    "(or send allow_no_video: true to ask without one)", param="messages")
            admission = gate.admit(workdir)  # a 503 now, before any answer starts
        except APIError:
            _cleanup(workdir)
            raise
        cancel = threading.Event()
        usage: dict = {"prompt_tokens": 0, "cached_tokens": 0, "completion_tokens": 0, "videos": []}

        def shown() -> dict:
            """What each video was read as, named as its sender named it."""
            return {"videos": [{"source": source, **info} for source, info in zip(sources, usage["videos"],
                                                                                   strict=False)]}
        chunks: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        by_path = {str(clip.path): source for clip, source in zip([*conversation.videos, *videos], sources,
                                                                  strict=True)}

        def named(exc: VideoError) -> str:
            """The user's name for a video, never the server's temp copy of a data: URL."""
            if exc.path in by_path:
                return by_path[exc.path]
            return "a video_url part (data: URL)" if Path(exc.path).parent == workdir else exc.path

        def report(exc: BaseException) -> APIError:
            if isinstance(exc, VideoError):
                # name the user's input, never the server's temp copy of a data: URL
                return APIError(400, f"{named(exc)}: {exc.reason}")
            if isinstance(exc, (ConversationError, ValueError)):
                return APIError(400, str(exc))
            log.error("generation failed: %r", exc)
            return APIError(500, str(exc), "server_error")

        def emit(kind: str, value) -> None:  # from the batcher's thread
            if kind == "done":
                usage.update(value)
            item = (kind, report(value) if kind == "error" else value)
            loop.call_soon_threadsafe(chunks.put_nowait, item)

        def produce() -> None:
            if batcher is not None:
                messages = [*conversation.messages, Message("user", place_videos(text, len(videos)))]
                batcher.submit(Job(messages, [*conversation.videos, *videos], settings, emit, cancel))
                return
            try:
                for piece in stream_reply(engine, conversation, text, videos, settings, cancel, usage,
                                          allow_no_video=req.allow_no_video):
                    loop.call_soon_threadsafe(chunks.put_nowait, ("text", piece))
                loop.call_soon_threadsafe(chunks.put_nowait, ("done", None))
            except VideoError as exc:
                # name the user's input, never the server's temp copy of a data: URL
                loop.call_soon_threadsafe(chunks.put_nowait, ("error", APIError(400, f"{named(exc)}: {exc.reason}")))
            except (ConversationError, ValueError) as exc:
                loop.call_soon_threadsafe(chunks.put_nowait, ("error", APIError(400, str(exc))))
            except Exception as exc:  # reported to the client as a 500, logged here
                log.exception("generation failed")
                loop.call_soon_threadsafe(chunks.put_nowait, ("error", APIError(500, str(exc), "server_error")))

        async def pieces():
            task = None
            try:
                await admission.run()
                if batcher is None:
                    task = loop.run_in_executor(None, produce)
                else:  # results arrive through emit(), from the batcher's thread
                    try:
                        produce()
                    except ConversationError as exc:
                        emit("error", exc)
                while True:
                    kind, value = await chunks.get()
                    if kind == "done":
                        break
                    if kind == "error":
                        raise value
                    yield value
            finally:
                cancel.set()  # a client that went away frees the slot once its generation stops
                if task is not None and not task.done():
                    # never awaited here: a cancelled request's awaits are cancelled again
                    task.add_done_callback(lambda _: admission.close())
                else:
                    admission.close()

        if not req.stream:
            try:
                answer = "".join([p async for p in pieces()]).strip()
            except APIError as exc:
                return _error(exc)
            return {"id": rid, "object": "chat.completion", "created": created, "model": name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                 "finish_reason": usage.get("finish_reason", "stop")}],
                    "usage": _openai_usage(usage), "hilight": shown()}

        async def events():
            def event(delta: dict, finish: str | None = None) -> str:
                body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
                return f"data: {json.dumps(body)}\n\n"

            yield event({"role": "assistant", "content": ""})
            answer = pieces()
            try:
                async for piece in answer:
                    if await request.is_disconnected():
                        break
                    yield event({"content": piece})
                final = json.loads(event({}, usage.get("finish_reason", "stop"))[6:])
                final["usage"] = _openai_usage(usage)
                final["hilight"] = shown()
                yield f"data: {json.dumps(final)}\n\n"
            except APIError as exc:
                yield f"data: {json.dumps({'error': {'message': exc.message, 'type': exc.kind, 'code': exc.status}})}\n\n"
            finally:
                await answer.aclose()  # its own finally gives the slot and the temp files back
            yield "data: [DONE]\n\n"

        response = StreamingResponse(events(), media_type="text/event-stream")
        weakref.finalize(response, admission.abandon)  # a stream that never began
        return response

    return app


class BodyLimit:
    """413 for a request body over ``limit`` bytes, counted as it arrives (a chunked body has no
    Content-Length to trust), before the app reads or parses any of it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"")
        too_large = _error(APIError(413, f"request body exceeds {self.limit} bytes", "request_too_large"))
        if length.isdigit() and int(length) > self.limit:
            return await too_large(scope, receive, send)
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.limit:
                return await too_large(scope, receive, send)
            if not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


class APIKey:
    """401 unless the request carries ``Authorization: Bearer KEY`` (compared in constant
    time); ``/health`` stays open for load balancers."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path") != "/health":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                refusal = _error(APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                                          "authentication_error"))
                return await refusal(scope, receive, send)
        await self.app(scope, receive, send)


def _cleanup(workdir: Path) -> None:
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)
