"""Typed config: precedence, unknown keys, data dir resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.container import Zhiku
from app.settings import DEFAULT_CONFIG, ConfigError, Settings, load_settings


def test_repo_config_matches_the_defaults() -> None:
    s = load_settings(DEFAULT_CONFIG)
    assert s.data_dir == DEFAULT_CONFIG.parent / "memory"
    assert (s.chunking.chunk_size, s.chunking.chunk_overlap, s.embedding.backend) == (300, 50, "auto")


def test_config_yml_spells_out_exactly_the_code_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    # config.yml is where users read the defaults: it must not drift from the typed models
    for var in [v for v in __import__("os").environ if v.startswith("ZHIKU_")]:
        monkeypatch.delenv(var)
    loaded = load_settings(DEFAULT_CONFIG)
    from_file = loaded.model_dump(exclude={"data_dir"})
    sections = {name: from_file["llm"].pop(name) for name in loaded.llm.sections()}
    assert from_file == Settings().model_dump(exclude={"data_dir"})
    # each backend's section holds exactly the defaults of the settings model that backend registered
    app = Zhiku(loaded, entry_points=False)
    assert sorted(sections) == app.llm_specs.names()
    for name, section in sections.items():
        model = app.llm_specs.get(name).settings
        assert set(section) <= set(model.model_fields), name
        assert app.llm_options(name) == model(), name


def test_a_backend_section_is_checked_against_the_backends_own_settings(tmp_path: Path) -> None:
    """Backends own their settings: a typo inside a backend's section, or a section no backend has, is an
    error naming it when the app is built, with the list of backends."""
    cfg = tmp_path / "c.yml"
    cfg.write_text("llm:\n  openai:\n    base_ur: http://x\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"llm\.openai\.base_ur: unknown key"):
        Zhiku(load_settings(cfg), entry_points=False).check()
    cfg.write_text("llm:\n  opnai:\n    base_url: http://x\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"llm\.opnai: no LLM backend .*registered backends: baichuan, default"):
        Zhiku(load_settings(cfg), entry_points=False).check()
    cfg.write_text("llm:\n  llama:\n    context_window: 8\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"llm\.llama\.context_window"):
        Zhiku(load_settings(cfg), entry_points=False).check()


def test_a_plugin_backend_gets_its_own_typed_settings(tmp_path: Path) -> None:
    from pydantic import BaseModel, ConfigDict

    from plugins.hookspecs import RegisterLLM, hookimpl

    class EchoSettings(BaseModel):
        model_config = ConfigDict(extra="forbid")
        greeting: str = "hi"

    seen: list[EchoSettings] = []

    class Plugin:
        @hookimpl
        def register_llms(self, register: RegisterLLM) -> None:
            register("echo", lambda settings: seen.append(settings) or settings, settings=EchoSettings)

    cfg = tmp_path / "c.yml"
    cfg.write_text("llm:\n  backend: echo\n  echo:\n    greeting: 你好\n", encoding="utf-8")
    app = Zhiku(load_settings(cfg), entry_points=False)
    app.plugins.register(Plugin())
    app.check().backend()
    assert seen == [EchoSettings(greeting="你好")]


def test_the_approximate_index_is_chosen_with_its_options_from_config(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yml"
    cfg.write_text("store:\n  index: faiss-hnsw\n  hnsw:\n    m: 16\n    ef_search: 40\n", encoding="utf-8")
    kind = Zhiku(load_settings(cfg), entry_points=False).vector_kind
    assert (kind.name, kind.m, kind.ef_search, kind.ef_construction) == ("faiss-hnsw", 16, 40, 80)  # type: ignore[attr-defined]
    assert len(kind.create(8)) == 0


def test_malformed_yaml_is_one_line_naming_the_line(tmp_path: Path) -> None:
    """Hostile-use finding: a YAML syntax error was a 107-line traceback and exit code 1."""
    cfg = tmp_path / "c.yml"
    cfg.write_text("chunking:\n  chunk_size: 100\n chunk_overlap: [10\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"c\.yml line \d+, column \d+ is not valid YAML") as raised:
        load_settings(cfg)
    assert "\n" not in str(raised.value)


def test_unknown_key_is_an_error_naming_it(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yml"
    cfg.write_text("chunking:\n  chunk_sise: 10\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"chunking\.chunk_sise: unknown key"):
        load_settings(cfg)


def test_bad_value_is_an_error(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yml"
    cfg.write_text("chunking:\n  chunk_size: 100\n  chunk_overlap: 100\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="chunk_overlap must be smaller"):
        load_settings(cfg)


def test_precedence_cli_over_env_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.yml"
    cfg.write_text("data_dir: from-file\nembedding:\n  batch_size: 3\n", encoding="utf-8")
    assert load_settings(cfg).data_dir == tmp_path / "from-file"  # relative to the config file
    monkeypatch.setenv("ZHIKU_DATA_DIR", str(tmp_path / "from-env"))
    monkeypatch.setenv("ZHIKU_EMBEDDING__BATCH_SIZE", "9")
    s = load_settings(cfg)
    assert (s.data_dir, s.embedding.batch_size) == (tmp_path / "from-env", 9)
    assert load_settings(cfg, data_dir=tmp_path / "from-cli").data_dir == tmp_path / "from-cli"


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.yml")
