"""A lean greedy decoder for Llama-family models (Llama, Mistral, Qwen2, Qwen3): the same arithmetic as
transformers' forward, with a fraction of its fixed cost per token.

Decode of a small quantized model spends most of a token outside its linears, in transformers' Python forward
(masks, cache objects, hooks, one module call per projection). :class:`LeanDecoder` runs the decoder layers
itself: a static KV cache written in place, rotary tables computed once, and the projections that share an
input (q/k/v, gate/up) fused into one call where their kernels allow it (:mod:`quantkit.runtime.fused`). For
a float32 model on a CPU with the C kernels, each decode token's norms and attention (q/k norms, rotation,
cache write, softmax over the cache) are single C calls (``csrc/cpu_decode.c``); otherwise, and for the
prompt, torch's ``F.rms_norm`` and SDPA. It reads the model's own modules and weights, so a quantized model
from :func:`quantkit.load` and a float one decode alike, and transformers' ``generate`` still works on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.runtime.fused import Projections

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class _Layer:
    """One decoder layer as the lean forward reads it."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: Projections
    o_proj: Projections
    gate_up: Projections
    down_proj: Projections
    act: Callable[[torch.Tensor], torch.Tensor]
    scaling: float
    q_norm: torch.Tensor | None  # Qwen3's per-head RMSNorm weights
    k_norm: torch.Tensor | None


def _step_library(dtype: torch.dtype, device: torch.device):
    """The C kernel library for the decode steps (float32 on CPU), or None."""
    if dtype != torch.float32 or device.type != "cpu":
        return None
    from quantkit.runtime.kernels import cpu_build

    build = cpu_build()
    return None if build is None else build.library


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _check(status: int) -> None:
    if status:
        raise RuntimeError(f"quantkit decode step failed with status {status}")


def _check_supported(model: nn.Module, max_length: int) -> None:
    config = model.config
    if config.model_type not in FAMILIES:
        raise QuantkitError(f"the lean decoder serves {', '.join(FAMILIES)} models, not {config.model_type!r}")
    if getattr(config, "pretraining_tp", 1) != 1:
        raise QuantkitError("the lean decoder does not serve models with pretraining_tp > 1")
    window = getattr(config, "sliding_window", None)
    sliding = config.model_type == "mistral" or "sliding_attention" in (getattr(config, "layer_types", None) or ())
    if sliding and window is not None and max_length > window:
        raise QuantkitError(f"max_length {max_length} exceeds the sliding window {window}; the lean decoder has none")


