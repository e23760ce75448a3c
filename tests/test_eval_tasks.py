"""The offline lm-eval tasks in quantkit/eval/tasks: loading, prompt equivalence with lm-eval's built-ins, errors.

Prompt equivalence is checked against lm-eval's own built-in task configs: each built-in YAML is loaded as
lm-eval loads it and run on hub-format docs rebuilt here from the raw local files (no download: the
config's dataset is replaced by those docs), and the requests it builds are compared with the ones the
local task builds. Nothing here runs a model or touches the network.
"""

from __future__ import annotations

import bz2
import json
import os
from pathlib import Path

import pytest

from quantkit.errors import QuantkitError
from quantkit.eval.tasks import loaders
from quantkit.eval.tasks.loaders import LOCAL_TASKS, TASKS_DIR, check_local_files, load_local

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"the real benchmark files are not at {DATA}")

EXPECTED_DOCS = {
    "piqa": 1838,
    "hellaswag": 10042,
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "winogrande": 1267,
    "lambada_openai": 5153,
    "boolq": 3270,
}
# the built-in task config each local task reproduces, relative to lm_eval/tasks
BUILTIN_YAML = {
    "piqa": "piqa/piqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "winogrande": "winogrande/default.yaml",
    "lambada_openai": "lambada/lambada_openai.yaml",
    "boolq": "super_glue/boolq/default.yaml",
}
FIRST = 25  # docs compared from the start of each file


@pytest.fixture(scope="module")
def offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        yield


def _task_manager(metadata: dict | None):
    from lm_eval.tasks import TaskManager

    # include_defaults=False only keeps the test fast: indexing lm-eval's ~14k built-in configs takes ~20 s.
    return TaskManager(include_path=TASKS_DIR, include_defaults=False, metadata=metadata)


@pytest.fixture(scope="module")
def local_tasks(offline):
    if not DATA.is_dir():
        pytest.skip(f"the real benchmark files are not at {DATA}")
    manager = _task_manager({"data_dir": str(DATA)})
    loaded = manager.load([spec.task_name for spec in LOCAL_TASKS.values()])
    assert set(loaded) >= {"tasks", "groups"}
    return {public: loaded["tasks"][spec.task_name] for public, spec in LOCAL_TASKS.items()}


