"""Any OpenAI-compatible chat-completions server: vLLM, llama.cpp's server, LM Studio, OpenAI itself.

A server that is down, slow or failing must end a chat with a clear error, never hang it:

- connecting has its own short limit (``connect_timeout``); after that, ``timeout`` bounds every wait for the
  server: for the response, for the first word and for each next piece, so an answer that stalls mid-way
  ends with an error after ``timeout`` seconds of silence, however long the whole answer takes;
- a request that could not be delivered or was turned away for a passing reason (connection refused or
  dropped, HTTP 408, 429, 5xx) is sent again up to ``retries`` times, waiting ``retry_backoff`` seconds and
  then twice as long each time (or what the server's Retry-After asks, up to 10 s; a longer wait is an
  error), but only before the server sent any text: once part of the answer has been
  streamed it is never sent again (that would repeat or contradict what was shown). A request the server
  accepted and then answered nothing to within ``timeout`` is not sent again either: a busy server would
  only get busier, and the user would wait ``timeout`` once more;
- every error names the URL and says what to do (docs/vllm.md has the ``vllm serve`` commands).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator, Iterator, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from common.errors import BackendUnavailableError
from common.retry import RETRY_STATUSES, one_line, retry_after_seconds, retry_delay, server_error_message
from common.text import estimate_tokens
from llms.base import GenerationOptions, Message, chat_completion_request, stream_with_stops

log = logging.getLogger(__name__)

MAX_RETRY_AFTER = 10.0  # seconds: a server that asks for a longer wait (Retry-After) gets an error, not a wait
ASK_AGAIN = "ask again (Regenerate in the UI)"


class OpenAISettings(BaseModel):
    """The ``llm.openai`` section of config.yml."""

    model_config = ConfigDict(extra="forbid")

    base_url: str = Field("http://127.0.0.1:8000/v1", description="the server's /v1 URL")
    model: str = Field("default", description="model name the server knows (vLLM: --served-model-name)")
    api_key: SecretStr = Field(SecretStr("EMPTY"), description="or env ZHIKU_LLM__OPENAI__API_KEY")
    context_window: int = Field(4096, ge=256, description="the served model's context length (vLLM: --max-model-len)")
    timeout: float = Field(
        120.0, gt=0, description="seconds of silence allowed: for the first word, then between pieces of the answer"
    )
    connect_timeout: float = Field(5.0, gt=0, description="seconds to open the connection to the server")
    retries: int = Field(
        2, ge=0, le=10, description="re-sends of a request refused for a passing reason, before any text arrived"
    )
    retry_backoff: float = Field(0.5, ge=0, le=60, description="seconds before the first re-send, doubled each time")


class OpenAIBackend:
    name = "openai"

    def __init__(self, settings: OpenAISettings) -> None:
        self.settings = settings
        self._client: Any = None

    def _api(self) -> Any:
        if self._client is None:
            from openai import OpenAI, Timeout

            s = self.settings
            self._client = OpenAI(
                base_url=s.base_url,
                api_key=s.api_key.get_secret_value(),
                timeout=Timeout(s.timeout, connect=s.connect_timeout),
                max_retries=0,  # retried here, and only before the first word
            )
        return self._client

    @property
    def context_window(self) -> int:
        return self.settings.context_window

    def count_tokens(self, messages: Sequence[Message]) -> int:
        return sum(estimate_tokens(m.content) + 4 for m in messages) + 2  # + role/turn markers

    def stream(self, messages: Sequence[Message], options: GenerationOptions) -> Generator[str, None, None]:
        from openai import APIError

        request = {
            "model": self.settings.model,
            **chat_completion_request(messages, options),
            "extra_body": {"top_k": options.top_k} if options.top_k else None,  # vLLM and llama.cpp read it
        }
        response, chunks, first = self._start(request)
        ended: list[str | None] = []  # the finish reason of the last chunk

        def pieces() -> Iterator[str]:
            if first is not None:
                ended.append(first.finish_reason)
                yield first.delta.content or ""
            try:
                for chunk in chunks:
                    if chunk.choices:
                        ended.append(chunk.choices[0].finish_reason)
                        yield chunk.choices[0].delta.content or ""
            except APIError as err:  # part of the answer is out: never sent again
                raise self._broken(err) from err

        try:
            at_limit = lambda: bool(ended) and ended[-1] == "length"  # noqa: E731
            yield from stream_with_stops((p for p in pieces() if p), options.stop, at_limit)
        finally:
            _closed(response)

    # ----- the request, up to the first word -------------------------------------------------------------
    def _start(self, request: dict[str, Any]) -> tuple[Any, Iterator[Any], Any]:
        """Send the request and read up to the first piece of text (or the end of a reply without any):
        (the response to close, the chunks after that piece, the choice that carried it or None). A passing
        failure before any text is retried; anything else raises :class:`BackendUnavailableError`."""
        from openai import APIError

        attempt = 0
        while True:
            attempt += 1
            response = None
            try:
                response = self._api().chat.completions.create(**request)
                chunks = iter(response)
                for chunk in chunks:
                    if chunk.choices:
                        choice = chunk.choices[0]
                        if choice.delta.content or choice.finish_reason:
                            return response, chunks, choice
                return response, chunks, None
            except APIError as err:
                _closed(response)
                wait = _retry_after(err)
                if attempt > self.settings.retries or not _passing(err) or (wait or 0) > MAX_RETRY_AFTER:
                    raise self._unavailable(err, attempt) from err
                delay = retry_delay(attempt - 1, self.settings.retry_backoff, _retry_after_header(err))
                log.info(
                    "%s: %s; sending the request again in %.1f s (retry %d of %d)",
                    self.settings.base_url,
                    _reason(err),
                    delay,
                    attempt,
                    self.settings.retries,
                )
                time.sleep(delay)
            except BaseException:
                _closed(response)
                raise

    # ----- errors --------------------------------------------------------------------------------------------
    def _unavailable(self, err: Exception, attempts: int) -> BackendUnavailableError:
        """The error for a request that produced no text, naming the URL and the fix."""
        from openai import APIConnectionError, APIStatusError

        url = self.settings.base_url
        tried = f"; {attempts} attempts" if attempts > 1 else ""
        start = (
            "check that it is running (e.g. `vllm serve MODEL --served-model-name "
            f"{self.settings.model} --port PORT`, see docs/vllm.md) and that llm.openai.base_url is its /v1 "
            f"address, then {ASK_AGAIN}"
        )
        if _is_read_timeout(err):
            return BackendUnavailableError(
                f"the OpenAI-compatible server at {url} accepted the request but sent nothing for "
                f"{self.settings.timeout:g} s",
                f"it may be overloaded or stuck: check its log, then {ASK_AGAIN}; if long prompts need longer "
                "before the first word, raise llm.openai.timeout",
            )
        if isinstance(err, APIConnectionError):
            return BackendUnavailableError(
                f"cannot reach the OpenAI-compatible server at {url} ({_reason(err)}{tried})", start
            )
        if isinstance(err, APIStatusError):
            status = err.status_code
            said = f"HTTP {status}: {_server_message(err)}"
            if status in RETRY_STATUSES:
                wait = _retry_after(err)
                asks = f"; it asks to wait {wait:g} s" if wait is not None and wait > MAX_RETRY_AFTER else ""
                return BackendUnavailableError(
                    f"the OpenAI-compatible server at {url} is busy or failing ({said}{tried}{asks})",
                    "ask again in a moment (Regenerate in the UI); if it keeps failing, check the server's log",
                )
            if status in (401, 403):
                return BackendUnavailableError(
                    f"the OpenAI-compatible server at {url} refused the API key ({said})",
                    "set llm.openai.api_key (or env ZHIKU_LLM__OPENAI__API_KEY) to the server's key (vLLM: --api-key)",
                )
            if status == 404:
                return BackendUnavailableError(
                    f"the OpenAI-compatible server at {url} does not know model {self.settings.model!r} or this "
                    f"address ({said})",
                    "set llm.openai.model to a name the server serves (vLLM: --served-model-name; GET "
                    f"{url}/models lists them) and check that llm.openai.base_url ends in /v1",
                )
            return BackendUnavailableError(
                f"the OpenAI-compatible server at {url} refused the request ({said})",
                "if it names the context length, set llm.openai.context_window to at most the server's "
                "--max-model-len; if it names a chat template, start the server with --chat-template "
                "(docs/vllm.md); else check llm.openai.model",
            )
        return BackendUnavailableError(  # an error event the server streamed before any text
            f"the OpenAI-compatible server at {url} failed to answer ({_reason(err)})",
            f"check the server's log, then {ASK_AGAIN}",
        )

    def _broken(self, err: Exception) -> BackendUnavailableError:
        """The error for an answer that stopped part-way: what was shown stays, nothing is sent again."""
        from openai import APIConnectionError

        url = self.settings.base_url
        if _is_read_timeout(err):
            what = f"stopped sending mid-answer (nothing for {self.settings.timeout:g} s)"
        elif isinstance(err, APIConnectionError):
            what = f"closed the connection mid-answer ({_reason(err)})"
        else:
            what = f"failed mid-answer ({_reason(err)})"
        return BackendUnavailableError(
            f"the OpenAI-compatible server at {url} {what}; the answer is incomplete",
            f"{ASK_AGAIN}; if it happens again, check the server's log (was it restarted, or out of memory?)",
        )


def _closed(response: Any) -> None:
    """Close an openai stream now: its HTTP response, and the generators that read it. Left suspended (an
    answer ended early: Stop, a stop string, an error), those wait in a reference cycle for the garbage
    collector, whose later run can meet openai's cleanup at a bad moment (e.g. while httpx is being imported)
    and print an ignored exception."""
    if response is None:
        return
    reader = getattr(response, "_iterator", None)  # openai's Stream reads the events in this generator
    if reader is not None and hasattr(reader, "close"):
        reader.close()
    response.close()


def _passing(err: Exception) -> bool:
    """Whether sending the same request again may succeed: it did not get through (refused, dropped, no
    connection within connect_timeout) or the server turned it away for now (408, 429, 5xx)."""
    from openai import APIConnectionError, APIStatusError

    if isinstance(err, APIStatusError):
        return err.status_code in RETRY_STATUSES
    return isinstance(err, APIConnectionError) and not _is_read_timeout(err)


def _retry_after_header(err: Exception) -> str | None:
    response = getattr(err, "response", None)
    return response.headers.get("retry-after") if response is not None else None


def _retry_after(err: Exception) -> float | None:
    """The seconds a 429/503 answer's Retry-After header asks to wait (None: no such header)."""
    return retry_after_seconds(_retry_after_header(err))


def _is_read_timeout(err: Exception) -> bool:
    """A timeout after the connection was made: the server took the request and went silent."""
    from openai import APITimeoutError

    # the HTTP library's exception is the cause; named by class, as openai has used httpx and httpx2
    return isinstance(err, APITimeoutError) and type(err.__cause__).__name__ != "ConnectTimeout"


def _reason(err: Exception) -> str:
    """What went wrong, in the words of the layer that knows: the HTTP library's ("[Errno 111] Connection
    refused") rather than openai's "Connection error."."""
    from openai import APIConnectionError

    cause = err.__cause__
    if isinstance(err, APIConnectionError) and cause is not None:
        text = str(cause).strip() or type(cause).__name__
    else:
        text = getattr(err, "message", None) or str(err) or type(err).__name__
    return one_line(text)


def _server_message(err: Any) -> str:
    """The server's own explanation of an error status (openai hands the body's inner object over as ``body``)."""
    text = err.response.text if getattr(err, "response", None) is not None else ""
    return server_error_message(err.body, text) or str(err.message)


def openai_factory(options: OpenAISettings | dict[str, Any]) -> OpenAIBackend:
    return OpenAIBackend(options if isinstance(options, OpenAISettings) else OpenAISettings.model_validate(options))
