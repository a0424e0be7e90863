"""Command line: ``python -m app ingest|search|chat|eval|serve|kb ...``.

Every subcommand takes ``--config`` and ``--data-dir``. JSON output (``--json``) is a contract other
tools rely on; its shapes are documented in README.md and must stay stable. Every failure a user can fix
is one ``error: ...`` line and exit code 2 (:func:`_app` is the one place that catches them).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from app.chat import AnswerEvent, ChatRequest, SourcesEvent, TextEvent
from app.container import Zhiku
from app.conversations import ConversationError
from app.settings import load_settings
from common.errors import ZhikuError
from knowledge.ingest import FileOutcome
from knowledge.store import StoreError
from llms.base import Message

cli = typer.Typer(
    help="Zhiku (知库): chat with your documents. Ingest folders of PDF/TXT into knowledge bases and search them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
kb_cli = typer.Typer(help="List, inspect, check and delete knowledge bases.", no_args_is_help=True)
cli.add_typer(kb_cli, name="kb")
users_cli = typer.Typer(
    help="UI accounts (login is on when there is one): stored as password hashes in <data_dir>/users.json.",
    no_args_is_help=True,
)
cli.add_typer(users_cli, name="users")
keys_cli = typer.Typer(
    help="API keys (`Authorization: Bearer zk-...` on the HTTP API when login is on): stored hashed in "
    "<data_dir>/api_keys.json.",
    no_args_is_help=True,
)
cli.add_typer(keys_cli, name="keys")

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="config file (default: $ZHIKU_CONFIG or config.yml)")]
DataDirOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="where knowledge bases live (default: $ZHIKU_DATA_DIR or memory/)")
]
KbOpt = Annotated[str, typer.Option("--kb", help="knowledge base name")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON")]
HostOpt = Annotated[str | None, typer.Option(help="bind address (default: server.host, 127.0.0.1)")]
PortOpt = Annotated[int | None, typer.Option(help="port (default: server.port)")]

# Exit codes: 0 ok, 1 some files failed to ingest, 2 bad usage, config or knowledge base.
EXIT_FILES_FAILED = 1
EXIT_ERROR = 2


@contextmanager
def _app(config: Path | None, data_dir: Path | None) -> Iterator[Zhiku]:
    """Build the app and check its configuration, inside :func:`_errors`."""
    with _errors():
        app = Zhiku(load_settings(config, data_dir=data_dir)).check()
        try:
            yield app
        finally:
            app.close()


@contextmanager
def _errors() -> Iterator[None]:
    """The error boundary of every command: a ZhikuError (or an operating-system error such as a missing
    file) becomes one ``error:`` line and its exit code."""
    try:
        yield
    except ZhikuError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(err.exit_code) from None
    except OSError as err:
        where = f" ({err.filename})" if err.filename else ""
        typer.echo(f"error: {err.strerror or err}{where}", err=True)
        raise typer.Exit(EXIT_ERROR) from None


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, ensure_ascii=False, indent=1))


@cli.command()
def ingest(
    paths: Annotated[list[Path], typer.Argument(help="files and folders (searched recursively)")],
    kb: KbOpt,
    prune: Annotated[bool, typer.Option(help="remove files no longer present under the given folders")] = False,
    workers: Annotated[int | None, typer.Option(help="parser processes (default: ingest.workers)")] = None,
    as_json: JsonOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Ingest PDF/TXT/MD files into a knowledge base (created if missing), incrementally."""
    failures: list[FileOutcome] = []

    def show(outcome: FileOutcome) -> None:
        if outcome.status == "failed":
            failures.append(outcome)

    with _app(config, data_dir) as app:
        if workers is not None:
            app.settings.ingest.workers = workers
        result = app.ingest.ingest(kb, paths, prune=prune, progress=not quiet and sys.stderr.isatty(), on_outcome=show)
    report, counts = result.report, result.total
    if as_json:
        _print_json(result.to_json())
    else:
        for f in failures:
            typer.echo(f"FAILED {f.reason}", err=True)
        typer.echo(
            f"{kb}: {report.count('added')} added, {report.count('unchanged')} unchanged, "
            f"{report.count('updated')} updated, {report.count('removed')} removed, {len(report.failures)} failed; "
            f"{report.chunks_added} chunks ({report.new_vectors} new vectors) in {report.seconds:.1f} s. "
            f"Knowledge base now: {counts['files']} files, {counts['chunks']} chunks."
        )
        if report.skipped:
            typer.echo(f"skipped {len(report.skipped)} files of unsupported types", err=True)
    if report.failures:
        raise typer.Exit(EXIT_FILES_FAILED)


