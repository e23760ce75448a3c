"""Training through quantized layers: every kernel gives the input the gradient of the dequantized weight, fake
activation quantization is straight-through, and peft's LoRA adapters train, save and reload on a loaded
checkpoint while its packed weights stay untouched.

``TRITON_INTERPRET`` is set before anything here imports triton; the Triton cases are skipped when the
kernels were imported without it.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

from functools import cache  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("peft")

from peft import LoraConfig, get_peft_model  # noqa: E402

import quantkit  # noqa: E402
from quantkit.actquant import activation_scheme  # noqa: E402
from quantkit.api import CalibrationSpec, quantize  # noqa: E402
from quantkit.errors import QuantkitError  # noqa: E402
from quantkit.formats.base import QuantizedTensor  # noqa: E402
from quantkit.formats.kron import kron_apply  # noqa: E402
from quantkit.integrations.peft import load_adapter, register  # noqa: E402
from quantkit.quantizers import LayerStats, make_quantizer  # noqa: E402
from quantkit.runtime.quant_linear import QuantLinear  # noqa: E402
from quantkit.schemes import QuantScheme  # noqa: E402

OUT_FEATURES, IN_FEATURES = 48, 64


@cache
def quantized_weight(kind: str) -> QuantizedTensor:
    """A 48x64 weight of ``kind``; the GPTQ and SpQR ones with act-order (a permuted ``g_idx``, permuted rows)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(OUT_FEATURES, IN_FEATURES, generator=gen) * 0.05
    w[3, 7] = 1.0  # an SpQR outlier
    x = torch.randn(256, IN_FEATURES, generator=gen) * torch.linspace(0.2, 3.0, IN_FEATURES)
    stats = LayerStats(hessian=2 * x.double().T @ x.double() / 256, tokens=256)
    method, scheme = {
        "int4-act-order": ("gptq", QuantScheme(4, 32, False)),
        "int8-channel": ("rtn", QuantScheme(8, -1, False)),
        "int3": ("rtn", QuantScheme(3, 32, True)),
        "fp4": ("rtn", QuantScheme(4, 32, True, format="fp4")),
        "mxfp4": ("rtn", QuantScheme(4, 32, True, format="mxfp4")),
        "nvfp4": ("rtn", QuantScheme(4, 16, True, format="nvfp4")),
        "spqr": ("spqr", QuantScheme(3, 16, False)),
    }[kind]
    options = {"act_order": True, **({"g_idx": True} if method == "gptq" else {})} if method != "rtn" else {}
    qt = make_quantizer(method, **options).quantize(w, stats, scheme)
    assert kind != "int4-act-order" or qt.g_idx is not None
    assert kind != "spqr" or (qt.outliers.count and qt.perm is not None)
    return qt


def quant_linear(qt: QuantizedTensor, backend: str, **options) -> QuantLinear:
    layer = QuantLinear(IN_FEATURES, OUT_FEATURES, False, qt.meta(), torch.float32, backend=backend, **options)
    for name, tensor in qt.to_tensors().items():
        setattr(layer, name, tensor)
    return layer


def triton_interpreted() -> bool:
    from quantkit_kernels import triton_int

    return triton_int.INTERPRETED


# the kernels that serve each kind on CPU
KERNELS = {
    "int4-act-order": ["dequant", "cpu", "aten", "triton"],
    "int8-channel": ["dequant", "cpu", "aten", "triton"],
    "int3": ["dequant", "cpu", "aten"],
    "fp4": ["dequant", "cpu", "triton"],
    "mxfp4": ["dequant", "cpu", "triton"],
    "nvfp4": ["dequant", "cpu", "triton"],
    "spqr": ["dequant", "cpu", "triton"],
}


