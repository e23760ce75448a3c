"""QuantLinear: a linear layer holding its weight in packed quantized form."""

from __future__ import annotations

import torch
from torch import nn

from quantkit.actquant import INPUT_SCALE, StaticActivations, fake_quantize, fake_quantize_static
from quantkit.formats.base import QuantizedTensor, tensor_class
from quantkit.formats.kron import TRANSFORM_BUFFERS, kron_apply
from quantkit.runtime.kernels import Kernel, build_kernel, check_backend
from quantkit.schemes import QuantScheme


class _FrozenWeightMatmul(torch.autograd.Function):
    """``kernel(x)`` = ``x @ W.T`` for kernels autograd cannot trace (``out=`` GEMMs, C kernels, Triton); the
    weight is frozen, and the input's gradient is ``grad @ W`` with ``W`` decoded in the gradient's dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel: Kernel, layer: QuantLinear) -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        return kernel(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        weight = ctx.layer.quantized().dequantize(grad.dtype).to(grad.device)
        return grad @ weight, None, None


class QuantLinear(nn.Module):
    """Stores the packed tensors of one format as buffers; forward runs a kernel chosen per device and dtype.

    ``backend`` names the kernel (see :mod:`quantkit.runtime.kernels`); the kernel is built for each device
    and activation dtype (by :meth:`prepare` at load, else on the first call, from the stored tensors) and
    reused. ``dequant`` (decode, then ``F.linear``) is the reference every faster kernel is tested against.

    Before the kernel, the input may go through a transform's online map ``x (L ⊗ R)`` (``input_transform``
    gives the factor sizes; the factors are float32 buffers, applied in float32) and then fake quantization
    with ``input_scheme``: per token with a clipping ratio ``input_clip``
    (:func:`quantkit.actquant.fake_quantize`), or with ``input_static`` by the float32 ``input_scale`` buffer
    (:func:`quantkit.actquant.fake_quantize_static`).

    The weight is frozen; with autograd on, any kernel gives the input the gradient of the dequantized weight,
    and the fake quantization is straight-through (its gradient is the identity).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, meta: dict, dtype: torch.dtype,
                 backend: str = "auto", input_scheme: QuantScheme | None = None,
                 input_transform: tuple[int, int] | None = None, input_clip: float = 1.0,
                 input_static: StaticActivations | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.meta = in_features, out_features, meta
        self.input_scheme, self.input_transform, self.input_clip = input_scheme, input_transform, input_clip
        self.input_static = input_static
        self.backend = check_backend(backend)
        self._kernels: dict[tuple[torch.device, torch.dtype], tuple[str, Kernel]] = {}
        self.tensor_class = tensor_class(meta["kind"])
        self.tensor_names = []
        for name, (shape, tensor_dtype) in self.tensor_class.expected_tensors(meta, self.shape).items():
            self.register_buffer(name, torch.empty(shape, dtype=tensor_dtype, device="meta"))
            self.tensor_names.append(name)
        self.kept_dtypes = list(self.tensor_names)
        if input_transform is not None:
            for name, size in zip(TRANSFORM_BUFFERS, input_transform):
                self.register_buffer(name, torch.empty((size, size), dtype=torch.float32, device="meta"))
            self.kept_dtypes += TRANSFORM_BUFFERS
        if input_static is not None:
            self.register_buffer(INPUT_SCALE, torch.empty(input_static.scale_shape(in_features), dtype=torch.float32,
                                                          device="meta"))
            self.kept_dtypes.append(INPUT_SCALE)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device="meta"), requires_grad=False) if bias else None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def stored_device(self) -> torch.device:
        """The device of the stored tensors."""
        return getattr(self, self.tensor_names[0]).device

    def quantized(self) -> QuantizedTensor:
        """The stored weight as its format's object."""
        return self.tensor_class.from_tensors({n: getattr(self, n) for n in self.tensor_names}, self.meta, self.shape)

    def prepare(self, quantized: QuantizedTensor, dtype: torch.dtype) -> None:
        """Build the kernel for inputs of ``dtype`` on the stored tensors' device from ``quantized``, the weight
        the loader has just decoded from them, so that loading decodes each layer once; the GPU backend
        (``triton``) waits for the device it is moved to."""
        if self.backend != "triton":
            device = self.stored_device
            stored = {n: getattr(self, n) for n in self.tensor_names}
            self._kernels[(device, dtype)] = build_kernel(self.quantized, stored, device, dtype, self.backend, quantized)

    def set_backend(self, backend: str) -> None:
        """Serve with ``backend`` from the next call on."""
        self.backend = check_backend(backend)
        self._kernels.clear()

    def kernel_name(self, device: torch.device, dtype: torch.dtype) -> str:
        """The backend that serves (or will serve) inputs of this device and dtype."""
        return self._kernel(device, dtype)[0]

    def kernel(self, device: torch.device, dtype: torch.dtype) -> Kernel:
        """The kernel that serves (or will serve) inputs of this device and dtype."""
        return self._kernel(device, dtype)[1]

    @property
    def plain_input(self) -> bool:
        """Whether the kernel sees the input unchanged (no online transform, no activation quantization)."""
        return self.input_transform is None and self.input_scheme is None and self.input_static is None

    def _kernel(self, device: torch.device, dtype: torch.dtype) -> tuple[str, Kernel]:
        key = (device, dtype)
        if key not in self._kernels:
            stored = {n: getattr(self, n) for n in self.tensor_names}
            self._kernels[key] = build_kernel(self.quantized, stored, device, dtype, self.backend)
        return self._kernels[key]

    def _apply(self, fn, recurse=True):
        """Move or cast like any module, except that the stored tensors keep their dtypes (float8 scales or
        a float32 tensor scale cast to half precision would change the weight)."""
        self._kernels.clear()  # moved or cast: kernels built from the old tensors are stale
        stored = {n: getattr(self, n) for n in self.kept_dtypes}
        module = super()._apply(fn, recurse)
        for name, before in stored.items():
            after = getattr(self, name)
            if after.dtype != before.dtype:
                setattr(self, name, before.to(after.device))
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is not None:
            x = kron_apply(x.float(), self.input_transform_left, self.input_transform_right).to(x.dtype)
        if self.input_static is not None:
            x = fake_quantize_static(x, self.input_scheme, self.input_scale)
        elif self.input_scheme is not None:
            x = fake_quantize(x, self.input_scheme, self.input_clip)
        kernel = self._kernel(x.device, x.dtype)[1]
        y = _FrozenWeightMatmul.apply(x, kernel, self) if torch.is_grad_enabled() and x.requires_grad else kernel(x)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        scheme, static = self.input_scheme, self.input_static
        acts = "" if scheme is None else f", input={scheme.format}{'' if scheme.is_fp8 else scheme.bits}"
        acts += "" if static is None else f" static per {static.granularity}"
        if self.input_transform is not None:
            acts += f", input_transform={self.input_transform[0]}x{self.input_transform[1]}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, kind={self.meta['kind']}, "
                f"backend={self.backend}{acts}")


def set_backend(model: nn.Module, backend: str) -> int:
    """Serve every QuantLinear of ``model`` with ``backend``; returns how many layers that is."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for layer in layers:
        layer.set_backend(backend)
    return len(layers)
