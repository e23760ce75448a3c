"""Offline datasets for lm-evaluation-harness's zero-shot tasks, read from local copies of the real data.

The YAML files next to this module define the lm-eval tasks ``local_piqa``, ``local_hellaswag``,
``local_arc_easy``, ``local_arc_challenge``, ``local_winogrande``, ``local_lambada_openai`` and
``local_boolq`` (tag ``quantkit_local``). Each names one of the ``load_*`` functions below as its
``custom_dataset``; lm-eval calls it as ``custom_dataset(**metadata, **dataset_kwargs)``, so the data
directory arrives as the ``data_dir`` metadata key and every other key (the task version, the model
arguments that lm-eval merges in) is ignored. The same tasks therefore run

* in-process: ``TaskManager(include_path=TASKS_DIR, metadata={"data_dir": D})``;
* from the plain CLI: ``lm_eval ... --include_path <this dir> --tasks local_piqa --metadata '{"data_dir": D}'``.

Rows keep file order (lm-eval's ``--limit N`` takes the first N). Prompts, choices, targets and metrics
follow the built-in tasks of lm-eval 0.4.13; the few places where the local files cannot reproduce the
hub data exactly are listed in ``LOCAL_TASKS[...].differs`` and, in full, in each loader's docstring.

lm-eval imports this file by its path (as a module named after that path) while quantkit imports it as
``quantkit.eval.tasks.loaders``: it keeps no state and uses absolute imports only.
"""

from __future__ import annotations

import bz2
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import datasets

from quantkit.errors import QuantkitError

TASKS_DIR: Path = Path(__file__).resolve().parent
TAG = "quantkit_local"

_HINT = "pass --data-dir (quantkit) or --metadata '{\"data_dir\": ...}' (lm_eval)"


class LocalTask(NamedTuple):
    """One local task: how lm-eval names it, what it reads, how it differs from the hub task.

    A NamedTuple, not a dataclass: lm-eval executes this file without registering it in sys.modules,
    which dataclasses (with postponed annotations) cannot cope with.
    """

    task_name: str  # the lm-eval task name, e.g. "local_piqa"
    hub_task: str  # the built-in lm-eval task it reproduces, e.g. "piqa"
    split: str  # the split the YAML evaluates (the built-in task's)
    files: tuple[str, ...]  # data files, relative to data_dir
    differs: str  # one line: how the prompts/data differ from the hub task


LOCAL_TASKS: dict[str, LocalTask] = {
    "piqa": LocalTask(
        "local_piqa",
        "piqa",
        "validation",
        ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
        "none: the original PIQA validation files (goal, sol1, sol2 + labels), same prompt as lm-eval's piqa",
    ),
    "hellaswag": LocalTask(
        "local_hellaswag",
        "hellaswag",
        "validation",
        ("hellaswag/hellaswag_val_full.txt.bz2",),
        "the context keeps ctx_b as written (usually lower case: '... roof. he'); the hub task applies"
        " str.capitalize to ctx_b ('... roof. He'); wikiHow [tags] were pre-stripped by the file's converter",
    ),
    "arc_easy": LocalTask(
        "local_arc_easy",
        "arc_easy",
        "test",
        ("arc_easy/arc_easy.jsonl",),
        "none in the prompt ('Question: ...\\nAnswer:' + choice texts); the A-D/1-4 answer labels are absent",
    ),
    "arc_challenge": LocalTask(
        "local_arc_challenge",
        "arc_challenge",
        "test",
        ("arc_challenge/arc_challenge.jsonl",),
        "none in the prompt ('Question: ...\\nAnswer:' + choice texts); the A-D/1-4 answer labels are absent",
    ),
    "winogrande": LocalTask(
        "local_winogrande",
        "winogrande",
        "validation",
        ("winogrande/winogrande.jsonl",),
        "none: the xl dev set pre-split into the two filled-in contexts and the continuation (partial scoring)",
    ),
    "lambada_openai": LocalTask(
        "local_lambada_openai",
        "lambada_openai",
        "test",
        ("lambada_openai/lambada_openai.jsonl",),
        "none: text pre-split at its last ' ' into context and last word, as lm-eval splits it",
    ),
    "boolq": LocalTask(
        "local_boolq",
        "boolq",
        "validation",
        ("boolq/boolq.jsonl",),
        "passage/question parsed back from 'Passage: ...\\nQuestion: ...?'; the file's 33 '\\nQuestion' artefacts"
        " in 22 passages are restored as ' question' (a title-case 'Question' in the hub text stays lower case)",
    ),
}


