"""The web UI (Gradio): chat with a knowledge base, manage system-prompt presets, upload documents.

A browser session shows one conversation: its chat is the Chatbot's value, its system prompt and
generation settings are component values, and each finished answer saves them to the conversation store
(:mod:`app.ui_conversations`), whose id the browser keeps so that a reload reopens it. This module keeps no
mutable state; the shared parts (models, knowledge bases, presets and conversations on disk) belong to the
services of :class:`Zhiku` and the stores.

:func:`layout` creates the components, :func:`wire` connects their events to the handlers of
:mod:`app.ui_handlers` (plain functions, tested without a browser) through thin adapters that speak
Gradio: toasts, ``gr.skip()`` for "unchanged", dropdown updates. Gradio is imported inside functions
only, so importing this module is cheap.
"""

from __future__ import annotations

import html
import inspect
import os
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from app import ui_conversations as uc
from app import ui_handlers as h
from app import ui_kb
from app.auth import SessionOwners, Users, make_auth
from app.container import Zhiku
from app.conversations import ConversationStore
from app.presets import PresetStore
from app.ui_handlers import NO_KB, NONE_YET, ChatControls, ChatUpdate, PresetUpdate
from common.errors import ZhikuError

if TYPE_CHECKING:
    import gradio as gr

TITLE = "知库 Zhiku"
# Gradio translates its page's strings by the browser's language (login, file drop), but writes a toast's
# header as its type in English: the CSS below shows these instead
TOAST_TITLES = {"warning": "注意 / Warning", "info": "提示 / Info", "error": "错误 / Error"}
# how long opening another chat waits for the answer in progress to end (it ends at its next piece of text;
# a model still reading a long prompt has none yet: the chat opens anyway, the answer shows nothing more)
SWITCH_WAIT_S = 5.0

CSS = """
#sources { font-size: 0.85em; }
#sources details.source { border-bottom: 1px solid var(--border-color-primary); padding: 0.25em 0; }
#sources summary { cursor: pointer; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
#sources .passage { white-space: pre-wrap; padding: 0.4em 0.8em; max-height: 16em; overflow-y: auto; }
#sources mark { background: #ffe58a; color: inherit; padding: 0 0.1em; }
#sources .sources-note { color: var(--body-text-color-subdued); }
#effective-system-prompt textarea { font-size: 0.85em; }
footer { display: none !important; }
""" + "".join(
    f".toast-title.{kind} {{ font-size: 0 !important; }}"
    f' .toast-title.{kind}::before {{ content: "{title}"; font-size: var(--text-md); }}\n'
    for kind, title in TOAST_TITLES.items()
)
CLOSE_SIDEBAR_ON_PHONES = """() => {
  const side = document.querySelector('#conversations');
  if (window.innerWidth < 768 && side && side.classList.contains('open')) {
    side.querySelector('button.toggle-button')?.click();
  }
}"""


def build_ui(app: Zhiku, accounts: bool = False) -> gr.Blocks:
    """The Gradio app over ``app``'s services, with its queue configured; :func:`launch` serves it.
    ``accounts``: login is on, so presets and conversations are each user's own, and the page shows the
    user's name and a logout."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import gradio as gr

    presets = PresetStore(app.settings.data_dir)
    conversations = app.conversations
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        wire(demo, app, presets, conversations, layout(app, None if accounts else presets, accounts))
    demo.queue(default_concurrency_limit=app.settings.llm.max_concurrent)
    return demo


# ----- layout -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Components:
    """The components that events read or write (the elem_ids are what the browser tests use)."""

    chatbot: gr.Chatbot
    question: gr.Textbox
    send: gr.Button
    stop: gr.Button
    regenerate: gr.Button
    clear: gr.Button
    sources: gr.HTML
    effective: gr.Textbox
    kb: gr.Dropdown
    system_prompt: gr.Textbox
    preset_list: gr.Dropdown
    preset_name: gr.Textbox
    preset_save: gr.Button
    preset_delete: gr.Button
    generation: list[Any]  # temperature, top_p, top_k, max_new_tokens, seed, retrieval_k
    files: gr.File
    upload_kb: gr.Textbox
    upload_button: gr.Button
    upload_result: gr.Markdown
    page_choice: gr.Dropdown  # the current answer's PDF sources
    page_view: gr.Image  # the chosen one's page, its passage marked
    sidebar: Sidebar
    user: gr.Markdown  # the logged-in user's name (empty without login)
    theme: gr.Button  # light/dark
    kb_page: KbPage

    @property
    def controls(self) -> list[Any]:
        """The inputs of :class:`ChatControls`, in its order."""
        return [self.kb, self.system_prompt, *self.generation]


@dataclass(frozen=True)
class Sidebar:
    """The saved conversations: a list to open one, and what can be done with the open one."""

    new: gr.Button
    search: gr.Textbox
    listing: gr.Radio
    title: gr.Textbox
    rename: gr.Button
    delete: gr.Button
    export_md: gr.Button
    export_json: gr.Button
    export_file: gr.File


@dataclass(frozen=True)
class KbPage:
    """The knowledge-base page: every base, one base's files, and deleting either."""

    tab: gr.Tab
    bases: gr.Dataframe
    base: gr.Dropdown
    files: gr.Dataframe
    file: gr.Dropdown
    remove_file: gr.Button
    reingest: gr.Button
    confirm: gr.Checkbox
    delete_base: gr.Button
    status: gr.Markdown
    private: gr.Checkbox
    uploads: gr.File  # files to ingest in the background
    target: gr.Textbox
    start: gr.Button
    job: gr.Markdown  # the user's latest background ingest
    job_files: gr.Dataframe
    timer: gr.Timer  # polls the job while it runs


