"""Text from local files and named hub sets, shared by calibration and evaluation."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantkit.errors import OptionError, QuantkitError
from quantkit.hub import data_unreachable

SUPPORTED_SUFFIXES = (".txt", ".raw", ".jsonl", ".json", ".parquet")  # .raw: plain text, as wiki.test.raw
DATA_DIR_ENV = "QUANTKIT_DATA_DIR"


@dataclass(frozen=True)
class NamedSet:
    """A named text set: where it lives on the hub and, optionally, in a local data directory."""

    name: str
    hub_path: str
    hub_config: str | None
    split: str
    field: str = "text"
    data_files: str | None = None
    local_file: str | None = None  # relative to the data directory
    joiner: str = "\n\n"  # how evaluation joins the documents
    max_documents: int | None = None  # evaluation keeps only the first ones

    def hub_description(self) -> str:
        return f"the hub ({self.hub_path}, {self.hub_config or self.data_files}, split {self.split})"


EVAL_SETS = {
    s.name: s
    for s in (
        NamedSet(
            "wikitext2", "wikitext", "wikitext-2-raw-v1", "test", local_file="wikitext-2-raw/wiki.test.raw"
        ),
        NamedSet(
            "ptb", "ptb_text_only", "penn_treebank", "test", field="sentence", local_file="ptb/ptb.test.txt"
        ),
        NamedSet(
            "c4",
            "allenai/c4",
            None,
            "train",
            data_files="en/c4-validation.00000-of-00008.json.gz",
            local_file="c4/c4_validation_2k.parquet",
            joiner=" ",
            max_documents=1100,
        ),
    )
}


def _one_line(text: str, limit: int = 160) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _to_lf(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _record_text(record: Any, field: str, where: str) -> str:
    """The text of one JSON record: a string itself, or an object's `field`."""
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise QuantkitError(f"{where} is a {type(record).__name__}, expected an object or a string")
    if field not in record:
        found = ", ".join(map(str, record)) or "none"
        raise QuantkitError(f"{where} has no text field '{field}' (fields found: {found})")
    value = record[field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise QuantkitError(f"{where} field '{field}' is a {type(value).__name__}, not text")
    return value


def _read_txt(path: Path, field: str) -> list[str]:
    return [path.read_text(encoding="utf-8")]


def _read_jsonl(path: Path, field: str) -> list[str]:
    lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines(): JSON text may hold U+2028
    return [
        _record_text(json.loads(line), field, f"{path} line {number}")
        for number, line in enumerate(lines, 1)
        if line.strip()
    ]


def _read_json(path: Path, field: str) -> list[str]:
    records = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(records, list):
        raise QuantkitError(
            f"{path} holds a JSON {type(records).__name__}, expected a list of objects or strings"
        )
    return [_record_text(record, field, f"{path} item {index}") for index, record in enumerate(records)]


def _read_parquet(path: Path, field: str) -> list[str]:
    import pyarrow.parquet as pq

    columns = pq.read_schema(path).names
    if field not in columns:
        raise QuantkitError(f"{path} has no text column '{field}' (columns found: {', '.join(columns)})")
    return [value or "" for value in pq.read_table(path, columns=[field]).column(field).to_pylist()]


_READERS: dict[str, Callable[[Path, str], list[str]]] = {
    ".txt": _read_txt,
    ".raw": _read_txt,
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".parquet": _read_parquet,
}


def _read_file(path: Path, field: str) -> list[str]:
    try:
        return _READERS[path.suffix.lower()](path, field)
    except QuantkitError:
        raise
    except (OSError, ValueError) as exc:  # undecodable text, bad JSON, broken parquet
        raise QuantkitError(f"cannot read {path}: {_one_line(str(exc))}") from exc


def _conversation(record: Any, where: str) -> list[dict[str, str]]:
    """One conversation: an object's ``messages``, or the list itself; each message ``{role, content}`` strings."""
    messages = record.get("messages") if isinstance(record, dict) else record
    if not isinstance(messages, list) or not messages:
        raise QuantkitError(f"{where} is no conversation: expected a non-empty list of messages, or an object "
                            "whose 'messages' is one")
    for index, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise QuantkitError(f"{where} message {index} is not an object with 'role' and 'content' strings")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_conversations(path: str | Path) -> list[list[dict[str, str]]]:
    """The conversations of a JSONL file, one a line (``{"messages": [{"role": ..., "content": ...}, ...]}`` or
    the bare list of messages); refused with a one-line error naming the line."""
    path = Path(path)
    if path.suffix.lower() != ".jsonl" or not path.is_file():
        raise QuantkitError(f"chat calibration reads a .jsonl file of conversations; {path} is not one")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
        conversations = [_conversation(json.loads(line), f"{path} line {number}")
                         for number, line in enumerate(lines, 1) if line.strip()]
    except (OSError, ValueError) as exc:
        raise QuantkitError(f"cannot read {path}: {_one_line(str(exc))}") from exc
    if not conversations:
        raise QuantkitError(f"{path} holds no conversation")
    return conversations


def read_documents(path: str | Path, text_field: str = "text") -> list[str]:
    """Documents of a .txt/.raw (one document), .jsonl, .json or .parquet file, or of a directory of them.

    A directory's supported files are read in name order. Line endings become LF; empty documents are dropped.
    """
    path = Path(path)
    supported = "/".join(SUPPORTED_SUFFIXES)
    if not path.exists():
        raise QuantkitError(f"no such file or directory: {path}")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES)
    elif path.suffix.lower() in SUPPORTED_SUFFIXES:
        files = [path]
    else:
        raise QuantkitError(
            f"unsupported text file {path}: expected a {supported} file or a directory of them"
        )
    documents = [_to_lf(doc) for file in files for doc in _read_file(file, text_field) if doc.strip()]
    if not documents:
        raise QuantkitError(
            f"no text found in {path} (looked for {supported} files with a '{text_field}' field)"
        )
    return documents