class LeanDecoder:
    """Greedy generation for one sequence with a static cache of ``max_length`` positions (prompt included)."""

    def __init__(self, model: nn.Module, max_length: int, c_steps: bool = True) -> None:
        """``c_steps``: run each decode token's norms and attention in C where the model allows (float32, CPU,
        the C kernels built); False keeps torch's ops throughout."""
        _check_supported(model, max_length)
        config, body = model.config, model.model
        self.max_length = max_length
        self.embed, self.norm = body.embed_tokens, body.norm
        self.lm_head = Projections([model.lm_head], self.embed.weight.dtype)
        self.eps = config.rms_norm_eps
        first = body.layers[0].self_attn
        self.head_dim = first.head_dim
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        dtype = self.embed.weight.dtype
        self.layers = [self._layer(layer, dtype) for layer in body.layers]
        positions = torch.arange(max_length)[None]
        cos, sin = body.rotary_emb(torch.zeros(1, dtype=dtype), positions)
        half = self.head_dim // 2
        self.cos_table, self.sin_table = cos[0].contiguous(), sin[0].contiguous()  # [positions, head_dim]
        # rotate_half(x) * sin == roll(x, half) * signed_sin
        self.signed_sin = torch.cat((-self.sin_table[:, :half], self.sin_table[:, half:]), dim=-1)
        shape = (len(self.layers), 1, self.kv_heads, max_length, self.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype)
        self.values = torch.zeros(shape, dtype=dtype)
        self.library = _step_library(dtype, self.embed.weight.device) if c_steps else None

    def _layer(self, layer: nn.Module, dtype: torch.dtype) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        return _Layer(
            layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
            Projections([attn.q_proj, attn.k_proj, attn.v_proj], dtype), Projections([attn.o_proj], dtype),
            Projections([mlp.gate_proj, mlp.up_proj], dtype), Projections([mlp.down_proj], dtype), mlp.act_fn,
            attn.scaling,
            None if q_norm is None else q_norm.weight, None if k_norm is None else k_norm.weight,
        )

    @property
    def projections(self) -> list[Projections]:
        """Every linear call of a token, in order."""
        return [p for layer in self.layers for p in (layer.qkv, layer.o_proj, layer.gate_up, layer.down_proj)] + [
            self.lm_head]

    def _rope(self, x: torch.Tensor, begin: int, end: int) -> torch.Tensor:
        """Rotary embedding of ``x [tokens, heads, head_dim]`` at positions ``begin:end``."""
        return torch.addcmul(x * self.cos_table[begin:end, None], x.roll(self.head_dim // 2, -1),
                             self.signed_sin[begin:end, None])

    def _attention(self, index: int, layer: _Layer, h: torch.Tensor, begin: int) -> torch.Tensor:
        tokens, end = h.shape[0], begin + h.shape[0]
        q, k, v = layer.qkv(h)
        q, k, v = (t.view(tokens, -1, self.head_dim) for t in (q, k, v))
        if layer.q_norm is not None:
            q = F.rms_norm(q, (self.head_dim,), layer.q_norm, self.eps)
            k = F.rms_norm(k, (self.head_dim,), layer.k_norm, self.eps)
        q, k = self._rope(q, begin, end), self._rope(k, begin, end)
        keys, values = self.keys[index], self.values[index]
        keys[0, :, begin:end] = k.transpose(0, 1)
        values[0, :, begin:end] = v.transpose(0, 1)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], keys[:, :, :end], values[:, :, :end], is_causal=tokens > 1,
            scale=layer.scaling, enable_gqa=self.heads != self.kv_heads)
        return layer.o_proj.joint(out[0].transpose(0, 1).reshape(tokens, -1))

    def _attention_c(self, index: int, layer: _Layer, h: torch.Tensor, position: int) -> torch.Tensor:
        """:meth:`_attention` for one token through ``qk_attend_decode``."""
        qkv = layer.qkv.joint(h).contiguous()
        out = torch.empty((1, self.heads * self.head_dim))
        _check(self.library.qk_attend_decode(
            qkv.data_ptr(), self.heads, self.kv_heads, self.head_dim, _pointer(layer.q_norm), _pointer(layer.k_norm),
            self.eps, self.cos_table[position].data_ptr(), self.sin_table[position].data_ptr(),
            self.keys[index].data_ptr(), self.values[index].data_ptr(), self.max_length, position, layer.scaling,
            out.data_ptr()))
        return layer.o_proj.joint(out)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, x.shape[-1:], weight, self.eps)

    def _norm_c(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """:meth:`_norm` through ``qk_rms_norm``."""
        out = torch.empty_like(x)
        _check(self.library.qk_rms_norm(x.data_ptr(), weight.data_ptr(), x.shape[0], x.shape[1], self.eps,
                                        out.data_ptr()))
        return out

    def forward(self, ids: torch.Tensor, begin: int) -> torch.Tensor:
        """Logits of the last of ``ids`` (1-D, at positions ``begin:``), the cache filled up to there. A prompt
        (``tokens > 1``) must start at position 0: its causal mask is SDPA's."""
        tokens = ids.shape[0]
        if begin + tokens > self.max_length:
            raise QuantkitError(f"the sequence exceeds the decoder's max_length {self.max_length}")
        if tokens > 1 and begin:
            raise QuantkitError("a multi-token step must start the sequence")
        c_step = tokens == 1 and self.library is not None
        norm = self._norm_c if c_step else self._norm
        attention = self._attention_c if c_step else self._attention
        x = self.embed(ids)
        for index, layer in enumerate(self.layers):
            x = x + attention(index, layer, norm(x, layer.input_norm), begin)
            gate, up = layer.gate_up(norm(x, layer.post_norm))
            x = x + layer.down_proj.joint(layer.act(gate) * up)
        return self.lm_head.joint(self.norm(x[-1:]))[0]

    @torch.inference_mode()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None,
                 on_token: Callable[[int], None] | None = None) -> list[int]:
        """Greedy continuation of ``prompt`` (1-D token ids): up to ``max_new_tokens`` ids, stopping after
        ``eos_token_id``; ``on_token`` is called with each id as it is chosen."""
        prompt = prompt.reshape(-1)
        if prompt.numel() + max_new_tokens > self.max_length + 1:
            raise QuantkitError(f"prompt ({prompt.numel()}) plus {max_new_tokens} new tokens exceeds max_length "
                                f"{self.max_length}")
        logits = self.forward(prompt, 0)
        position, generated = prompt.numel(), []
        while True:
            token = int(logits.argmax())
            generated.append(token)
            if on_token is not None:
                on_token(token)
            if len(generated) == max_new_tokens or token == eos_token_id:
                return generated
            logits = self.forward(torch.tensor([token]), position)
            position += 1
