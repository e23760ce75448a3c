"""The function-preserving rewrite every transform produces, applied functionally or fused into the model.

The model must first be prepared (:mod:`quantkit.transforms.prepare`: untied embeddings, norm scales folded
into the linears that read them). A :class:`Rewrite` then says, in the prepared model's terms:

- ``residual``: an orthogonal ``R`` on the residual stream. Embeddings, the writers (attention output, down)
  and the readers (q/k/v, gate/up, lm_head) absorb it; weightless RMSNorm commutes with it.
- per block, on each linear's input ``x`` a map ``T`` with ``x̃ = x T`` and weight ``W T⁻ᵀ``:
  ``attention`` (q/k/v) and ``mlp`` (gate/up): ``T = R · diag(scale) · online``, where the scale becomes the
  norm's weight and ``online`` is a :class:`~quantkit.formats.kron.Kron` applied at run time;
  attention output: ``T = blockdiag(head_rotation) · diag(value_scale) · online``, produced by rotating and
  scaling the value projection's output per head; down: ``T = diag(up_scale) · online``, the scale produced by
  the up projection's rows.

:func:`block_parameters` computes a block's new parameters from its prepared ones; training runs the block
with them through ``torch.func.functional_call`` and :func:`fuse` writes them (in float64, then the model's
dtype), so what is trained is exactly what is served.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from quantkit.formats.kron import TRANSFORM_BUFFERS, Kron, kron_apply
from quantkit.models.adapters import ModelAdapter
from quantkit.schemes import QuantScheme


@dataclass
class BlockRewrite:
    """One decoder block's transforms; ``None`` leaves that part as it is."""

    attention_scale: torch.Tensor | None = None  # [hidden], becomes the attention norm's weight
    attention_online: Kron | None = None
    head_rotation: torch.Tensor | None = None  # [head_dim, head_dim] orthogonal, fused into v rows and o columns
    value_scale: torch.Tensor | None = None  # [kv_heads·head_dim]: v rows × s, o columns ÷ s
    output_online: Kron | None = None  # attention output projection's input
    mlp_scale: torch.Tensor | None = None  # [hidden], becomes the MLP norm's weight
    mlp_online: Kron | None = None
    up_scale: torch.Tensor | None = None  # [intermediate]: up rows × s, down columns ÷ s
    down_online: Kron | None = None

    def online(self, adapter: ModelAdapter) -> dict[str, Kron]:
        """Run-time input maps by linear name (relative to the block)."""
        pairs = [(name, self.attention_online) for name in adapter.sites.attention_inputs]
        pairs += [(adapter.sites.attention_output, self.output_online)]
        pairs += [(name, self.mlp_online) for name in adapter.sites.mlp_inputs]
        pairs += [(adapter.sites.down, self.down_online)]
        return {name: kron for name, kron in pairs if kron is not None}


@dataclass
class Rewrite:
    residual: torch.Tensor | None = None
    blocks: list[BlockRewrite] = field(default_factory=list)


@dataclass(frozen=True)
class Heads:
    heads: int
    kv_heads: int
    head_dim: int


def _reader(weight: torch.Tensor, residual: torch.Tensor | None, scale: torch.Tensor | None,
            online: Kron | None) -> torch.Tensor:
    """``W T⁻ᵀ`` for ``T = R · diag(scale) · online`` (each part optional)."""
    if residual is not None:
        weight = weight @ residual
    if scale is not None:
        weight = weight / scale
    return online.fuse(weight) if online is not None else weight


def _per_head(x: torch.Tensor, heads: int, rotation: torch.Tensor) -> torch.Tensor:
    """``x [..., heads·d]`` with each head's slice multiplied by ``rotation [d, d]`` on the right."""
    return (x.reshape(*x.shape[:-1], heads, -1) @ rotation).reshape(x.shape)


def block_parameters(params: dict[str, torch.Tensor], rewrite: BlockRewrite, residual: torch.Tensor | None,
                     adapter: ModelAdapter, heads: Heads) -> dict[str, torch.Tensor]:
    """The block's rewritten weights, biases and norm weights, from its prepared ``params`` (by parameter name)."""
    out: dict[str, torch.Tensor] = {}
    for name in adapter.sites.attention_inputs:
        out[f"{name}.weight"] = _reader(params[f"{name}.weight"], residual, rewrite.attention_scale, rewrite.attention_online)
    for name in adapter.sites.mlp_inputs:
        out[f"{name}.weight"] = _reader(params[f"{name}.weight"], residual, rewrite.mlp_scale, rewrite.mlp_online)
    if rewrite.attention_scale is not None:
        out[f"{adapter.sites.attention_norm}.weight"] = rewrite.attention_scale
    if rewrite.mlp_scale is not None:
        out[f"{adapter.sites.mlp_norm}.weight"] = rewrite.mlp_scale

    v, o = adapter.sites.value, adapter.sites.attention_output
    value_side = [(f"{v}.weight", True), (f"{v}.bias", False)]
    for key, is_weight in value_side:
        if key not in params:
            continue
        t = out.get(key, params[key])
        t = t.T if is_weight else t  # the value's output dimension last
        if rewrite.head_rotation is not None:
            t = _per_head(t, heads.kv_heads, rewrite.head_rotation)
        if rewrite.value_scale is not None:
            t = t * rewrite.value_scale
        out[key] = t.T if is_weight else t
    w_o = params[f"{o}.weight"]
    if rewrite.head_rotation is not None:
        w_o = _per_head(w_o, heads.heads, rewrite.head_rotation)
    if rewrite.value_scale is not None:
        groups = heads.heads // heads.kv_heads
        w_o = w_o / rewrite.value_scale.reshape(heads.kv_heads, -1).repeat_interleave(groups, dim=0).reshape(-1)
    out[f"{o}.weight"] = rewrite.output_online.fuse(w_o) if rewrite.output_online is not None else w_o

    up, down = adapter.sites.up, adapter.sites.down
    if rewrite.up_scale is not None:
        out[f"{up}.weight"] = out[f"{up}.weight"] * rewrite.up_scale[:, None]
        if f"{up}.bias" in params:
            out[f"{up}.bias"] = params[f"{up}.bias"] * rewrite.up_scale
    w_down = params[f"{down}.weight"]
    out[f"{down}.weight"] = _reader(w_down, None, rewrite.up_scale, rewrite.down_online)

    if residual is not None:  # the writers' outputs join the rotated residual stream
        for name in (o, down):
            out[f"{name}.weight"] = residual.T @ out[f"{name}.weight"]
            if f"{name}.bias" in params:
                out[f"{name}.bias"] = params[f"{name}.bias"] @ residual
    return out


