"""Any OpenAI-compatible chat-completions server: vLLM, llama.cpp's server, LM Studio, OpenAI itself."""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from common.errors import BackendUnavailableError
from common.text import estimate_tokens
from llms.base import GenerationOptions, Message, chat_completion_request, stream_with_stops


class OpenAISettings(BaseModel):
    """The ``llm.openai`` section of config.yml."""

    model_config = ConfigDict(extra="forbid")

    base_url: str = Field("http://127.0.0.1:8000/v1", description="the server's /v1 URL")
    model: str = Field("default", description="model name the server knows (vLLM: --served-model-name)")
    api_key: SecretStr = Field(SecretStr("EMPTY"), description="or env ZHIKU_LLM__OPENAI__API_KEY")
    context_window: int = Field(4096, ge=256, description="the served model's context length")
    timeout: float = Field(120.0, gt=0)


class OpenAIBackend:
    name = "openai"

    def __init__(self, settings: OpenAISettings) -> None:
        self.settings = settings
        self._client: Any = None

    def _api(self) -> Any:
        if self._client is None:
            from openai import OpenAI

            self._client = OpenAI(
                base_url=self.settings.base_url,
                api_key=self.settings.api_key.get_secret_value(),
                timeout=self.settings.timeout,
                max_retries=1,
            )
        return self._client

    @property
    def context_window(self) -> int:
        return self.settings.context_window

    def count_tokens(self, messages: Sequence[Message]) -> int:
        return sum(estimate_tokens(m.content) + 4 for m in messages) + 2  # + role/turn markers

    def stream(self, messages: Sequence[Message], options: GenerationOptions) -> Generator[str, None, None]:
        from openai import APIConnectionError, APIStatusError

        try:
            response = self._api().chat.completions.create(
                model=self.settings.model,
                **chat_completion_request(messages, options),
                extra_body={"top_k": options.top_k} if options.top_k else None,  # vLLM and llama.cpp read it
            )
        except APIConnectionError as err:
            raise BackendUnavailableError(
                f"cannot reach the OpenAI-compatible server at {self.settings.base_url} ({err})",
                "check that it is running (e.g. `vllm serve MODEL --served-model-name default`) and that "
                "llm.openai.base_url points at its /v1 address",
            ) from err
        except APIStatusError as err:
            raise BackendUnavailableError(
                f"the server at {self.settings.base_url} refused the request ({err})",
                "check llm.openai.model (the name the server serves) and llm.openai.api_key",
            ) from err
        ended = []  # the finish reason of the last chunk

        def pieces() -> Iterator[str]:
            for chunk in response:
                if chunk.choices:
                    ended.append(chunk.choices[0].finish_reason)
                    yield chunk.choices[0].delta.content or ""

        try:
            at_limit = lambda: bool(ended) and ended[-1] == "length"  # noqa: E731
            yield from stream_with_stops((p for p in pieces() if p), options.stop, at_limit)
        finally:
            response.close()


def openai_factory(options: OpenAISettings | dict[str, Any]) -> OpenAIBackend:
    return OpenAIBackend(options if isinstance(options, OpenAISettings) else OpenAISettings.model_validate(options))
