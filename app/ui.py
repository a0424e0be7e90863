"""The web UI (Gradio): chat with a knowledge base, manage system-prompt presets, upload documents.

Everything a conversation owns lives in the browser session: the chat history is the Chatbot's value,
the system prompt and generation settings are component values. This module keeps no mutable state;
the shared parts (models, knowledge bases, presets on disk) belong to :class:`ChatService`.

Gradio is imported inside :func:`build_ui` / :func:`launch` only, so importing this module is cheap.
"""

from __future__ import annotations

import html
import logging
import os
import re
import shutil
import tempfile
import unicodedata
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.auth import Users, make_auth
from app.chat import ChatRequest, ChatService, Source, SourcesEvent, TextEvent
from app.presets import PresetStore
from knowledge.catalog import InvalidNameError, validate_name
from knowledge.ingest import FileOutcome
from knowledge.store import StoreError
from llms.base import GenerationOptions, Message

if TYPE_CHECKING:
    import gradio as gr

log = logging.getLogger(__name__)

TITLE = "知库 Zhiku"
NO_KB = "（无 / none）"
ERROR_MARK = "⚠️"  # assistant bubbles that start with this are errors, not part of the conversation
SNIPPET_CHARS = 80
_UNSAFE_NAME_CHARS = re.compile(r'[<>:"|?*]')

CSS = """
#sources table { font-size: 0.85em; }
#sources td:not(:nth-child(4)), #sources th:not(:nth-child(4)) { white-space: nowrap; }
#effective-system-prompt textarea { font-size: 0.85em; }
footer { display: none !important; }
"""


# ----- pure helpers (no Gradio) ------------------------------------------------------------------
def message_text(content: Any) -> str:
    """The text of a Chatbot message's content: a string, a {"type": "text"} part, or a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        text = content.get("text")
        return text if isinstance(text, str) else ""
    if isinstance(content, list | tuple):
        return "".join(message_text(part) for part in content)
    return ""


def plain_chat(chat: Sequence[dict[str, Any]] | None) -> list[dict[str, str]]:
    """The Chatbot's value as simple ``{"role", "content"}`` text messages."""
    out: list[dict[str, str]] = []
    for m in chat or []:
        role = m.get("role")
        if role in ("user", "assistant"):
            out.append({"role": str(role), "content": message_text(m.get("content"))})
    return out


def history_of(chat: Sequence[dict[str, str]]) -> list[Message]:
    """Completed question/answer turns, oldest first; unanswered questions and error bubbles are left out."""
    turns: list[Message] = []
    pending: str | None = None
    for m in chat:
        text = m["content"].strip()
        if m["role"] == "user":
            pending = text or None
        elif pending is not None and text and not text.startswith(ERROR_MARK):
            turns += [Message("user", pending), Message("assistant", text)]
            pending = None
    return turns


def _md_cell(text: str) -> str:
    """Text safe inside a Markdown table cell: one line, no HTML, no table or emphasis syntax."""
    text = html.escape(" ".join(text.split()), quote=False)
    return re.sub(r"([\\`*_{}\[\]()#+!|~>])", r"\\\1", text)