# ----------------------------------------------------------------------------------------------- errors
def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _fail(task_name: str, path: Path | str, what: str) -> NoReturn:
    raise QuantkitError(_one_line(f"{task_name}: {path} {what}"))


def _resolve(task_name: str, data_dir: Any, rel: str) -> Path:
    """The path of one data file under data_dir, or a one-line error naming it."""
    if data_dir is None or (isinstance(data_dir, str) and not data_dir.strip()):
        raise QuantkitError(f"{task_name}: no data_dir given, so {rel} cannot be found; {_HINT}")
    if not isinstance(data_dir, (str, os.PathLike)):
        raise QuantkitError(
            f"{task_name}: data_dir must be a directory path, got {type(data_dir).__name__} {data_dir!r}; {_HINT}"
        )
    path = Path(data_dir).expanduser() / rel
    if not path.exists():
        _fail(task_name, path, f"not found; {_HINT}")
    if not path.is_file():
        _fail(task_name, path, "is not a file")
    return path


def _read_text(task_name: str, path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        _fail(task_name, path, f"is not UTF-8 text ({exc.reason} at byte {exc.start})")
    except OSError as exc:
        _fail(task_name, path, f"cannot be read ({exc.strerror or exc})")


def _lines(text: str) -> list[tuple[int, str]]:
    """(1-based line number, line) for the non-blank lines; splits on '\\n' only (JSON strings may hold U+2028)."""
    return [(n, line.rstrip("\r")) for n, line in enumerate(text.split("\n"), 1) if line.strip()]


def _read_jsonl(task_name: str, path: Path, fields: dict[str, type]) -> list[tuple[int, dict]]:
    rows = []
    for lineno, line in _lines(_read_text(task_name, path)):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            _fail(task_name, path, f"line {lineno} is not valid JSON ({exc.msg} at column {exc.colno})")
        if not isinstance(row, dict):
            _fail(task_name, path, f"line {lineno} is not a JSON object")
        for name, kind in fields.items():
            if name not in row:
                _fail(task_name, path, f"line {lineno} lacks the field {name!r}")
            value = row[name]
            if not isinstance(value, kind) or isinstance(value, bool):
                _fail(
                    task_name,
                    path,
                    f"line {lineno}: field {name!r} is {type(value).__name__}, not {kind.__name__}",
                )
            if kind is list and not all(isinstance(item, str) for item in value):
                _fail(task_name, path, f"line {lineno}: field {name!r} is not a list of strings")
        rows.append((lineno, row))
    if not rows:
        _fail(task_name, path, "has no rows")
    return rows


def _check_gold(task_name: str, path: Path, lineno: int, gold: int, n_choices: int) -> None:
    if not 0 <= gold < n_choices:
        _fail(task_name, path, f"line {lineno}: gold {gold} is not an index into its {n_choices} choices")


def _dataset(split: str, rows: list[dict]) -> datasets.DatasetDict:
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


# ------------------------------------------------------------------------------------------- the tasks
def piqa_rows(data_dir: str | os.PathLike) -> list[dict]:
    """PIQA validation as the hub's ``{goal, sol1, sol2, label}``, from ``valid.jsonl`` + ``valid-labels.lst``.

    These are the original PIQA files (the hub copy lm-eval reads was built from them), so prompts are
    identical to lm-eval's ``piqa``: ``"Question: {goal}\\nAnswer:"`` with ``[sol1, sol2]``.
    """
    name = LOCAL_TASKS["piqa"].task_name
    docs_path = _resolve(name, data_dir, "piqa/valid.jsonl")
    labels_path = _resolve(name, data_dir, "piqa/valid-labels.lst")
    rows = _read_jsonl(name, docs_path, {"goal": str, "sol1": str, "sol2": str})
    labels = _lines(_read_text(name, labels_path))
    if len(labels) != len(rows):
        _fail(name, labels_path, f"has {len(labels)} labels but {docs_path} has {len(rows)} rows")
    out = []
    for (_, row), (lineno, label) in zip(rows, labels):
        if label.strip() not in ("0", "1"):
            _fail(name, labels_path, f"line {lineno}: label {label.strip()!r} is not 0 or 1")
        out.append({"goal": row["goal"], "sol1": row["sol1"], "sol2": row["sol2"], "label": int(label)})
    return out


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag ``preprocess`` (lm_eval/tasks/hellaswag/utils.py), reimplemented."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_rows(data_dir: str | os.PathLike) -> list[dict]:
    """HellaSwag validation as lm-eval's processed docs ``{query, choices, gold}``.

    The file holds 6 lines per item: ``"<activity_label>: <ctx>"``, the gold index and the 4 endings, each
    already passed through its converter's tag stripping (klosax/hellaswag_text_data, extract_hellaswag.cpp:
    removes ``[header]``, ``[step]``, ``[substeps]``, turns `` [title]`` into ``". "``). lm-eval's
    ``preprocess`` is applied again to the context line and to each ending, as the built-in task does.

    How the prompt differs from lm-eval's ``hellaswag`` on the hub data:

    * the hub task builds the context as ``ctx_a + " " + ctx_b.capitalize()``; the local line is the raw
      ``ctx`` (``ctx_a + " " + ctx_b``), whose ``ctx_b`` is not capitalised and cannot be located in it.
      So where ``ctx_b`` is non-empty (most ActivityNet items) the local context has a lower-case letter
      where the hub's is upper case (``"Roof shingle removal: A man is sitting on a roof. he"`` vs
      ``"... roof. He"``), and an upper-case letter later in ``ctx_b``, which ``str.capitalize`` would
      lower, stays upper case;
    * tag stripping ran twice (converter, then lm-eval's ``preprocess``) instead of once, which can leave
      a different spacing around a removed tag in rare wikiHow items.

    The endings and the gold index are unaffected by the first point.
    """
    name = LOCAL_TASKS["hellaswag"].task_name
    path = _resolve(name, data_dir, "hellaswag/hellaswag_val_full.txt.bz2")
    try:
        raw = bz2.decompress(path.read_bytes())
    except (OSError, EOFError, ValueError) as exc:
        _fail(name, path, f"is not a valid bzip2 file ({exc})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        _fail(name, path, f"does not hold UTF-8 text ({exc.reason} at byte {exc.start})")
    lines = [line.rstrip("\r") for line in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or len(lines) % 6:
        _fail(name, path, f"has {len(lines)} lines, not a positive multiple of 6 (6 lines per item)")
    out = []
    for start in range(0, len(lines), 6):
        context, gold, *endings = lines[start : start + 6]
        if gold.strip() not in ("0", "1", "2", "3"):
            _fail(name, path, f"line {start + 2}: gold {gold.strip()!r} is not 0-3 (item {start // 6})")
        out.append(
            {
                "query": hellaswag_preprocess(context),
                "choices": [hellaswag_preprocess(ending) for ending in endings],
                "gold": int(gold),
            }
        )
    return out


def _arc_rows(task: str, data_dir: str | os.PathLike) -> list[dict]:
    name = LOCAL_TASKS[task].task_name
    path = _resolve(name, data_dir, LOCAL_TASKS[task].files[0])
    out = []
    for lineno, row in _read_jsonl(name, path, {"query": str, "choices": list, "gold": int}):
        if not row["query"].startswith("Question: "):
            _fail(name, path, f"line {lineno}: query does not start with 'Question: '")
        _check_gold(name, path, lineno, row["gold"], len(row["choices"]))
        out.append({"query": row["query"], "choices": row["choices"], "gold": row["gold"]})
    return out


def arc_easy_rows(data_dir: str | os.PathLike) -> list[dict]:
    """ARC-Easy test as ``{query, choices, gold}``; ``query`` is the hub's ``"Question: " + question``.

    lm-eval's ``arc_easy`` prompt ``"Question: {question}\\nAnswer:"`` is rebuilt as ``"{query}\\nAnswer:"``,
    the choices are the hub's ``choices.text``, gold its ``choices.label.index(answerKey)``.
    """
    return _arc_rows("arc_easy", data_dir)


def arc_challenge_rows(data_dir: str | os.PathLike) -> list[dict]:
    """ARC-Challenge test, as :func:`arc_easy_rows`."""
    return _arc_rows("arc_challenge", data_dir)


def winogrande_rows(data_dir: str | os.PathLike) -> list[dict]:
    """WinoGrande (xl) dev as ``{context_options, continuation, gold}``.

    lm-eval's ``winogrande`` scores partially: ``doc_to_choice`` gives the sentence up to the blank with
    each option filled in (= ``context_options``), ``doc_to_target`` the rest of the sentence after the
    blank (= ``continuation``) and ``doc_to_text`` the index of the right option (= ``gold``), which makes
    lm-eval score ``(context_i, " " + continuation)`` for each option.
    """
    name = LOCAL_TASKS["winogrande"].task_name
    path = _resolve(name, data_dir, LOCAL_TASKS["winogrande"].files[0])
    out = []
    for lineno, row in _read_jsonl(name, path, {"context_options": list, "continuation": str, "gold": int}):
        if len(row["context_options"]) != 2:
            _fail(
                name, path, f"line {lineno}: context_options has {len(row['context_options'])} entries, not 2"
            )
        _check_gold(name, path, lineno, row["gold"], 2)
        out.append({k: row[k] for k in ("context_options", "continuation", "gold")})
    return out


def lambada_openai_rows(data_dir: str | os.PathLike) -> list[dict]:
    """LAMBADA (OpenAI) test as ``{context, continuation}``.

    lm-eval's ``lambada_openai`` splits ``text`` at its last ``" "``: context = all but the last word,
    target = ``" " + last word``; the local file holds the two parts, so ``text == context + " " +
    continuation`` and the requests are identical.
    """
    name = LOCAL_TASKS["lambada_openai"].task_name
    path = _resolve(name, data_dir, LOCAL_TASKS["lambada_openai"].files[0])
    out = []
    for lineno, row in _read_jsonl(name, path, {"context": str, "continuation": str}):
        if not row["continuation"] or " " in row["continuation"]:
            _fail(
                name, path, f"line {lineno}: continuation {row['continuation']!r} is not one space-free word"
            )
        out.append({"context": row["context"], "continuation": row["continuation"]})
    return out


_BOOLQ_ARTEFACT = "\nQuestion"


def boolq_rows(data_dir: str | os.PathLike) -> list[dict]:
    """BoolQ dev as the hub's ``{passage, question, label}``, parsed from ``"Passage: {p}\\nQuestion: {q}?"``.

    The prompt is then lm-eval's own ``"{passage}\\nQuestion: {question}?\\nAnswer:"`` with the choices
    ``["no", "yes"]`` (scored as ``" no"`` / ``" yes"``). The local query cannot be used as it is: it
    carries a ``"Passage: "`` prefix that the built-in prompt lacks.

    The local file's converter also turned each ``" question"`` inside a passage into ``"\\nQuestion"``
    (33 places in 22 passages; BoolQ passages hold no line breaks). The loader turns them back into
    ``" question"``; where the hub passage had a title-case ``"Question"`` (one known place: the book
    title "Snakes in Question" in doc 2417, counting from 0) the local prompt has ``"question"``.
    The question is the text after the last ``"\\nQuestion: "``, without its final ``"?"``.
    """
    name = LOCAL_TASKS["boolq"].task_name
    path = _resolve(name, data_dir, LOCAL_TASKS["boolq"].files[0])
    out = []
    for lineno, row in _read_jsonl(name, path, {"query": str, "gold": int}):
        query = row["query"]
        if not query.startswith("Passage: ") or "\nQuestion: " not in query or not query.endswith("?"):
            _fail(name, path, f"line {lineno}: query is not 'Passage: ...\\nQuestion: ...?'")
        if row.get("choices", ["no", "yes"]) != ["no", "yes"]:
            _fail(name, path, f"line {lineno}: choices {row.get('choices')!r} are not ['no', 'yes']")
        _check_gold(name, path, lineno, row["gold"], 2)
        passage, _, question = query[len("Passage: ") :].rpartition("\nQuestion: ")
        out.append(
            {
                "passage": passage.replace(_BOOLQ_ARTEFACT, " question"),
                "question": question[:-1],
                "label": row["gold"],
            }
        )
    return out


_ROWS: dict[str, Callable[[str | os.PathLike], list[dict]]] = {
    "piqa": piqa_rows,
    "hellaswag": hellaswag_rows,
    "arc_easy": arc_easy_rows,
    "arc_challenge": arc_challenge_rows,
    "winogrande": winogrande_rows,
    "lambada_openai": lambada_openai_rows,
    "boolq": boolq_rows,
}


def _public_name(task: str) -> str:
    if task in LOCAL_TASKS:
        return task
    for public, spec in LOCAL_TASKS.items():
        if task == spec.task_name:
            return public
    raise QuantkitError(f"unknown local task {task!r}; known: {', '.join(LOCAL_TASKS)}")


def check_local_files(task: str, data_dir: str | os.PathLike | None) -> None:
    """Raise a one-line QuantkitError if a file of ``task`` (``piqa`` or ``local_piqa``) is missing."""
    spec = LOCAL_TASKS[_public_name(task)]
    for rel in spec.files:
        _resolve(spec.task_name, data_dir, rel)


def load_local(task: str, data_dir: str | os.PathLike | None) -> datasets.DatasetDict:
    """The DatasetDict of ``task`` (``piqa`` or ``local_piqa``), holding the split its YAML evaluates."""
    public = _public_name(task)
    check_local_files(public, data_dir)
    return _dataset(LOCAL_TASKS[public].split, _ROWS[public](data_dir))  # type: ignore[arg-type]


# lm-eval's custom_dataset entry points: called with the task metadata (data_dir, version, model args...).
def load_piqa(data_dir: str | os.PathLike | None = None, **_metadata: Any) -> datasets.DatasetDict:
    return load_local("piqa", data_dir)


def load_hellaswag(data_dir: str | os.PathLike | None = None, **_metadata: Any) -> datasets.DatasetDict:
    return load_local("hellaswag", data_dir)


def load_arc_easy(data_dir: str | os.PathLike | None = None, **_metadata: Any) -> datasets.DatasetDict:
    return load_local("arc_easy", data_dir)


def load_arc_challenge(data_dir: str | os.PathLike | None = None, **_metadata: Any) -> datasets.DatasetDict:
    return load_local("arc_challenge", data_dir)


def load_winogrande(data_dir: str | os.PathLike | None = None, **_metadata: Any) -> datasets.DatasetDict:
    return load_local("winogrande", data_dir)


def load_lambada_openai(data_dir: str | os.PathLike | None = None, **_metadata: Any) -> datasets.DatasetDict:
    return load_local("lambada_openai", data_dir)


def load_boolq(data_dir: str | os.PathLike | None = None, **_metadata: Any) -> datasets.DatasetDict:
    return load_local("boolq", data_dir)
