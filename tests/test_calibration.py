"""Calibration windows: GPTQ-style sampling from documents, fallbacks, sources, and model-sampled text."""

from __future__ import annotations

import copy
import json
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from conftest import tiny_model
from helpers_tokenizer import tiny_tokenizer
from quantkit.calib import load_calibration
from quantkit.calib.sampling import sample_windows
from quantkit.calib.sources import check_source
from quantkit.calib.synthetic import synthetic_windows
from quantkit.errors import QuantkitError
from quantkit.textsources import read_conversations

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
C4 = DATA / "c4" / "c4_validation_2k.parquet"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="shared data folder not present")

SENTENCES = [
    "Quantized weights keep most of the accuracy of the original model.",
    "A calibration set of a few hundred windows is usually enough.",
    "Every layer sees the activations of the layers before it.",
    "Outliers in activations make low-bit quantization harder.",
]


def _documents(count: int, repeats: int) -> list[str]:
    return [
        " ".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(repeats)) + f" #{i}" for i in range(count)
    ]


def _ids(text: str) -> list[int]:
    return tiny_tokenizer()(text)["input_ids"]


def _is_slice(window: list[int], ids: list[int]) -> bool:
    return any(ids[i : i + len(window)] == window for i in range(len(ids) - len(window) + 1))


def _gptq_reference(documents: list[str], nsamples: int, seqlen: int, seed: int) -> list[list[int]]:
    """The loop of GPTQ's get_c4 (tokenize a random document until one is longer than seqlen)."""
    rng = random.Random(seed)
    windows = []
    for _ in range(nsamples):
        while True:
            ids = _ids(documents[rng.randint(0, len(documents) - 1)])
            if len(ids) > seqlen:
                break
        start = rng.randint(0, len(ids) - seqlen - 1)
        windows.append(ids[start : start + seqlen])
    return windows


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("QUANTKIT_DATA_DIR", raising=False)


def test_windows_match_the_gptq_loop_and_are_document_slices() -> None:
    documents = _documents(12, 1) + _documents(8, 6)  # short ones get skipped
    windows = sample_windows(documents, tiny_tokenizer(), nsamples=10, seqlen=40, seed=3)
    assert windows.dtype == torch.int64 and windows.shape == (10, 40)
    assert windows.tolist() == _gptq_reference(documents, 10, 40, seed=3)
    long_ids = [_ids(doc) for doc in documents[12:]]
    assert all(any(_is_slice(w, ids) for ids in long_ids) for w in windows.tolist())


def test_windows_are_deterministic_per_seed() -> None:
    documents = _documents(30, 6)
    first = sample_windows(documents, tiny_tokenizer(), 8, 32, seed=0)
    assert torch.equal(first, sample_windows(documents, tiny_tokenizer(), 8, 32, seed=0))
    assert not torch.equal(first, sample_windows(documents, tiny_tokenizer(), 8, 32, seed=1))


def test_short_documents_fall_back_to_the_joined_stream() -> None:
    documents = _documents(5, 1)
    seqlen = max(len(_ids(doc)) for doc in documents)  # no document is longer than seqlen
    windows = sample_windows(documents, tiny_tokenizer(), 6, seqlen, seed=0)
    stream = _ids("\n\n".join(documents))
    assert windows.shape == (6, seqlen)
    assert all(_is_slice(w, stream) for w in windows.tolist())
    assert len({tuple(w) for w in windows.tolist()}) > 1


def test_too_little_text_names_tokens_and_seqlen() -> None:
    tokens = len(_ids("tiny text"))
    with pytest.raises(QuantkitError) as info:
        sample_windows(["tiny text"], tiny_tokenizer(), 2, 64, seed=0)
    message = str(info.value)
    assert "\n" not in message and f"{tokens} tokens" in message and "64" in message


@pytest.mark.parametrize(("nsamples", "seqlen", "match"), [(0, 16, "nsamples=0"), (4, 1, "seqlen=1")])
def test_sizes_are_validated(tmp_path: Path, nsamples: int, seqlen: int, match: str) -> None:
    (tmp_path / "a.txt").write_text(_documents(1, 20)[0], encoding="utf-8")
    with pytest.raises(QuantkitError, match=match):
        load_calibration(str(tmp_path / "a.txt"), tiny_tokenizer(), nsamples, seqlen, seed=0)