@cli.command()
def search(
    question: Annotated[str, typer.Argument(help="what to look for")],
    kb: KbOpt,
    k: Annotated[int | None, typer.Option("-k", "--top-k", help="how many passages (default: search.top_k)")] = None,
    source: Annotated[
        list[str] | None,
        typer.Option("--source", help="only files whose stored path matches (a path or a glob: '*.pdf'); repeatable"),
    ] = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Search a knowledge base: the top passages with source, page and score."""
    with _app(config, data_dir) as app:
        # the pipeline picks the k passages; they are listed by the score shown (cosine similarity)
        hits = app.library.retriever(kb).search(question, k or app.settings.search.top_k, source or ())
        hits.sort(key=lambda h: -h.relevance)
    if as_json:
        _print_json([h.to_json() for h in hits])
        return
    if not hits:
        typer.echo("no passages found")
    for rank, hit in enumerate(hits, 1):
        c = hit.chunk
        page = f" p.{c.page}" if c.page is not None else ""
        typer.echo(f"[{rank}] {hit.relevance:.3f}  {Path(c.source).name}{page}")
        typer.echo("    " + c.text.replace("\n", "\n    "))


@cli.command()
def chat(
    question: Annotated[str, typer.Argument(help="your question")],
    kb: Annotated[str | None, typer.Option("--kb", help="knowledge base to answer from (default: none)")] = None,
    system_prompt: Annotated[str | None, typer.Option("--system", help="system prompt for this chat")] = None,
    k: Annotated[int | None, typer.Option("-k", "--top-k", help="passages to retrieve")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="answer length limit in tokens")] = None,
    temperature: Annotated[float | None, typer.Option(help="0 = greedy")] = None,
    conversation: Annotated[
        str | None, typer.Option("--conversation", help="go on with this saved conversation (its id)")
    ] = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Ask one question: the answer streams to the terminal, then its sources. The exchange is saved as a
    conversation (the UI lists it); --conversation ID goes on with one. --json prints
    {"answer", "sources", "conversation_id"} at the end instead."""
    with _app(config, data_dir) as app:
        store = app.conversations
        history = []
        if conversation:
            history = [Message(m.role, m.content) for m in store.messages("", conversation)]
        changes = {"max_new_tokens": max_new_tokens, "temperature": temperature}
        options = app.settings.chat.generation.model_copy(update={k: v for k, v in changes.items() if v is not None})
        sources: list[Any] = []
        request = ChatRequest(question, history, kb=kb, system_prompt=system_prompt, options=options, top_k=k)
        streamed, answer = "", ""
        show = (lambda text: None) if as_json else (lambda text: typer.echo(text, nl=False))
        for event in app.chat.stream(request):
            if isinstance(event, SourcesEvent):
                sources = event.sources
            elif isinstance(event, TextEvent):
                streamed += event.text
                show(event.text)
            elif isinstance(event, AnswerEvent):
                answer = event.text
                if event.text != streamed:
                    # what the service added after the model: [n] markers and the supporting sentence
                    tail = event.text.removeprefix(streamed)
                    show(tail if tail != event.text else "\n\n" + event.text)
                if event.cut_short:
                    show(f"\n\n(cut at --max-new-tokens {options.max_new_tokens}: raise it for the rest)")
        found = [s.to_json(n) for n, s in enumerate(sources, 1)]
        saved: str | None = None
        try:
            if not conversation:
                conversation = store.create("", kb=kb, system_prompt=system_prompt or "", settings={}).id
            store.add_exchange("", conversation, question, answer, found)
            saved = conversation
        except ConversationError as err:  # e.g. a read-only data dir: the answer stands, unsaved
            typer.echo(f"\nwarning: the conversation was not saved: {err}", err=True)
    if as_json:
        _print_json({"answer": answer, "sources": found, "conversation_id": saved})
        return
    typer.echo()
    if kb:
        typer.echo("\nSources:")
        for n, source in enumerate(sources, 1):
            typer.echo(f"[{n}] {source.label()}  ({source.score:.3f})")
        if not sources:
            typer.echo("(no passages found)")
    if saved:
        typer.echo(f"\n(conversation {saved}: --conversation {saved} goes on with it)", err=True)


@cli.command()
def serve(
    host: HostOpt = None,
    port: PortOpt = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Start the chat web UI, and the HTTP API (OpenAI-compatible) under /v1 on the same port."""
    from app.ui import launch
    from app.users import UserStore, all_logins

    with _app(config, data_dir) as app:
        configured = [(u.name, u.password_hash) for u in app.settings.server.users]
        users = all_logins(configured, UserStore(app.settings.data_dir))
        where = f"{host or app.settings.server.host}:{port or app.settings.server.port}"
        keys = "an API key (python -m app keys create --user NAME)" if users else "no key (login is off)"
        typer.echo(f"HTTP API: http://{where}/v1 (docs: /v1/docs) with {keys}", err=True)
        launch(app, host=host, port=port, auth=users or None)


@cli.command("eval")
def evaluate_cmd(
    questions: Annotated[Path, typer.Argument(help="JSON Lines: {question, answers: [...], lang?, id?} per line")],
    kb: KbOpt,
    budget: Annotated[int, typer.Option(help="context budget in characters for recall@budget")] = 1500,
    k: Annotated[
        int | None, typer.Option("-k", "--top-k", help="passages in the context (default: chat.top_k)")
    ] = None,
    compare: Annotated[bool, typer.Option(help="also run plain vector top-k, side by side")] = False,
    answers: Annotated[
        bool,
        typer.Option(
            "--answers",
            help="answer each question with the chat service (configured LLM, prompt, retrieval) and score the "
            "answers; questions with an empty answers list must get 'not in the knowledge base'",
        ),
    ] = False,
    n: Annotated[int | None, typer.Option("--n", help="only the first N questions")] = None,
    dump: Annotated[
        Path | None, typer.Option("--dump", help="with --answers: write each question's answer and verdict (JSONL)")
    ] = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Measure retrieval (recall@1/3/5/10, recall@budget, MRR, latency) or, with --answers, the answers
    (answer_acc, answer_in_context, not_found_rate, false_not_found, latency) on questions with known
    answers. A progress bar goes to stderr."""
    from tqdm import tqdm

    from knowledge.evaluation import evaluate, load_questions

    with _app(config, data_dir) as app:
        qs = load_questions(questions)[:n]
        if answers:
            from app.answer_eval import evaluate_answers

            app.library.retriever(kb)  # a missing base fails here, before the model loads
            bar = tqdm(qs, desc="answering", unit="q", file=sys.stderr, dynamic_ncols=True)
            evaluated = evaluate_answers(app.chat, kb, bar)
            if dump is not None:
                lines = (json.dumps(r.to_json(), ensure_ascii=False) for r in evaluated.runs)
                dump.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
            result = evaluated.to_json()
            if as_json:
                _print_json(result)
            else:
                for key, value in result.items():
                    if key != "by_language":
                        typer.echo(f"{key:>20} {value}")
            return
        from knowledge.retrieval import RetrievalSettings

        top = k or app.settings.chat.top_k
        pipelines = {"pipeline": app.library.retriever(kb)}
        if compare:
            plain = RetrievalSettings(mode="vector", expand_window=0, min_similarity=0.0)
            pipelines["vector"] = app.library.retriever(kb, plain)
        results = {
            name: evaluate(
                tqdm(qs, desc=name, unit="q", file=sys.stderr, dynamic_ncols=True),
                r.search,
                lambda q, b, r=r: [p.text for p in r.context(q, top, budget=b, measure=len)],  # type: ignore[misc]
                budget_chars=budget,
            ).to_json()
            for name, r in pipelines.items()
        }
    if as_json:
        out = dict(results["pipeline"])
        if compare:
            out["compare"] = {"vector": results["vector"]}
        _print_json(out)
        return
    names = list(results)
    typer.echo(f"{'':>20}" + "".join(f"{name:>12}" for name in names))
    for key, value in results["pipeline"].items():
        if isinstance(value, int | float):
            typer.echo(f"{key:>20}" + "".join(f"{results[name][key]:>12}" for name in names))


@kb_cli.command("list")
def kb_list(as_json: JsonOpt = False, config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """List knowledge bases."""
    with _app(config, data_dir) as app:
        names = app.kbs.names()
    if as_json:
        _print_json(names)
    else:
        typer.echo("\n".join(names) if names else "no knowledge bases yet; create one with `python -m app ingest`")


@kb_cli.command("info")
def kb_info(
    name: Annotated[str, typer.Argument()],
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Files, chunks and embedding model of a knowledge base."""
    with _app(config, data_dir) as app:
        info = app.kbs.info(name)
    if as_json:
        _print_json(info)
    else:
        typer.echo(
            f"{name}: {info['files']} files, {info['chunks']} chunks, {info['vectors']} vectors; "
            f"embedding {info['embedding_model']} ({info['dim']}-d); "
            f"chunks {info['chunk_size']}/{info['chunk_overlap']} characters"
        )


@kb_cli.command("check")
def kb_check(name: Annotated[str, typer.Argument()], config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Consistency check: every vector has its chunk, every chunk its vector, counts match.

    Opens the knowledge base for writing, like any maintenance: a manifest or index file that a crash
    left behind the docstore is brought up to date from it first."""
    with _app(config, data_dir) as app:
        problems = app.kbs.check(name)
    if problems:
        for p in problems:
            typer.echo(f"problem: {p}", err=True)
        raise typer.Exit(EXIT_ERROR)
    typer.echo(f"{name}: ok")


@kb_cli.command("migrate")
def kb_migrate(
    name: Annotated[str, typer.Argument()],
    to: Annotated[str, typer.Option("--to", help="the store to move to: faiss | milvus")],
    uri: Annotated[
        str | None,
        typer.Option("--uri", help="milvus: a server (http://host:19530); empty: Milvus Lite; default: store.uri"),
    ] = None,
    drop_source: Annotated[
        bool, typer.Option("--drop-source", help="then delete the copy in the old store (kept until then)")
    ] = False,
    sample: Annotated[int, typer.Option("--sample", min=1, help="ids whose vectors are checked after the copy")] = 100,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Move a knowledge base's vectors to another store, in place and without embedding again.

    Resumable (run it again after an interruption); the copy is checked before the base switches; every
    command on NAME uses the new store afterwards. The old copy stays until --drop-source."""
    import sys

    from tqdm import tqdm

    from knowledge.stores import STORES

    if to not in STORES:
        raise typer.BadParameter(f"--to must be one of {', '.join(STORES)}", param_hint="--to")
    bars: list[tqdm[Any]] = []  # made at the first batch: a base already in that store shows none

    def progress(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc=f"copying to {to}", unit="vec", file=sys.stderr, disable=as_json))
        bars[0].update(done - bars[0].n)

    with _app(config, data_dir) as app:
        try:
            report = app.kbs.migrate(name, to, uri, drop_source=drop_source, sample=sample, progress=progress)
        finally:
            for bar in bars:
                bar.close()
    if as_json:
        _print_json(report.to_json())
        return
    if report.switched:
        typer.echo(
            f"{name}: moved {report.vectors} vectors from {report.source} to {report.target} in {report.seconds:.1f} s "
            f"({report.copied} copied by this run, {report.checked} checked)"
        )
    else:
        typer.echo(f"{name}: already in {report.target}")
    for what in report.dropped:
        typer.echo(f"dropped {what}")


@kb_cli.command("delete")
def kb_delete(
    name: Annotated[str, typer.Argument()],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask")] = False,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Delete a knowledge base and everything in it."""
    with _app(config, data_dir) as app:
        if not app.catalog.exists(name):
            raise StoreError(f"knowledge base {name!r} does not exist", "`python -m app kb list` shows them")
        if not yes and not typer.confirm(f"delete knowledge base {name!r}?"):
            raise typer.Exit(1)
        app.kbs.delete(name)
        app.access.forget(name)  # a new base of that name starts without an owner
    typer.echo(f"deleted {name}")


def main() -> None:
    from common.threads import limit_tokenizer_threads

    limit_tokenizer_threads()  # before anything tokenises: the pool is made then
    cli()


def _user_store(config: Path | None, data_dir: Path | None) -> Any:
    from app.users import UserStore

    return UserStore(load_settings(config, data_dir=data_dir).data_dir)


def _read_password(from_stdin: bool) -> str:
    import getpass
    import sys

    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    if not sys.stdin.isatty():
        raise ZhikuError("no terminal to ask for the password", "pipe it in with --password-stdin")
    first = getpass.getpass("password: ")
    if first != getpass.getpass("again: "):
        raise ZhikuError("the passwords differ", "type the same password twice")
    return first


@users_cli.command("add")
def users_add(
    name: Annotated[str, typer.Argument(help="the login name")],
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="read the password from standard input (one line)")
    ] = False,
    replace: Annotated[bool, typer.Option(help="set a new password for an existing user")] = False,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Add a UI user (asks for the password twice; only its salted scrypt hash is stored)."""
    with _errors():
        store = _user_store(config, data_dir)
        added = store.add(name, _read_password(password_stdin), replace=replace)
    typer.echo(f"user {added} saved in {store.path}; restart `serve` to log them in")


@users_cli.command("remove")
def users_remove(name: Annotated[str, typer.Argument()], config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Remove a UI user added with `users add` (their conversations and presets stay on disk)."""
    with _errors():
        store = _user_store(config, data_dir)
        store.remove(name)
    typer.echo(f"user {name} removed; restart `serve` to log them out")


@users_cli.command("list")
def users_list(as_json: JsonOpt = False, config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """The UI users: those of `users add` and those of server.users in config.yml."""
    with _errors():
        settings = load_settings(config, data_dir=data_dir)
        from app.users import UserStore

        stored = UserStore(settings.data_dir).names()
        configured = [u.name for u in settings.server.users]
    rows = [{"name": n, "source": "users.json"} for n in stored] + [
        {"name": n, "source": "config.yml"} for n in configured
    ]
    if as_json:
        _print_json(rows)
    else:
        typer.echo("\n".join(f"{r['name']}\t({r['source']})" for r in rows) if rows else "no users: login is off")


def _key_store(config: Path | None, data_dir: Path | None) -> Any:
    from app.keys import KeyStore

    return KeyStore(load_settings(config, data_dir=data_dir).data_dir)


@keys_cli.command("create")
def keys_create(
    user: Annotated[str, typer.Option("--user", help="the user the key acts for")],
    label: Annotated[str, typer.Option("--label", help="what the key is for (shown by `keys list`)")] = "",
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Make an API key for USER and print it (only its hash is stored: copy it now)."""
    with _errors():
        key, token = _key_store(config, data_dir).create(user, label)
    typer.echo(token)
    typer.echo(f"key {key.id} for {key.user}: shown this once; revoke it with `keys revoke {key.id}`", err=True)


@keys_cli.command("list")
def keys_list(
    user: Annotated[str | None, typer.Option("--user", help="only this user's keys")] = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """The API keys (ids, users, labels; never the keys themselves)."""
    with _errors():
        keys = _key_store(config, data_dir).list(user)
    rows = [{"id": k.id, "user": k.user, "label": k.label, "created": k.created} for k in keys]
    if as_json:
        _print_json(rows)
    else:
        typer.echo("\n".join(f"{r['id']}\t{r['user']}\t{r['label']}" for r in rows) if rows else "no API keys")


@keys_cli.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="the key's id (from `keys list`)")],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Revoke an API key: requests with it get 401 from then on."""
    with _errors():
        key = _key_store(config, data_dir).revoke(key_id)
    typer.echo(f"key {key.id} of {key.user} revoked")
