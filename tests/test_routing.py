"""Every routing method of the paper on a tiny T5: training step, gradients, evaluation, and each method's formulas."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model

from smear_peft import ROUTING_METHODS, SmearConfig, SmearLayer
from smear_peft.analysis import RoutingRecorder
from smear_peft.experts import Experts
from smear_peft.frames import RoutingFrame
from smear_peft.losses import has_reinforce_terms, reinforce_loss
from smear_peft.routing import RoutingInputs, content_keys, gumbel_temperature_at, hash_experts

from .conftest import tiny_t5

METHODS = ["smear", "top_k", "st_gumbel", "reinforce", "tag", "hash", "monolithic", "ensemble"]
TASK_GRADIENT = {"smear", "top_k", "st_gumbel", "ensemble"}  # router trained through the task loss
NO_ROUTER = {"tag", "hash", "monolithic"}
DISCRETE = {"top_k", "st_gumbel", "reinforce", "tag", "hash"}  # one gathered expert per example
LEARNED = ["smear", "top_k", "st_gumbel", "reinforce", "ensemble"]
CPU = torch.device("cpu")


def build(routing: str, seed: int = 0, **config) -> PeftModel:
    values = dict(num_experts=4, reduction_factor=4, routing=routing)
    values.update(config)
    model = tiny_t5()
    torch.manual_seed(seed)
    return get_peft_model(model, SmearConfig(**values))


def smear(model):
    return model.base_model


def layers(model) -> list[SmearLayer]:
    return [m for m in model.modules() if isinstance(m, SmearLayer)]


def method_inputs(logits, training=True, **kw) -> RoutingInputs:
    return RoutingInputs(logits=logits, batch_size=logits.shape[0], device=CPU, training=training, side="encoder",
                         block_index=0, **kw)


def expert_output(experts: Experts, n: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``n`` on ``x`` computed on its own (no stacking, no batching over experts)."""
    return F.silu(x @ experts.down_weight[n] + experts.down_bias[n]) @ experts.up_weight[n]


def first_block(model):
    """Encoder block 0, ready to be called on hidden states directly (``apply_block`` without a frame: no attention
    mask, so plain mean pooling)."""
    return layers(model)[0]


# ------------------------------------------------------------------------------------------------------------------
# Every method: a training step, the right gradients, deterministic evaluation
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("routing", METHODS)
def test_training_step_and_gradients_reach_exactly_what_they_should(routing, t5_batch):
    model = build(routing)
    model.train()
    tags = [0, 1, 2]  # routing_tags are accepted by every method (metadata for the others)
    with RoutingRecorder(model) as recorder:
        out = model(**t5_batch, routing_tags=tags)
    assert torch.isfinite(out.loss)
    assert has_reinforce_terms(out) == (routing == "reinforce")
    out.loss.backward(retain_graph=routing == "reinforce")

    blocks = layers(model)
    assert len(blocks) == 10 and set(recorder.block_names) == {b.block_name for b in blocks}
    for block in blocks:
        router = block.smear_router["default"] if "default" in block.smear_router else None
        if routing in NO_ROUTER:
            assert router is None
        elif routing in TASK_GRADIENT:
            assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0, block.block_name
            assert router.weight_norm_weight.grad.abs().sum() > 0
        else:  # reinforce: nothing from the task loss
            assert router.weight.grad is None or not router.weight.grad.any()
            assert all(p.grad is None for p in block.smear_baseline["default"].parameters())
        # experts: only the ones an example used get gradient
        grad = block.smear_experts["default"].down_weight.grad.abs().sum(dim=(1, 2))
        if routing in DISCRETE:
            used = set(recorder.chosen(block.block_name).tolist())
            assert {n for n in range(4) if grad[n] > 0} == used, block.block_name
        elif routing == "monolithic":
            assert grad.shape == (1,) and grad[0] > 0
        else:
            assert (grad > 0).all()
        assert recorder.tags(block.block_name).tolist() == tags
    # the frozen backbone gets nothing
    assert model.base_model.model.shared.weight.grad is None

    if routing == "reinforce":
        aux = smear(model).reinforce_loss(torch.tensor([3.0, 1.0, 2.0]), out)
        aux.backward()
        for block in blocks:
            assert block.smear_router["default"].weight.grad.abs().sum() > 0
            assert all(p.grad is not None and p.grad.any() for p in block.smear_baseline["default"].parameters())
    else:
        assert smear(model).reinforce_loss(torch.ones(3), out).item() == 0.0
        assert reinforce_loss(out, torch.ones(3)).item() == 0.0