def shorten(text: str, limit: int = SNIPPET_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def sources_markdown(sources: Sequence[Source], kb: str | None) -> str:
    if kb is None:
        return "_未使用知识库 / no knowledge base selected_"
    if not sources:
        return f"_知识库 {_md_cell(kb)} 中没有找到相关段落 / no relevant passages found_"
    rows = [
        "| # | 文件 file | 页 page | 片段 snippet | 分数 score |",
        "|---|---|---|---|---|",
    ]
    for n, s in enumerate(sources, 1):
        page = str(s.page) if s.page is not None else "–"
        rows.append(f"| {n} | {_md_cell(s.file)} | {page} | {_md_cell(shorten(s.snippet))} | {s.score:.3f} |")
    return "\n".join(rows)


def safe_filename(raw: str) -> str:
    """The base name of an uploaded file, without directories, control characters or leading dots."""
    name = unicodedata.normalize("NFC", raw.replace("\\", "/").rsplit("/", 1)[-1])
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C")
    name = _UNSAFE_NAME_CHARS.sub("_", name).strip().lstrip(".").rstrip(". ")
    if not name:
        raise ValueError(f"unusable file name {raw!r}")
    while len(name.encode("utf-8")) > 200:  # most file systems allow 255 bytes
        suffix = Path(name).suffix
        name = name[: len(name) - len(suffix) - 1] + suffix
    return name


def check_uploads(
    paths: Sequence[str | Path], extensions: Collection[str], max_upload_mb: float
) -> tuple[dict[str, Path], list[tuple[str, str]]]:
    """Uploaded files by their safe name, and (name, reason) for those refused: unusable names, types no
    loader reads, files over the size limit, and anything that is not a regular file."""
    rejected: list[tuple[str, str]] = []
    accepted: dict[str, Path] = {}
    for raw in paths:
        src = Path(raw)
        try:
            filename = safe_filename(src.name)
        except ValueError as err:
            rejected.append((src.name, _explain(err)))
            continue
        if Path(filename).suffix.lower() not in extensions:
            rejected.append((filename, f"不支持的文件类型 / unsupported type; 支持 supported: {', '.join(extensions)}"))
        elif src.is_symlink() or not src.is_file():
            rejected.append((filename, "不是普通文件 / not a regular file"))
        elif (size_mb := src.stat().st_size / 2**20) > max_upload_mb:
            rejected.append(
                (filename, f"{size_mb:.1f} MB，超过上传上限 / over the upload limit of {max_upload_mb:g} MB")
            )
        else:
            accepted[filename] = src
    return accepted, rejected


def upload_destination(data_dir: Path, kb: str, filename: str) -> Path:
    """Where an uploaded file is stored: ``<data_dir>/uploads/<kb>/<safe name>``. Raises ValueError when the
    name is unusable or the place is not directly in that folder (e.g. a symbolic link as the knowledge
    base's folder or in place of the file). ``uploads`` itself may be a link an administrator made."""
    uploads = data_dir / "uploads"
    folder = uploads / validate_name(kb)
    dest = folder / safe_filename(filename)
    for path in (folder, dest):
        if path.is_symlink():
            raise ValueError(f"{path.name}: a symbolic link in the uploads folder; remove it")
    if dest.resolve().parent != folder.resolve() or folder.resolve().parent != uploads.resolve():
        raise ValueError(f"{dest.name}: unsafe file name")
    return dest


def kb_choices(service: ChatService) -> list[str]:
    return [NO_KB, *service.knowledge_bases()]


def _kb_arg(value: str | None) -> str | None:
    return None if not value or value == NO_KB else value


def _explain(err: BaseException) -> str:
    return str(err) or type(err).__name__


# ----- the app -----------------------------------------------------------------------------------
def build_ui(service: ChatService) -> gr.Blocks:
    """The Gradio app for ``service``, with its queue configured; :func:`launch` serves it."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import gradio as gr

    settings = service.settings
    zhiku = service.zhiku
    presets = PresetStore(settings.data_dir)
    gen = settings.chat.generation
    max_upload_mb = settings.server.max_upload_mb
    extensions = sorted(zhiku.loaders.extensions)
    chat_limit = settings.llm.max_concurrent

    # ----- chat ------------------------------------------------------------------------------
    def answer(
        question: str,
        prior: list[dict[str, str]],
        kb_value: str | None,
        system_prompt: str | None,
        temperature: float,
        top_p: float,
        top_k: float,
        max_new_tokens: float,
        seed: float | None,
        retrieval_k: float,
    ) -> Iterator[tuple[list[dict[str, str]], str, str]]:
        """Stream (chat, sources markdown, effective system prompt) for one question."""
        kb = _kb_arg(kb_value)
        chat = [*prior, {"role": "user", "content": question}]
        searching = "_检索中… / searching…_"
        sources_md = searching if kb else sources_markdown([], None)
        effective = text = ""

        def failed(message: str) -> tuple[list[dict[str, str]], str, str]:
            gr.Warning(message)
            partial = [{"role": "assistant", "content": text}] if text else []
            error = {"role": "assistant", "content": f"{ERROR_MARK} {message}"}
            return [*chat, *partial, error], "_—_" if sources_md == searching else sources_md, effective

        try:
            options = GenerationOptions(
                **{
                    **gen.model_dump(),
                    "temperature": float(temperature),
                    "top_p": float(top_p),
                    "top_k": int(top_k),
                    "max_new_tokens": int(max_new_tokens),
                    "seed": None if seed is None else int(seed),
                }
            )
            request = ChatRequest(
                question,
                history=history_of(prior),
                kb=kb,
                system_prompt=(system_prompt or "").strip() or None,
                options=options,
                top_k=int(retrieval_k),
            )
            effective = service.build_messages(request, [])[0].content
            yield chat, sources_md, effective
            events = service.stream(request)
            try:
                for event in events:
                    if isinstance(event, SourcesEvent):
                        sources_md = sources_markdown(event.sources, kb)
                        yield chat, sources_md, effective
                    elif isinstance(event, TextEvent) and event.text:
                        text += event.text
                        yield [*chat, {"role": "assistant", "content": text}], sources_md, effective
            finally:  # Stop closes this generator: end the model's generation and free its slot now
                close = getattr(events, "close", None)
                if close is not None:
                    close()
            if not text:
                yield (
                    [*chat, {"role": "assistant", "content": "（模型没有给出回答 / empty answer）"}],
                    sources_md,
                    effective,
                )
        except (ValueError, StoreError, FileNotFoundError, OSError) as err:
            yield failed(_explain(err))
        except Exception as err:
            log.exception("answering %r failed", question)
            yield failed(f"内部错误 / internal error: {type(err).__name__}: {_explain(err)}")

    def respond(question: str, chat: list[dict[str, Any]] | None, *settings_: Any) -> Iterator[tuple[Any, ...]]:
        question = (question or "").strip()
        if not question:
            gr.Warning("请输入问题 / Please type a question")
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        for out in answer(question, plain_chat(chat), *settings_):
            yield ("", *out)

    def regenerate(chat: list[dict[str, Any]] | None, *settings_: Any) -> Iterator[tuple[Any, ...]]:
        prior = plain_chat(chat)
        while prior and prior[-1]["role"] != "user":
            prior.pop()
        if not prior or not prior[-1]["content"].strip():
            gr.Warning("还没有可以重新生成的问题 / Nothing to regenerate yet")
            yield gr.skip(), gr.skip(), gr.skip()
            return
        question = prior.pop()["content"].strip()
        yield from answer(question, prior, *settings_)

    # ----- knowledge bases and presets --------------------------------------------------------
    def refresh(kb_value: str | None, preset_value: str | None) -> tuple[Any, Any]:
        choices = kb_choices(service)
        if kb_value not in choices:
            kb_value = choices[1] if len(choices) > 1 else NO_KB
        names = _preset_names()
        return (
            gr.Dropdown(choices=choices, value=kb_value),
            gr.Dropdown(choices=names, value=preset_value if preset_value in names else None),
        )

    def _preset_names() -> list[str]:
        try:
            return list(presets.list())
        except ValueError as err:
            gr.Warning(_explain(err))
            return []

    def pick_preset(name: str | None) -> tuple[Any, Any]:
        if not name:
            return gr.skip(), gr.skip()
        try:
            return presets.get(name), name
        except ValueError as err:
            gr.Warning(_explain(err))
            return gr.skip(), gr.skip()

    def save_preset(name: str, text: str) -> tuple[Any, Any]:
        try:
            saved = presets.save(name or "", text or "")
        except ValueError as err:
            gr.Warning(f"预设未保存 / preset not saved: {_explain(err)}")
            return gr.skip(), gr.skip()
        gr.Info(f"已保存预设 / saved preset “{saved}”")
        return gr.Dropdown(choices=_preset_names(), value=saved), saved

    def delete_preset(name: str, selected: str | None) -> tuple[Any, Any]:
        target = (name or "").strip() or (selected or "")
        try:
            presets.delete(target)
        except ValueError as err:
            gr.Warning(f"预设未删除 / preset not deleted: {_explain(err)}")
            return gr.skip(), gr.skip()
        gr.Info(f"已删除预设 / deleted preset “{target.strip()}”")
        return gr.Dropdown(choices=_preset_names(), value=None), ""

    # ----- upload -----------------------------------------------------------------------------
    def upload(
        files: list[str] | str | None,
        target: str,
        selected: str | None,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio's way of asking for a progress bar
    ) -> tuple[Any, Any, Any]:
        paths = [files] if isinstance(files, str) else list(files or [])
        name = (target or "").strip() or _kb_arg(selected)
        if not paths:
            gr.Warning("请先选择文件 / Choose files to upload first")
            return gr.skip(), gr.skip(), gr.skip()
        if not name:
            gr.Warning("请选择知识库或输入新知识库名称 / Pick a knowledge base or type a new name")
            return gr.skip(), gr.skip(), gr.skip()
        try:
            validate_name(name)
        except InvalidNameError as err:
            gr.Warning(_explain(err))
            return f"{ERROR_MARK} {_md_cell(_explain(err))}", gr.skip(), gr.skip()

        accepted, rejected = check_uploads(paths, extensions, max_upload_mb)

        report = None
        try:
            if accepted:
                copied: list[Path] = []
                progress(0, desc="复制文件 / copying files")
                for filename, src in accepted.items():
                    try:
                        dest = upload_destination(settings.data_dir, name, filename)
                    except ValueError as err:  # belt and braces after safe_filename
                        rejected.append((filename, _explain(err)))
                        continue
                    folder = dest.parent
                    folder.mkdir(parents=True, exist_ok=True)
                    fd, tmp = tempfile.mkstemp(prefix=".upload-", dir=folder)
                    os.close(fd)
                    try:
                        shutil.copyfile(src, tmp)
                        Path(tmp).replace(dest)
                    finally:
                        Path(tmp).unlink(missing_ok=True)
                    copied.append(dest)
                done = 0

                def on_outcome(outcome: FileOutcome) -> None:
                    nonlocal done
                    done += 1
                    progress((done, len(copied)), desc=f"导入 / ingesting {Path(outcome.path).name}")

                progress((0, len(copied)), desc="导入 / ingesting")
                with zhiku.open_kb(name, create=True) as store:
                    report = zhiku.ingestor(store).run(copied, progress=False, on_outcome=on_outcome)
        except (ValueError, StoreError, FileNotFoundError, OSError) as err:
            gr.Warning(_explain(err))
            return f"{ERROR_MARK} {_md_cell(_explain(err))}", gr.skip(), gr.skip()
        except Exception as err:
            log.exception("upload into %r failed", name)
            message = f"内部错误 / internal error: {type(err).__name__}: {_explain(err)}"
            gr.Warning(message)
            return f"{ERROR_MARK} {_md_cell(message)}", gr.skip(), gr.skip()

        lines = [f"**知识库 knowledge base: {_md_cell(name)}**", ""]
        if report is not None:
            lines.append(
                f"新增 added {report.count('added')} · 更新 updated {report.count('updated')} · "
                f"未变 unchanged {report.count('unchanged')} · 失败 failed {len(report.failures)} · "
                f"片段 chunks +{report.chunks_added}"
            )
            for failure in report.failures:
                lines.append(f"- ❌ {_md_cell(Path(failure.path).name)}: {_md_cell(failure.reason)}")
        for filename, reason in rejected:
            lines.append(f"- ❌ {_md_cell(filename)}: {_md_cell(reason)}")
        if rejected or (report is not None and report.failures):
            gr.Warning("部分文件未导入 / some files were not ingested")
        choices = kb_choices(service)
        kb_update = gr.Dropdown(choices=choices, value=name) if name in choices else gr.Dropdown(choices=choices)
        return "\n".join(lines), kb_update, None

    # ----- layout -----------------------------------------------------------------------------
    initial_kbs = kb_choices(service)
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"# {TITLE}\n与你的文档对话 · Chat with your documents", elem_id="title")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(
                    label="对话 Chat",
                    elem_id="chatbot",
                    height=380,
                    buttons=["copy"],
                    feedback_options=None,
                    placeholder="选择知识库，然后提问 · Pick a knowledge base and ask a question",
                )
                with gr.Row():
                    question = gr.Textbox(
                        show_label=False,
                        placeholder="输入问题，回车发送 / Ask a question, Enter to send",
                        elem_id="question",
                        scale=6,
                        lines=1,
                        max_lines=6,
                    )
                    send = gr.Button("发送 Send", variant="primary", elem_id="send", scale=1, min_width=90)
                with gr.Row():
                    stop = gr.Button("停止 Stop", variant="stop", elem_id="stop", size="sm")
                    regen = gr.Button("重新生成 Regenerate", elem_id="regenerate", size="sm")
                    clear = gr.Button("清空 Clear", elem_id="clear", size="sm")
                gr.Markdown("#### 引用来源 Sources")
                sources = gr.Markdown("_暂无 / none yet_", elem_id="sources")
                effective = gr.Textbox(
                    label="本次回答使用的系统提示 Effective system prompt",
                    interactive=False,
                    lines=1,
                    max_lines=3,
                    elem_id="effective-system-prompt",
                )
            with gr.Column(scale=2):
                kb = gr.Dropdown(
                    choices=initial_kbs,
                    value=initial_kbs[1] if len(initial_kbs) > 1 else NO_KB,
                    label="知识库 Knowledge base",
                    elem_id="kb",
                )
                system_prompt = gr.Textbox(
                    value="",  # empty: the config's default for the question's language (zh or en)
                    placeholder=settings.chat.system_prompt_zh,
                    label="系统提示 System prompt",
                    info="留空 = 按问题语言使用默认提示 / empty: the default for the question's language",
                    lines=3,
                    max_lines=10,
                    elem_id="system-prompt",
                )
                with gr.Group():
                    preset_list = gr.Dropdown(
                        choices=_preset_names(),
                        value=None,
                        label="预设 Presets",
                        elem_id="preset-list",
                    )
                    preset_name = gr.Textbox(label="预设名称 Preset name", max_lines=1, elem_id="preset-name")
                    with gr.Row():
                        preset_save = gr.Button("保存预设 Save", size="sm", elem_id="preset-save")
                        preset_delete = gr.Button("删除预设 Delete", size="sm", elem_id="preset-delete")
                with gr.Accordion("生成设置 Generation settings", open=False, elem_id="generation-settings"):
                    temperature = gr.Slider(
                        0.0, 2.0, value=gen.temperature, step=0.05, label="temperature", elem_id="temperature"
                    )
                    top_p = gr.Slider(
                        min(0.01, gen.top_p), 1.0, value=gen.top_p, step=0.01, label="top_p", elem_id="top-p"
                    )
                    top_k = gr.Slider(0, max(200, gen.top_k), value=gen.top_k, step=1, label="top_k", elem_id="top-k")
                    max_new_tokens = gr.Slider(
                        1,
                        max(4096, gen.max_new_tokens),
                        value=gen.max_new_tokens,
                        step=1,
                        label="max_new_tokens",
                        elem_id="max-new-tokens",
                    )
                    seed = gr.Number(
                        value=gen.seed, precision=0, label="seed（留空 = 随机 / empty: random）", elem_id="seed"
                    )
                    retrieval_k = gr.Slider(
                        0,
                        50,
                        value=settings.chat.top_k,
                        step=1,
                        label="检索段落数 retrieval top-k（0 = 不检索 / no retrieval）",
                        elem_id="retrieval-top-k",
                    )
                with gr.Accordion("上传文档 Upload documents", open=False, elem_id="upload"):
                    files = gr.File(
                        label=f"文件 files（{', '.join(extensions)}；≤ {max_upload_mb:g} MB）",
                        file_count="multiple",
                        file_types=extensions,
                        type="filepath",
                        elem_id="upload-files",
                    )
                    upload_kb = gr.Textbox(
                        label="导入到知识库 Into knowledge base",
                        placeholder="留空 = 当前选择的知识库 / empty: the selected one",
                        max_lines=1,
                        elem_id="upload-kb",
                    )
                    upload_button = gr.Button("导入 Ingest", variant="primary", elem_id="upload-button")
                    upload_result = gr.Markdown(elem_id="upload-result")

        # ----- events ------------------------------------------------------------------------
        gen_inputs = [kb, system_prompt, temperature, top_p, top_k, max_new_tokens, seed, retrieval_k]
        private: Any = {"api_visibility": "private"}
        chat_event = gr.on(
            [send.click, question.submit],
            respond,
            inputs=[question, chatbot, *gen_inputs],
            outputs=[question, chatbot, sources, effective],
            concurrency_limit=chat_limit,
            concurrency_id="chat",
            trigger_mode="once",
            show_progress="minimal",
            **private,
        )
        regen_event = regen.click(
            regenerate,
            inputs=[chatbot, *gen_inputs],
            outputs=[chatbot, sources, effective],
            concurrency_limit=chat_limit,
            concurrency_id="chat",
            trigger_mode="once",
            show_progress="minimal",
            cancels=[chat_event],
            **private,
        )
        gr.on([send.click, question.submit], None, cancels=[regen_event])
        stop.click(None, cancels=[chat_event, regen_event])
        clear.click(
            lambda: ([], "_暂无 / none yet_", ""),
            outputs=[chatbot, sources, effective],
            cancels=[chat_event, regen_event],
            queue=False,
            **private,
        )
        chatbot.clear(
            lambda: ("_暂无 / none yet_", ""),
            outputs=[sources, effective],
            cancels=[chat_event, regen_event],
            **private,
        )
        preset_list.input(pick_preset, inputs=[preset_list], outputs=[system_prompt, preset_name], **private)
        preset_save.click(
            save_preset, inputs=[preset_name, system_prompt], outputs=[preset_list, preset_name], **private
        )
        preset_delete.click(
            delete_preset, inputs=[preset_name, preset_list], outputs=[preset_list, preset_name], **private
        )
        upload_button.click(
            upload,
            inputs=[files, upload_kb, kb],
            outputs=[upload_result, kb, files],
            concurrency_limit=1,
            concurrency_id="ingest",
            **private,
        )
        demo.load(refresh, inputs=[kb, preset_list], outputs=[kb, preset_list], **private)

    demo.queue(default_concurrency_limit=settings.llm.max_concurrent)
    return demo


def launch(
    service: ChatService,
    host: str | None = None,
    port: int | None = None,
    *,
    auth: Users | None = None,
    **kwargs: Any,
) -> None:
    """Serve the UI on ``host:port`` (default: ``server.host`` / ``server.port`` from the config).

    ``auth``: (user name, password hash) pairs (hashes from :func:`app.auth.hash_password`, format
    ``scrypt$n$r$p$salt$hash``); when given, every page and API call needs a login. Plain passwords are
    refused. Extra keyword arguments go to ``gr.Blocks.launch`` (e.g. ``prevent_thread_lock=True`` in
    tests); a public share link is never created.
    """
    if kwargs.pop("share", False):
        raise ValueError("Zhiku never creates a public share link; bind server.host to expose the UI")
    if "auth" in kwargs or "auth_dependency" in kwargs:
        raise ValueError("pass users with hashed passwords as launch(auth=[(name, hash)])")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import gradio as gr

    server = service.settings.server
    checker = make_auth(auth) if auth is not None else None  # a bad hash fails here, before serving
    demo = build_ui(service)
    theme = gr.themes.Soft(
        font=["Noto Sans CJK SC", "PingFang SC", "Microsoft YaHei", "Source Han Sans SC", "sans-serif"],
        font_mono=["Noto Sans Mono CJK SC", "monospace"],
    )
    options: dict[str, Any] = {
        "server_name": host or server.host,
        "server_port": port or server.port,
        "max_file_size": int(server.max_upload_mb * 2**20),
        "ssr_mode": False,
        "theme": theme,
        "css": CSS,
    }
    if checker is not None:
        options["auth"] = checker
        options["auth_message"] = "知库 Zhiku：请登录 / please log in"
    options.update(kwargs)
    demo.launch(share=False, **options)
