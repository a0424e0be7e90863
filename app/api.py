"""The HTTP API under ``/v1``, served by ``python -m app serve`` beside the UI, on the same port.

OpenAI-compatible: ``GET /v1/models`` (the LLM, the embedding model, and each knowledge base as ``kb:<name>``),
``POST /v1/chat/completions`` (streamed or not; ``kb:<name>`` answers from that base, follow-ups included) and
``POST /v1/embeddings``. Zhiku's own: knowledge bases (list, read, search, upload files into a background ingest,
its status, remove a file, delete) and the conversations the UI saves (list, read, export, delete). The schema
is at ``/v1/openapi.json``, the docs at ``/v1/docs``.

With login on (UI users configured), every route needs ``Authorization: Bearer zk-...`` (``python -m app keys
create --user NAME``) and acts as that key's user: their conversations, their private bases. Errors use
OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with a message that says what to change.
It wires the services the UI and the CLI use; the work happens there.
"""

from __future__ import annotations

import itertools
import json
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import Depends, FastAPI, File, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import kb_admin
from app.access import AccessError
from app.chat import AnswerEvent, ChatRequest, Source, SourcesEvent, TextEvent
from app.conversations import ConversationError
from app.jobs import UnknownJob
from app.kb_admin import KbBusyError
from app.uploads import safe_filename
from common.errors import BackendUnavailableError, InvalidRequestError, ZhikuError
from llms.base import Message

if TYPE_CHECKING:
    from app.container import Zhiku
    from app.keys import KeyStore

KB_PREFIX = "kb:"


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": None, "code": self.code}}
        return JSONResponse(body, self.status)


def _from_zhiku(err: ZhikuError) -> ApiError:
    if isinstance(err, AccessError | ConversationError | UnknownJob):
        return ApiError(404, str(err), code="not_found")
    if isinstance(err, KbBusyError):
        return ApiError(409, str(err))
    if isinstance(err, BackendUnavailableError):  # the model's server is down: nothing the request can change
        return ApiError(503, str(err), "server_error", "model_unavailable")
    return ApiError(400, str(err))


# ----- request and response bodies ------------------------------------------------------------------------
class ContentPart(BaseModel):
    type: str
    text: str | None = None


class ChatMessageIn(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # other OpenAI parameters (n, user, ...) are accepted and unused

    model: str = Field(description="the LLM's name, or kb:<knowledge base> to answer from that base")
    messages: list[ChatMessageIn] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1, le=32768)
    max_completion_tokens: int | None = Field(None, ge=1, le=32768)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[str] = Field(description="a text, or a list of up to 256 texts")


class SourceOut(BaseModel):
    index: int = Field(description="the [n] that answers cite")
    file: str
    path: str
    page: int | None
    score: float = Field(description="cosine similarity to the question")
    snippet: str


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorOut(BaseModel):
    error: ErrorBody


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorOut, "description": what}
    for status, what in [
        (400, "a request to change"),
        (401, "no or a wrong API key"),
        (404, "not found"),
        (409, "in the way: an ingest running, a name taken"),
        (503, "the model's server cannot be reached"),
    ]
}


def _sources(sources: list[Source]) -> list[dict[str, Any]]:
    return [SourceOut.model_validate(s.to_json(n)).model_dump() for n, s in enumerate(sources, 1)]


# ----- who is asking -------------------------------------------------------------------------------------------
_bearer = HTTPBearer(auto_error=False, description="an API key: python -m app keys create --user NAME")


