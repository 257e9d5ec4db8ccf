"""RoutingRecorder and routing heatmaps on a tiny T5."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model

from smear_peft import SmearConfig, SmearLayer
from smear_peft.analysis import RoutingMeans, RoutingRecorder, plot_routing_heatmaps

from .conftest import tiny_t5

TASKS = ["mnli", "rte", "sst2"]


def build(routing="smear", **config):
    values = dict(num_experts=4, reduction_factor=4, routing=routing, tag_names=TASKS, init_weights=False)
    values.update(config)
    torch.manual_seed(0)
    return get_peft_model(tiny_t5(), SmearConfig(**values)).eval()


def encoder_block0(model) -> SmearLayer:
    return next(m for m in model.modules() if isinstance(m, SmearLayer))


def test_recorder_stores_probabilities_choices_and_tags_per_block(t5_batch):
    model = build()
    block = encoder_block0(model)
    seen = []
    handle = block.base_layer.register_forward_hook(lambda module, args, output: seen.append(output[0]))
    with RoutingRecorder(model) as recorder, torch.no_grad():
        model(**t5_batch, routing_tags=["rte", "mnli", "rte"])
        model(**t5_batch, routing_tags=[2, 2, 0])
    assert len(recorder.block_names) == 10
    assert recorder.block_names[0] == "encoder.block.0.layer.0.SelfAttention"
    for name in recorder.block_names:
        probs = recorder.probs(name)
        assert probs.shape == (6, 4) and probs.dtype == torch.float32 and probs.device.type == "cpu"
        assert not probs.requires_grad
        torch.testing.assert_close(probs.sum(-1), torch.ones(6))
        assert torch.equal(recorder.chosen(name), probs.argmax(-1))  # soft method: the top expert
        assert recorder.tags(name).tolist() == [1, 0, 1, 2, 2, 0]
        assert recorder.expert_counts(name).sum() == 6
    handle.remove()
    # the recorded probabilities are the router's: softmax(router(masked mean of the sublayer output))
    mask = t5_batch["attention_mask"].float()[:, :, None]
    expected = [F.softmax(block.smear_router["default"]((y * mask).sum(1) / mask.sum(1))[0], -1) for y in seen]
    torch.testing.assert_close(recorder.probs(block.block_name), torch.cat(expected))
    assert recorder.records[block.block_name].side == "encoder"
    assert recorder.records["decoder.block.0.layer.1.EncDecAttention"].side == "decoder"


def test_mean_probs_per_tag_is_the_mean_over_each_tags_examples(t5_batch):
    model = build()
    with RoutingRecorder(model) as recorder, torch.no_grad():
        model(**t5_batch, routing_tags=["rte", "mnli", "rte"])
        model(**t5_batch, routing_tags=[2, 2, 0])
    means = recorder.mean_probs_per_tag()
    assert isinstance(means, RoutingMeans)
    assert means.tags == [0, 1, 2] and means.tag_labels == TASKS
    assert means.means.shape == (10, 3, 4)
    for b, name in enumerate(recorder.block_names):
        probs, tags = recorder.probs(name), recorder.tags(name)
        for t in range(3):
            torch.testing.assert_close(means.means[b, t], probs[tags == t].mean(0))
        assert means.counts[b].tolist() == [2, 2, 2]
        torch.testing.assert_close(means.block(name), means.means[b])
    assert means.sides[:4] == ["encoder"] * 4 and means.sides[4:] == ["decoder"] * 6

    untagged = RoutingRecorder(model)
    with untagged, torch.no_grad():
        model(**t5_batch)
    plain = untagged.mean_probs_per_tag()
    assert plain.tag_labels == ["all"] and plain.means.shape == (10, 1, 4)
    torch.testing.assert_close(plain.means[0, 0], untagged.probs(untagged.block_names[0]).mean(0))


def test_recorder_under_beam_search_sees_every_beam_with_its_examples_tag():
    model = build()
    ids = torch.randint(2, 64, (2, 5))
    with RoutingRecorder(model) as recorder:
        model.generate(input_ids=ids, routing_tags=["sst2", "mnli"], num_beams=3, max_new_tokens=3)
    assert recorder.tags("encoder.block.0.layer.0.SelfAttention").tolist() == [2, 0]
    decoder = "decoder.block.1.layer.2.DenseReluDense"
    assert recorder.tags(decoder).tolist() == [2, 2, 2, 0, 0, 0]  # routed once per generate call, per beam
    probs = recorder.probs(decoder)
    assert torch.equal(probs[0], probs[2]) and torch.equal(probs[3], probs[5])


def test_discrete_and_monolithic_methods_record_what_they_used(t5_batch):
    model = build("tag")
    with RoutingRecorder(model) as recorder, torch.no_grad():
        model(**t5_batch, routing_tags=["sst2", "mnli", "rte"])
    for name in recorder.block_names:
        assert recorder.chosen(name).tolist() == [2, 0, 1]
        assert torch.equal(recorder.probs(name), F.one_hot(torch.tensor([2, 0, 1]), 4).float())
    model = build("monolithic")
    with RoutingRecorder(model) as recorder, torch.no_grad():
        model(**t5_batch)
    assert torch.equal(recorder.probs(recorder.block_names[0]), torch.ones(3, 1))
    assert recorder.chosen(recorder.block_names[-1]).tolist() == [0, 0, 0]
    model = build("reinforce").train()
    with RoutingRecorder(model) as recorder:
        model(**t5_batch, routing_tags=[0, 1, 2])
    name = recorder.block_names[0]
    assert not recorder.probs(name).requires_grad
    assert recorder.probs(name).gather(-1, recorder.chosen(name)[:, None]).min() > 0  # sampled experts


@pytest.mark.parametrize("routing,top_k", [("smear", 1), ("ensemble", 1), ("top_k", 1), ("top_k", 2),
                                           ("st_gumbel", 1), ("reinforce", 1), ("tag", 1), ("monolithic", 1)])
def test_recorder_weights_are_what_each_routing_did_with_its_experts(t5_batch, routing, top_k):
    """`weights` (what export uses) per method, in evaluation: the merge / mixing weights, top-k's renormalised
    weights at its experts (k=1: p_argmax at the argmax), the one-hot of a discrete method's expert."""
    model = build(routing, top_k=top_k)
    with RoutingRecorder(model) as recorder, torch.no_grad():
        model(**t5_batch, routing_tags=[2, 0, 1])
    for name in recorder.block_names:
        probs, weights, record = recorder.probs(name), recorder.weights(name), recorder.records[name]
        assert record.adapter == "default" and record.module == name and not record.segmented
        if routing == "monolithic":
            assert torch.equal(weights, torch.ones(3, 1)) and record.mixture is None
            continue
        if routing in ("smear", "ensemble"):
            expected = probs
        elif routing == "top_k":
            top, index = probs.topk(top_k, dim=-1)
            expected = torch.zeros(3, 4).scatter(1, index, top / top.sum(-1, keepdim=True) if top_k > 1 else top)
        else:  # st_gumbel / reinforce (argmax in evaluation), tag: the expert used, unscaled
            expected = F.one_hot(recorder.chosen(name), 4).float()
            assert torch.equal(recorder.chosen(name), probs.argmax(-1)) or routing == "tag"
        torch.testing.assert_close(weights, expected, rtol=0, atol=1e-7)
        assert record.mixture == ("parameters" if routing == "smear" else "outputs")
    means = recorder.mean_probs_per_tag()
    assert means.adapters == ["default"] * 10 and means.modules == recorder.block_names
    for b, name in enumerate(recorder.block_names):
        for t in range(3):
            torch.testing.assert_close(means.weights[b, t], recorder.weights(name)[recorder.tags(name) == t].mean(0))