# ----------------------------------------------------------------- hub-format docs, rebuilt from raw files
def _jsonl_rows(rel: str, indices: list[int]) -> list[dict]:
    wanted, rows = set(indices), {}
    with open(DATA / rel, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if i in wanted:
                rows[i] = json.loads(line)
    return [rows[i] for i in indices]


def _hub_piqa(indices):
    labels = (DATA / "piqa/valid-labels.lst").read_text().split()
    return [
        dict(row, label=int(labels[i])) for i, row in zip(indices, _jsonl_rows("piqa/valid.jsonl", indices))
    ]


def _hellaswag_items() -> list[list[str]]:
    lines = bz2.decompress((DATA / "hellaswag/hellaswag_val_full.txt.bz2").read_bytes()).decode().split("\n")
    return [lines[i : i + 6] for i in range(0, len(lines) - 5, 6)]


def _hub_hellaswag(indices):
    # the local line is "<activity_label>: <ctx>"; ctx_b cannot be located in it, so the whole context goes
    # to ctx_a and ctx_b is empty (the built-in's ctx_a + " " + "" is then stripped by its preprocess).
    items = _hellaswag_items()
    docs = []
    for i in indices:
        head, gold, *endings = items[i]
        label, _, ctx = head.partition(": ")
        docs.append({"activity_label": label, "ctx_a": ctx, "ctx_b": "", "endings": endings, "label": gold})
    return docs


def _hub_arc(task):
    def build(indices):
        docs = []
        for row in _jsonl_rows(f"{task}/{task}.jsonl", indices):
            assert row["query"].startswith("Question: ")
            keys = list("ABCDE")[: len(row["choices"])]
            docs.append(
                {
                    "question": row["query"][len("Question: ") :],
                    "choices": {"text": row["choices"], "label": keys},
                    "answerKey": keys[row["gold"]],
                }
            )
        return docs

    return build


def _hub_winogrande(indices):
    docs = []
    for row in _jsonl_rows("winogrande/winogrande.jsonl", indices):
        first, second = row["context_options"]
        stem = os.path.commonprefix([first, second])
        docs.append(
            {
                "sentence": f"{stem}_ {row['continuation']}",
                "option1": first[len(stem) :],
                "option2": second[len(stem) :],
                "answer": str(row["gold"] + 1),
            }
        )
    return docs


def _hub_lambada(indices):
    return [
        {"text": r["context"] + " " + r["continuation"]}
        for r in _jsonl_rows("lambada_openai/lambada_openai.jsonl", indices)
    ]


def _hub_boolq(indices):
    docs = []
    for row in _jsonl_rows("boolq/boolq.jsonl", indices):
        passage, _, question = row["query"].removeprefix("Passage: ").rpartition("\nQuestion: ")
        assert "\n" not in passage, "pick docs without the file's '\\nQuestion' artefact"
        docs.append(
            {"passage": passage, "question": question.removesuffix("?"), "label": row["gold"], "idx": 0}
        )
    return docs


HUB_DOCS = {
    "piqa": _hub_piqa,
    "hellaswag": _hub_hellaswag,
    "arc_easy": _hub_arc("arc_easy"),
    "arc_challenge": _hub_arc("arc_challenge"),
    "winogrande": _hub_winogrande,
    "lambada_openai": _hub_lambada,
    "boolq": _hub_boolq,
}


def _extra(public: str) -> list[int]:
    """Docs checked besides the first FIRST: the last PIQA doc (label alignment), the HellaSwag items with
    "[...]" left in the file (lm-eval's preprocess strips them), LAMBADA targets holding line breaks."""
    if public == "hellaswag":
        return [i for i, item in enumerate(_hellaswag_items()) if i >= FIRST and "[" in "".join(item)]
    return {"piqa": [1837], "lambada_openai": [426, 1053, 4462]}.get(public, [])


def _builtin_task(public: str, hub_docs: list[dict]):
    """lm-eval's built-in task, configured from its own YAML, evaluating ``hub_docs`` instead of the hub split."""
    import datasets
    import lm_eval.tasks
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml  # what TaskManager loads configs with

    cfg = load_yaml(Path(lm_eval.tasks.__file__).parent / BUILTIN_YAML[public])
    assert cfg["task"] == public
    for key in ("tag", "group", "task_list"):
        cfg.pop(key, None)
    split = LOCAL_TASKS[public].split
    assert cfg.get(f"{split}_split") == split, "the local task must evaluate the built-in's split"
    # only the evaluated split exists: no training/validation split to draw few-shot docs from
    cfg["training_split"] = None
    if split == "test":
        cfg["validation_split"] = None
    cfg["custom_dataset"] = lambda **_: datasets.DatasetDict({split: datasets.Dataset.from_list(hub_docs)})
    return ConfigurableTask(config=cfg)


def _requests(task, **kwargs) -> list[tuple]:
    task.build_all_requests(**kwargs)
    return [inst.arguments for inst in task.instances]


def _gold(task, doc):
    """The gold that lm-eval's process_results scores against (the target itself for loglikelihood tasks)."""
    return task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)


# ------------------------------------------------------------------------------------------------- tests
def test_task_table_matches_yaml_files():
    assert TASKS_DIR == Path(loaders.__file__).resolve().parent
    names = {spec.task_name for spec in LOCAL_TASKS.values()}
    assert names == {f"local_{public}" for public in EXPECTED_DOCS}
    assert {p.stem for p in TASKS_DIR.glob("*.yaml")} == names
    for public, spec in LOCAL_TASKS.items():
        text = (TASKS_DIR / f"{spec.task_name}.yaml").read_text()
        assert f"task: {spec.task_name}\n" in text
        assert f"{spec.split}_split: {spec.split}\n" in text
        assert f"custom_dataset: !function loaders.load_{public}\n" in text
        assert "  - quantkit_local\n" in text
        assert spec.hub_task == public and spec.differs and "\n" not in spec.differs


@needs_data
def test_every_task_loads_with_all_docs(local_tasks):
    for public, task in local_tasks.items():
        assert len(task.eval_docs) == EXPECTED_DOCS[public], public
        requests = _requests(task, limit=3)
        per_doc = 1 if task.OUTPUT_TYPE == "loglikelihood" else len(task.doc_to_choice(task.eval_docs[0]))
        assert len(requests) >= 3 * min(per_doc, 2), public