@pytest.mark.parametrize("routing", METHODS)
def test_evaluation_is_deterministic(routing, t5_batch):
    model = build(routing, init_weights=False).eval()
    kwargs = dict(routing_tags=[0, 1, 2], routing_keys=[10, 11, 12])
    with torch.no_grad():
        first = model(**t5_batch, **kwargs).logits
        torch.manual_seed(123)  # a different RNG state changes nothing in evaluation
        second = model(**t5_batch, **kwargs).logits
    assert torch.equal(first, second)
    inputs = {k: t5_batch[k] for k in ("input_ids", "attention_mask")}
    gen1 = model.generate(**inputs, **kwargs, max_new_tokens=4, do_sample=False)
    gen2 = model.generate(**inputs, **kwargs, max_new_tokens=4, do_sample=False)
    assert torch.equal(gen1, gen2)


# ------------------------------------------------------------------------------------------------------------------
# What a block computes, per method, against each expert run on its own
# ------------------------------------------------------------------------------------------------------------------
def block_reference(block, y, weights_per_expert):
    """``y + post_norm(sum_n w[:, n] * expert_n(y))`` with each expert run separately."""
    experts = block.smear_experts["default"]
    delta = sum(weights_per_expert[:, n, None, None] * expert_output(experts, n, y) for n in range(experts.num_experts))
    return y + block.smear_post_norm["default"](delta)


def router_probs(block, y):
    return F.softmax(block.smear_router["default"](y.mean(1))[0], dim=-1)


@pytest.mark.parametrize("training", [False, True])
def test_ensemble_equals_weighted_sum_of_each_experts_output(training):
    model = build("ensemble", init_weights=False)
    model.train(training)
    block = first_block(model)
    y = torch.randn(3, 5, 32)
    out = block.apply_block("default", y)
    torch.testing.assert_close(out, block_reference(block, y, router_probs(block, y)), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert block.smear_router["default"].weight.grad.abs().sum() > 0


def test_smear_merges_parameters_which_differs_from_mixing_outputs():
    model = build("smear", init_weights=False).eval()
    block = first_block(model)
    y = torch.randn(3, 5, 32)
    p = router_probs(block, y)
    experts = block.smear_experts["default"]
    merged_down = torch.einsum("bn,ncr->bcr", p, experts.down_weight)
    merged_bias = p @ experts.down_bias
    merged_up = torch.einsum("bn,nrc->brc", p, experts.up_weight)
    delta = torch.bmm(F.silu(torch.bmm(y, merged_down) + merged_bias[:, None]), merged_up)
    expected = y + block.smear_post_norm["default"](delta)
    out = block.apply_block("default", y)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, block_reference(block, y, p), atol=1e-3)  # merging != ensembling (nonlinear)


@pytest.mark.parametrize("routing", ["top_k", "st_gumbel", "reinforce"])
def test_evaluation_uses_the_argmax_expert_scaled_as_the_authors(routing):
    model = build(routing, init_weights=False).eval()
    block = first_block(model)
    y = torch.randn(6, 5, 32)
    p = router_probs(block, y)
    chosen = p.argmax(-1)
    assert len(set(chosen.tolist())) > 1  # the test exercises several experts
    scale = p.max(-1).values if routing == "top_k" else torch.ones(6)  # top-k: scaled in eval too; others: not
    weights = F.one_hot(chosen, 4) * scale[:, None]
    with torch.no_grad():
        torch.testing.assert_close(block.apply_block("default", y), block_reference(block, y, weights), rtol=1e-5, atol=1e-5)


def test_top_k_training_scales_by_the_chosen_probability_and_k2_renormalises():
    model = build("top_k", init_weights=False).train()
    block = first_block(model)
    y = torch.randn(6, 5, 32)
    p = router_probs(block, y)
    weights = F.one_hot(p.argmax(-1), 4) * p.max(-1).values[:, None]
    out = block.apply_block("default", y)
    torch.testing.assert_close(out, block_reference(block, y, weights), rtol=1e-5, atol=1e-5)

    model2 = build("top_k", init_weights=False, top_k=2).train()
    block2 = first_block(model2)
    p2 = router_probs(block2, y)
    top, index = p2.topk(2, dim=-1)
    weights2 = torch.zeros_like(p2).scatter(-1, index, top / top.sum(-1, keepdim=True))
    torch.testing.assert_close(block2.apply_block("default", y), block_reference(block2, y, weights2), rtol=1e-5, atol=1e-5)
    assert SmearConfig().top_k == 1


