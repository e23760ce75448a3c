"""Check ``--devices`` and ``--offload disk`` on a machine with a GPU: GPTQ and SpQR on a synthetic Llama, on the
CPU, on ``cuda:0`` (solves in torch on the GPU; also with bfloat16 forwards) and split over ``cuda:0,cpu``,
resident and streamed.

Reports per run: seconds, how many stored tensors equal the CPU run's, the relative error of the quantized
model's logits against the float model, and whether streamed and resident runs on the same devices wrote the
same bytes. Results go to ``--out`` (JSON) and print as a table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors import safe_open

import quantkit
from quantkit.api import CalibrationSpec, quantize
from quantkit.export.atomic import write_json
from quantkit.models.synthetic import SyntheticShape, write_synthetic_llama
from quantkit.schemes import QuantScheme

GPTQ = {"method": "gptq", "scheme": QuantScheme(4, 64, False)}
SPQR = {"method": "spqr", "scheme": QuantScheme(3, 16, False)}
RUNS = {
    "gptq cpu": GPTQ,
    "gptq cuda:0": GPTQ | {"devices": ["cuda:0"]},
    "gptq cuda:0 bf16 forwards": GPTQ | {"devices": ["cuda:0"], "forward_dtype": "bfloat16"},
    "gptq cuda:0 streamed": GPTQ | {"devices": ["cuda:0"], "offload": "disk"},
    "gptq cuda:0,cpu": GPTQ | {"devices": ["cuda:0", "cpu"]},
    "gptq cuda:0,cpu streamed": GPTQ | {"devices": ["cuda:0", "cpu"], "offload": "disk"},
    "spqr cpu": SPQR,
    "spqr cuda:0": SPQR | {"devices": ["cuda:0"]},
}
SAME_DEVICES = [("gptq cuda:0", "gptq cuda:0 streamed"), ("gptq cuda:0,cpu", "gptq cuda:0,cpu streamed")]


def stored_tensors(folder: Path) -> dict[str, bytes]:
    out = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key).contiguous().view(torch.uint8).numpy().tobytes()
    return out


def logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return quantkit.load(folder, kernel="dequant")(ids).logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("results/check_devices/work"))
    parser.add_argument("--calib", help="calibration text (default: the C4 validation subset beside the checkout)",
                        default=str(Path(__file__).resolve().parents[2] / "shared/data/c4/c4_validation_2k.parquet"))
    parser.add_argument("--out", type=Path, default=Path("results/check_devices/check_devices.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check needs a GPU")
    from transformers import AutoModelForCausalLM

    model = args.work / "model"
    write_synthetic_llama(model, SyntheticShape(8, 512, 1408, 8, 4, 1024))
    calibration = CalibrationSpec(args.calib, 16, 256)
    ids = torch.randint(0, 300, (4, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)(ids).logits
    results: dict[str, dict] = {}
    for name, options in RUNS.items():
        output = args.work / name.replace(" ", "_").replace(",", "+").replace(":", "")
        start = time.perf_counter()
        quantize(str(model), calibration=calibration, output=output, overwrite=True, **options)
        results[name] = {"seconds": round(time.perf_counter() - start, 1), "output": str(output)}
        quantized = logits(output, ids)
        results[name]["logit_error_vs_float"] = float((quantized - reference).norm() / reference.norm())
    for name, record in results.items():
        cpu = stored_tensors(Path(results[f"{name.split()[0]} cpu"]["output"]))
        mine = stored_tensors(Path(record["output"]))
        record["tensors_equal_to_cpu"] = f"{sum(mine.get(k) == v for k, v in cpu.items())}/{len(cpu)}"
    same = {f"{a} == {b}": stored_tensors(Path(results[a]["output"])) == stored_tensors(Path(results[b]["output"]))
            for a, b in SAME_DEVICES}
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "runs": results,
              "streamed_equals_resident": same}
    write_json(args.out, report)
    table = Table(title=f"--devices and --offload disk on {report['device']}")
    for column in ("run", "seconds", "tensors equal to CPU run", "logit error vs float"):
        table.add_column(column)
    for name, record in results.items():
        table.add_row(name, f"{record['seconds']}", record["tensors_equal_to_cpu"],
                      f"{record['logit_error_vs_float']:.4f}")
    console = Console()
    console.print(table)
    for pair, equal in same.items():
        console.print(f"{pair}: {'identical bytes' if equal else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