def test_recorder_names_each_blocks_adapter_and_marks_segments():
    from .test_expert_types import tiny_llama

    config = dict(expert_type="lora", num_experts=3, r=2, init_weights=False)
    model = get_peft_model(tiny_llama(), SmearConfig(**config))
    model.add_adapter("b", SmearConfig(**config))
    model.base_model.set_adapter(["default", "b"])
    ids = torch.randint(2, 64, (2, 5))
    with RoutingRecorder(model) as both, torch.no_grad():
        model(input_ids=ids, routing_mask=torch.ones_like(ids))
    block = "model.layers.0.self_attn.q_proj"
    assert both.adapters == ["default", "b"]
    assert both.records[block].adapter == "default" and both.records[block + "@b"].adapter == "b"
    assert both.records[block + "@b"].module == block
    with RoutingRecorder(model, adapter="b") as only_b, torch.no_grad():
        model(input_ids=ids, routing_mask=torch.ones_like(ids))
    assert only_b.adapters == ["b"] and only_b.records[block].adapter == "b"
    torch.testing.assert_close(only_b.weights(block), both.weights(block + "@b"))

    segmented = get_peft_model(tiny_llama(), SmearConfig(**config, causal_routing="segment", segment_length=2))
    with RoutingRecorder(segmented) as recorder, torch.no_grad():
        segmented(input_ids=ids)
    assert recorder.records[block].segmented and recorder.weights(block).shape == (6, 3)  # 2 examples x 3 segments
    assert recorder.mean_probs_per_tag().segmented == [True] * len(recorder.block_names)