@pytest.mark.parametrize("routing", ["top_k", "st_gumbel", "reinforce", "tag", "hash", "monolithic"])
def test_discrete_methods_gather_the_chosen_expert_instead_of_merging(routing, t5_batch, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("an N-way merge ran for a discrete routing method")

    monkeypatch.setattr(Experts, "merged", forbidden)
    for name in ("run_each", "run_mixture"):
        if hasattr(Experts, name):
            monkeypatch.setattr(Experts, name, forbidden)
    model = build(routing).train()
    model(**t5_batch, routing_tags=[0, 1, 2])


def test_tag_and_hash_blocks_apply_exactly_the_selected_expert():
    for routing in ("tag", "hash"):
        model = build(routing, init_weights=False).eval()
        block = first_block(model)
        y = torch.randn(4, 5, 32)
        frame = RoutingFrame(kind="forward", tags=torch.tensor([3, 0, 2, 1]), keys=torch.tensor([7, 8, 9, 10]))
        expected = torch.tensor([3, 0, 2, 1]) if routing == "tag" else torch.from_numpy(
            hash_experts(np.array([7, 8, 9, 10]), block.block_index, 0, 4))
        out = block.apply_block("default", y, frame)
        torch.testing.assert_close(out, block_reference(block, y, F.one_hot(expected, 4).float()), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# ST-Gumbel
# ------------------------------------------------------------------------------------------------------------------
def test_st_gumbel_training_argmax_of_gumbel_softmax_with_straight_through_multiplier():
    method = ROUTING_METHODS["st_gumbel"](SmearConfig(routing="st_gumbel", num_experts=4))
    logits = torch.randn(64, 4, requires_grad=True)
    torch.manual_seed(0)
    decision = method.decide(method_inputs(logits))
    torch.manual_seed(0)
    uniform = torch.rand(64, 4)
    gumbel = -torch.log(-torch.log(uniform + 1e-20) + 1e-20)
    soft = F.softmax((logits + gumbel) / 10.0, dim=-1)  # tau starts at 10
    assert decision.kind == "select"
    assert torch.equal(decision.index, soft.argmax(-1))
    assert not torch.equal(decision.index, logits.argmax(-1))  # the noise matters
    torch.testing.assert_close(decision.weights, torch.ones(64))  # value 1 - sg(y) + y == 1
    (grad,) = torch.autograd.grad(decision.weights.sum(), logits)
    (expected,) = torch.autograd.grad(soft.max(-1).values.sum(), logits)  # gradient of y
    torch.testing.assert_close(grad, expected)
    assert grad.abs().sum() > 0

    evaluation = method.decide(method_inputs(logits.detach(), training=False))
    assert torch.equal(evaluation.index, logits.argmax(-1)) and evaluation.weights is None


def authors_t5_temperatures(steps: int, rate=1e-6, every=5000, initial=10.0, minimum=0.5) -> list[float]:
    """The temperature each training step uses in the authors' T5 trainer (t5_trainer.py): before the step, with
    ``global_step`` optimizer steps done, ``if (global_step + 1) % eval_steps == 0: temp = max(temp *
    exp(-anneal_rate * global_step), min_temp)``."""
    temp, used = initial, []
    for global_step in range(steps):
        if (global_step + 1) % every == 0:
            temp = max(temp * math.exp(-rate * global_step), minimum)
        used.append(temp)
    return used


def authors_resnet_temperatures(steps: int, rate=1e-4, every=1000, initial=10.0, minimum=0.5) -> list[float]:
    """The same for their DomainNet loop (cvl/src/train.py): after training batch ``batch_idx``, ``if (batch_idx + 1)
    % eval_every == 0: temp = max(temp * exp(-anneal_rate * batch_idx), min_temp)``."""
    temp, used = initial, []
    for batch_idx in range(steps):
        used.append(temp)
        if (batch_idx + 1) % every == 0:
            temp = max(temp * math.exp(-rate * batch_idx), minimum)
    return used


def test_gumbel_temperature_matches_the_authors_t5_trainer_at_every_step():
    steps = 200_000
    used = authors_t5_temperatures(steps)
    ours = [gumbel_temperature_at(s, 10.0, 0.5, 1e-6, 5000, "t5") for s in range(steps)]
    assert max(abs(a - b) for a, b in zip(used, ours)) < 1e-9
    # Figures of the step-by-step simulation in docs/reproducing.md: the update is already in effect at step 4999.
    assert used[4998] == 10.0 and round(used[4999], 6) == 9.950135 == round(used[5000], 6)
    assert round(used[9999], 6) == 9.851139 and round(ours[9999], 6) == 9.851139
    assert next(s for s in range(steps) if ours[s] == 0.5) == 174_999  # floor of 0.5 from the 35th update on


def test_gumbel_temperature_matches_the_authors_resnet_loop_at_every_step():
    steps = 12_000
    used = authors_resnet_temperatures(steps)
    ours = [gumbel_temperature_at(s, 10.0, 0.5, 1e-4, 1000, "resnet") for s in range(steps)]
    assert max(abs(a - b) for a, b in zip(used, ours)) < 1e-9
    assert used[999] == 10.0 and round(used[1000], 6) == 9.049279 and round(used[2000], 6) == 7.409664
    assert next(s for s in range(steps) if ours[s] == 0.5) == 8000
    with pytest.raises(ValueError, match="schedule"):
        gumbel_temperature_at(0, 10.0, 0.5, 1e-4, 1000, "resnet18")


def test_set_training_step_picks_the_authors_loop_of_the_backbone():
    """T5 (and any other backbone) follows their T5 trainer, a transformers ResNet their DomainNet loop."""
    from transformers import ResNetConfig, ResNetForImageClassification

    resnet = ResNetForImageClassification(
        ResNetConfig(layer_type="basic", embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    )
    t5 = tiny_t5()
    for base, step, expected in [(t5, 4999, 9.950135), (resnet, 999, 10.0), (resnet, 1000, 9.049279)]:
        rate, every = (1e-6, 5000) if base is t5 else (1e-4, 1000)
        config = SmearConfig(num_experts=2, routing="st_gumbel", gumbel_anneal_rate=rate, gumbel_anneal_every=every)
        model = get_peft_model(base, config)
        assert round(model.base_model.set_training_step(step)["default"], 6) == expected
        model.unload()


def test_set_training_step_drives_the_temperature_used_and_it_is_saved_with_the_adapter(tmp_path):
    config = SmearConfig(num_experts=4, reduction_factor=4, routing="st_gumbel")
    assert (config.gumbel_temperature, config.gumbel_min_temperature) == (10.0, 0.5)
    assert (config.gumbel_anneal_rate, config.gumbel_anneal_every) == (1e-6, 5000)
    model = build("st_gumbel", gumbel_anneal_rate=1e-4, gumbel_anneal_every=1000)
    taus = smear(model).set_training_step(3000)
    expected = 10.0 * math.exp(-1e-4 * (999 + 1999 + 2999))  # T5 timing: the third update is in effect at 2999
    assert taus == {"default": pytest.approx(expected)}
    method = smear(model)._routing_methods["default"]
    assert method.temperature.item() == pytest.approx(expected)
    logits = torch.randn(32, 4, requires_grad=True)
    torch.manual_seed(1)
    decision = method.decide(method_inputs(logits))
    torch.manual_seed(1)
    gumbel = -torch.log(-torch.log(torch.rand(32, 4) + 1e-20) + 1e-20)
    soft = F.softmax((logits + gumbel) / expected, dim=-1)
    (grad,) = torch.autograd.grad(decision.weights.sum(), logits)
    torch.testing.assert_close(grad, torch.autograd.grad(soft.max(-1).values.sum(), logits)[0])

    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_t5(), tmp_path)
    assert smear(loaded)._routing_methods["default"].temperature.item() == pytest.approx(expected)


# ------------------------------------------------------------------------------------------------------------------
# Expert dropout
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("routing", LEARNED)
def test_expert_dropout_follows_its_formula_in_training_only(routing):
    q = 0.3
    method = ROUTING_METHODS[routing](SmearConfig(routing=routing, num_experts=4, expert_dropout=q))
    logits = torch.randn(4000, 4)
    torch.manual_seed(5)
    decision = method.decide(method_inputs(logits))
    torch.manual_seed(5)
    keep = torch.rand(4000, 4) >= q  # the first draw of decide() is the dropout mask
    assert abs((~keep).float().mean().item() - q) < 0.02
    has_kept = keep.any(-1)
    if routing in ("smear", "ensemble", "top_k"):
        kept = F.softmax(logits, -1) * keep + 1e-10
        dropped_probs = kept / kept.sum(-1, keepdim=True)  # zero, renormalise; all dropped -> uniform
        torch.testing.assert_close(decision.probs, dropped_probs)
        if routing == "top_k":
            torch.testing.assert_close(decision.weights, dropped_probs.max(-1).values)
        else:
            torch.testing.assert_close(decision.weights, dropped_probs)
    if routing in ("top_k", "st_gumbel", "reinforce"):  # a dropped expert is never chosen
        assert keep[has_kept].gather(-1, decision.index[has_kept, None]).all()
    if routing in ("st_gumbel", "reinforce"):  # sampling methods mask the dropped logits
        assert (decision.probs[has_kept][~keep[has_kept]] < 1e-6).all()
        masked = logits.masked_fill(~keep, -1e10)
        torch.testing.assert_close(decision.probs[has_kept], F.softmax(masked, -1)[has_kept])

    evaluation = method.decide(method_inputs(logits, training=False))  # never in evaluation
    torch.testing.assert_close(evaluation.probs, F.softmax(logits, -1))


def test_expert_dropout_of_every_expert_gives_uniform_sampling():
    method = ROUTING_METHODS["st_gumbel"](SmearConfig(routing="st_gumbel", num_experts=4, expert_dropout=0.999))
    torch.manual_seed(0)
    decision = method.decide(method_inputs(torch.randn(4000, 4)))
    counts = torch.bincount(decision.index, minlength=4).float() / 4000
    assert (counts - 0.25).abs().max() < 0.04  # not always expert 0


# ------------------------------------------------------------------------------------------------------------------
# REINFORCE
# ------------------------------------------------------------------------------------------------------------------
def test_reinforce_samples_in_training_and_takes_the_argmax_in_evaluation():
    method = ROUTING_METHODS["reinforce"](SmearConfig(routing="reinforce", num_experts=4))
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5]]).expand(20000, 4)
    torch.manual_seed(0)
    decision = method.decide(method_inputs(logits))
    freq = torch.bincount(decision.index, minlength=4).float() / 20000
    torch.testing.assert_close(freq, F.softmax(logits[0], -1), atol=0.015, rtol=0)
    torch.testing.assert_close(decision.log_prob, F.log_softmax(logits, -1).gather(-1, decision.index[:, None])[:, 0])
    torch.testing.assert_close(decision.entropy, -(F.softmax(logits, -1) * F.log_softmax(logits, -1)).sum(-1))
    assert decision.weights is None  # the task loss never reaches the router
    assert (method.decide(method_inputs(logits, training=False)).index == 0).all()


