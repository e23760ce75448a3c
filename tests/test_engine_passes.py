"""The engine's per-block hooks against plain forwards of the model written here."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from quantkit.engine.passes import (
    BlockTrace,
    block_outputs,
    input_ranges,
    model_outputs,
    swapped_weights,
    train_steps,
    walk_blocks,
)
from quantkit.models.architectures import adapter_for

ADAPTER = adapter_for("llama")
CALIB = torch.randint(0, 320, (5, 12), generator=torch.Generator().manual_seed(1))


def hidden_states(model, calib: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The residual stream entering each block (and leaving the last, before the final norm) in one forward."""
    with torch.no_grad():
        states = model(input_ids=calib, use_cache=False, output_hidden_states=True).hidden_states
    blocks = ADAPTER.get_blocks(model)
    entering = states[: len(blocks)]
    with torch.no_grad():  # transformers reports the last state after the final norm: run the last block here
        captured = []
        handle = blocks[-1].register_forward_hook(lambda _m, _a, out: captured.append(out[0] if isinstance(out, tuple) else out))
        model(input_ids=calib, use_cache=False)
        handle.remove()
    return (*entering, captured[0])


def test_walk_feeds_each_block_the_previous_ones_outputs() -> None:
    model = tiny_model()
    seen: list[list[torch.Tensor]] = []

    def visit(_i, block, inputs):
        seen.append([h for h, _ in inputs])
        return block_outputs(block, inputs)

    last = walk_blocks(model, ADAPTER, CALIB, 2, visit)
    reference = hidden_states(model, CALIB)
    assert len(seen) == len(ADAPTER.get_blocks(model))
    for i, batches in enumerate([*seen, last]):
        assert [b.shape[0] for b in batches] == [2, 2, 1]
        torch.testing.assert_close(torch.cat(batches), reference[i], rtol=1e-5, atol=1e-5)


def test_trace_reruns_from_any_block_what_a_full_forward_computes() -> None:
    model = tiny_model()
    trace = BlockTrace(model, ADAPTER, CALIB)
    last = hidden_states(model, CALIB)[-1]
    for start in range(len(ADAPTER.get_blocks(model))):
        for window in range(len(trace)):
            torch.testing.assert_close(trace.run_from(start, window)[0], last[window], rtol=1e-5, atol=1e-5)
    layer = f"{ADAPTER.blocks}.1.mlp.down_proj"
    noisy = model.get_submodule(layer).weight.data + 0.05 * torch.randn_like(model.get_submodule(layer).weight)
    with swapped_weights(model, {layer: noisy}):
        changed = hidden_states(model, CALIB)[-1]
        torch.testing.assert_close(trace.run_from(1, 3)[0], changed[3], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(changed, last)


def test_trace_log_probs_are_the_models_in_float64() -> None:
    model = tiny_model()
    trace = BlockTrace(model, ADAPTER, CALIB)
    with torch.no_grad():
        expected = torch.log_softmax(model(input_ids=CALIB, use_cache=False).logits.double(), dim=-1)
    for start in range(len(ADAPTER.get_blocks(model))):
        for window in range(len(trace)):
            got = trace.log_probs(trace.run_from(start, window))
            assert got.dtype == torch.float32
            torch.testing.assert_close(got.double(), expected[window], rtol=0, atol=1e-5)


def test_swapped_weights_come_back_as_the_same_tensors_even_after_an_error() -> None:
    model = tiny_model()
    layer = f"{ADAPTER.blocks}.0.self_attn.q_proj"
    own = model.get_submodule(layer).weight.data
    before = own.clone()
    zero = torch.zeros_like(own)
    with pytest.raises(RuntimeError, match="boom"), swapped_weights(model, {layer: zero}):
        assert model.get_submodule(layer).weight.data_ptr() == zero.data_ptr()
        model.get_submodule(layer).weight.data.add_(1.0)  # writes reach the swapped tensor, not the model's
        raise RuntimeError("boom")
    assert model.get_submodule(layer).weight.data_ptr() == own.data_ptr() and torch.equal(own, before)
    assert torch.equal(zero, torch.ones_like(zero))


def test_input_ranges_observe_every_batch_and_stop_after() -> None:
    model = tiny_model()
    block = ADAPTER.get_blocks(model)[0]
    linear = block.get_submodule(ADAPTER.sites.down)
    inputs_seen = []
    handle = linear.register_forward_pre_hook(lambda _m, args: inputs_seen.append(args[0].detach().clone()))
    try:
        def visit(i, blk, inputs):
            if i == 0:
                with input_ranges(blk, [ADAPTER.sites.down]) as ranges:
                    outputs = block_outputs(blk, inputs)
                expected = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs_seen]).abs().amax(dim=0)
                torch.testing.assert_close(ranges[ADAPTER.sites.down], expected, rtol=0, atol=0)
                return outputs
            return block_outputs(blk, inputs)

        walk_blocks(model, ADAPTER, CALIB, 2, visit)
    finally:
        handle.remove()
    assert linear._forward_pre_hooks == {}


def test_train_steps_cycle_the_batches_in_order_with_gradients() -> None:
    weight = torch.nn.Parameter(torch.zeros(3))
    batches = [torch.tensor([1.0, 0, 0]), torch.tensor([0, 2.0, 0])]
    order, reported = [], []

    def step(batch: torch.Tensor) -> float:
        order.append(int(batch.argmax()))
        loss = ((weight - batch) ** 2).sum()
        assert loss.requires_grad
        loss.backward()
        return loss.item()

    with torch.no_grad():
        losses = train_steps(batches, 5, step, lambda i, loss: reported.append((i, loss)))
    assert order == [0, 1, 0, 1, 0] and losses == [1.0, 4.0, 1.0, 4.0, 1.0]
    assert reported == list(enumerate(losses))
    torch.testing.assert_close(weight.grad, torch.tensor([-6.0, -8.0, 0.0]))


def test_model_outputs_reduce_each_batch_without_gradients() -> None:
    model = tiny_model()
    batches = list(CALIB.split(2))
    got = model_outputs(model, batches, lambda logits: logits.argmax(dim=-1))
    with torch.no_grad():
        expected = [model(input_ids=b, use_cache=False).logits.argmax(dim=-1) for b in batches]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