def test_local_jsonl_and_directory_sources(tmp_path: Path) -> None:
    documents = _documents(6, 6)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents[:3]), "utf-8")
    (tmp_path / "b.json").write_text(json.dumps(documents[3:]), "utf-8")
    from_dir = load_calibration(str(tmp_path), tiny_tokenizer(), 5, 24, seed=1)
    assert from_dir.tolist() == _gptq_reference(documents, 5, 24, seed=1)
    from_file = load_calibration(str(tmp_path / "a.jsonl"), tiny_tokenizer(), 5, 24, seed=1)
    assert from_file.tolist() == _gptq_reference(documents[:3], 5, 24, seed=1)


def test_unknown_source_names_the_choices() -> None:
    with pytest.raises(QuantkitError, match="'synthetic', 'self', 'wikitext2', 'c4'"):
        load_calibration("c5", tiny_tokenizer(), 4, 16, seed=0)


def test_named_source_offline_fails_fast_naming_local_alternatives() -> None:
    started = time.perf_counter()
    with pytest.raises(QuantkitError) as info:
        load_calibration("wikitext2", tiny_tokenizer(), 4, 16, seed=0)
    assert time.perf_counter() - started < 1.0
    message = str(info.value)
    assert "\n" not in message and message.startswith(
        "cannot reach the hub for 'wikitext2' (HF_HUB_OFFLINE=1)"
    )
    assert "a local .txt/.raw/.jsonl/.json/.parquet file or directory, or 'synthetic'" in message


@needs_data
def test_real_c4_parquet_gives_128_windows_of_512_quickly() -> None:
    started = time.perf_counter()
    windows = load_calibration(str(C4), tiny_tokenizer(), 128, 512, seed=0)
    assert time.perf_counter() - started < 10
    assert windows.shape == (128, 512) and windows.dtype == torch.int64
    rows = pq.read_table(C4).column("text").to_pylist()
    assert windows.tolist()[:4] == _gptq_reference(rows, 4, 512, seed=0)


@needs_data
def test_data_dir_serves_c4_but_never_the_wikitext_test_split() -> None:
    from_dir = load_calibration("c4", tiny_tokenizer(), 4, 64, seed=5, data_dir=str(DATA))
    assert torch.equal(from_dir, load_calibration(str(C4), tiny_tokenizer(), 4, 64, seed=5))
    with pytest.raises(QuantkitError, match="cannot reach the hub for 'wikitext2'"):
        load_calibration("wikitext2", tiny_tokenizer(), 4, 64, seed=5, data_dir=str(DATA))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models run no faster on more threads, and far slower when another process holds a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_synthetic_needs_a_model() -> None:
    with pytest.raises(QuantkitError, match="no model"):
        load_calibration("synthetic", tiny_tokenizer(), 4, 16, seed=0)


@pytest.mark.usefixtures("one_thread")
def test_synthetic_is_deterministic_in_vocab_and_top_k() -> None:
    tokenizer = tiny_tokenizer()
    model = tiny_model(vocab_size=len(tokenizer) + 64)  # padded embedding rows beyond the tokenizer
    tokens = load_calibration("synthetic", tokenizer, 5, 12, seed=7, model=model)
    assert tokens.shape == (5, 12) and tokens.dtype == torch.int64
    assert int(tokens.min()) >= 0 and int(tokens.max()) < len(tokenizer)
    assert torch.equal(tokens, synthetic_windows(model, tokenizer, 5, 12, seed=7))
    assert not torch.equal(tokens, synthetic_windows(model, tokenizer, 5, 12, seed=8))
    with torch.inference_mode():  # reference without the KV cache: each token is among the 50 most likely
        logits = model(input_ids=tokens).logits[:, :-1, : len(tokenizer)]
    top50 = logits.topk(50, dim=-1).indices
    assert bool((top50 == tokens[:, 1:, None]).any(dim=-1).all())
    assert len(set(tokens[:, 0].tolist())) > 1  # first tokens are drawn, not fixed


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _conversations(path: Path, count: int = 12) -> Path:
    lines = []
    for i in range(count):
        messages = [{"role": "user", "content": f"Question {i}: how do {i % 5} weights fit in a few bits?"},
                    {"role": "assistant", "content": f"Answer {i}: they are rounded group by group " * 3}]
        lines.append(json.dumps({"messages": messages} if i % 2 else messages))  # both forms a line may take
    path.write_text("\n".join(lines) + "\n")
    return path