def partition_like_zero3(model):
    """Outside its own forward, every adapter expert stack holds an empty tensor (ZeRO-3 / FSDP1 keep only a flat
    shard there); a pre-hook puts the full tensors back for the forward and a post-hook empties them again."""
    from smear_peft.experts import Experts
    from smear_peft.expert_types import IA3Experts, LoraExperts

    handles = []
    for module in model.modules():
        if isinstance(module, (Experts, LoraExperts, IA3Experts)):
            full = {name: p.data for name, p in module.named_parameters(recurse=False)}

            def gather(mod, args, full=full):
                for name, p in mod.named_parameters(recurse=False):
                    p.data = full[name]

            def release(mod, args, output):
                for p in mod.parameters(recurse=False):
                    p.data = torch.empty(0, dtype=p.dtype)

            handles += [module.register_forward_pre_hook(gather), module.register_forward_hook(release)]
            release(module, None, None)
    return handles


@pytest.mark.parametrize("expert_type", ["adapter", "lora", "ia3"])
@pytest.mark.parametrize("routing", ["tag", "hash", "top_k", "smear"])
def test_recorder_reads_the_expert_count_from_the_config_not_from_sharded_parameters(t5_batch, routing, expert_type):
    typed = {} if expert_type == "adapter" else dict(expert_type=expert_type)
    model = build(routing, num_experts=5, **typed)
    kwargs = dict(routing_tags=[2, 0, 1]) if routing == "tag" else {}
    if routing == "hash":
        kwargs = dict(routing_keys=[11, 12, 13])
    with RoutingRecorder(model) as full, torch.no_grad():
        want = model(**t5_batch, **kwargs).logits
    partition_like_zero3(model)
    with RoutingRecorder(model) as sharded, torch.no_grad():
        got = model(**t5_batch, **kwargs).logits
    assert torch.equal(got, want)  # expert parameters are used only inside their module's forward
    for name in full.block_names:
        assert sharded.records[name].num_experts == 5
        assert torch.equal(sharded.probs(name), full.probs(name))
        assert torch.equal(sharded.expert_counts(name), full.expert_counts(name))


def test_recorder_is_off_outside_its_block_and_nests(t5_batch, monkeypatch):
    model = build()
    frames = model.base_model.frames

    def current_recorder():
        frame = frames.current()
        return None if frame is None else frame.recorder

    assert current_recorder() is None
    outer, inner = RoutingRecorder(model), RoutingRecorder(model)
    with outer:
        assert current_recorder() is outer
        with inner, torch.no_grad():
            assert current_recorder() is inner
            model(**t5_batch)
        assert current_recorder() is outer
        with pytest.raises(RuntimeError), torch.no_grad():
            with RoutingRecorder(model):
                raise RuntimeError("boom")
        assert current_recorder() is outer
    assert current_recorder() is None and frames.current() is None
    assert outer.block_names == [] and len(inner.block_names) == 10

    def fail(*args, **kwargs):
        raise AssertionError("recorded without a recorder")

    monkeypatch.setattr(RoutingRecorder, "record", fail)
    with torch.no_grad():
        model(**t5_batch)  # no recorder, no recording work


def test_recorder_accepts_the_smear_model_and_filters_adapters(t5_batch):
    model = build()
    with RoutingRecorder(model.base_model, adapter="other") as recorder, torch.no_grad():
        model(**t5_batch)
    assert recorder.block_names == []
    with pytest.raises(ValueError, match="holds nothing"):
        recorder.mean_probs_per_tag()
    with pytest.raises(TypeError, match="no SMEAR adapter"):
        RoutingRecorder(torch.nn.Linear(2, 2))


def test_plot_routing_heatmaps_draws_one_tags_by_experts_map_per_block(t5_batch, tmp_path):
    model = build()
    with RoutingRecorder(model) as recorder, torch.no_grad():
        model(**t5_batch, routing_tags=["rte", "mnli", "sst2"])
    path = tmp_path / "routing.png"
    figure = plot_routing_heatmaps(recorder, path, ncols=4, title="tiny T5")
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    panels = [ax for ax in figure.axes if ax.images]
    assert len(panels) == 10
    means = recorder.mean_probs_per_tag()
    for ax, block in zip(panels, means.means):
        assert ax.images[0].get_array().shape == (3, 4)
        torch.testing.assert_close(torch.as_tensor(ax.images[0].get_array().data, dtype=torch.float32), block)
    assert [t.get_text() for t in panels[0].get_yticklabels()] == TASKS
    assert panels[0].get_title() == "enc 0 SelfAttention"
    assert len(figure.axes) == 12 + 1  # 3 x 4 grid (2 empty) + colour bar

    subset = plot_routing_heatmaps(means, None, blocks=means.blocks[:2])
    assert len([ax for ax in subset.axes if ax.images]) == 2
