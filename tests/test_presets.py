"""System-prompt presets: CRUD, persistence, name validation, atomic writes."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from app.presets import FILE_NAME, PresetError, PresetStore


def test_crud(tmp_path: Path) -> None:
    store = PresetStore(tmp_path)
    assert store.list() == {}
    assert store.save("简洁", "请简洁地回答。") == "简洁"
    store.save("english", "Answer in English.")
    assert store.list() == {"english": "Answer in English.", "简洁": "请简洁地回答。"}
    assert store.get("简洁") == "请简洁地回答。"
    store.save("简洁", "只用一句话回答。")  # saving again replaces
    assert store.get("简洁") == "只用一句话回答。"
    store.delete("english")
    assert list(store.list()) == ["简洁"]
    with pytest.raises(ValueError, match="no preset"):
        store.delete("english")
    with pytest.raises(ValueError, match="no preset"):
        store.get("english")


def test_persists_across_instances(tmp_path: Path) -> None:
    PresetStore(tmp_path).save("只说英文", "Always answer in English.")
    again = PresetStore(tmp_path)
    assert again.list() == {"只说英文": "Always answer in English."}
    data = json.loads((tmp_path / FILE_NAME).read_text(encoding="utf-8"))
    assert data == {"只说英文": "Always answer in English."}


def test_creates_the_data_dir(tmp_path: Path) -> None:
    store = PresetStore(tmp_path / "not" / "yet")
    store.save("x", "y")
    assert (tmp_path / "not" / "yet" / FILE_NAME).is_file()


@pytest.mark.parametrize("name", ["../x", "", "   ", "a\x00b", "/abs", "a\\b", "a/b", "x" * 65, "tab\there", "."])
def test_bad_names_are_rejected(tmp_path: Path, name: str) -> None:
    store = PresetStore(tmp_path)
    with pytest.raises(ValueError):
        store.save(name, "text")
    assert not (tmp_path / FILE_NAME).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_name_limits(tmp_path: Path) -> None:
    store = PresetStore(tmp_path)
    store.save("x" * 64, "text")
    assert store.save("  padded  ", "text") == "padded"
    assert set(store.list()) == {"x" * 64, "padded"}


@pytest.mark.parametrize("text", ["", "   \n", "a\x00b"])
def test_bad_texts_are_rejected(tmp_path: Path, text: str) -> None:
    with pytest.raises(ValueError):
        PresetStore(tmp_path).save("name", text)


def test_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = PresetStore(tmp_path)
    store.save("keep", "old text")
    before = (tmp_path / FILE_NAME).read_bytes()

    def crash(self: Path, target: Path) -> Path:
        raise OSError("disk full")

    monkeypatch.setattr(Path, "replace", crash)
    with pytest.raises(PresetError, match=r"cannot save presets .*disk full.*write access"):  # not a blank "Error"
        store.save("new", "new text")
    monkeypatch.undo()
    # the old file is untouched and no temp file is left behind
    assert (tmp_path / FILE_NAME).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [FILE_NAME]
    assert store.list() == {"keep": "old text"}


def test_corrupt_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        PresetStore(tmp_path).list()
    (tmp_path / FILE_NAME).write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match="JSON object"):
        PresetStore(tmp_path).list()


def test_concurrent_saves_lose_nothing(tmp_path: Path) -> None:
    store = PresetStore(tmp_path)
    threads = [threading.Thread(target=store.save, args=(f"p{i}", f"text {i}")) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.list() == {f"p{i}": f"text {i}" for i in range(20)}


def test_each_user_has_their_own_presets_in_a_file_not_named_after_them(tmp_path: Path) -> None:
    shared, alice, bob = PresetStore(tmp_path), PresetStore(tmp_path, "alice"), PresetStore(tmp_path, "../bob")
    alice.save("mine", "alice 的提示")
    assert bob.list() == {} and shared.list() == {}
    assert PresetStore(tmp_path, "alice").list() == {"mine": "alice 的提示"}
    bob.save("mine", "bob 的提示")
    assert alice.get("mine") == "alice 的提示"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alice.path.name, bob.path.name])
    assert all(p.parent == tmp_path and "bob" not in p.name for p in (alice.path, bob.path))