@needs_data
def test_tag_names_all_tasks(offline):
    manager = _task_manager({"data_dir": str(DATA)})
    assert manager.task_index["quantkit_local"].tags == {spec.task_name for spec in LOCAL_TASKS.values()}


@needs_data
@pytest.mark.parametrize("public", list(EXPECTED_DOCS))
def test_prompts_equal_builtin_task(local_tasks, public):
    local = local_tasks[public]
    indices = list(range(FIRST)) + _extra(public)
    builtin = _builtin_task(public, HUB_DOCS[public](indices))

    assert local.OUTPUT_TYPE == builtin.OUTPUT_TYPE
    assert local.config.target_delimiter == builtin.config.target_delimiter
    assert local.config.fewshot_delimiter == builtin.config.fewshot_delimiter
    assert local.aggregation() == builtin.aggregation()
    assert local.higher_is_better() == builtin.higher_is_better()
    assert bool(local.multiple_input) == bool(builtin.multiple_input)

    assert _requests(local, samples=indices) == _requests(builtin)
    local_docs = local.eval_docs
    assert [_gold(local, local_docs[i]) for i in indices] == [_gold(builtin, d) for d in builtin.eval_docs]


@needs_data
def test_hellaswag_differs_from_hub_only_in_ctx_b_capital(local_tasks):
    # the first hub validation row (Rowan/hellaswag): ctx_a / ctx_b are separate fields there
    hub_row = {
        "activity_label": "Roof shingle removal",
        "ctx_a": "A man is sitting on a roof.",
        "ctx_b": "he",
        "endings": [
            "is using wrap to wrap a pair of skis.",
            "is ripping level tiles off.",
            "is holding a rubik's cube.",
            "starts pulling up roofing on a roof.",
        ],
        "label": "3",
    }
    builtin = _builtin_task("hellaswag", [hub_row])
    local = local_tasks["hellaswag"]
    hub_ctx = builtin.fewshot_context(builtin.eval_docs[0], 0)
    local_ctx = local.fewshot_context(local.eval_docs[0], 0)
    assert hub_ctx == "Roof shingle removal: A man is sitting on a roof. He"
    assert local_ctx == "Roof shingle removal: A man is sitting on a roof. he"
    assert builtin.doc_to_choice(builtin.eval_docs[0]) == local.doc_to_choice(local.eval_docs[0])
    assert builtin.doc_to_target(builtin.eval_docs[0]) == local.doc_to_target(local.eval_docs[0]) == 3


@needs_data
def test_preprocess_matches_lm_eval():
    from lm_eval.tasks.hellaswag.utils import preprocess

    samples = [line for item in _hellaswag_items()[3500:3520] for line in item]
    samples += [" [header] How to x [title] Do y. [step] Z  w ", "a [www.site.org] b", "[title] x"]
    assert [loaders.hellaswag_preprocess(s) for s in samples] == [preprocess(s) for s in samples]


@needs_data
def test_boolq_artefacts_are_restored():
    docs = load_local("boolq", DATA)["validation"]
    assert not any("\n" in p for p in docs["passage"])
    assert "answer general knowledge questions to win" in docs[45]["passage"]
    assert docs[2417]["question"] == "is the sea snake the most venomous snake"
    assert "``Snakes in question: The Smithsonian Answer Book''" in docs[2417]["passage"]


@needs_data
def test_check_local_files_passes_on_real_data():
    for public, spec in LOCAL_TASKS.items():
        check_local_files(public, DATA)
        check_local_files(spec.task_name, DATA)


# ------------------------------------------------------------------------------------------------ errors
def _assert_one_line(exc: pytest.ExceptionInfo, *parts: str) -> str:
    message = str(exc.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)
    return message


def test_missing_data_dir_through_task_manager(offline):
    manager = _task_manager(None)
    with pytest.raises(QuantkitError) as exc:
        manager.load(["local_piqa"])
    _assert_one_line(exc, "local_piqa", "piqa/valid.jsonl", "data_dir", "--metadata")


def test_missing_file_through_task_manager(offline, tmp_path):
    manager = _task_manager({"data_dir": str(tmp_path)})
    with pytest.raises(QuantkitError) as exc:
        manager.load(["local_arc_easy"])
    _assert_one_line(exc, "local_arc_easy", str(tmp_path / "arc_easy" / "arc_easy.jsonl"), "not found")