@pytest.mark.parametrize("kind,backend", [(k, b) for k, backends in KERNELS.items() for b in backends])
@pytest.mark.parametrize("tokens", [1, 17, 40])  # above 16 tokens the C kernels run GEMMs with out=
def test_input_gradients_match_the_dequantized_weight(kind: str, backend: str, tokens: int) -> None:
    if backend == "triton" and not triton_interpreted():
        pytest.skip("the Triton kernels were imported without TRITON_INTERPRET=1")
    qt = quantized_weight(kind)
    layer = quant_linear(qt, backend)
    assert layer.kernel_name(torch.device("cpu"), torch.float32) == backend
    weight = qt.dequantize(torch.float64)
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(2, tokens, IN_FEATURES, generator=gen)
    upstream = torch.randn(2, tokens, OUT_FEATURES, generator=gen)
    with torch.no_grad():
        served = layer(x)
    leaf = x.clone().requires_grad_(True)
    y = layer(leaf)
    assert torch.equal(y, served)  # training runs the kernel that serves
    torch.testing.assert_close(y.double(), F.linear(x.double(), weight), rtol=1e-5, atol=1e-5)
    (y * upstream).sum().backward()
    torch.testing.assert_close(leaf.grad.double(), upstream.double() @ weight, rtol=1e-5, atol=1e-5)
    assert not any(t.requires_grad for t in [*layer.buffers(), *layer.parameters()])


def test_activation_quantization_is_straight_through() -> None:
    """The gradient passes the per-token rounding unchanged and goes back through the online Hadamard-like map."""
    qt = quantized_weight("int4-act-order")
    gen = torch.Generator().manual_seed(5)
    left, right = (torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=torch.float64))[0] for _ in range(2))
    layer = quant_linear(qt, "cpu", input_scheme=activation_scheme(4, "int"), input_transform=(8, 8))
    layer.input_transform_left, layer.input_transform_right = left.float(), right.float()
    x = torch.randn(3, 20, IN_FEATURES, generator=gen, requires_grad=True)
    upstream = torch.randn(3, 20, OUT_FEATURES, generator=gen)
    (layer(x) * upstream).sum().backward()
    reference = x.detach().double().requires_grad_(True)
    (F.linear(kron_apply(reference, left, right), qt.dequantize(torch.float64)) * upstream.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), reference.grad, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- LoRA through peft

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dir: Path, calib_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny quantized checkpoints: GPTQ 4-bit with act-order, and NVFP4."""
    root = tmp_path_factory.mktemp("lora")
    runs = {
        "int": {"method": "gptq", "scheme": QuantScheme(4, 16, False), "g_idx": True,
                "calibration": CalibrationSpec(str(calib_file), nsamples=2, seqlen=16)},
        "nvfp4": {"method": "rtn", "scheme": QuantScheme(4, 16, format="nvfp4")},
    }
    for name, arguments in runs.items():
        quantize(str(tiny_model_dir), output=root / name, **arguments)
    return {name: root / name for name in runs}


def lora_model(path: Path) -> torch.nn.Module:
    torch.manual_seed(0)  # peft's initialization of the A matrices
    return get_peft_model(quantkit.load(path), register(LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)))


@pytest.mark.parametrize("kind", ["int", "nvfp4"])
def test_lora_trains_saves_and_reloads_on_a_quantized_checkpoint(checkpoints: dict[str, Path], kind: str,
                                                                  tmp_path: Path) -> None:
    model = lora_model(checkpoints[kind])
    wrapped = [name for name, module in model.named_modules() if isinstance(module, QuantLinear)
               and name.endswith(tuple(f"{t}.base_layer" for t in TARGETS))]
    assert len(wrapped) == 2 * len(TARGETS)  # 2 blocks
    frozen = {name: tensor.clone() for name, tensor in model.base_model.model.state_dict().items() if "lora_" not in name}
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 320, (4, 24), generator=gen) for _ in range(2)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    losses = []
    for step in range(30):
        loss = model(input_ids=batches[step % 2], labels=batches[step % 2]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(later < earlier for earlier, later in zip(losses, losses[2:])), losses  # each batch, every time
    assert losses[-1] < losses[1] - 0.4, losses

    after = model.base_model.model.state_dict()
    for name, tensor in frozen.items():
        assert torch.equal(after[name], tensor), name  # packed weights, norms, embeddings: bit-identical

    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batches[0]).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = load_adapter(quantkit.load(checkpoints[kind]), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=batches[0]).logits, logits, rtol=0, atol=0)


def test_lora_refuses_to_merge_into_quantized_weights_and_dora(checkpoints: dict[str, Path]) -> None:
    model = lora_model(checkpoints["int"])
    with pytest.raises(QuantkitError, match="cannot merge LoRA adapters into a quantized layer"):
        model.merge_and_unload()
    config = register(LoraConfig(r=8, target_modules=TARGETS, use_dora=True))
    with pytest.raises(QuantkitError, match="cannot use DoRA"):
        get_peft_model(quantkit.load(checkpoints["int"]), config)