def block_params(block: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A block's parameters by name, detached (optionally cast)."""
    return {n: (p.detach() if dtype is None else p.detach().to(dtype)) for n, p in block.named_parameters()}


def group_bounds(bound: torch.Tensor, scheme: QuantScheme, in_features: int) -> torch.Tensor:
    """A ``[rows, groups]`` bound per group of columns of ``scheme`` spread over the ``in_features`` columns."""
    size = scheme.for_columns(in_features).group_columns(in_features)
    return bound.repeat_interleave(size, dim=1)[:, :in_features]


def clamp_ranges(model: nn.Module, ranges: dict[str, torch.Tensor], scheme: QuantScheme) -> None:
    """Clamp each named linear's weight into ``[-bound, bound]``, one bound per output row and group of columns
    of ``scheme`` (``ranges[name]``: ``[rows, groups]``)."""
    with torch.no_grad():
        for name, bound in ranges.items():
            weight = model.get_submodule(name).weight
            limit = group_bounds(bound, scheme, weight.shape[1]).to(weight.dtype)
            weight.copy_(torch.maximum(torch.minimum(weight, limit), -limit))


def fuse(model: nn.Module, adapter: ModelAdapter, rewrite: Rewrite) -> dict[str, Kron]:
    """Write ``rewrite`` into the prepared ``model``'s weights (computed in float64); the online maps by full
    linear name, in the model's dtype or float32, whichever is wider."""
    heads = Heads(*adapter.heads(model))
    r = None if rewrite.residual is None else rewrite.residual.detach().double()
    online_dtype = torch.promote_types(model.get_submodule(adapter.lm_head).weight.dtype, torch.float32)
    online: dict[str, Kron] = {}
    with torch.no_grad():
        if r is not None:
            for weight in (model.get_submodule(adapter.embeddings).weight, model.get_submodule(adapter.lm_head).weight):
                weight.copy_(weight.double() @ r)
        for i, (block, rw) in enumerate(zip(adapter.get_blocks(model), rewrite.blocks, strict=True)):
            rw64 = detach_rewrite(rw, torch.float64)
            new = block_parameters(block_params(block, torch.float64), rw64, r, adapter, heads)
            for name, tensor in new.items():
                block.get_parameter(name).copy_(tensor)
            converted: dict[int, Kron] = {}  # one object per map, shared by the linears reading the same input
            for name, kron in rw64.online(adapter).items():
                if id(kron) not in converted:
                    converted[id(kron)] = kron.to(online_dtype)
                online[f"{adapter.blocks}.{i}.{name}"] = converted[id(kron)]
    return online


def detach_rewrite(rewrite: BlockRewrite, dtype: torch.dtype | None = None) -> BlockRewrite:
    """A copy of ``rewrite`` cut from autograd (cast to ``dtype`` if given)."""

    def cast(value: Kron | torch.Tensor | None) -> Kron | torch.Tensor | None:
        if isinstance(value, Kron):
            return Kron(*(cast(t) for t in (value.left, value.right, value.left_it, value.right_it)))
        return None if value is None else value.detach().to(dtype or value.dtype, copy=True)

    return BlockRewrite(**{name: cast(getattr(rewrite, name)) for name in BlockRewrite.__dataclass_fields__})


class _SharedInput:
    """The online map of linears that read one tensor, computed once per input tensor, so they all see one
    transformed tensor (as the engine's statistics expect). Results are kept while their input lives."""

    def __init__(self) -> None:
        self.outputs: dict[int, torch.Tensor] = {}

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        key = id(x)
        out = self.outputs.get(key)
        if out is None:
            left, right = module.input_transform_left, module.input_transform_right
            dtype = torch.promote_types(x.dtype, left.dtype)
            out = self.outputs[key] = kron_apply(x.to(dtype), left.to(dtype), right.to(dtype)).to(x.dtype)
            weakref.finalize(x, self.outputs.pop, key, None)  # runs before the id can be reused
        return (out, *args[1:])


def attach_online(model: nn.Module, online: dict[str, Kron]) -> list[RemovableHandle]:
    """Apply each layer's online map to its input from now on (in float32 or wider), as QuantLinear does after
    loading.

    The forward factors become each layer's ``input_transform_left/right`` buffers, which is how checkpoints
    store them; layers given the same :class:`Kron` object share one computation per input.
    """
    handles, shared = [], {}
    for name, kron in online.items():
        module = model.get_submodule(name)
        module.register_buffer(TRANSFORM_BUFFERS[0], kron.left.clone())
        module.register_buffer(TRANSFORM_BUFFERS[1], kron.right.clone())
        hook = shared.setdefault(id(kron), _SharedInput())
        handles.append(module.register_forward_pre_hook(hook))
    return handles