def _owner(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    """The user an API key acts for ("" when login is off: one user, as in the UI)."""
    keys: KeyStore | None = request.app.state.keys
    if keys is None:
        return ""
    user = keys.user_of(credentials.credentials) if credentials is not None else None
    if user is None:
        raise ApiError(
            401,
            "a valid API key is needed: make one with `python -m app keys create --user NAME` and send it as "
            "`Authorization: Bearer zk-...`",
            "authentication_error",
            "invalid_api_key",
        )
    return user


Owner = Annotated[str, Depends(_owner)]
# The names the API takes, spelt without \w (which JSON Schema reads as ASCII, Python as Unicode): ASCII letters and
# digits, Latin letters with accents, CJK, kana and Hangul; then '_', '-', and '.' between parts. A subset of what
# knowledge.catalog.validate_name accepts (a base of another script is reached with the CLI).
_WORD = (
    "0-9A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f"  # ASCII, Latin with accents
    "\u3041-\u3096\u30a1-\u30fa\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7a3"  # kana, CJK, Hangul
)
KB_NAME = f"^[{_WORD}][{_WORD}_-]*(\\.[{_WORD}_-]+)*$"
KbName = Annotated[str, PathParam(pattern=KB_NAME, max_length=64, description="a knowledge base's name")]


# ----- the app ----------------------------------------------------------------------------------------------
def create_api(zhiku: Zhiku, keys: KeyStore | None) -> FastAPI:
    """The ``/v1`` app. ``keys``: the API keys when login is on (every route then needs one); None: open."""
    api = FastAPI(
        title="Zhiku API",
        version="1",
        description=__doc__,
        responses=ERRORS,
        docs_url="/docs",
        openapi_url="/openapi.json",
        redoc_url=None,
    )
    api.state.keys = keys

    @api.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return err.response()

    @api.exception_handler(ZhikuError)  # what the services raise, with what to do: in OpenAI's shape
    async def zhiku_error(request: Request, err: ZhikuError) -> JSONResponse:
        return _from_zhiku(err).response()

    @api.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid')}" if where else str(first.get("msg", "invalid request"))
        return ApiError(400, f"{message}; see /v1/docs for this route's fields").response()

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return ApiError(
            err.status_code, str(err.detail), code="not_found" if err.status_code == 404 else None
        ).response()

    def readable_kb(user: str, name: str) -> str:
        if name not in zhiku.kbs.names():
            raise ApiError(404, f"no knowledge base {name!r}; GET /v1/kbs lists them", code="not_found")
        zhiku.access.check_read(user, name)
        return name

    # ---- OpenAI-compatible ----
    @api.get("/models", summary="The models: the LLM, the embedding model and each knowledge base as kb:<name>")
    def models(user: Owner) -> dict[str, Any]:
        names = [zhiku.settings.llm.backend, zhiku.embedder().model_id]
        names += [KB_PREFIX + n for n in zhiku.access.visible(user, zhiku.kbs.names())]
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "created": 0, "owned_by": "zhiku"} for n in names],
        }

    @api.post("/chat/completions", summary="Chat (OpenAI-compatible); model kb:<name> answers from that base")
    def chat_completions(body: ChatCompletionRequest, user: Owner) -> Any:
        request = _chat_request(zhiku, user, body, readable_kb)
        stamp, cid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
        events = zhiku.chat.stream(request)
        # up to the first words: a bad request or an unreachable model is an error status, not a broken stream
        started = []
        for event in events:
            started.append(event)
            if isinstance(event, TextEvent | AnswerEvent):
                break
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            head = {"id": cid, "created": stamp, "model": body.model}
            chunks = _chunks(head, itertools.chain(started, events), usage)
            return StreamingResponse(chunks, media_type="text/event-stream")
        answer, sources = _collect(itertools.chain(started, events))
        return {
            "id": cid,
            "created": stamp,
            "model": body.model,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer.text},
                    "finish_reason": "length" if answer.cut_short else "stop",
                }
            ],
            "usage": _usage(answer),
            "sources": _sources(sources),
        }

    @api.post("/embeddings", summary="Embeddings (OpenAI-compatible) with the configured embedding model")
    def embeddings(body: EmbeddingRequest, user: Owner) -> dict[str, Any]:
        embedder = zhiku.embedder()
        model = embedder.model_id
        if body.model != model:
            raise ApiError(
                404, f"no embedding model {body.model!r}; this server embeds with {model!r}", code="model_not_found"
            )
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or len(texts) > 256:
            raise ApiError(400, f"input holds {len(texts)} texts; send 1 to 256")
        vectors = embedder.embed_documents(texts)
        tokens = sum(len(t) for t in texts)  # characters: the embedder's tokenizer is not exposed
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": [float(x) for x in v]} for i, v in enumerate(vectors)
            ],
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    # ---- knowledge bases ----
    @api.get("/kbs", summary="The knowledge bases the caller may read (kb info --json for each)")
    def list_kbs(user: Owner) -> list[dict[str, Any]]:
        return [zhiku.kbs.info(n) for n in zhiku.access.visible(user, zhiku.kbs.names())]

    @api.get("/kbs/{name}", summary="One knowledge base: its files, chunks, embedding model")
    def get_kb(name: KbName, user: Owner) -> dict[str, Any]:
        return zhiku.kbs.info(readable_kb(user, name))

    @api.put("/kbs/{name}", status_code=201, summary="Create an empty knowledge base (the caller's own, private)")
    def create_kb(name: KbName, user: Owner) -> dict[str, Any]:
        if name in zhiku.kbs.names():
            raise ApiError(409, f"knowledge base {name!r} exists; upload into it, or pick another name")
        zhiku.access.reserve(user, name, exists=False)
        zhiku.open_kb(name, create=True).close()
        return zhiku.kbs.info(name)

    @api.get("/kbs/{name}/search", summary="Search a knowledge base (the `search --json` shape), best first")
    def search(
        name: KbName,
        user: Owner,
        q: Annotated[str, Query(min_length=1, max_length=8000, description="what to look for")],
        k: Annotated[int | None, Query(ge=1, le=100, description="passages (default search.top_k)")] = None,
        source: Annotated[
            list[str] | None,
            Query(max_length=1000, description="only files whose stored path matches (a path or a glob); repeatable"),
        ] = None,
    ) -> list[dict[str, Any]]:
        readable_kb(user, name)
        hits = zhiku.library.retriever(name).search(q, k or zhiku.settings.search.top_k, source or ())
        return [h.to_json() for h in sorted(hits, key=lambda h: -h.relevance)]

    @api.post(
        "/kbs/{name}/files", status_code=202, summary="Upload files into a base (created if new): a background ingest"
    )
    def upload(
        name: KbName,
        user: Owner,
        files: Annotated[list[UploadFile], File(min_length=1, description="PDF or TXT files")],
    ) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="zhiku-api-") as folder:
            paths = []
            for n, upload in enumerate(files):
                path = Path(folder) / str(n) / safe_filename(upload.filename or "upload.txt")
                path.parent.mkdir()
                with path.open("wb") as out:
                    while chunk := upload.file.read(1 << 20):
                        out.write(chunk)
                paths.append(path)
            job = kb_admin.start_ingest(zhiku.kbs, zhiku.access, zhiku.jobs, user, name, paths)  # copies them
        return _job(job)

    @api.get("/jobs/{job_id}", summary="An ingest's state, with each file's status and the reason of a failure")
    def get_job(job_id: str, user: Owner) -> dict[str, Any]:
        return _job(zhiku.jobs.get(user, job_id))

    @api.delete("/kbs/{name}/files", summary="Remove one file (its path as GET /v1/kbs/{name} lists it)")
    def remove_file(name: KbName, user: Owner, path: Annotated[str, Query(min_length=1)]) -> dict[str, Any]:
        readable_kb(user, name)
        removed = kb_admin.remove_file(zhiku.kbs, zhiku.access, user, name, path)
        return {"kb": name, "path": path, "chunks_removed": removed}

    @api.delete("/kbs/{name}", summary="Delete a knowledge base with its files")
    def delete_kb(name: KbName, user: Owner) -> dict[str, Any]:
        readable_kb(user, name)
        kb_admin.delete_base(zhiku.kbs, zhiku.access, zhiku.jobs, user, name)
        return {"deleted": name}

    # ---- conversations ----
    @api.get("/conversations", summary="The caller's saved conversations, most recent first")
    def list_conversations(
        user: Owner, q: Annotated[str, Query(max_length=200, description="only those matching")] = ""
    ) -> list[dict[str, Any]]:
        return [_conversation(c) for c in zhiku.conversations.conversations(user, q)]

    @api.get("/conversations/{conversation_id}", summary="One conversation with its messages")
    def get_conversation(conversation_id: str, user: Owner) -> dict[str, Any]:
        return zhiku.conversations.export_json(user, conversation_id)

    @api.get("/conversations/{conversation_id}/export", summary="A conversation as Markdown or JSON")
    def export_conversation(
        conversation_id: str, user: Owner, format: Annotated[Literal["md", "json"], Query()] = "md"
    ) -> PlainTextResponse:
        if format == "json":
            text = json.dumps(zhiku.conversations.export_json(user, conversation_id), ensure_ascii=False, indent=1)
        else:
            text = zhiku.conversations.export_markdown(user, conversation_id)
        return PlainTextResponse(text, media_type="text/markdown" if format == "md" else "application/json")

    @api.delete("/conversations/{conversation_id}", summary="Delete a conversation")
    def delete_conversation(conversation_id: str, user: Owner) -> dict[str, Any]:
        zhiku.conversations.delete(user, conversation_id)
        return {"deleted": conversation_id}

    return api


