"""The HTTP API (issue 14): the real `openai` client against `serve`'s /v1 on 127.0.0.1 (chat streamed and not,
a kb: model with its sources, embeddings), the knowledge-base and conversation routes, API keys and what each
user's key reaches, and schemathesis over the OpenAPI schema."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from typer.testing import CliRunner

from app.api import create_api
from app.chat import AnswerEvent, TextEvent
from app.cli import cli
from app.container import Zhiku
from app.keys import KeyStore
from app.ui import launch
from app.ui_conversations import save as save_conversation
from app.ui_handlers import ChatControls
from app.users import UserStore
from tests.test_ui import _free_port, echo_app, echo_config

RIVER = "长江全长约6300公里，是中国最长的河流。黄河全长约5464公里，被称为母亲河。"
SECRET = "bob 的私有笔记：保险箱密码是 4711。"


def _serve(zhiku: Zhiku, **kwargs: Any) -> str:
    port = _free_port()
    launch(zhiku, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True, **kwargs)
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Zhiku]]:
    """Login off: the API needs no key (as the UI needs no login)."""
    root = tmp_path_factory.mktemp("api")
    zhiku = echo_app(echo_config(root))
    (root / "river.txt").write_text(RIVER, encoding="utf-8")
    zhiku.ingest.ingest("notes", [root / "river.txt"])
    try:
        yield _serve(zhiku), zhiku
    finally:
        import gradio

        gradio.close_all(verbose=False)


def test_the_openai_client_chats_streams_and_embeds(open_server: tuple[str, Zhiku]) -> None:
    url, zhiku = open_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused-without-login")
    models = [m.id for m in client.models.list()]
    embedder = zhiku.embedder().model_id
    assert models == ["echo", embedder, "kb:notes"]

    messages: Any = [{"role": "system", "content": "只说中文"}, {"role": "user", "content": "长江有多长？"}]
    answer = client.chat.completions.create(model="kb:notes", messages=messages, temperature=0, max_tokens=200)
    text = answer.choices[0].message.content or ""
    assert "6300" in text and "[1]" in text  # the echo model read the passage; the answer cites it
    assert answer.choices[0].finish_reason == "stop"
    usage = answer.usage
    assert (
        usage is not None
        and usage.prompt_tokens > 0
        and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    )
    sources = (answer.model_extra or {})["sources"]
    assert sources[0]["index"] == 1 and sources[0]["file"] == "river.txt" and 0 < sources[0]["score"] <= 1

    # streamed: the same answer in pieces, the sources and finish reason on the last chunk, then the usage
    stream = client.chat.completions.create(
        model="kb:notes", messages=messages, temperature=0, max_tokens=200, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    last = next(c for c in reversed(chunks) if c.choices)
    assert last.choices[0].finish_reason == "stop" and (last.model_extra or {})["sources"] == sources
    # the pieces are the model's words as they came (the [n] markers go into the whole answer, at the end)
    assert (last.model_extra or {})["answer"] == text and len([p for p in pieces if p]) >= 2
    assert re.sub(r"\[\d+\]", "", "".join(pieces)) == re.sub(r"\[\d+\]", "", text)
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == usage.prompt_tokens

    # the bare model: no retrieval, no sources; a follow-up carries the history
    plain = client.chat.completions.create(
        model="echo",
        messages=[
            {"role": "user", "content": "第一问"},
            {"role": "assistant", "content": "第一答"},
            {"role": "user", "content": "第二问"},
        ],
    )
    alone = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "第二问"}])
    assert plain.usage and alone.usage and plain.usage.prompt_tokens > alone.usage.prompt_tokens  # read the history
    assert (plain.model_extra or {})["sources"] == []

    vectors = client.embeddings.create(model=embedder, input=["长江", "黄河", "长江"])
    assert [d.index for d in vectors.data] == [0, 1, 2]
    assert vectors.data[0].embedding == vectors.data[2].embedding != vectors.data[1].embedding
    assert len(vectors.data[0].embedding) == zhiku.embedder().dim

    with pytest.raises(openai.NotFoundError, match="GET /v1/models lists them"):
        client.chat.completions.create(model="gpt-4", messages=messages)
    with pytest.raises(openai.NotFoundError, match="no knowledge base 'nope'"):
        client.chat.completions.create(model="kb:nope", messages=messages)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="echo", messages=messages, temperature=5)
    with pytest.raises(openai.BadRequestError, match="end with the user's message"):
        client.chat.completions.create(model="echo", messages=[{"role": "assistant", "content": "hi"}])
    with pytest.raises(openai.NotFoundError, match="embeds with"):
        client.embeddings.create(model="text-embedding-3-small", input="x")


def test_an_answer_cut_at_max_tokens_finishes_with_length(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    zhiku = echo_app(echo_config(tmp_path))
    events = [TextEvent("长江全"), AnswerEvent("长江全", cut_short=True, prompt_tokens=9, completion_tokens=3)]
    monkeypatch.setattr(zhiku.chat, "stream", lambda request: iter(events))
    client = TestClient(create_api(zhiku, None))
    body = {"model": "echo", "messages": [{"role": "user", "content": "长江有多长？"}], "max_tokens": 3}
    answer = client.post("/chat/completions", json=body).json()
    assert answer["choices"][0]["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 3
    streamed = client.post("/chat/completions", json={**body, "stream": True}).text
    assert '"finish_reason": "length"' in streamed and streamed.endswith("data: [DONE]\n\n")


def test_an_unreachable_model_server_is_a_503_that_names_it(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    port = _free_port()  # nothing listens there
    extra = f"  openai:\n    base_url: http://127.0.0.1:{port}/v1\n"
    config = echo_config(tmp_path).read_text(encoding="utf-8").replace("backend: echo", "backend: openai")
    (tmp_path / "config.yml").write_text(config.replace("llm:\n", "llm:\n" + extra), encoding="utf-8")
    client = TestClient(create_api(echo_app(tmp_path / "config.yml"), None))
    body = {"model": "openai", "messages": [{"role": "user", "content": "你好"}]}
    for stream in (False, True):
        answer = client.post("/chat/completions", json={**body, "stream": stream})
        assert answer.status_code == 503 and f"127.0.0.1:{port}" in answer.json()["error"]["message"]


def test_knowledge_bases_and_conversations_through_the_api(open_server: tuple[str, Zhiku], tmp_path: Path) -> None:
    url, zhiku = open_server
    api = httpx.Client(base_url=f"{url}/v1", timeout=60)
    uploaded = api.post(
        "/kbs/uploaded/files",
        files=[("files", ("tea.txt", "茶叶最早在中国西南地区种植。".encode())), ("files", ("bad.exe", b"MZ"))],
    )
    assert uploaded.status_code == 202, uploaded.text
    job = uploaded.json()
    while job["state"] in ("queued", "running"):  # the ingest runs in the background: follow it
        time.sleep(0.1)
        job = api.get(f"/jobs/{job['id']}").json()
    statuses = {f["file"]: (f["status"], f["reason"]) for f in job["files"]}
    assert job["state"] == "done" and statuses["tea.txt"][0] == "added"
    assert statuses["bad.exe"][0] == "refused" and statuses["bad.exe"][1]  # with its reason
    assert [k["name"] for k in api.get("/kbs").json()] == ["notes", "uploaded"]

    made = api.put("/kbs/empty")
    assert made.status_code == 201 and made.json()["files"] == 0 and api.put("/kbs/empty").status_code == 409
    assert api.delete("/kbs/empty").status_code == 200

    hits = api.get("/kbs/uploaded/search", params={"q": "茶叶在哪里种植？", "k": 3}).json()
    assert hits and "茶叶" in hits[0]["text"]
    [source] = api.get("/kbs/uploaded").json()["sources"]
    removed = api.delete("/kbs/uploaded/files", params={"path": source["path"]})
    assert removed.status_code == 200 and removed.json()["chunks_removed"] >= 1
    assert api.get("/kbs/uploaded/search", params={"q": "茶叶"}).json() == []
    assert api.delete("/kbs/uploaded").json() == {"deleted": "uploaded"}
    assert api.get("/kbs/uploaded").status_code == 404

    chat = [{"role": "user", "content": "长江有多长？"}, {"role": "assistant", "content": "约6300公里[1]"}]
    cid = save_conversation(zhiku.conversations, "", "", chat, ChatControls(kb="notes")).conversation_id
    assert [c["id"] for c in api.get("/conversations").json()] == [cid]
    assert [m["content"] for m in api.get(f"/conversations/{cid}").json()["messages"]] == [
        "长江有多长？",
        "约6300公里[1]",
    ]
    assert "约6300公里" in api.get(f"/conversations/{cid}/export", params={"format": "md"}).text
    assert api.delete(f"/conversations/{cid}").status_code == 200
    gone = api.get(f"/conversations/{cid}")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"


@pytest.fixture(scope="module")
def accounts_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Zhiku, dict[str, str]]]:
    """Login on (alice and bob); bob has a private base and a conversation; each has an API key."""
    root = tmp_path_factory.mktemp("api-accounts")
    zhiku = echo_app(echo_config(root))
    users = UserStore(root / "data")
    keys = {}
    for name in ("alice", "bob"):
        users.add(name, f"{name}-password-1")
        keys[name] = KeyStore(root / "data").create(name)[1]
    (root / "secret.txt").write_text(SECRET, encoding="utf-8")
    zhiku.access.claim("bob", "bob-private")
    zhiku.ingest.ingest("bob-private", [root / "secret.txt"])
    (root / "river.txt").write_text(RIVER, encoding="utf-8")
    zhiku.ingest.ingest("shared", [root / "river.txt"])
    chat = [{"role": "user", "content": "bob 的问题"}, {"role": "assistant", "content": "bob 的回答"}]
    keys["bob-conversation"] = save_conversation(zhiku.conversations, "bob", "", chat, ChatControls()).conversation_id
    try:
        yield _serve(zhiku, auth=users.logins()), zhiku, keys
    finally:
        import gradio

        gradio.close_all(verbose=False)


def test_with_login_every_route_needs_a_key_and_reaches_only_its_users_things(
    accounts_server: tuple[str, Zhiku, dict[str, str]],
) -> None:
    url, zhiku, keys = accounts_server
    bob_cid = keys["bob-conversation"]
    routes = [
        ("GET", "/models", None),
        ("POST", "/chat/completions", {"model": "kb:bob-private", "messages": [{"role": "user", "content": "密码？"}]}),
        ("POST", "/embeddings", {"model": zhiku.embedder().model_id, "input": "x"}),
        ("GET", "/kbs", None),
        ("GET", "/kbs/bob-private", None),
        ("GET", "/kbs/bob-private/search?q=密码", None),
        ("DELETE", "/kbs/bob-private/files?path=secret.txt", None),
        ("DELETE", "/kbs/bob-private", None),
        ("GET", "/jobs/nope", None),
        ("GET", "/conversations", None),
        ("GET", f"/conversations/{bob_cid}", None),
        ("GET", f"/conversations/{bob_cid}/export?format=json", None),
        ("DELETE", f"/conversations/{bob_cid}", None),
    ]
    with httpx.Client(base_url=f"{url}/v1", timeout=60) as anonymous:
        for method, path, body in routes:
            for headers in ({}, {"Authorization": "Bearer zk-00000000-" + "x" * 43}, {"Authorization": "Basic eA=="}):
                refused = anonymous.request(method, path, json=body, headers=headers)
                assert refused.status_code == 401, (method, path, headers)
                assert "keys create" in refused.json()["error"]["message"]
        upload = anonymous.post("/kbs/x/files", files=[("files", ("a.txt", b"a"))])
        assert upload.status_code == 401

    alice = httpx.Client(base_url=f"{url}/v1", timeout=60, headers={"Authorization": f"Bearer {keys['alice']}"})
    seen = []
    for method, path, body in routes:
        answer = alice.request(method, path, json=body)
        assert answer.status_code in (200, 404), (method, path, answer.text)
        seen.append(answer.text)
    assert not [s for s in seen if "4711" in s or "bob-private" in s.replace("'bob-private'", "") or "bob 的" in s]
    assert [m["id"] for m in alice.get("/models").json()["data"]][-1] == "kb:shared"  # hers to read: the shared one
    uploaded = alice.post("/kbs/bob-private/files", files=[("files", ("a.txt", "alice 的".encode()))])
    assert uploaded.status_code == 404  # as if it did not exist
    bob = httpx.Client(base_url=f"{url}/v1", timeout=60, headers={"Authorization": f"Bearer {keys['bob']}"})
    job = bob.post("/kbs/bob-private/files", files=[("files", ("more.txt", "bob 的第二份笔记。".encode()))]).json()
    assert alice.get(f"/jobs/{job['id']}").status_code == 404
    while job["state"] in ("queued", "running"):
        time.sleep(0.1)
        job = bob.get(f"/jobs/{job['id']}").json()
    assert job["state"] == "done"
    # nothing of bob's changed, and his key reaches it all
    assert any(f["path"].endswith("secret.txt") for f in bob.get("/kbs/bob-private").json()["sources"])
    assert bob.get(f"/conversations/{bob_cid}").json()["messages"][0]["content"] == "bob 的问题"
    answer = bob.post("/chat/completions", json=routes[1][2]).json()
    assert "4711" in answer["choices"][0]["message"]["content"] and answer["sources"][0]["file"] == "secret.txt"

    # a revoked key is refused from then on
    key_id = keys["alice"].split("-")[1]
    result = CliRunner().invoke(cli, ["keys", "revoke", key_id, "--data-dir", str(zhiku.settings.data_dir)])
    assert result.exit_code == 0, result.output
    assert alice.get("/kbs").status_code == 401


def test_keys_are_made_listed_and_revoked_and_stored_hashed(tmp_path: Path) -> None:
    run = CliRunner().invoke
    made = run(cli, ["keys", "create", "--user", "carol", "--label", "editor", "--data-dir", str(tmp_path)])
    assert made.exit_code == 0, made.output
    token = made.stdout.strip().splitlines()[0]
    assert token.startswith("zk-") and KeyStore(tmp_path).user_of(token) == "carol"
    stored = (tmp_path / "api_keys.json").read_text(encoding="utf-8")
    assert token.split("-", 2)[2] not in stored  # the secret is never stored, only its hash
    listed = run(cli, ["keys", "list", "--json", "--data-dir", str(tmp_path)])
    assert '"user": "carol"' in listed.stdout and '"label": "editor"' in listed.stdout
    assert KeyStore(tmp_path).user_of(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert run(cli, ["keys", "revoke", "nope", "--data-dir", str(tmp_path)]).exit_code == 2
    assert KeyStore(tmp_path).user_of(token) == "carol"


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("schema")
    zhiku = echo_app(echo_config(root))
    (root / "river.txt").write_text(RIVER, encoding="utf-8")
    zhiku.ingest.ingest("notes", [root / "river.txt"])
    keys = KeyStore(root / "data")
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_api(zhiku, keys))
    return schema, keys.create("alice")[1]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_the_api_keeps_its_schema_whatever_it_is_sent(api_schema: Any, mode: str) -> None:
    """Generated requests to every route, valid ones and invalid ones: no server error, and every answer
    (errors too) as the schema says. (Schemathesis's own pytest plugin does not run on this pytest: its
    strategies are driven by hypothesis directly.)"""
    schema, key = api_schema
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14
    checked = []
    for operation in operations:
        if mode == "negative" and operation.label == "POST /kbs/{name}/files":
            continue  # a multipart body "against" its schema is still a valid upload (extra fields are ignored)
        signed = {"Authorization": f"Bearer {key}"}  # login on: a user's key (schemathesis tries others too)

        @given(case=operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode), headers=signed))
        @settings(
            max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True
        )
        def check(case: Any) -> None:
            case.call_and_validate()

        try:
            check()
        except Unsatisfiable:  # no invalid request to make (no parameters, or only free-form strings)
            assert mode == "negative", operation.label
            continue
        checked.append(operation.label)
    assert len(checked) >= (len(operations) if mode == "positive" else 8), checked


def test_the_schema_holds_every_route(api_schema: Any) -> None:
    paths = set(api_schema[0].raw_schema["paths"])
    assert {"/models", "/chat/completions", "/embeddings", "/kbs", "/kbs/{name}/files", "/jobs/{job_id}"} <= paths
    assert {"/conversations", "/conversations/{conversation_id}/export"} <= paths
