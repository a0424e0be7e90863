"""Zhiku's built-in chat backends, registered through the same hook as third-party plugins."""

from __future__ import annotations

from plugins.hookspecs import RegisterLLM, hookimpl


@hookimpl
def register_llms(register: RegisterLLM) -> None:
    from llms.llamacpp import default_factory
    from llms.openai_backend import openai_factory
    from llms.transformers_backend import baichuan_factory, llama_factory, moss_factory

    register("default", default_factory)
    register("openai", openai_factory)
    register("moss", moss_factory)
    register("llama", llama_factory)
    register("baichuan", baichuan_factory)
