"""Reading documents from local files and loading evaluation text (local, data directory, offline hub)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from quantkit.errors import QuantkitError
from quantkit.textsources import load_eval_text, read_documents

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKI = DATA / "wikitext-2-raw" / "wiki.test.raw"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="shared data folder not present")


@pytest.fixture(autouse=True)
def _no_data_dir_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QUANTKIT_DATA_DIR", raising=False)


def _one_line_error(match: str, call, *args, **kwargs) -> str:
    with pytest.raises(QuantkitError, match=match) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_txt_is_one_document_with_lf_line_endings(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(b"first line\r\nsecond\rthird\n\nlast")
    assert read_documents(path) == ["first line\nsecond\nthird\n\nlast"]


def test_jsonl_takes_the_field_and_drops_empty_documents(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    rows = [{"body": "one\r\ntwo", "id": 1}, {"body": "  "}, {"body": "three\u2028four"}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    assert read_documents(path, text_field="body") == ["one\ntwo", "three\u2028four"]


def test_json_list_of_objects_or_strings(tmp_path: Path) -> None:
    objects, strings = tmp_path / "o.json", tmp_path / "s.json"
    objects.write_text(json.dumps([{"text": "alpha"}, {"text": ""}, {"text": "beta"}]), encoding="utf-8")
    strings.write_text(json.dumps(["gamma", "delta"]), encoding="utf-8")
    assert read_documents(objects) == ["alpha", "beta"]
    assert read_documents(strings) == ["gamma", "delta"]


def test_parquet_column(tmp_path: Path) -> None:
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"content": ["x y", None, "z"], "n": [1, 2, 3]}), path)
    assert read_documents(path, text_field="content") == ["x y", "z"]


def test_directory_reads_supported_files_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "b.jsonl").write_text('{"text": "b1"}\n{"text": "b2"}\n', encoding="utf-8")
    (tmp_path / "a.txt").write_text("a", encoding="utf-8")
    (tmp_path / "c.json").write_text('["c"]', encoding="utf-8")
    (tmp_path / "README.md").write_text("not text data", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    assert read_documents(tmp_path) == ["a", "b1", "b2", "c"]


def test_missing_path(tmp_path: Path) -> None:
    _one_line_error("no such file or directory", read_documents, tmp_path / "nope.txt")


def test_unsupported_suffix_names_the_supported_ones(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text("text\nhello\n", encoding="utf-8")
    message = _one_line_error("unsupported", read_documents, path)
    assert all(suffix in message for suffix in (".txt", ".raw", ".jsonl", ".json", ".parquet"))


def test_missing_text_field_names_field_and_fields_found(tmp_path: Path) -> None:
    jsonl, parquet = tmp_path / "a.jsonl", tmp_path / "a.parquet"
    jsonl.write_text('{"text": "ok"}\n{"title": "t", "body": "b"}\n', encoding="utf-8")
    pq.write_table(pa.table({"body": ["b"]}), parquet)
    message = _one_line_error("'text'", read_documents, jsonl)
    assert "line 2" in message and "title, body" in message
    assert "body" in _one_line_error("'text'", read_documents, parquet)


def test_no_text_at_all(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n{"text": " \\n "}\n', encoding="utf-8")
    _one_line_error("no text found", read_documents, tmp_path / "empty.jsonl")
    (tmp_path / "other").mkdir()
    _one_line_error("no text found", read_documents, tmp_path / "other")


def test_malformed_files_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    (tmp_path / "obj.json").write_text('{"data": []}', encoding="utf-8")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    _one_line_error("cannot read", read_documents, tmp_path / "bad.jsonl")
    _one_line_error("expected a list", read_documents, tmp_path / "obj.json")
    _one_line_error("cannot read", read_documents, tmp_path / "bin.txt")


def test_local_eval_text_joins_documents(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"one\r\ntwo")
    (tmp_path / "b.txt").write_bytes(b"three")
    text, description = load_eval_text(str(tmp_path))
    assert text == "one\ntwo\n\nthree"
    assert str(tmp_path) in description


def test_unknown_eval_source_names_the_sets() -> None:
    message = _one_line_error("unknown evaluation source", load_eval_text, "wikitext3")
    assert "'wikitext2'" in message and "'c4'" in message and "'ptb'" in message


@needs_data
def test_real_wikitext_file_loads_with_lf_only() -> None:
    raw = WIKI.read_bytes()
    assert b"\r\n" in raw  # the shared copy has CRLF line endings
    text, _ = load_eval_text(str(WIKI))
    assert "\r" not in text
    assert text.startswith(" = Robert Boulter = \n Robert Boulter is an English film , television")
    assert text == raw.decode("utf-8").replace("\r\n", "\n")


@needs_data
def test_data_dir_resolves_named_eval_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # must not need the hub
    wiki, description = load_eval_text("wikitext2", data_dir=str(DATA))
    assert wiki == WIKI.read_bytes().decode("utf-8").replace("\r\n", "\n")
    assert str(WIKI) in description
    ptb, _ = load_eval_text("ptb", data_dir=str(DATA))
    assert ptb == (DATA / "ptb" / "ptb.test.txt").read_text(encoding="utf-8")
    c4, _ = load_eval_text("c4", data_dir=str(DATA))
    rows = pq.read_table(DATA / "c4" / "c4_validation_2k.parquet").column("text").to_pylist()
    assert c4 == " ".join(rows[:1100]).replace("\r\n", "\n").replace("\r", "\n")


@needs_data
def test_data_dir_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("QUANTKIT_DATA_DIR", str(DATA))
    assert load_eval_text("ptb")[0] == (DATA / "ptb" / "ptb.test.txt").read_text(encoding="utf-8")


@pytest.mark.parametrize("env", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_named_set_offline_fails_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: str) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv(env, "1")
    started = time.perf_counter()
    message = _one_line_error("cannot reach the hub for 'wikitext2'", load_eval_text, "wikitext2")
    assert time.perf_counter() - started < 1.0
    assert f"{env}=1" in message
    assert (
        "--ppl path/to/wiki.test.raw" in message
        and "--data-dir DIR holding wikitext-2-raw/wiki.test.raw" in message
    )


@pytest.mark.parametrize("env", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_calibration_and_zero_shot_sets_follow_the_same_offline_rule(monkeypatch: pytest.MonkeyPatch,
                                                                      env: str) -> None:
    from quantkit.calib import check_source
    from quantkit.eval.zeroshot import _check_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv(env, "1")
    assert f"({env}=1)" in _one_line_error("cannot reach the hub for 'c4'", check_source, "c4", None)
    assert f"({env}=1)" in _one_line_error("read their data from the hub", _check_hub, ["piqa"])


def test_hub_probe_tells_a_closed_endpoint_from_an_open_one(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from huggingface_hub import constants

    from quantkit.hub import _connection_failure, unreachable

    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
        _connection_failure.cache_clear()
        assert unreachable("HF_HUB_OFFLINE") is None
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")  # the port is closed now
    _connection_failure.cache_clear()
    reason = unreachable("HF_HUB_OFFLINE")
    _connection_failure.cache_clear()
    assert reason is not None and "127.0.0.1 unreachable" in reason