# ----- helpers -----------------------------------------------------------------------------------------------
def _chat_request(zhiku: Zhiku, user: str, body: ChatCompletionRequest, readable_kb: Any) -> ChatRequest:
    kb = None
    if body.model.startswith(KB_PREFIX):
        kb = readable_kb(user, body.model.removeprefix(KB_PREFIX))
    elif body.model != zhiku.settings.llm.backend:
        raise ApiError(
            404,
            f"no model {body.model!r}; GET /v1/models lists them (kb:<name> answers from a base)",
            code="model_not_found",
        )
    system = "\n\n".join(m.text() for m in body.messages if m.role in ("system", "developer")).strip() or None
    turns = [m for m in body.messages if m.role in ("user", "assistant")]
    if not turns or turns[-1].role != "user":
        raise ApiError(400, "messages must end with the user's message (the question to answer)")
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    changes = {
        "temperature": body.temperature,
        "top_p": body.top_p,
        "max_new_tokens": body.max_completion_tokens or body.max_tokens,
        "stop": stop,
        "seed": body.seed,
    }
    options = zhiku.settings.chat.generation.model_copy(update={k: v for k, v in changes.items() if v is not None})
    history = [Message("user" if m.role == "user" else "assistant", m.text()) for m in turns[:-1]]
    return ChatRequest(turns[-1].text(), history=history, kb=kb, system_prompt=system, options=options)