def test_chat_calibration_windows_open_each_templated_conversation(tmp_path: Path) -> None:
    """Each window is the start of a different conversation rendered by the chat template (role markers
    included), drawn with the seed; conversations too short for the windows are packed into one stream."""
    tokenizer = copy.deepcopy(tiny_tokenizer())  # the helper's tokenizer is shared: it keeps no template
    tokenizer.chat_template = CHAT_TEMPLATE
    source = f"chat:{_conversations(tmp_path / 'chats.jsonl')}"
    check_source(source, None)
    windows = load_calibration(source, tokenizer, 6, 24, seed=4)
    rendered = [tokenizer.apply_chat_template(m, tokenize=False) for m in read_conversations(tmp_path / "chats.jsonl")]
    streams = [tokenizer(text)["input_ids"] for text in rendered]
    assert windows.shape == (6, 24)
    openings = [streams.index(next(s for s in streams if s[:24] == window)) for window in windows.tolist()]
    assert len(set(openings)) == 6
    assert all(tokenizer.decode(w).startswith("<|user|>") for w in windows.tolist())
    assert torch.equal(windows, load_calibration(source, tokenizer, 6, 24, seed=4))
    assert not torch.equal(windows, load_calibration(source, tokenizer, 6, 24, seed=5))
    longest = max(len(s) for s in streams)
    packed = load_calibration(source, tokenizer, 3, longest + 5, seed=4)
    joined = tokenizer("\n\n".join(rendered))["input_ids"]
    for window in packed.tolist():
        assert any(joined[i : i + longest + 5] == window for i in range(len(joined) - longest - 4))


@pytest.mark.parametrize("content,fragment", [
    ('{"messages": []}\n', "line 1 is no conversation"),
    ('[{"role": "user"}]\n', "line 1 message 0 is not an object with 'role' and 'content' strings"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n', "cannot read"),
    ("\n\n", "holds no conversation"),
])
def test_malformed_chat_files_are_named_before_the_model_loads(tmp_path: Path, content: str, fragment: str) -> None:
    path = tmp_path / "chats.jsonl"
    path.write_text(content)
    with pytest.raises(QuantkitError, match=re.escape(fragment)):
        check_source(f"chat:{path}", None)


def test_chat_calibration_needs_a_chat_template(tmp_path: Path) -> None:
    with pytest.raises(QuantkitError, match="has none"):
        load_calibration(f"chat:{_conversations(tmp_path / 'chats.jsonl')}", tiny_tokenizer(), 2, 16, seed=0)
    with pytest.raises(QuantkitError, match="reads a .jsonl file of conversations"):
        check_source(f"chat:{tmp_path / 'missing.jsonl'}", None)


def test_self_calibration_is_the_models_answers_to_templated_prompts() -> None:
    """Each window opens with a prompt of SELF_PROMPTS as the chat template renders it (prompts in turn, the
    first ones once more when the count does not divide), and every later token is among the model's own top-k
    after what precedes it; the same seed gives the same windows."""
    from quantkit.calib.synthetic import SELF_PROMPTS, TOP_K, self_windows

    tokenizer = copy.deepcopy(tiny_tokenizer())
    tokenizer.chat_template = CHAT_TEMPLATE
    model = tiny_model()
    windows = self_windows(model, tokenizer, 18, 96, seed=3)
    assert windows.shape == (18, 96)
    order = [p for p in SELF_PROMPTS for _ in range(2 if p in SELF_PROMPTS[:2] else 1)]
    with torch.no_grad():
        top = model(windows).logits[:, :-1].topk(TOP_K, dim=-1).indices
    for row, prompt in enumerate(order):
        text = CHAT_TEMPLATE.replace("{% for m in messages %}", "").split("{% endfor %}")[0]
        rendered = text.replace("{{ m['role'] }}", "user").replace("{{ m['content'] }}", prompt) + "<|assistant|>"
        prefix = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        assert windows[row, : len(prefix)].tolist() == prefix
        generated = windows[row, len(prefix):]
        assert (top[row, len(prefix) - 1:] == generated[:, None]).any(-1).all()
    assert torch.equal(windows, self_windows(model, tokenizer, 18, 96, seed=3))
    with pytest.raises(QuantkitError, match="has none"):
        self_windows(model, tiny_tokenizer(), 2, 48, seed=0)
