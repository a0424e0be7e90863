"""Zhiku's built-in chat backends, registered through the same hook as third-party plugins, each with the
model of its own options."""

from __future__ import annotations

from plugins.hookspecs import RegisterLLM, hookimpl


@hookimpl
def register_llms(register: RegisterLLM) -> None:
    from llms.llamacpp import LlamaCppSettings, default_factory
    from llms.openai_backend import OpenAISettings, openai_factory
    from llms.transformers_backend import (
        BaichuanSettings,
        LlamaSettings,
        MossSettings,
        baichuan_factory,
        llama_factory,
        moss_factory,
    )

    register("default", default_factory, settings=LlamaCppSettings)
    register("openai", openai_factory, settings=OpenAISettings)
    register("moss", moss_factory, settings=MossSettings)
    register("llama", llama_factory, settings=LlamaSettings)
    register("baichuan", baichuan_factory, settings=BaichuanSettings)