@pytest.mark.parametrize("public", list(EXPECTED_DOCS))
def test_check_local_files_names_the_missing_file(tmp_path, public):
    spec = LOCAL_TASKS[public]
    with pytest.raises(QuantkitError) as exc:
        check_local_files(public, tmp_path)
    _assert_one_line(exc, spec.task_name, str(tmp_path / spec.files[0]), "not found")
    with pytest.raises(QuantkitError) as exc:
        check_local_files(public, None)
    _assert_one_line(exc, spec.task_name, spec.files[0], "data_dir")


def test_unknown_task():
    with pytest.raises(QuantkitError, match="unknown local task 'mmlu'"):
        check_local_files("mmlu", "/tmp")


def _write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


PIQA_ROW = json.dumps({"goal": "g", "sol1": "a", "sol2": "b"})


def test_piqa_label_count_mismatch(tmp_path):
    _write(tmp_path / "piqa/valid.jsonl", "\n".join([PIQA_ROW] * 3) + "\n")
    labels = _write(tmp_path / "piqa/valid-labels.lst", "0\n1\n")
    with pytest.raises(QuantkitError) as exc:
        # lm-eval passes the whole task metadata (version, model args...) as keyword arguments
        loaders.load_piqa(data_dir=str(tmp_path), version=1.0, pretrained="x")
    _assert_one_line(exc, "local_piqa", str(labels), "2 labels", "3 rows")


def test_piqa_small_files_load(tmp_path):
    _write(tmp_path / "piqa/valid.jsonl", "\n".join([PIQA_ROW] * 3) + "\n")
    _write(tmp_path / "piqa/valid-labels.lst", "0\n1\n1\n")
    docs = loaders.load_piqa(data_dir=tmp_path)["validation"]
    assert docs["label"] == [0, 1, 1] and docs[0]["goal"] == "g"


CORRUPT = [
    (
        "arc_easy",
        "arc_easy/arc_easy.jsonl",
        '{"query": "Question: q", "choices": ["a", "b"], "gold": 0}\n{oops\n',
        "line 2 is not valid JSON",
    ),
    (
        "arc_challenge",
        "arc_challenge/arc_challenge.jsonl",
        '{"query": "Question: q", "choices": ["a"], "gold": 3}\n',
        "gold 3 is not an index",
    ),
    (
        "winogrande",
        "winogrande/winogrande.jsonl",
        '{"context_options": ["a", "b"], "gold": 0}\n',
        "lacks the field 'continuation'",
    ),
    (
        "lambada_openai",
        "lambada_openai/lambada_openai.jsonl",
        '{"context": "a b", "continuation": 7}\n',
        "field 'continuation' is int, not str",
    ),
    (
        "boolq",
        "boolq/boolq.jsonl",
        '{"query": "Question: q?", "choices": ["no", "yes"], "gold": 1}\n',
        "query is not 'Passage: ...\\nQuestion: ...?'",
    ),
    ("boolq", "boolq/boolq.jsonl", "", "has no rows"),
    ("hellaswag", "hellaswag/hellaswag_val_full.txt.bz2", b"not bzip2", "is not a valid bzip2 file"),
    (
        "hellaswag",
        "hellaswag/hellaswag_val_full.txt.bz2",
        bz2.compress(b"a: b\n3\nx\ny\n"),
        "has 4 lines, not a positive multiple of 6",
    ),
    (
        "hellaswag",
        "hellaswag/hellaswag_val_full.txt.bz2",
        bz2.compress(b"a: b\n7\nw\nx\ny\nz\n"),
        "gold '7' is not 0-3",
    ),
    ("piqa", "piqa/valid.jsonl", b"\xff\xfe", "is not UTF-8 text"),
]


@pytest.mark.parametrize(
    ("public", "rel", "content", "what"), CORRUPT, ids=[f"{c[0]}-{c[3][:20]}" for c in CORRUPT]
)
def test_corrupt_file_gives_one_line_error(tmp_path, public, rel, content, what):
    path = _write(tmp_path / rel, content)
    if public == "piqa":
        _write(tmp_path / "piqa/valid-labels.lst", "0\n")
    with pytest.raises(QuantkitError) as exc:
        getattr(loaders, f"load_{public}")(data_dir=str(tmp_path))
    _assert_one_line(exc, LOCAL_TASKS[public].task_name, str(path), what)
