"""Router and REINFORCE baseline against their formulas."""

from __future__ import annotations

import torch

from smear_peft.routers import ReinforceBaseline, Router


def standardise(x):
    return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)


def test_router_logits_are_layernormed_input_times_standardised_expert_vectors():
    torch.manual_seed(0)
    router = Router(16, 4, init_scale=0.01)
    with torch.no_grad():
        for p in (router.input_norm_weight, router.input_norm_bias, router.weight_norm_weight, router.weight_norm_bias):
            p.normal_()
    pooled = torch.randn(3, 16)
    v = standardise(pooled) * router.input_norm_weight + router.input_norm_bias
    w = standardise(router.weight.T) * router.weight_norm_weight + router.weight_norm_bias  # [N, C], shared gain
    torch.testing.assert_close(router(pooled)[0], v @ w.T, rtol=1e-5, atol=1e-5)


def test_router_has_no_bias_and_leaf_parameters_only():
    router = Router(16, 4)
    assert [n for n, _ in router.named_parameters()] == [
        "weight", "input_norm_weight", "input_norm_bias", "weight_norm_weight", "weight_norm_bias"
    ]
    assert list(router.children()) == []


def test_baseline_is_two_linear_layers_on_the_detached_input():
    torch.manual_seed(0)
    baseline = ReinforceBaseline(32)
    assert baseline.weight1.shape == (4, 32) and baseline.weight2.shape == (1, 4)
    x = torch.randn(5, 32, requires_grad=True)
    expected = (x @ baseline.weight1.T + baseline.bias1) @ baseline.weight2.T + baseline.bias2
    out = baseline(x)
    torch.testing.assert_close(out, expected.squeeze(-1))
    out.sum().backward()
    assert x.grad is None and baseline.weight1.grad is not None
