"""LoRA adapters on quantized layers through peft (QLoRA-style fine-tuning of a :func:`quantkit.load` model).

peft wraps only the layer types it knows, and its hook for others is a field of each ``LoraConfig`` (so nothing
can be registered once, on import): :func:`register` makes a config wrap every
:class:`~quantkit.runtime.quant_linear.QuantLinear` it targets in a :class:`QuantLoraLinear`::

    from peft import LoraConfig, get_peft_model
    from quantkit.integrations.peft import load_adapter, register

    model = get_peft_model(quantkit.load(path), register(LoraConfig(r=8, target_modules=["q_proj", "v_proj"])))
    ...  # train, then model.save_pretrained(adapter_dir)
    model = load_adapter(quantkit.load(path), adapter_dir)

The packed weight stays frozen and the adapters stay unmerged: ``y = QuantLinear(x) + B(A(x)) * scaling``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora.layer import Linear

from quantkit.errors import QuantkitError
from quantkit.runtime.quant_linear import QuantLinear

# initializations that read the base layer's dense weight
_WEIGHT_INITS = ("pissa", "olora", "corda", "loftq", "eva")


class QuantLoraLinear(Linear):
    """peft's LoRA linear around a QuantLinear: unmerged only, and without variants that need a dense weight."""

    def __init__(self, base_layer: QuantLinear, adapter_name: str, config: LoraConfig, **kwargs: Any) -> None:
        init = config.init_lora_weights
        if config.use_dora or (isinstance(init, str) and init.startswith(_WEIGHT_INITS)):
            what = "DoRA" if config.use_dora else f"init_lora_weights={init!r}"
            raise QuantkitError(f"LoRA on quantized layers cannot use {what} (it needs a dense base weight); "
                                "use plain LoRA")
        if not hasattr(base_layer, "qweight"):  # peft's _replace_module finds the device by a qweight, a weight or a
            base_layer.qweight = torch.empty(0, device=base_layer.stored_device)  # parameter: FP4 layers have none
        super().__init__(base_layer, adapter_name, config, **kwargs)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise QuantkitError("cannot merge LoRA adapters into a quantized layer; keep them unmerged, or merge them "
                            "into the float model and quantize it again")

    def _get_in_out_features(self, module: QuantLinear) -> tuple[int, int]:
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer: QuantLinear) -> tuple[torch.device, None]:
        """The stored tensors' device; no dtype, so the adapters keep theirs (peft's float32 by default)."""
        return base_layer.stored_device, None


def register(config: LoraConfig) -> LoraConfig:
    """``config``, made to wrap every QuantLinear it targets in a :class:`QuantLoraLinear`."""
    config._register_custom_module({QuantLinear: QuantLoraLinear})
    return config


def load_adapter(model: torch.nn.Module, adapter: str | Path, **kwargs: Any) -> PeftModel:
    """``PeftModel.from_pretrained(model, adapter)`` for a quantized ``model`` (``kwargs`` go to it too)."""
    config = register(LoraConfig.from_pretrained(str(adapter)))
    return PeftModel.from_pretrained(model, str(adapter), config=config, **kwargs)
