"""The multi-adapter LoRA layer: its grouped execution (the GPU's) gives every trial the per-trial matmuls' output
and gradients, whatever the ranks, scalings, absent slots and padding, accumulated over micro-batches."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def _layer(mode: str):
    """A base linear 16 -> 24 with three trials' adapters (ranks 4, 8, 8; scalings 2, 0.5, 1) and a slot-3 trial
    that does not target it; the same numbers for every `mode`."""
    from trial_worker.pack import lora

    g = torch.Generator().manual_seed(0)
    routing = lora.Routing()
    layer = lora.MultiLoRALinear(torch.nn.Linear(16, 24), routing, index=0)
    with torch.no_grad():
        layer.base.weight.copy_(torch.randn(24, 16, generator=g))
        layer.base.bias.copy_(torch.randn(24, generator=g))
    layer.base.requires_grad_(False)
    # slots 0 and 1 as a pack makes them (views of one flat parameter, gradients kept), slot 2 plain tensors
    flat, (a0,) = lora.new_adapters([(16, 24)], 4, 8.0, 0.0, g, "cpu", bf16_init=False)
    _, (a1,) = lora.new_adapters([(16, 24)], 8, 4.0, 0.0, g, "cpu", bf16_init=False)
    a2 = lora.LoRAAdapter(torch.randn(8, 16, generator=g), torch.zeros(24, 8), 8.0, 0.0)
    for slot, a in enumerate([a0, a1, a2]):
        with torch.no_grad():
            a.B.copy_(torch.randn(a.B.shape, generator=g))  # B is zero at init: nonzero to give A a gradient
        layer.adapters[str(slot)] = a
    layer.flat0 = flat
    return layer, routing


@pytest.mark.parametrize("mode", ["grouped", "segments"])
def test_grouped_lora_gives_each_trial_its_own_output_and_gradients(mode, monkeypatch):
    from trial_worker.pack import lora

    spans = [(0, 5, 1), (5, 5, 0), (5, 12, 3), (12, 20, 0), (20, 23, 2), (23, 32, None)]  # an empty span too
    got = {}
    for m in (mode, "reference"):
        monkeypatch.setattr(lora, "MODE", "segments" if m == "reference" else m)
        layer, routing = _layer(m)
        g = torch.Generator().manual_seed(1)
        outs, xgrads = [], []
        for _ in range(2):  # two micro-batches: gradients accumulate
            x = torch.randn(1, 32, 16, generator=g, requires_grad=True)
            routing.set(spans, {}, per_token=True)
            y = layer(x)
            y.backward(torch.randn(y.shape, generator=g))
            outs.append(y.detach())
            xgrads.append(x.grad)
        got[m] = (outs, xgrads, {n: p.grad.clone() for n, p in layer.adapters.named_parameters()})
        # slot 0's flat parameter (what its optimizer steps) has its adapter's gradients as its own
        a0 = layer.adapters["0"]
        assert torch.equal(layer.flat0.grad, torch.cat([a0.A.grad.flatten(), a0.B.grad.flatten()]))
    (outs, xgrads, grads), (r_outs, r_xgrads, r_grads) = got[mode], got["reference"]
    for a, b in zip(outs + xgrads, r_outs + r_xgrads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert grads.keys() == r_grads.keys() == {f"{s}.{w}" for s in "012" for w in "AB"}
    for n in grads:
        torch.testing.assert_close(grads[n], r_grads[n], rtol=1e-5, atol=1e-5)
    # each adapter's gradient is its own: slot 2's span has 3 tokens, slot 0's two spans 7 + 8 (one empty)
    assert all(grads[n].abs().sum() > 0 for n in grads)


def test_grouped_lora_in_evaluation_needs_no_gradients():
    from trial_worker.pack import lora

    layer, routing = _layer("grouped")
    routing.set([(0, 4, 0), (4, 8, 2)], None, per_token=True)
    try:
        lora.MODE = "grouped"
        with torch.no_grad():
            y = layer(torch.randn(1, 8, 16))
    finally:
        lora.MODE = "auto"
    assert y.shape == (1, 8, 24) and not y.requires_grad
    assert all(p.grad is None or not p.grad.any() for p in layer.adapters.parameters())