def test_reinforce_loss_is_the_authors_policy_entropy_and_huber_value_terms(t5_batch):
    config = SmearConfig()
    assert (config.reinforce_policy_weight, config.reinforce_entropy_weight, config.reinforce_value_weight) == (1e-2, 5e-4, 1e-2)
    model = build("reinforce", init_weights=False).train()
    with RoutingRecorder(model) as recorder:
        out = model(**t5_batch)
    losses = torch.tensor([3.0, 0.2, 2.0])
    aux = smear(model).reinforce_loss(losses, out)
    torch.testing.assert_close(reinforce_loss(out, losses), aux)  # the module function, for custom loops

    config, terms = out.smear_reinforce_terms["default"]  # the terms travel on the forward's output
    assert config.routing == "reinforce" and len(terms) == 10  # one entry per block
    assert all(len(t) == 4 and t[3] is None for t in terms)  # (log_prob, entropy, baseline, example): units are examples
    log_prob, entropy, baseline = (torch.stack(t) for t in list(zip(*terms))[:3])
    assert log_prob.shape == (10, 3)  # one row per block
    for i, name in enumerate(recorder.block_names):  # consistent with what the blocks did
        probs, chosen = recorder.probs(name), recorder.chosen(name)
        torch.testing.assert_close(log_prob[i].detach(), probs.gather(-1, chosen[:, None]).log()[:, 0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(entropy[i].detach(), -(probs * probs.log()).sum(-1), rtol=1e-4, atol=1e-5)
    advantage = losses - baseline
    huber = torch.where(advantage.abs() < 1, 0.5 * advantage**2, advantage.abs() - 0.5)
    expected = 1e-2 * (log_prob * advantage.detach()).mean() + 5e-4 * entropy.mean() + 1e-2 * huber.mean()
    torch.testing.assert_close(aux, expected)

    # sign convention (the authors'): gradient descent lowers log p(chosen) when the loss beats the baseline, and
    # the entropy term is added to the loss (entropy is penalised, not rewarded)
    grads = torch.autograd.grad(aux, [t for block in terms for t in block[:2]])
    d_log_prob, d_entropy = torch.stack(grads[0::2]), torch.stack(grads[1::2])
    torch.testing.assert_close(d_log_prob, 1e-2 * advantage.detach() / 30)
    torch.testing.assert_close(d_entropy, torch.full_like(entropy, 5e-4 / 30))


def test_reinforce_value_term_trains_only_the_baseline_on_the_detached_router_input(t5_batch):
    model = build("reinforce", reinforce_policy_weight=0.0, reinforce_entropy_weight=0.0).train()
    out = model(**t5_batch)
    smear(model).reinforce_loss(torch.tensor([3.0, 1.0, 2.0]), out).backward()
    for block in layers(model):
        assert block.smear_router["default"].weight.grad is None or not block.smear_router["default"].weight.grad.any()
        assert block.smear_baseline["default"].weight1.grad.any()
    assert all(p.grad is None or not p.grad.any() for n, p in model.named_parameters() if "smear_experts" in n)
    del out


def test_reinforce_loss_errors_clearly_without_the_task_loss(t5_batch):
    model = build("reinforce").train()
    out = model(**t5_batch)
    with pytest.raises(ValueError, match="per-example task loss"):
        smear(model).reinforce_loss(None, out)
    with pytest.raises(ValueError, match="2 example losses for a batch of 3"):
        smear(model).reinforce_loss(torch.ones(2), out)
    with pytest.raises(TypeError, match="pass the model's output"):
        reinforce_loss(model, torch.ones(3))
    model.eval()
    with torch.no_grad():
        evaluation = model(**t5_batch)
    assert not has_reinforce_terms(evaluation)
    assert smear(model).reinforce_loss(None, evaluation).item() == 0.0  # nothing to train in evaluation


# ------------------------------------------------------------------------------------------------------------------
# Tag routing
# ------------------------------------------------------------------------------------------------------------------
TASKS = ["mnli", "rte", "sst2", "qqp"]


def chosen_by_side(recorder, model):
    sides = {b.block_name: b.side for b in layers(model)}
    result = {"encoder": set(), "decoder": set()}
    for name in recorder.block_names:
        result[sides[name]].add(tuple(recorder.chosen(name).tolist()))
    return result


def test_tag_routing_with_ints_strings_and_tag_plus_per_side(t5_batch):
    model = build("tag", tag_names=TASKS).eval()
    with RoutingRecorder(model) as recorder, torch.no_grad():
        model(**t5_batch, routing_tags=[2, 0, 1])
    assert chosen_by_side(recorder, model) == {"encoder": {(2, 0, 1)}, "decoder": {(2, 0, 1)}}
    with RoutingRecorder(model) as recorder, torch.no_grad():
        model(**t5_batch, routing_tags=["qqp", "rte", "mnli"])
    assert chosen_by_side(recorder, model) == {"encoder": {(3, 1, 0)}, "decoder": {(3, 1, 0)}}

    # Tag+: RTE uses MNLI's expert in encoder blocks only (the paper's setting)
    plus = build("tag", tag_names=TASKS, tag_to_expert={"encoder": {"rte": 0}}).eval()
    with RoutingRecorder(plus) as recorder, torch.no_grad():
        plus(**t5_batch, routing_tags=["rte", "sst2", "mnli"])
    assert chosen_by_side(recorder, plus) == {"encoder": {(0, 2, 0)}, "decoder": {(1, 2, 0)}}
    with pytest.raises(ValueError, match="out of range"):
        SmearConfig(routing="tag", num_experts=4, tag_names=TASKS, tag_to_expert={"encoder": {"rte": 9}})


def test_tag_routing_errors_on_missing_unknown_or_out_of_range_tags(t5_batch):
    model = build("tag", tag_names=TASKS).eval()
    with pytest.raises(ValueError, match="routing_tags"):
        model(**t5_batch)
    with pytest.raises(ValueError, match=r"routing_tags must be in \[0, 4\)"):
        model(**t5_batch, routing_tags=[0, 1, 7])
    with pytest.raises(ValueError, match=r"routing_tags must be in \[0, 4\)"):
        model(**t5_batch, routing_tags=[0, -1, 2])
    with pytest.raises(ValueError, match="Unknown routing tag 'cola'"):
        model(**t5_batch, routing_tags=["mnli", "cola", "rte"])
    with pytest.raises(ValueError, match="3 routing_tags for a batch of"):
        RoutingFrame(kind="forward", tags=torch.tensor([0, 1, 2])).tags_for(4)
    # tags must match the batch exactly in forward (only generate repeats them for beams)
    with pytest.raises(ValueError, match="2 routing_tags for a batch of 3"):
        model(**t5_batch, routing_tags=[0, 1])
    with pytest.raises(ValueError, match="routing_tags for a batch of 3"):
        with smear(model).routing_inputs(routing_tags=[0, 1, 2, 3]):
            model(**t5_batch)
    for bad in ([0.0, 1.0, 2.0], [True, False, True], [[0], [1], [2]], torch.tensor([0.0, 1.0, 2.0])):
        with pytest.raises(ValueError, match="routing_tags"):
            model(**t5_batch, routing_tags=bad)
    assert smear(model).frames.current() is None  # a failed call leaves no routing state behind


def test_tag_routing_under_beam_search_routes_every_beam_by_its_examples_tag():
    model = build("tag", init_weights=False).eval()
    torch.manual_seed(3)
    input_ids = torch.randint(2, 64, (3, 6))
    tags = [2, 0, 3]
    kwargs = dict(num_beams=3, num_return_sequences=2, max_new_tokens=5, do_sample=False, output_scores=True,
                  return_dict_in_generate=True)
    batched = model.generate(input_ids=input_ids, routing_tags=tags, **kwargs)
    assert batched.sequences.shape[0] == 6
    for i, tag in enumerate(tags):
        alone = model.generate(input_ids=input_ids[i : i + 1], routing_tags=[tag], **kwargs)
        assert torch.equal(batched.sequences[2 * i : 2 * i + 2], alone.sequences)
        torch.testing.assert_close(batched.sequences_scores[2 * i : 2 * i + 2], alone.sequences_scores)
    other = model.generate(input_ids=input_ids, routing_tags=[1, 1, 1], **kwargs)
    assert not torch.allclose(other.sequences_scores, batched.sequences_scores)  # the tags do steer generation


# ------------------------------------------------------------------------------------------------------------------
# Hash routing
# ------------------------------------------------------------------------------------------------------------------
def test_hash_experts_are_pinned_portable_values():
    # SplitMix64-based: these exact values must hold on every machine, process and version
    assert hash_experts(np.array([0, 1, 2, 3, 12345, 2**40]), 3, 0, 8).tolist() == [0, 2, 4, 5, 7, 4]
    assert hash_experts(np.array([0, 1, 2, 3, 12345, 2**40]), 0, 7, 8).tolist() == [0, 0, 4, 0, 7, 2]
    keys = np.arange(8000)
    counts = np.bincount(hash_experts(keys, 5, 0, 8), minlength=8)
    assert counts.min() > 900 and counts.max() < 1100  # ~uniform
    agreement = (hash_experts(keys, 5, 0, 8) == hash_experts(keys, 6, 0, 8)).mean()
    assert 0.08 < agreement < 0.17  # blocks draw independently (1/8 expected)


HASH_IDS = [[5, 9, 3, 1, 0], [7, 7, 2, 8, 1]]
HASH_KEYS = [3, 2**33 + 1]

# Runs in a fresh interpreter: loads smear_peft/routing.py on its own (torch + numpy only, so it starts fast) and
# prints the expert of every (example, block) for explicit keys and for content keys.
_HASH_SCRIPT = """
import importlib.util, json, sys, numpy as np, torch
spec = importlib.util.spec_from_file_location("routing_alone", sys.argv[1])
routing = sys.modules["routing_alone"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(routing)
ids = torch.tensor(json.loads(sys.argv[2]))
keys = {"keys": np.array(json.loads(sys.argv[3])), "content": routing.content_keys(ids, (ids != 0).long()).numpy()}
print(json.dumps({name: [routing.hash_experts(k, block, 0, 4).tolist() for block in range(10)]
                  for name, k in keys.items()}))
"""


def hash_routing_table() -> dict:
    """Expert of every (example, block) that a tiny T5 with hash routing uses, for fixed keys and for content keys."""
    model = build("hash").eval()
    ids = torch.tensor(HASH_IDS)
    table = {}
    for name, keys in (("keys", HASH_KEYS), ("content", None)):
        with RoutingRecorder(model) as recorder, torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=(ids != 0).long(), routing_keys=keys, max_new_tokens=2,
                                 num_beams=2)
        assert out.shape[0] == 2
        by_index = {b.block_index: b.block_name for b in layers(model)}
        # decoder blocks see every beam (2 per example), routed as its example
        table[name] = [recorder.chosen(by_index[i]).tolist()[:: 2 if i >= 4 else 1] for i in range(10)]
        assert all(recorder.chosen(by_index[i]).view(2, 2).unique(dim=1).shape[1] == 1 for i in range(4, 10))
    return table


def test_hash_routing_is_identical_across_processes_with_different_hash_seeds():
    routing_file = Path(__file__).resolve().parents[1] / "smear_peft" / "routing.py"
    args = [sys.executable, "-c", _HASH_SCRIPT, str(routing_file), json.dumps(HASH_IDS), json.dumps(HASH_KEYS)]
    procs = [
        subprocess.Popen(args, env=dict(os.environ, PYTHONHASHSEED=seed, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for seed in ("0", "4242")
    ]
    here = hash_routing_table()  # the model, in this process
    outputs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr[-2000:]
        outputs.append(json.loads(stdout.strip().splitlines()[-1]))
    assert outputs[0] == outputs[1] == here
    assert len({tuple(row) for row in here["keys"]}) > 1 and here["keys"] != here["content"]


def test_hash_routing_with_keys_is_shared_by_every_template_of_an_example():
    model = build("hash").eval()
    templates = [torch.tensor([[5, 9, 3, 1]]), torch.tensor([[11, 12, 5, 9, 3, 13, 1]])]  # same example, 2 prompts
    tables = []
    for ids in templates:
        with RoutingRecorder(model) as recorder, torch.no_grad():
            model(input_ids=ids, decoder_input_ids=torch.zeros(1, 2, dtype=torch.long), routing_keys=[42])
        tables.append({b: recorder.chosen(b).tolist() for b in recorder.block_names})
    assert tables[0] == tables[1]
    assert len({tuple(v) for v in tables[0].values()}) > 1  # different blocks, different experts
    expected = {b.block_name: hash_experts(np.array([42]), b.block_index, 0, 4).tolist() for b in layers(model)}
    assert tables[0] == expected


def test_hash_routing_without_keys_hashes_content_ignoring_padding():
    model = build("hash").eval()
    example = torch.tensor([[5, 9, 3, 1]])
    batch = torch.tensor([[8, 8, 8, 8, 8, 1], [5, 9, 3, 1, 0, 0]])
    decoder_ids = torch.zeros(1, 2, dtype=torch.long)
    with RoutingRecorder(model) as alone, torch.no_grad():
        model(input_ids=example, decoder_input_ids=decoder_ids)
    with RoutingRecorder(model) as batched, torch.no_grad():
        model(input_ids=batch, attention_mask=(batch != 0).long(), decoder_input_ids=decoder_ids.expand(2, 2))
    for block in alone.block_names:
        assert alone.chosen(block).tolist() == batched.chosen(block)[1:].tolist()
    key = content_keys(example).item()
    assert key == content_keys(batch, (batch != 0).long())[1].item() and key >= 0


def reference_content_key(values: torch.Tensor, real: list) -> int:
    """`content_keys` of one example, written out element by element with Python ints: the example's real elements
    in order, each at its position among the real elements."""
    mask64 = 2**64 - 1

    def mix(z: int) -> int:  # SplitMix64 finaliser
        z = (z + 0x9E3779B97F4A7C15) & mask64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask64
        return z ^ (z >> 31)

    total, position = 0, 0
    for value, keep in zip(values, real):
        for element in value.reshape(-1):
            bits = element.float().view(torch.int32).item() if element.is_floating_point() else element.item()
            if keep:
                total = (total + mix(position) * mix(bits & mask64)) & mask64
                position += 1
    return mix(total) >> 1


def test_content_keys_count_positions_among_real_tokens_only():
    ids = torch.tensor([[5, 9, 3, 1, 0, 0], [7, 7, 2, 8, 1, 4]])
    embeds = torch.linspace(-1, 1, 2 * 3 * 4).view(2, 3, 4)
    pixels = torch.linspace(0, 1, 2 * 3 * 2 * 2).view(2, 3, 2, 2)
    # Pinned: unpadded and right-padded inputs keep the keys of the earlier absolute-index formula, so saved hash-routed
    # adapters route them as before.
    assert content_keys(ids, (ids != 0).long()).tolist() == [4677729080684622770, 8706346318903761883]
    assert content_keys(ids).tolist() == [6897930242998420787, 8706346318903761883]
    assert content_keys(embeds).tolist() == content_keys(embeds, torch.ones(2, 3)).tolist() == [
        6762032385052424212, 1800338025971685578]
    assert content_keys(pixels).tolist() == [3132780902286355316, 4887708993289078119]
    # An example alone, left-padded, right-padded and padded on both sides: one key, the element-by-element formula's.
    example = torch.tensor([5, 9, 3, 1])
    layouts = [(0, 0), (3, 0), (0, 2), (2, 1)]
    batch = torch.zeros(len(layouts), 7, dtype=torch.long)
    for row, (left, _) in enumerate(layouts):
        batch[row, left:left + 4] = example
    mask = (batch != 0).long()
    keys = content_keys(batch, mask).tolist()
    assert keys == [content_keys(example[None]).item()] * 4 == [reference_content_key(example[:, None], [1] * 4)] * 4
    assert keys[0] == 4677729080684622770
    # Embeddings [B, S, C]: padding positions are left out whole; left padding does not shift the key.
    table = torch.randn(64, 3)
    assert content_keys(table[batch], mask).tolist() == [content_keys(table[example][None]).item()] * 4
    assert keys[0] == reference_content_key(batch[1], mask[1].tolist())
    assert content_keys(table[batch], mask)[2].item() == reference_content_key(table[batch[2]], mask[2].tolist())
    # The content still matters: another token, or the same tokens in another order, is another key.
    assert len(set(content_keys(torch.tensor([[5, 9, 3, 1], [5, 9, 3, 2], [9, 5, 3, 1]])).tolist())) == 3
    with pytest.raises(ValueError, match="batch, positions"):
        content_keys(batch, mask[:, :5])


def test_hash_routing_without_keys_is_the_same_alone_left_or_right_padded_from_ids_or_embeddings():
    model = build("hash").eval()
    embed = model.get_input_embeddings()
    example = torch.tensor([[5, 9, 3, 1]])
    other = torch.tensor([[8, 8, 8, 8, 8, 1]])
    decoder_ids = torch.zeros(2, 2, dtype=torch.long)

    def run(**inputs):
        with RoutingRecorder(model) as recorder, torch.no_grad():
            logits = model(**inputs, decoder_input_ids=decoder_ids[: len(next(iter(inputs.values())))]).logits
        return {block: recorder.chosen(block).tolist() for block in recorder.block_names}, logits

    alone, alone_logits = run(input_ids=example)
    alone_embeds, alone_embeds_logits = run(inputs_embeds=embed(example))
    assert len({tuple(v) for v in alone.values()}) > 1  # (ids and embeddings are different contents: other keys)
    for left in (True, False):
        padding = torch.zeros(1, 2, dtype=torch.long)
        row = torch.cat([padding, example] if left else [example, padding], 1)
        batch = torch.cat([other, row])
        mask = (batch != 0).long()
        batched, batched_logits = run(input_ids=batch, attention_mask=mask)
        batched_embeds, embeds_logits = run(inputs_embeds=embed(batch), attention_mask=mask)
        assert {b: v[1:] for b, v in batched.items()} == alone
        assert {b: v[1:] for b, v in batched_embeds.items()} == alone_embeds
        torch.testing.assert_close(batched_logits[1], alone_logits[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(embeds_logits[1], alone_embeds_logits[0], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# Monolithic
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant,width", [("compute", 8), ("params", 32)])
def test_monolithic_is_one_expert_for_every_example(variant, width):
    model = build("monolithic", monolithic_params=variant, init_weights=False).eval()
    block = first_block(model)
    experts = block.smear_experts["default"]
    assert experts.down_weight.shape == (1, 32, width)  # "1x params": the bottleneck is N = 4 times wider
    assert len(block.smear_router) == 0
    y = torch.randn(3, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(block.apply_block("default", y), block_reference(block, y, torch.ones(3, 1)))