def _kb_page(tab: gr.Tab) -> KbPage:
    import gradio as gr

    bases = gr.Dataframe(
        headers=[
            "知识库 base",
            "文件 files",
            "段落 chunks",
            "嵌入模型 embedding model",
            "更新 updated",
            "所有者 owner",
        ],
        interactive=False,
        elem_id="kb-bases",
    )
    base = gr.Dropdown(choices=[], value=None, label="知识库 Knowledge base", elem_id="kb-pick")
    files = gr.Dataframe(
        headers=["文件 file", "页 pages", "段落 chunks", "编码 encoding"], interactive=False, elem_id="kb-files"
    )
    with gr.Row():
        file = gr.Dropdown(choices=[], value=None, label="文件 File", elem_id="kb-file", scale=4)
        remove_file = gr.Button("从知识库删除 Remove file", variant="stop", elem_id="kb-remove-file", scale=1)
    reingest = gr.Button("重新导入全部文件 Ingest its files again", elem_id="kb-reingest")
    private = gr.Checkbox(
        label="私有：只有我能看到 Private: only I see it (bases you created, with login)", elem_id="kb-private"
    )
    with gr.Row():
        confirm = gr.Checkbox(label="确认删除整个知识库 I mean to delete the whole base", elem_id="kb-confirm")
        delete_base = gr.Button("删除知识库 Delete base", variant="stop", elem_id="kb-delete")
    status = gr.Markdown(elem_id="kb-status")
    gr.Markdown("#### 后台导入 Ingest in the background")
    uploads = gr.File(file_count="multiple", type="filepath", label="文件 files", elem_id="kb-uploads")
    with gr.Row():
        target = gr.Textbox(
            label="导入到 Into",
            placeholder="留空 = 上面选择的知识库；新名字 = 新建 / empty: the base above; a new name creates one",
            max_lines=1,
            elem_id="kb-target",
            scale=4,
        )
        start = gr.Button("开始导入 Start", variant="primary", elem_id="kb-start", scale=1)
    job = gr.Markdown(elem_id="kb-job")
    job_files = gr.Dataframe(
        headers=["文件 file", "状态 status", "段落 chunks", "原因 reason"], interactive=False, elem_id="kb-job-files"
    )
    timer = gr.Timer(1.0, active=False)
    return KbPage(
        tab, bases, base, files, file, remove_file, reingest, confirm, delete_base, status, private, uploads,
        target, start, job, job_files, timer,
    )  # fmt: skip


def _sidebar() -> Sidebar:
    import gradio as gr

    with gr.Sidebar(label="对话 Conversations", open=True, elem_id="conversations"):
        new = gr.Button("＋ 新对话 New chat", variant="primary", size="sm", elem_id="conv-new")
        search = gr.Textbox(
            show_label=False, placeholder="搜索对话 Search", max_lines=1, elem_id="conv-search", submit_btn=False
        )
        listing = gr.Radio(choices=[], value=None, show_label=False, elem_id="conv-list")
        with gr.Accordion("当前对话 This conversation", open=False, elem_id="conv-actions"):
            title = gr.Textbox(label="名称 Name", max_lines=1, elem_id="conv-title")
            with gr.Row():
                rename = gr.Button("重命名 Rename", size="sm", elem_id="conv-rename")
                delete = gr.Button("删除 Delete", size="sm", variant="stop", elem_id="conv-delete")
            with gr.Row():
                export_md = gr.Button("导出 Markdown", size="sm", elem_id="conv-export-md")
                export_json = gr.Button("导出 JSON", size="sm", elem_id="conv-export-json")
            export_file = gr.File(label="导出文件 Export", interactive=False, elem_id="conv-export-file")
    return Sidebar(new, search, listing, title, rename, delete, export_md, export_json, export_file)