def _collect(events: Iterable[Any]) -> tuple[AnswerEvent, list[Source]]:
    sources: list[Source] = []
    for event in events:
        if isinstance(event, SourcesEvent):
            sources = list(event.sources)
        elif isinstance(event, AnswerEvent):
            return event, sources
    raise InvalidRequestError("the answer ended without its last event", "report this as a bug")


def _usage(answer: AnswerEvent) -> dict[str, int]:
    prompt, completion = answer.prompt_tokens, answer.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _chunks(head: dict[str, Any], events: Iterable[Any], include_usage: bool) -> Iterator[str]:
    """The answer as OpenAI's stream of ``chat.completion.chunk`` events; the last one carries the finish
    reason and the sources (and a chunk with the usage, when asked for)."""

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        body = {
            **head,
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return f"data: {json.dumps({**body, **extra}, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    streamed, sources = "", []
    try:
        for event in events:
            if isinstance(event, SourcesEvent):
                sources = list(event.sources)
            elif isinstance(event, TextEvent) and event.text:
                streamed += event.text
                yield chunk({"content": event.text})
            elif isinstance(event, AnswerEvent):
                # what the service adds after the model's words (the quoted sources) comes last; the answer
                # as a whole, with the [n] markers put into the model's words, is on the last chunk
                tail = event.text.removeprefix(streamed) if event.text.startswith(streamed) else event.appended
                if tail:
                    yield chunk({"content": tail})
                finish = "length" if event.cut_short else "stop"
                yield chunk({}, finish, sources=_sources(sources), answer=event.text)
                if include_usage:
                    body = {**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(event)}
                    yield f"data: {json.dumps(body)}\n\n"
    except ZhikuError as err:  # after the first byte there is no status code left to set: say it in the stream
        failed = {"error": {"message": str(err), "type": "server_error", "param": None, "code": None}}
        yield f"data: {json.dumps(failed, ensure_ascii=False)}\n\n"
    yield "data: [DONE]\n\n"


def _job(job: Any) -> dict[str, Any]:
    return {
        "id": job.id,
        "kb": job.kb,
        "state": job.state,
        "files": job.files,
        "error": job.error,
        "started": job.started,
        "finished": job.finished,
    }


def _conversation(c: Any) -> dict[str, Any]:
    return {"id": c.id, "title": c.title, "kb": c.kb, "created": c.created, "updated": c.updated}
