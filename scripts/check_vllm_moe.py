"""Does vLLM's CPU build serve quantkit's MoE checkpoints? A tiny random Qwen3-MoE, quantized by quantkit (GPTQ
W4 g64) into the GPTQ and compressed-tensors layouts, scored by vLLM (in its own venv, see runtime_envs.py) and
by quantkit.load on the same token windows: each runtime's mean NLL, or the one line vLLM refused it with.

vLLM 0.32's int4 expert kernels need AMX or AMD's zentorch (with VLLM_CPU_INT4_W4A8=1); ``--zentorch DIR`` puts
a folder holding it (``pip install --no-deps --target DIR zentorch==2.13.0.2 && pip install --target DIR
deprecated``) on the runner's path.

    python scripts/check_vllm_moe.py [--zentorch /tmp/zentorch_pkgs] [--out results/check_vllm_moe]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runtime_envs import RunnerError, ensure, run_runner  # noqa: E402

from quantkit.api import CalibrationSpec, quantize  # noqa: E402
from quantkit.models.synthetic import byte_tokenizer  # noqa: E402
from quantkit.schemes import QuantScheme  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
console = Console(width=140)


def cpu() -> str:
    info = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    return f"{model} ({' '.join(f for f in FLAGS if f in flags) or 'none of ' + ', '.join(FLAGS)})"


def tiny_moe(folder: Path) -> Path:
    """A random 2-block Qwen3-MoE (4 experts of 64, top-2, hidden 128) with a byte-level tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = byte_tokenizer()
    config = AutoConfig.for_model("qwen3_moe", vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                                  moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                  max_position_embeddings=512, eos_token_id=len(tokenizer) - 1)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zentorch", type=Path, help="a folder holding zentorch (and deprecated) for vLLM's runner")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "check_vllm_moe")
    args = parser.parse_args()
    console.print(f"CPU: {cpu()}")
    args.out.mkdir(parents=True, exist_ok=True)
    source = tiny_moe(args.out / "float")
    calib = args.out / "calib.txt"
    calib.write_text(" ".join(f"Expert {i} gets the tokens its router picks, {i % 5} times out of ten." for i in range(200)))
    windows = torch.randint(0, 300, (4, 64), generator=torch.Generator().manual_seed(1)).tolist()
    request = {"windows": windows, "prompt": windows[0][:8], "new_tokens": 4, "threads": 2,
               "options": {"enforce_eager": True, "max_num_seqs": 2}}
    vllm = ensure("vllm", log=console.print)
    env = {"VLLM_CPU_INT4_W4A8": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    if args.zentorch:
        env["PYTHONPATH"] = str(args.zentorch)
    results = {"cpu": cpu(), "zentorch": str(args.zentorch) if args.zentorch else None, "layouts": {}}
    table = Table(title=f"quantkit MoE checkpoints in vLLM CPU{' with zentorch' if args.zentorch else ''}")
    for column in ("layout", "quantkit.load NLL", "vLLM NLL", "|difference| per window", "vLLM"):
        table.add_column(column)
    for layout in ("gptq", "compressed-tensors"):
        folder = args.out / layout
        quantize(str(source), method="gptq", scheme=QuantScheme(4, 64, True), layout=layout, output=folder,
                 overwrite=True, calibration=CalibrationSpec(str(calib), 16, 64))
        mine = run_runner({**request, "runtime": "quantkit", "model": str(folder)})
        try:
            served = run_runner({**request, "runtime": "vllm", "model": str(folder)}, vllm, log=folder / "vllm.log",
                                env=env)
            gap = sum(abs(a - b) for a, b in zip(served["window_nlls"], mine["window_nlls"])) / len(windows)
            row = {"quantkit_nll": mine["nll"], "vllm_nll": served["nll"], "gap": gap, "vllm": "served"}
        except RunnerError as error:
            row = {"quantkit_nll": mine["nll"], "vllm_nll": None, "gap": None, "vllm": f"refused: {str(error).lstrip(': ')}"}
        results["layouts"][layout] = row
        table.add_row(layout, f"{row['quantkit_nll']:.4f}",
                      "-" if row["vllm_nll"] is None else f"{row['vllm_nll']:.4f}",
                      "-" if row["gap"] is None else f"{row['gap']:.4f}", row["vllm"][:90])
    console.print(table)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    console.print(f"saved {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
