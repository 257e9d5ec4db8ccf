"""Experts: the merged, selected and all-experts paths against plain per-example loops."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from smear_peft.experts import Experts


def make_experts(n=5, c=12, r=4):
    torch.manual_seed(0)
    experts = Experts(n, c, r)
    experts.reset_parameters(0.3)
    with torch.no_grad():
        experts.down_bias.normal_()
    return experts


def expert_output(experts, n, x):
    return F.silu(x @ experts.down_weight[n] + experts.down_bias[n]) @ experts.up_weight[n]


def test_merged_parameters_are_the_probability_weighted_average():
    experts = make_experts()
    probs = torch.softmax(torch.randn(3, 5), -1)
    params = experts.merged(probs)
    for b in range(3):
        torch.testing.assert_close(params.down_weight[b], torch.einsum("n,ncr->cr", probs[b], experts.down_weight))
        torch.testing.assert_close(params.down_bias[b], probs[b] @ experts.down_bias)
        torch.testing.assert_close(params.up_weight[b], torch.einsum("n,nrc->rc", probs[b], experts.up_weight))


def test_one_hot_merge_equals_gathering_that_expert():
    experts = make_experts()
    index = torch.tensor([4, 0, 2])
    merged = experts.merged(F.one_hot(index, 5).float())
    selected = experts.selected(index)
    for a, b in zip(merged, selected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_run_applies_each_examples_parameters():
    experts = make_experts()
    x = torch.randn(3, 7, 12)
    index = torch.tensor([1, 3, 3])
    out = experts.run(x, experts.selected(index))
    for b in range(3):
        torch.testing.assert_close(out[b], expert_output(experts, index[b], x[b]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(experts.run_shared(x, 2), expert_output(experts, 2, x), rtol=1e-5, atol=1e-6)


def test_run_each_gives_every_experts_output():
    experts = make_experts()
    x = torch.randn(2, 6, 12)
    everything = experts.run_each(x)
    assert everything.shape == (2, 5, 6, 12)
    for n in range(5):
        torch.testing.assert_close(everything[:, n], expert_output(experts, n, x), rtol=1e-5, atol=1e-6)
    index = torch.tensor([[4, 1], [0, 0]])
    chosen = experts.run_each(x, index)
    for b in range(2):
        for k in range(2):
            torch.testing.assert_close(chosen[b, k], expert_output(experts, index[b, k], x[b]), rtol=1e-5, atol=1e-6)


def test_run_mixture_equals_weighted_sum_of_every_experts_output():
    experts = make_experts()
    x = torch.randn(3, 6, 12)
    weights = torch.softmax(torch.randn(3, 5), -1)
    expected = torch.einsum("bn,bnsc->bsc", weights, experts.run_each(x))
    torch.testing.assert_close(experts.run_mixture(x, weights), expected, rtol=1e-5, atol=1e-6)