def local_documents(source: str, names: Iterable[str], purpose: str) -> list[str]:
    """read_documents(source), saying which names were expected if `source` is not an existing path."""
    if not Path(source).exists():
        expected = ", ".join(f"'{name}'" for name in names)
        raise QuantkitError(
            f"unknown {purpose} source '{source}': expected one of {expected} or an existing file or directory"
        )
    return read_documents(source)


def resolve_data_dir(given: str | None) -> Path | None:
    """The local data directory: ``given`` (``--data-dir``), else $QUANTKIT_DATA_DIR, else None; one that does
    not exist is refused at once rather than ignored."""
    if given is not None:
        root, origin = given, "--data-dir"
    elif os.environ.get(DATA_DIR_ENV):
        root, origin = os.environ[DATA_DIR_ENV], f"${DATA_DIR_ENV}"
    else:
        return None
    path = Path(root).expanduser()
    if not path.is_dir():
        error = OptionError if given is not None else QuantkitError
        raise error(f"{origin} {root}: {'not a directory' if path.exists() else 'no such directory'}")
    return path


def data_dir_file(relative: str | None, root: str | None) -> Path | None:
    """`relative` inside the data directory (``root`` or $QUANTKIT_DATA_DIR), or None when there is no data
    directory; a data directory without the file is an error naming both."""
    folder = resolve_data_dir(root)
    if folder is None or not relative:
        return None
    candidate = folder / relative
    if not candidate.is_file():
        raise QuantkitError(f"the data directory {folder} has no {relative}")
    return candidate


def _hub_failure(spec: NamedSet, reason: str, alternative: str) -> QuantkitError:
    return QuantkitError(f"cannot reach the hub for '{spec.name}' ({reason}); pass {alternative}")


def check_hub(spec: NamedSet, alternative: str) -> None:
    """Refuse at once a hub set that cannot be had now (offline by choice, or no connection), suggesting
    ``alternative``: its client would retry for half a minute first."""
    reason = data_unreachable()
    if reason:
        raise _hub_failure(spec, reason, alternative)


def hub_documents(spec: NamedSet, alternative: str) -> Sequence[str]:
    """The `spec.field` values of a hub dataset; a one-line QuantkitError suggesting `alternative` if unreachable."""
    check_hub(spec, alternative)
    try:
        from datasets import load_dataset

        dataset = load_dataset(spec.hub_path, spec.hub_config, data_files=spec.data_files, split=spec.split)
    except Exception as exc:  # any failure here means the set cannot be had; say how to work without it
        raise _hub_failure(spec, _one_line(f"{type(exc).__name__}: {exc}", 120), alternative) from exc
    return dataset[spec.field]


def load_eval_text(source: str, data_dir: str | None = None) -> tuple[str, str]:
    """(text, description) of an evaluation source: 'wikitext2', 'c4', 'ptb' or a local file or directory."""
    spec = EVAL_SETS.get(source)
    if spec is None:
        documents = local_documents(source, EVAL_SETS, "evaluation")
        return "\n\n".join(documents), f"{source} ({len(documents)} documents)"
    local = data_dir_file(spec.local_file, data_dir)
    if local is not None:
        documents, origin = read_documents(local, spec.field), str(local)
    else:
        example = Path(spec.local_file).name
        alternative = (
            f"a local file instead (e.g. --ppl path/to/{example}) or --data-dir DIR holding {spec.local_file}"
        )
        documents, origin = hub_documents(spec, alternative), spec.hub_description()
    return _to_lf(spec.joiner.join(documents[: spec.max_documents])), f"{spec.name} from {origin}"