def layout(app: Zhiku, presets: PresetStore | None, accounts: bool = False) -> Components:
    """Create the components, inside the caller's ``gr.Blocks``. ``presets``: the ones to list before the
    page has loaded (None with login: whose they are is known only then)."""
    import gradio as gr

    settings = app.settings
    # with login, whose bases are visible is known only once the page loads (refresh)
    initial_kbs = [NO_KB] if accounts else h.kb_choices(app.kbs)
    kb_value = initial_kbs[1] if len(initial_kbs) > 1 else NO_KB
    with gr.Row(equal_height=True):
        gr.Markdown(f"# {TITLE}\n与你的文档对话 · Chat with your documents", elem_id="title")
        with gr.Column(scale=0, min_width=160):
            user = gr.Markdown("", elem_id="user", visible=accounts)
            with gr.Row():
                # light/dark in the browser only: Gradio's themes follow the "dark" class on <body>
                theme = gr.Button("🌓 明/暗", size="sm", elem_id="theme-toggle")
                gr.Button("退出登录 Log out", link="/logout", size="sm", elem_id="logout", visible=accounts)
    sidebar = _sidebar()
    with gr.Tabs(elem_id="tabs"):
        with gr.Tab("对话 Chat", elem_id="chat-tab"), gr.Row(equal_height=False):
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(
                    label="对话 Chat",
                    show_label=False,  # its badge covered the first message
                    elem_id="chatbot",
                    height="62vh",  # the window's height, less the input, buttons and sources
                    min_height=320,
                    buttons=["copy"],
                    feedback_options=("Like", "Dislike"),  # 👍/👎, stored with the conversation
                    placeholder=h.chat_placeholder(kb_value),
                    # no LaTeX: Gradio cuts $$...$$ out of the Markdown before parsing it, which could unpair
                    # the code fences that safe_markdown() relies on
                    latex_delimiters=[],
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
                    regenerate = gr.Button("重新生成 Regenerate", elem_id="regenerate", size="sm")
                    clear = gr.Button("清空 Clear", elem_id="clear", size="sm")
                gr.Markdown("#### 引用来源 Sources")
                # HTML, not Markdown: a passage is shown whole and as it is (escaped), never parsed as Markdown
                sources = gr.HTML(NONE_YET, elem_id="sources")
                with gr.Accordion("查看原文页 View page", open=False, elem_id="page-panel"):
                    page_choice = gr.Dropdown(
                        choices=[],
                        value=None,
                        label="PDF 来源 PDF source",
                        elem_id="page-choice",
                    )
                    page_view = gr.Image(
                        type="pil",
                        format="png",
                        interactive=False,
                        show_label=False,
                        height=560,
                        elem_id="page-view",
                    )
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
                    value=kb_value,
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
                        # a problem is shown when the page loads (refresh), which also lists a user's own
                        choices=h.preset_names(presets)[0] if presets is not None else [],
                        value=None,
                        label="预设 Presets",
                        elem_id="preset-list",
                    )
                    preset_name = gr.Textbox(label="预设名称 Preset name", max_lines=1, elem_id="preset-name")
                    with gr.Row():
                        preset_save = gr.Button("保存预设 Save", size="sm", elem_id="preset-save")
                        preset_delete = gr.Button("删除预设 Delete", size="sm", elem_id="preset-delete")
                generation = _generation_settings(app)
                with gr.Accordion("上传文档 Upload documents", open=False, elem_id="upload"):
                    extensions = app.ingest.extensions
                    files = gr.File(
                        label=f"文件 files（{', '.join(extensions)}；≤ {settings.server.max_upload_mb:g} MB）",
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
        with gr.Tab("知识库 Knowledge bases", elem_id="kb-tab") as kb_tab:
            kb_page = _kb_page(kb_tab)
    return Components(
        chatbot, question, send, stop, regenerate, clear, sources, effective, kb, system_prompt, preset_list,
        preset_name, preset_save, preset_delete, generation, files, upload_kb, upload_button, upload_result,
        page_choice, page_view, sidebar, user, theme, kb_page,
    )  # fmt: skip


def _generation_settings(app: Zhiku) -> list[Any]:
    """The generation-settings accordion: temperature, top_p, top_k, max_new_tokens, seed, retrieval top-k."""
    import gradio as gr

    gen = app.settings.chat.generation
    with gr.Accordion("生成设置 Generation settings", open=False, elem_id="generation-settings"):
        return [
            gr.Slider(
                0.0,
                2.0,
                value=gen.temperature,
                step=0.05,
                label="temperature",
                # chat.greedy_with_context: answers from a knowledge base stay close to the passages
                info="知识库回答固定为 0 / answers from a knowledge base use 0"
                if app.settings.chat.greedy_with_context
                else None,
                elem_id="temperature",
            ),
            gr.Slider(min(0.01, gen.top_p), 1.0, value=gen.top_p, step=0.01, label="top_p", elem_id="top-p"),
            gr.Slider(0, max(200, gen.top_k), value=gen.top_k, step=1, label="top_k", elem_id="top-k"),
            gr.Slider(
                1,
                max(4096, gen.max_new_tokens),
                value=gen.max_new_tokens,
                step=1,
                label="max_new_tokens",
                elem_id="max-new-tokens",
            ),
            # a Textbox, not a Number: an empty Number becomes 0 when the accordion first renders it, which
            # silently turned "random" into seed 0
            gr.Textbox(
                value="" if gen.seed is None else str(gen.seed),
                label="seed（留空 = 随机 / empty: random）",
                max_lines=1,
                elem_id="seed",
            ),
            gr.Slider(
                0,
                50,
                value=app.settings.chat.top_k,
                step=1,
                label="检索段落数 retrieval top-k（0 = 不检索 / no retrieval）",
                elem_id="retrieval-top-k",
            ),
        ]


# ----- events -------------------------------------------------------------------------------------------
class Adapters:
    """The handlers of :mod:`app.ui_handlers` in Gradio's terms: component values in; values, dropdown
    updates, ``gr.skip()`` for "unchanged" and toasts out."""

    def __init__(self, gr: ModuleType, app: Zhiku, presets: PresetStore, conversations: ConversationStore) -> None:
        self.gr = gr
        self.app = app
        self.presets = presets  # without login; with it, each user's own: presets_for()
        self.conversations = conversations
        self._lock = threading.Lock()  # guards the two lazily made things below
        self._exports: Path | None = None
        self._user_presets: dict[str, PresetStore] = {}  # one store (and its lock) per user

    def kb_choices(self, owner: str) -> list[str]:
        """The knowledge-base picker's choices: none, and the bases ``owner`` may see."""
        return [NO_KB, *self.app.access.visible(owner, self.app.kbs.names())]

    def presets_for(self, owner: str) -> PresetStore:
        if not owner:
            return self.presets
        with self._lock:
            if owner not in self._user_presets:
                self._user_presets[owner] = PresetStore(self.app.settings.data_dir, owner)
            return self._user_presets[owner]

    def toast(self, warning: str | None, info: str | None = None) -> None:
        # a toast renders its text as HTML: escaped, a message quoting a name or a document adds no <img>
        if warning:
            self.gr.Warning(html.escape(warning), title=TOAST_TITLES["warning"])
        if info:
            self.gr.Info(html.escape(info), title=TOAST_TITLES["info"])

    def keep(self, value: Any) -> Any:
        return self.gr.skip() if value is None else value

    def chat_outputs(self, update: ChatUpdate) -> tuple[Any, ...]:
        """(the chat, the sources panel, the effective prompt, the page list's state, its dropdown, the page)"""
        self.toast(update.warning)
        shown = self.keep(update.chat), self.keep(update.sources), self.keep(update.effective)
        if update.pages is None:
            return (*shown, self.gr.skip(), self.gr.skip(), self.gr.skip())
        choices = [ref.label for ref in update.pages]
        return (*shown, update.pages, self.gr.Dropdown(choices=choices, value=None), None)

    def refused(self, controls: Sequence[Any], owner: str) -> ChatUpdate | None:
        """A warning when the chosen knowledge base is one ``owner`` may not read (another user's private
        one, whose name the page was not given: a hand-made request)."""
        kb = h.kb_name(ChatControls(*controls).kb)
        try:
            if kb:
                self.app.access.check_read(owner, kb)
        except ZhikuError as err:
            return ChatUpdate(None, warning=h.readable(err))
        return None

    def respond(
        self,
        question: str | None,
        chat: Any,
        stopper: h.Stopper | None,
        conversation_id: str | None,
        view: str | None,
        *controls: Any,
        owner: str = "",
    ) -> Iterator[tuple[Any, ...]]:
        """Send: (the question box, the answer's outputs, the conversation id, the sidebar list) per update."""
        updates = h.ask(self.app.chat, question, chat, ChatControls(*controls))
        taken = False  # the box is emptied once, when the question is taken: a draft typed later stays
        for update, shown in self._answer(updates, chat, stopper, conversation_id, view, controls, owner):
            box = self.gr.skip() if taken or update.chat is None else ""
            taken = taken or update.chat is not None
            yield (box, *shown)

    def regenerate(
        self,
        chat: Any,
        stopper: h.Stopper | None,
        conversation_id: str | None,
        view: str | None,
        *controls: Any,
        owner: str = "",
    ) -> Iterator[tuple[Any, ...]]:
        """Regenerate: (the answer's outputs, the conversation id, the sidebar list) per update."""
        updates = h.regenerate(self.app.chat, chat, ChatControls(*controls))
        for _, shown in self._answer(updates, chat, stopper, conversation_id, view, controls, owner):
            yield shown

    def _answer(
        self,
        updates: Iterator[ChatUpdate],
        asked_in: Any,
        stopper: h.Stopper | None,
        conversation_id: str | None,
        view: str | None,
        controls: Sequence[Any],
        owner: str,
    ) -> Iterator[tuple[ChatUpdate, tuple[Any, ...]]]:
        """Each update of an answer with :meth:`chat_outputs` plus (the conversation id, the sidebar), unchanged
        until the end, when the chat is saved to the conversation it was asked in (``asked_in``: the chat
        the answer started from; see uc.save). The saving is part of the
        answer (not a later event): whatever conversation is opened next, it is shown after the answer's
        last update, and the id it sets is not overwritten by this one (see h.Stopper)."""
        if (refusal := self.refused(controls, owner)) is not None:
            updates = iter([refusal])
        ticket = stopper.begin(view) if stopper is not None else 0
        unchanged = (self.gr.skip(), self.gr.skip())
        try:
            last = ChatUpdate(None)  # what the answer shows at its end
            for update in h.until_stopped(updates, stopper, ticket):
                last = ChatUpdate(
                    last.chat if update.chat is None else update.chat,
                    last.sources if update.sources is None else update.sources,
                    last.effective if update.effective is None else update.effective,
                )
                if stopper is None or stopper.state(ticket) != h.ABANDONED:
                    yield update, (*self.chat_outputs(update), *unchanged)
            if last.chat is None:
                return
            saved = self.save(conversation_id, last.chat, asked_in, owner, *controls)
            if stopper is None or stopper.state(ticket) != h.ABANDONED:
                # the end shown again, with the saved id: an API client reads the event's last update only
                yield last, (*self.chat_outputs(last), *saved)
            else:
                # Gradio completes a streamed event by sending its last outputs once more, after the generator
                # has ended, so after the switch that waited for that end may have shown another chat: an
                # abandoned answer's last outputs must change nothing
                yield ChatUpdate(None), (*self.chat_outputs(ChatUpdate(None)), *unchanged)
        finally:
            if stopper is not None:
                stopper.end(ticket)

    def show_page(self, refs: list[h.PageRef] | None, choice: str | None) -> Any:
        view = h.show_page(refs, choice)
        self.toast(view.warning)
        return view.image

    @staticmethod
    def stop(stopper: h.Stopper | None) -> None:
        if stopper is not None:
            stopper.stop()

    def refresh(self, kb_value: str | None, preset_value: str | None, owner: str) -> tuple[Any, Any, Any]:
        """(the knowledge bases, the user's presets, the user's name) when the page loads."""
        fresh = h.refresh(self.app.kbs, self.presets_for(owner), kb_value, preset_value)
        self.toast(fresh.warning)
        kbs = self.kb_choices(owner)
        return (
            self.gr.Dropdown(choices=kbs, value=fresh.kb if fresh.kb in kbs else NO_KB),
            self.gr.Dropdown(choices=fresh.presets, value=fresh.preset),
            f"👤 {h.md_cell(owner)}" if owner else "",
        )

    def preset_outputs(self, update: PresetUpdate) -> tuple[Any, Any]:
        """(the preset list, the name box)"""
        self.toast(update.warning, update.info)
        choices = update.choices
        listed = self.gr.skip() if choices is None else self.gr.Dropdown(choices=choices, value=update.selected)
        return listed, self.keep(update.name)

    def pick_preset(self, name: str | None, owner: str) -> tuple[Any, Any]:
        update = h.pick_preset(self.presets_for(owner), name)
        self.toast(update.warning, update.info)
        return self.keep(update.prompt), self.keep(update.name)

    def save_preset(self, name: str | None, text: str | None, owner: str) -> tuple[Any, Any]:
        return self.preset_outputs(h.save_preset(self.presets_for(owner), name, text))

    def delete_preset(self, name: str | None, selected: str | None, owner: str) -> tuple[Any, Any]:
        return self.preset_outputs(h.delete_preset(self.presets_for(owner), name, selected))

    def upload(
        self, files: Any, target: str | None, selected: str | None, progress: Any, owner: str
    ) -> tuple[Any, Any, Any]:
        def report(done: int, total: int, desc: str) -> None:
            progress((done, total), desc=desc)

        kb_name = (target or "").strip() or h.kb_name(selected)
        try:
            if kb_name:
                self.app.access.reserve(owner, kb_name, exists=kb_name in self.app.kbs.names())
        except (ZhikuError, OSError) as err:
            self.toast(h.readable(err))
            return self.gr.skip(), self.gr.skip(), self.gr.skip()
        update = h.upload(self.app.ingest, self.app.kbs, files, target, selected, report)
        self.toast(update.warning)
        kb = self.gr.skip()
        if update.kbs is not None:
            choices = self.kb_choices(owner)
            kb = self.gr.Dropdown(choices=choices, **({"value": update.kb} if update.kb in choices else {}))
        return self.keep(update.summary), kb, None if update.clear_files else self.gr.skip()

    # ---- saved conversations (the sidebar) ----

    def listing(self, choices: uc.Choices | None, selected: str | None) -> Any:
        if choices is None:
            return self.gr.skip()
        return self.gr.Radio(choices=choices, value=selected or None)

    def save(
        self, conversation_id: str | None, chat: Any, based_on: Any, owner: str, *controls: Any
    ) -> tuple[Any, Any]:
        """(the session's conversation id, the sidebar list) after an answer made from the chat ``based_on``."""
        saved = uc.save(self.conversations, owner, conversation_id, chat, ChatControls(*controls), based_on)
        self.toast(saved.warning)
        return saved.conversation_id, self.listing(saved.choices, saved.conversation_id)

    def control_values(self, controls: ChatControls, owner: str) -> list[Any]:
        """The values of :attr:`Components.controls` for ``controls`` (the config's default where None)."""
        gen = self.app.settings.chat.generation
        seed = "" if gen.seed is None else str(gen.seed)
        defaults = [gen.temperature, gen.top_p, gen.top_k, gen.max_new_tokens, seed, self.app.settings.chat.top_k]
        given = [getattr(controls, name) for name in uc.GENERATION]
        kb = controls.kb if controls.kb in self.kb_choices(owner) else NO_KB
        return [
            kb,
            controls.system_prompt or "",
            *(d if g is None else g for g, d in zip(given, defaults, strict=True)),
        ]

    def open(self, conversation_id: str | None, owner: str, *, quiet: bool = False) -> tuple[Any, ...]:
        """Outputs of :func:`wire`'s ``opened``: the id, the chat and its panels, the controls, the name."""
        opened = uc.open_conversation(self.conversations, owner, conversation_id)
        choices, problem = uc.safe_choices(self.conversations, owner)
        if not quiet or problem:
            self.toast(opened.warning or problem)
        title = opened.title
        controls = self.control_values(opened.controls, owner) if opened.conversation_id else [self.gr.skip()] * 8
        return (
            opened.conversation_id,
            self.gr.Radio(choices=choices, value=opened.conversation_id or None),
            opened.chat,
            NONE_YET,
            "",
            [],
            self.gr.Dropdown(choices=[], value=None),
            None,
            *controls,
            title,
        )

    def reopen(self, conversation_id: str | None, stopper: h.Stopper | None, owner: str) -> Any:
        """:meth:`open` of the conversation the browser had open, when the page loads, unless the user has
        changed the chat already (a busy server runs this late): its outputs would replace that chat."""
        if stopper is not None and stopper.touched():
            return self.gr.skip()  # one skip leaves every output as it is
        return self.open(conversation_id, owner, quiet=True)

    def search(self, query: str | None, conversation_id: str | None, owner: str) -> Any:
        choices, problem = uc.safe_choices(self.conversations, owner, query or "")
        self.toast(problem)
        return self.gr.Radio(choices=choices, value=conversation_id or None)

    def rename(self, conversation_id: str | None, title: str | None, owner: str) -> Any:
        saved = uc.rename(self.conversations, owner, conversation_id, title)
        self.toast(saved.warning)
        return self.listing(saved.choices, saved.conversation_id)

    def delete(self, conversation_id: str | None, owner: str) -> tuple[Any, ...]:
        saved = uc.delete(self.conversations, owner, conversation_id)
        self.toast(saved.warning)
        if saved.warning:
            return (self.gr.skip(),) * 3
        return "", self.listing(saved.choices, None), []

    def export(self, conversation_id: str | None, kind: str, owner: str) -> Any:
        with self._lock:  # one folder for this process's exports, not one per click
            if self._exports is None:
                self._exports = Path(tempfile.mkdtemp(prefix="zhiku-export-"))
        path, warning = uc.export(
            self.conversations, owner, conversation_id, "json" if kind == "json" else "md", self._exports
        )
        self.toast(warning)
        return None if path is None else str(path)


class KbAdapters:
    """The knowledge-base page's handlers (:mod:`app.ui_kb`) in Gradio's terms."""

    def __init__(self, on: Adapters) -> None:
        self.on = on
        self.kbs = on.app.kbs

    def outputs(self, view: ui_kb.KbView, chat_kb: str | None, owner: str) -> tuple[Any, ...]:
        """(bases, base picker, files, file picker, status, confirm box, the chat's knowledge-base picker,
        the private box)"""
        gr = self.on.gr
        self.on.toast(view.warning)
        kb_choices = self.on.kb_choices(owner)
        entry = self.on.app.access.entry(view.base) if view.base else None
        return (
            view.bases,
            gr.Dropdown(choices=view.names, value=view.base),
            view.files,
            gr.Dropdown(choices=view.paths, value=None),
            view.status,
            False,
            gr.Dropdown(choices=kb_choices, value=chat_kb if chat_kb in kb_choices else NO_KB),
            gr.Checkbox(value=bool(entry and entry[1]), interactive=bool(entry and entry[0] == owner)),
        )

    def show(self, base: str | None, chat_kb: str | None, owner: str) -> tuple[Any, ...]:
        return self.outputs(ui_kb.view(self.kbs, self.on.app.access, owner, base), chat_kb, owner)

    def remove_file(self, base: str | None, path: str | None, chat_kb: str | None, owner: str) -> tuple[Any, ...]:
        return self.outputs(ui_kb.remove_file(self.kbs, self.on.app.access, owner, base, path), chat_kb, owner)

    def delete_base(self, base: str | None, confirmed: bool, chat_kb: str | None, owner: str) -> tuple[Any, ...]:
        app = self.on.app
        view = ui_kb.delete_base(self.kbs, app.access, owner, base, bool(confirmed), app.jobs)
        return self.outputs(view, chat_kb, owner)

    def set_private(self, base: str | None, private: bool, chat_kb: str | None, owner: str) -> tuple[Any, ...]:
        view = ui_kb.set_private(self.kbs, self.on.app.access, owner, base, bool(private))
        return self.outputs(view, chat_kb, owner)

    def job_outputs(self, view: ui_kb.JobView) -> tuple[Any, ...]:
        """(the job's summary, its files, the timer that polls it while it runs)"""
        self.on.toast(view.warning)
        return view.summary, view.rows, self.on.gr.Timer(active=view.active)

    def start(self, files: Any, target: str | None, base: str | None, owner: str) -> tuple[Any, ...]:
        app = self.on.app
        view = ui_kb.start_job(app.jobs, app.kbs, app.access, owner, files, target, base)
        return (*self.job_outputs(view), None if view.warning is None else self.on.gr.skip())

    def reingest(self, base: str | None, owner: str) -> tuple[Any, ...]:
        app = self.on.app
        return self.job_outputs(ui_kb.reingest(app.jobs, app.kbs, app.access, owner, base))

    def latest(self, owner: str) -> tuple[Any, ...]:
        return self.job_outputs(ui_kb.latest_job(self.on.app.jobs, owner))

    def poll(self, base: str | None, chat_kb: str | None, owner: str) -> tuple[Any, ...]:
        """The job's progress; once it has ended, the bases and files too (the chat's picker included)."""
        view = ui_kb.latest_job(self.on.app.jobs, owner)
        refreshed = self.show(base, chat_kb, owner) if not view.active else (self.on.gr.skip(),) * 8
        return (*self.job_outputs(view), *refreshed)


def owner_of(request: Any) -> str:
    """The logged-in user's name ("" without login): whose conversations and presets a request reaches."""
    return str(getattr(request, "username", None) or "")


def with_owner(gr: ModuleType, fn: Any) -> Any:
    """``fn(*inputs, owner=...)`` as a Gradio handler (a generator stays one: Gradio streams what it yields).
    Gradio finds ``gr.Request`` by its type annotation, and this module's annotations are strings: the
    wrapper is given the class itself."""

    # positional first: Gradio injects the request only into a positional parameter (never after *args)
    def call(request: Any, *args: Any) -> Any:
        return fn(*args, owner=owner_of(request))

    def stream(request: Any, *args: Any) -> Iterator[Any]:
        yield from fn(*args, owner=owner_of(request))

    handler = stream if inspect.isgeneratorfunction(fn) else call
    handler.__annotations__ = {"request": gr.Request}
    return handler


def wire(demo: gr.Blocks, app: Zhiku, presets: PresetStore, conversations: ConversationStore, c: Components) -> None:
    """Connect the events of ``demo``'s components. Every event is private (not in the API page); the chat
    events share one concurrency limit, the model's."""
    import gradio as gr

    on = Adapters(gr, app, presets, conversations)
    private: Any = {"api_visibility": "private"}
    chat_limit = app.settings.llm.max_concurrent

    def upload(
        request: Any,
        files: Any,
        target: str | None,
        selected: str | None,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio's way of asking for a progress bar
    ) -> tuple[Any, Any, Any]:
        return on.upload(files, target, selected, progress, owner_of(request))

    upload.__annotations__ = {"request": gr.Request}  # see with_owner; the progress bar is found by its default

    stopper = gr.State(h.Stopper())  # per browser session
    pages = gr.State([])  # the current answer's PDF pages (h.PageRef), per session: what the page view may show
    # the open conversation's id, kept in the browser's storage: a reload or a new tab reopens it
    conversation = gr.BrowserState("", storage_key="zhiku-conversation")
    # which opening of a chat a question was asked in (h.Stopper.switch): sent with each question
    view = gr.Textbox("", visible=False, elem_id="chat-view")
    answer_outputs = [c.chatbot, c.sources, c.effective, pages, c.page_choice, c.page_view]
    saved_outputs = [conversation, c.sidebar.listing]

    chat_event = gr.on(
        [c.send.click, c.question.submit],
        with_owner(gr, on.respond),
        inputs=[c.question, c.chatbot, stopper, conversation, view, *c.controls],
        outputs=[c.question, *answer_outputs, *saved_outputs],
        concurrency_limit=chat_limit,
        concurrency_id="chat",
        # a question sent while an answer streams waits for it, then is answered (the box keeps it meanwhile)
        trigger_mode="always_last",
        show_progress="minimal",
        **private,
    )
    regen_event = c.regenerate.click(
        with_owner(gr, on.regenerate),
        inputs=[c.chatbot, stopper, conversation, view, *c.controls],
        outputs=[*answer_outputs, *saved_outputs],
        concurrency_limit=chat_limit,
        concurrency_id="chat",
        trigger_mode="once",
        show_progress="minimal",
        cancels=[chat_event],
        **private,
    )
    gr.on([c.send.click, c.question.submit], None, cancels=[regen_event])
    # Stop ends the answer in progress from the inside (not with cancels=: see Stopper), and at once:
    # unqueued, it does not wait behind the chats it stops
    c.stop.click(on.stop, inputs=[stopper], queue=False, **private)
    c.page_choice.input(on.show_page, inputs=[pages, c.page_choice], outputs=[c.page_view], **private)
    c.preset_list.input(
        with_owner(gr, on.pick_preset), inputs=[c.preset_list], outputs=[c.system_prompt, c.preset_name], **private
    )
    c.preset_save.click(
        with_owner(gr, on.save_preset),
        inputs=[c.preset_name, c.system_prompt],
        outputs=[c.preset_list, c.preset_name],
        **private,
    )
    c.preset_delete.click(
        with_owner(gr, on.delete_preset),
        inputs=[c.preset_name, c.preset_list],
        outputs=[c.preset_list, c.preset_name],
        **private,
    )
    c.upload_button.click(
        upload,
        inputs=[c.files, c.upload_kb, c.kb],
        outputs=[c.upload_result, c.kb, c.files],
        concurrency_limit=1,
        concurrency_id="ingest",
        **private,
    )
    # registered after the chat's events: clients of the queue API (tests/test_reliability_load.py) find
    # the chat as the first event
    c.theme.click(None, js="() => { document.body.classList.toggle('dark'); }", **private)
    # an empty chat says where answers come from (the base picked, or none)
    c.kb.change(lambda kb: gr.update(placeholder=h.chat_placeholder(kb)), inputs=[c.kb], outputs=[c.chatbot], **private)
    # on a phone the open sidebar would cover the chat: it starts closed there (its toggle opens it)
    demo.load(None, js=CLOSE_SIDEBAR_ON_PHONES, api_visibility="private")
    loaded = demo.load(
        with_owner(gr, on.refresh), inputs=[c.kb, c.preset_list], outputs=[c.kb, c.preset_list, c.user], **private
    )
    _wire_conversations(gr, on, c, conversation, view, loaded, answer_outputs, stopper, private)
    page, kb_on = c.kb_page, KbAdapters(on)
    kb_outputs = [page.bases, page.base, page.files, page.file, page.status, page.confirm, c.kb, page.private]
    page.tab.select(with_owner(gr, kb_on.show), inputs=[page.base, c.kb], outputs=kb_outputs, **private)
    page.base.input(with_owner(gr, kb_on.show), inputs=[page.base, c.kb], outputs=kb_outputs, **private)
    page.private.input(
        with_owner(gr, kb_on.set_private), inputs=[page.base, page.private, c.kb], outputs=kb_outputs, **private
    )
    job_outputs = [page.job, page.job_files, page.timer]
    page.start.click(
        with_owner(gr, kb_on.start),
        inputs=[page.uploads, page.target, page.base],
        outputs=[*job_outputs, page.uploads],
        **private,
    )
    page.reingest.click(with_owner(gr, kb_on.reingest), inputs=[page.base], outputs=job_outputs, **private)
    polled = [*job_outputs, *kb_outputs]
    # the page (after a reload too) shows the user's latest job, and follows it while it runs
    page.tab.select(with_owner(gr, kb_on.latest), outputs=job_outputs, **private)
    page.timer.tick(with_owner(gr, kb_on.poll), inputs=[page.base, c.kb], outputs=polled, **private)
    page.remove_file.click(
        with_owner(gr, kb_on.remove_file),
        inputs=[page.base, page.file, c.kb],
        outputs=kb_outputs,
        concurrency_id="ingest",
        **private,
    )
    page.delete_base.click(
        with_owner(gr, kb_on.delete_base),
        inputs=[page.base, page.confirm, c.kb],
        outputs=kb_outputs,
        concurrency_id="ingest",
        **private,
    )


def _wire_conversations(
    gr: ModuleType,
    on: Adapters,
    c: Components,
    conversation: Any,
    view: Any,
    loaded: Any,
    answer_outputs: list[Any],
    stopper: Any,
    private: Any,
) -> None:
    """The sidebar: opening a conversation, a new chat, Clear, and what the sidebar does with the open one.
    (Each answer saves the chat itself: :meth:`Adapters.respond`.)"""
    side = c.sidebar

    def rate(conversation_id: str | None, request: Any = None, data: Any = None) -> None:
        on.toast(uc.feedback(on.conversations, owner_of(request), conversation_id, data.index, data.liked))

    rate.__annotations__ = {"request": gr.Request, "data": gr.LikeData}
    c.chatbot.like(rate, inputs=[conversation], **private)

    opened = [conversation, side.listing, *answer_outputs, *c.controls, side.title]

    def switch(request: Any, stopper: h.Stopper | None, conversation_id: str | None = None) -> tuple[Any, ...]:
        # the answer in progress ends first, and all it sent reaches the browser before the opened chat:
        # its late updates would otherwise land in, and be saved as, the conversation just opened
        new_view = stopper.switch(SWITCH_WAIT_S) if stopper is not None else gr.skip()
        return (*on.open(conversation_id, owner_of(request)), new_view)

    switch.__annotations__ = {"request": gr.Request}  # see with_owner
    # cheap, and waiting only for the session's own answer: no shared limit, so one session's switch never
    # waits behind another's
    switching: Any = {"outputs": [*opened, view], "concurrency_limit": None, **private}
    side.listing.input(switch, inputs=[stopper, side.listing], **switching)
    for start_afresh in (side.new.click, c.clear.click, c.chatbot.clear):  # Clear is a new chat
        start_afresh(switch, inputs=[stopper], **switching)
    loaded.then(with_owner(gr, on.reopen), inputs=[conversation, stopper], outputs=opened, **private)
    side.search.change(with_owner(gr, on.search), inputs=[side.search, conversation], outputs=[side.listing], **private)
    side.rename.click(with_owner(gr, on.rename), inputs=[conversation, side.title], outputs=[side.listing], **private)
    side.delete.click(
        with_owner(gr, on.delete), inputs=[conversation], outputs=[conversation, side.listing, c.chatbot], **private
    )
    side.export_md.click(
        with_owner(gr, lambda cid, owner: on.export(cid, "md", owner)),
        inputs=[conversation],
        outputs=[side.export_file],
        **private,
    )
    side.export_json.click(
        with_owner(gr, lambda cid, owner: on.export(cid, "json", owner)),
        inputs=[conversation],
        outputs=[side.export_file],
        **private,
    )


def launch(
    app: Zhiku,
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

    server = app.settings.server
    checker = make_auth(auth) if auth is not None else None  # a bad hash fails here, before serving
    demo = build_ui(app, accounts=checker is not None)
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
    from starlette.middleware import Middleware
    from starlette.routing import Mount

    from app.api import create_api
    from app.keys import KeyStore

    # the HTTP API on the same port, before Gradio's routes; behind API keys when login is on
    api = create_api(app, KeyStore(app.settings.data_dir) if checker is not None else None)
    options["app_kwargs"] = {"routes": [Mount("/v1", app=api)]}
    if checker is not None:
        options["auth"] = checker
        options["auth_message"] = "知库 Zhiku：请登录 / please log in"
        options["app_kwargs"]["middleware"] = [Middleware(SessionOwners)]  # a session is its user's only
    options.update(kwargs)
    try:
        demo.launch(share=False, **options)
    except OSError:  # gradio's "Cannot find empty port": its advice (GRADIO_SERVER_PORT, launch()) is not ours
        raise ZhikuError(
            f"cannot serve on {options['server_name']}:{options['server_port']}: the port is in use, or the "
            "address is not one of this machine's",
            "stop the program using that port, or pick another with --port (or server.port in config.yml)",
        ) from None
