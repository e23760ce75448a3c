"""Shared fixtures: a tiny random Llama saved as a Hugging Face directory, and calibration text."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers_tokenizer import tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Loaded checkpoints are compared with float references at float32 tolerances, so CPU prefill stays in float32
# here; tests/test_cpu_kernels.py checks the bfloat16 prefill this CPU may default to.
os.environ.setdefault("QUANTKIT_CPU_PREFILL", "fp32")

CALIBRATION_TEXT = " ".join(
    f"Sentence {i} says that the {w} model maps {i % 7} weights to a few bits and keeps its accuracy."
    for i, w in enumerate(["quick", "lazy", "small", "large", "careful", "fast"] * 20)
)


def tiny_llama_config(model_type: str = "llama", vocab_size: int = 320):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )


def tiny_model(model_type: str = "llama", seed: int = 0, vocab_size: int = 320):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(model_type, vocab_size)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-block Llama with a real byte-level tokenizer, saved like a hub checkpoint."""
    return saved_with_tokenizer(tiny_model(), tmp_path_factory.mktemp("tiny-llama"))


def saved_with_tokenizer(model, folder: Path) -> Path:
    """``model`` saved in ``folder`` like a hub checkpoint, with the tiny byte-level tokenizer."""
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(CALIBRATION_TEXT)
    return path
