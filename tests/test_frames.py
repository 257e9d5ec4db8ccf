"""Routing state belongs to one call: threads, nested scopes, strict per-call inputs, checkpoint recomputation."""

from __future__ import annotations

import threading

import pytest
import torch
from peft import get_peft_model

from smear_peft import SmearConfig
from smear_peft.losses import reinforce_loss

from .conftest import tiny_t5


def randomised(model, seed: int):
    """``model`` in eval mode with its adapters and routers drawn away from their init, so that routing matters."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "smear_" in name:
                param.normal_(0.0, 0.3)
    return model.eval()


def smear_t5(**config):
    return randomised(get_peft_model(tiny_t5(), SmearConfig(num_experts=4, reduction_factor=4, **config)), seed=2)


def batch(seed: int, size: int = 3):
    torch.manual_seed(seed)
    ids = torch.randint(2, 64, (size, 6))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(2, 64, (size, 3))}


def test_two_threads_with_different_tags_and_inputs_are_exact():
    model = smear_t5(routing="tag")
    jobs = [(batch(10 + i), torch.tensor([i % 4, (i + 1) % 4, (i + 2) % 4])) for i in range(4)]
    with torch.no_grad():
        expected = [model(**inputs, routing_tags=tags).logits for inputs, tags in jobs]
    failures = []

    def worker(offset: int):
        with torch.no_grad():
            for call in range(100):
                index = (offset + call) % len(jobs)
                inputs, tags = jobs[index]
                if not torch.equal(model(**inputs, routing_tags=tags).logits, expected[index]):
                    failures.append((offset, call))

    threads = [threading.Thread(target=worker, args=(offset,)) for offset in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert model.base_model.frames.current() is None


def test_threads_calling_forward_and_generate_concurrently_are_exact():
    model = smear_t5()
    inputs = [batch(20), batch(21)]
    with torch.no_grad():
        logits = model(**inputs[0]).logits
        generated = model.generate(input_ids=inputs[1]["input_ids"], attention_mask=inputs[1]["attention_mask"], max_new_tokens=4)
    failures = []

    def forward():
        with torch.no_grad():
            for _ in range(30):
                failures.extend(["forward"] if not torch.equal(model(**inputs[0]).logits, logits) else [])

    def generate():
        with torch.no_grad():
            for _ in range(10):
                out = model.generate(input_ids=inputs[1]["input_ids"], attention_mask=inputs[1]["attention_mask"], max_new_tokens=4)
                failures.extend(["generate"] if not torch.equal(out, generated) else [])

    threads = [threading.Thread(target=forward), threading.Thread(target=generate)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_nested_routing_inputs_and_per_call_tags_restore_the_outer_state():
    model = smear_t5(routing="tag")
    inputs = batch(30)
    outer, inner, own = torch.tensor([0, 1, 2]), torch.tensor([3, 3, 3]), torch.tensor([2, 0, 1])
    with torch.no_grad():
        reference = {name: model(**inputs, routing_tags=tags).logits for name, tags in
                     (("outer", outer), ("inner", inner), ("own", own))}
        with model.base_model.routing_inputs(routing_tags=outer):
            assert torch.equal(model(**inputs).logits, reference["outer"])
            assert torch.equal(model(**inputs, routing_tags=own).logits, reference["own"])
            assert torch.equal(model(**inputs).logits, reference["outer"])  # the call's own tags did not leak
            with model.base_model.routing_inputs(routing_tags=inner):
                assert torch.equal(model(**inputs).logits, reference["inner"])
            assert torch.equal(model(**inputs).logits, reference["outer"])
    assert model.base_model.frames.current() is None
    with pytest.raises(ValueError, match="routing_tags"):
        model(**inputs)  # no tags outside the block


def test_reinforce_terms_belong_to_their_forward():
    model = smear_t5(routing="reinforce")
    model.train()
    first, second = batch(40), batch(41, size=2)
    torch.manual_seed(0)
    out = model(**first)
    losses = torch.arange(3, dtype=torch.float32)
    alone = reinforce_loss(out, losses)
    model(**second)  # another forward (e.g. an evaluation batch) in between
    with torch.no_grad():
        model.eval()
        model(**second)
    assert torch.equal(reinforce_loss(out, losses), alone)
    assert alone.requires_grad


def test_tags_and_keys_must_match_the_batch_exactly_in_forward():
    model = smear_t5(routing="tag")
    inputs = {k: v for k, v in batch(50, size=4).items()}
    for bad, message in (
        ([0, 1], "exactly one per example"),
        ([0.0, 1.0, 2.0, 3.0], "integer"),
        (torch.tensor([0.0, 1.0, 2.0, 3.0]), "integers"),
        ([[0, 1], [2, 3]], "integer"),
        ([True, False, True, False], "integer"),
        (torch.tensor([[0, 1], [2, 3]]), "1-D"),
    ):
        with pytest.raises(ValueError, match=message):
            model(**inputs, routing_tags=bad)
    with pytest.raises(ValueError, match="exactly one per example"):
        smear_t5(routing="hash")(**inputs, routing_keys=[1, 2])
    assert model.base_model.frames.current() is None


def test_generate_repeats_tags_for_beams_and_return_sequences_only():
    model = smear_t5(routing="tag")
    inputs = batch(60, size=2)
    with torch.no_grad():
        out = model.generate(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], routing_tags=[1, 2], num_beams=3,
            num_return_sequences=2, max_new_tokens=3,
        )
    assert out.shape[0] == 4


def test_an_attention_mask_passed_positionally_is_used_for_routing():
    model = smear_t5()
    base = model.get_base_model()
    inputs = batch(70)
    decoder_input_ids = torch.zeros(3, 2, dtype=torch.long)
    with torch.no_grad():
        by_name = base(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], decoder_input_ids=decoder_input_ids).logits
        positional = base(inputs["input_ids"], inputs["attention_mask"], decoder_input_ids=decoder_input_ids).logits
        unmasked = base(input_ids=inputs["input_ids"], decoder_input_ids=decoder_input_ids).logits
    assert torch.equal(by_name, positional)
    assert (by_name[0] - unmasked[0]).abs().max() > 1e-5  # example 0 has padding, which routing ignores


def test_an_attention_mask_routing_cannot_read_is_an_error_unless_routing_does_not_need_it():
    import transformers

    def classifier(**config):
        llama = transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, num_labels=3,
        )
        torch.manual_seed(0)
        base = transformers.LlamaForSequenceClassification(llama).eval()  # routes on each block's own input
        model = get_peft_model(base, SmearConfig(num_experts=4, reduction_factor=4, target_modules=["o_proj", "down_proj"], **config))
        return randomised(model, seed=1)

    torch.manual_seed(3)
    ids = torch.randint(2, 64, (2, 6))
    ids[1, 4:] = 0
    mask = (ids != 0).long()
    allowed = torch.tril(torch.ones(6, 6, dtype=torch.bool))[None, None] & mask.bool()[:, None, None, :]
    four_d = allowed | torch.eye(6, dtype=torch.bool)[None, None]  # [B, 1, S, S], the model's own business
    with torch.no_grad():
        # the masked mean over real positions, and content keys over real tokens, need the padding
        for config in (dict(), dict(routing="hash")):
            with pytest.raises(ValueError, match=r"4-D tensor of shape \(2, 1, 6, 6\).*pass the 2-D padding mask") as error:
                classifier(**config)(input_ids=ids, attention_mask=four_d)
            assert "routing_mask" not in str(error.value)  # a causal LM's prompt option, not this model's
        # tags, explicit hash keys and the authors' unmasked mean do not
        for config, extra in ((dict(routing="tag"), dict(routing_tags=[0, 1])), (dict(routing="hash"), dict(routing_keys=[3, 4]))):
            model = classifier(**config)
            torch.testing.assert_close(model(input_ids=ids, attention_mask=four_d, **extra).logits,
                                       model(input_ids=ids, attention_mask=mask, **extra).logits, rtol=0, atol=1e-6)
        assert torch.isfinite(classifier(pooling="mean")(input_ids=ids, attention_mask=four_d).logits).all()
        # decoder blocks of an encoder-decoder average the encoder output over its real positions
        model = smear_t5()
        states = torch.randn(2, 6, 32)
        with pytest.raises(ValueError, match="encoder_attention_mask is a 4-D tensor.*as encoder_attention_mask"):
            model.get_base_model().get_decoder()(
                input_ids=torch.zeros(2, 1, dtype=torch.long), encoder_hidden_states=states, encoder_attention_mask=four_d
            )
        # generate() keeps the encoder's 2-D mask even with a static cache (only the decoder's self-attention mask is 4-D)
        kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        assert torch.equal(model.generate(**kwargs, cache_implementation="static"), model.generate(**kwargs))
    assert model.base_model.frames.current() is None


def test_num_experts_must_be_a_real_integer():
    with pytest.raises(ValueError, match="num_experts"):
        SmearConfig(num_experts=True)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_layers_recompute_in_their_calls_frame(reentrant):
    """Tag routing needs the call's tags when a checkpointed layer is recomputed in the backward pass."""
    inputs, tags = batch(80), torch.tensor([3, 0, 2])

    def gradients(checkpointing: bool):
        model = smear_t5(routing="tag")
        model.train()
        if checkpointing:
            model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model(**inputs, routing_tags=tags).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_reinforce_under_non_reentrant_checkpointing_equals_no_checkpointing():
    """The recomputed layers save the same tensors as the forward (the baseline included) and record no second set of
    terms: task and REINFORCE gradients equal those without checkpointing."""
    inputs = batch(85)

    def gradients(checkpointing: bool):
        model = smear_t5(routing="reinforce")
        model.train()
        if checkpointing:
            model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(7)  # the sampled experts
        out = model(**inputs)
        (out.loss + reinforce_loss(out, torch.tensor([1.0, 2.0, 4.0]))).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    assert any("smear_baseline" in name for name in plain) and any("smear_router" in name for name in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_reinforce_terms_ride_on_a_bare_tensor_output():
    """A model whose forward returns one tensor (no ModelOutput) still carries its REINFORCE terms."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    model = get_peft_model(mlp, SmearConfig(num_experts=3, bottleneck_size=4, target_modules=["0"], routing="reinforce"))
    model.train()
    out = model(torch.randn(5, 6))
    assert isinstance(out, torch.Tensor)
    loss = reinforce_loss(out, torch.arange(5.0))
    assert loss.requires_grad and loss.item() != 0.0
    loss.backward()
    assert model.base_model.model[0].smear_router["default"].weight.grad.abs().sum() > 0


def test_reinforce_with_reentrant_checkpointing_names_the_fix():
    model = smear_t5(routing="reinforce")
    model.train()
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(RuntimeError, match="use_reentrant': False"):
        model(**batch(90))


def test_no_frame_outlives_a_call_that_failed():
    model = smear_t5(routing="tag")
    with pytest.raises(ValueError):
        model(**batch(95))  # tag routing without tags
    assert model.base_model.frames.current() is None


def test_inference_mode_gives_the_no_grad_outputs():
    """Under torch.inference_mode (no version counters) blocks still route, each on its own pooled input."""
    from .test_expert_types import tiny_llama

    t5 = smear_t5()
    llama = get_peft_model(tiny_llama(), SmearConfig(expert_type="lora", num_experts=3, r=4, init_weights=False)).eval()
    ids = torch.randint(2, 60, (2, 5))
    for model, inputs in ((t5, batch(99)), (llama, {"input_ids": ids, "labels": torch.where(torch.arange(5) < 3, -100, ids)})):
        with torch.no_grad():
            expected = model(**inputs).logits
        with torch.inference_mode():
            assert torch.equal(model(**inputs).logits, expected)


def test_pooled_routing_inputs_accumulate_float16_in_float32():
    from smear_peft.frames import RoutingFrame, pool
    from smear_peft.sources import CausalSegment

    # 2000 positions of 40.0: a float16 sum (80000) overflows to inf; float16 counts past 2048 are inexact (3001 -> 3000)
    for positions, value in ((2000, 40.0), (3001, 1.0)):
        states = torch.full((2, positions, 4), value, dtype=torch.float16)
        mask = torch.ones(2, positions, dtype=torch.long)
        mask[1, positions // 2:] = 0
        states[1, positions // 2:] = 1000.0  # padding, left out of the masked mean
        expected = torch.full((2, 4), value, dtype=torch.float16)
        assert torch.equal(pool(states, mask, "masked_mean"), expected)
        assert torch.equal(pool(states[:1], None, "mean"), expected[:1])
        assert pool(states, mask).dtype == torch.float16
    # The mean of random values: the float32 mean of the same float16 numbers, rounded once to float16.
    torch.manual_seed(0)
    states = (torch.randn(3, 2500, 8) * 30 + 20).half()
    mask = torch.rand(3, 2500) > 0.3
    reference = (states.float() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    assert torch.equal(pool(states, mask), reference.half())
    assert torch.equal(pool(states, None, "mean"), states.float().mean(1).half())
    # float32 and float64 inputs: unchanged (summed in their own dtype)
    for dtype in (torch.float32, torch.float64):
        wide = states.to(dtype)
        weights = mask.to(dtype).unsqueeze(-1)
        assert torch.equal(pool(wide, mask), (wide * weights).sum(1) / weights.sum(1).clamp_min(1.0))
    # Causal segments: the segment sums too (a 2500-token segment of 40.0; the next segment routes on its mean).
    states = torch.full((1, 5000, 4), 40.0, dtype=torch.float16)
    plan = CausalSegment(2500).plan(object(), "default", states, RoutingFrame(kind="forward"), needs_input=True)
    assert plan.pooled.dtype == torch.float16
    assert torch.equal(plan.pooled, torch.tensor([[0.0] * 4, [40.0] * 4], dtype=torch.float16))
