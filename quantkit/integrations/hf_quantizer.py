"""The quantization config and HfQuantizer that load a native quantkit checkpoint through ``from_pretrained``.

Before transformers loads the weights, the quantizer opens the checkpoint with the loader's checks
(:func:`~quantkit.runtime.loader.open_checked`) and puts QuantLinear layers in the model. The native layout
stores each layer's tensors under its QuantLinear buffers' names, so transformers loads them as any weight,
on the device its ``device_map`` gives; the layout's empty ``weight`` placeholders are expected and skipped.
After loading, every tensor is checked and each layer decoded and its kernel prepared by the loader's code, so
the model is :func:`quantkit.load`'s: same layers, same kernels, same logits. Imported only with transformers'
quantizer registry (see :mod:`quantkit.integrations.transformers`).
"""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from quantkit.errors import QuantkitError
from quantkit.kvcache import install as install_kv_cache
from quantkit.layouts.native import QUANT_METHOD
from quantkit.models.architectures import adapter_for
from quantkit.models.experts import stored_modules
from quantkit.runtime.kernels import default_backend
from quantkit.runtime.loader import CheckedCheckpoint, open_checked, replace_linear
from quantkit.runtime.quant_linear import QuantLinear


class QuantkitConfig(QuantizationConfigMixin):
    """A native checkpoint's ``quantization_config``, kept as stored (``to_dict`` gives it back)."""

    def __init__(self, **stored: object) -> None:
        self.__dict__.update(stored)
        self.quant_method = QUANT_METHOD


class QuantkitHfQuantizer(HfQuantizer):
    """Loads a native quantkit checkpoint as :func:`quantkit.load` does, served by ``$QUANTKIT_KERNEL`` (default
    ``auto``) in the dtype ``from_pretrained`` builds the model in."""

    requires_calibration = True  # it loads quantized checkpoints; quantizing is quantkit's own

    def __init__(self, quantization_config: QuantizationConfigMixin, **kwargs: object) -> None:
        super().__init__(quantization_config, **kwargs)
        self._folder: Path | None = None
        self._checked: CheckedCheckpoint | None = None
        self._layers: dict[str, tuple[QuantLinear, torch.dtype]] = {}

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: list[str] | None = None,
                                             **kwargs: object) -> nn.Module:
        if not checkpoint_files:
            raise QuantkitError("from_pretrained gave quantkit's quantizer no checkpoint files: it loads a folder "
                                "of safetensors with transformers 5 (else use quantkit.load)")
        self._folder = Path(checkpoint_files[0]).parent
        return model

    def update_weight_conversions(self, weight_conversions: list, model: nn.Module) -> list:
        """Give ``model`` the native names of the stored tensors: open the checkpoint and put QuantLinear layers
        in place. Done here, not in preprocessing, where transformers switches weight tying off, which the
        checkpoint's skeleton needs; here the model is built and no weight is read yet."""
        if self._folder is not None:
            self._install(model, open_checked(self._folder))
            self._folder = None
        # quantkit stores every tensor under the module's name (experts one by one, as the model now holds them):
        # the architecture's own renames and expert stacking do not apply
        return super().update_weight_conversions([], model)

    def _install(self, model: nn.Module, checked: CheckedCheckpoint) -> None:
        if type(model) is not type(checked.model):
            raise QuantkitError(f"a quantkit checkpoint loads as {type(checked.model).__name__} (with "
                                f"AutoModelForCausalLM), not as {type(model).__name__}")
        adapter = adapter_for(model.config.model_type)
        stored_modules(model, adapter)
        if checked.kv_cache is not None:
            install_kv_cache(model, adapter, checked.kv_cache)
        kernel = default_backend()
        self._layers = {layer: replace_linear(model, layer, plan.meta, kernel, checked)
                        for layer, plan in checked.plans.items()}
        placeholders = checked.config.layout.extra_specs(checked.config.quantization, checked.plans)
        model._keys_to_ignore_on_load_unexpected = {*(model._keys_to_ignore_on_load_unexpected or ()),
                                                    *(f"^{re.escape(name)}$" for name in placeholders)}
        self._checked = checked

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: object) -> nn.Module:
        checked, layers = self._checked, self._layers
        self._checked, self._layers = None, {}
        for name in checked.plain:
            checked.check(name, model.get_parameter_or_buffer(name))
        for layer, (quant, dtype) in layers.items():
            decoded, _ = checked.decode(layer, {name: getattr(quant, name) for name in checked.stored_names(layer)})
            quant.prepare(decoded.quantized, dtype)
        return model

    def is_serializable(self, *args: object, **kwargs: object) -> bool:
        """``save_pretrained`` would drop the native layout's placeholders; quantkit writes its checkpoints."""
        return False

    @property
    def is_trainable(self) -> bool:
        """The quantized weights are frozen; inputs get gradients, so adapters train."""
        return True


def register_with(registry: ModuleType) -> None:
    """Register the config and the quantizer in transformers' quantizer ``registry`` (once)."""
    if QUANT_METHOD not in registry.AUTO_QUANTIZER_MAPPING:
        registry.register_quantization_config(QUANT_METHOD)(QuantkitConfig)
        registry.register_quantizer(QUANT_METHOD)(QuantkitHfQuantizer)
