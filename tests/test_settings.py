"""Typed config: precedence, unknown keys, data dir resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.settings import DEFAULT_CONFIG, ConfigError, Settings, load_settings


def test_repo_config_matches_the_defaults() -> None:
    s = load_settings(DEFAULT_CONFIG)
    assert s.data_dir == DEFAULT_CONFIG.parent / "memory"
    assert (s.chunking.chunk_size, s.chunking.chunk_overlap, s.embedding.backend) == (300, 50, "auto")


def test_config_yml_spells_out_exactly_the_code_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    # config.yml is where users read the defaults: it must not drift from the typed models
    for var in [v for v in __import__("os").environ if v.startswith("ZHIKU_")]:
        monkeypatch.delenv(var)
    from_file = load_settings(DEFAULT_CONFIG).model_dump(exclude={"data_dir"})
    assert from_file == Settings().model_dump(exclude={"data_dir"})


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
