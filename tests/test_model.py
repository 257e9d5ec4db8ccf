"""SmearModel inside PEFT on tiny T5s: training, invariances, generation, save/load, the adapter API, the Hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from unittest import mock

import pytest
import smear_peft
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from smear_peft import SmearConfig, SmearLayer

from .conftest import tiny_t5, tiny_t5_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smear_t5(seed=0, **config):
    values = dict(num_experts=4, reduction_factor=4)
    values.update(config)
    return get_peft_model(tiny_t5(seed), SmearConfig(**values)).eval()


def randomise_adapters(model, seed=7):
    """Move adapters away from their near-uniform init so that tests can tell adapters apart."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "smear_" in name:
                param.normal_(0, 0.5)


def test_get_peft_model_with_the_authors_trainable_set():
    model = smear_t5()
    assert type(model) is PeftModel
    trainable, total = model.get_nb_trainable_parameters()
    # per block: router C*N + 4C, experts N (C d + d + d C), post-LN 2C; C=32, N=4, d=8; plus T5's 12 layer norms
    per_block = 32 * 4 + 4 * 32 + 4 * (32 * 8 + 8 + 8 * 32) + 2 * 32
    assert trainable == 10 * per_block + 12 * 32
    trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("smear_" in n or "layer_norm" in n for n in trainable_names)
    assert not any("SelfAttention.base_layer" in n or "lm_head" in n or "shared" in n for n in trainable_names)


def test_t5_v1_1_base_gets_60_blocks_and_the_authors_parameter_count():
    from transformers import T5ForConditionalGeneration

    config = tiny_t5_config(
        vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12
    )
    model = get_peft_model(T5ForConditionalGeneration(config), SmearConfig(num_experts=8, routing="smear"))
    layers = list(model.base_model.smear_layers())
    assert len(layers) == 60 and {layer.smear_experts["default"].num_experts for layer in layers} == {8}
    assert layers[0].smear_experts["default"].down_weight.shape == (8, 768, 24)
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == 60 * 305_856 + 62 * 768 == 18_398_976  # ~18.4M, as in the authors' code
    model.train()
    batch = {"input_ids": torch.randint(2, 32128, (2, 12)), "labels": torch.randint(2, 32128, (2, 3))}
    model(**batch).loss.backward()
    assert layers[30].smear_router["default"].weight.grad.abs().sum() > 0


def test_training_step_reaches_adapters_routers_and_layer_norms_only(t5_batch):
    model = smear_t5()
    model.train()
    model(**t5_batch).loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_few_adamw_steps_fit_a_batch(t5_batch):
    model = smear_t5()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model(**t5_batch).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < 0.7 * losses[0]


def test_example_alone_equals_example_in_a_padded_batch(t5_batch):
    model = smear_t5()
    randomise_adapters(model)
    with torch.no_grad():
        batch_logits = model(**t5_batch).logits
        for b in range(3):
            length = int(t5_batch["attention_mask"][b].sum())
            alone = model(
                input_ids=t5_batch["input_ids"][b : b + 1, :length],
                attention_mask=t5_batch["attention_mask"][b : b + 1, :length],
                labels=t5_batch["labels"][b : b + 1],
            ).logits
            torch.testing.assert_close(alone[0], batch_logits[b], rtol=1e-5, atol=1e-5)


def test_authors_unmasked_mean_depends_on_padding(t5_batch):
    model = smear_t5(pooling="mean")
    randomise_adapters(model)
    with torch.no_grad():
        batch_logits = model(**t5_batch).logits
        alone = model(
            input_ids=t5_batch["input_ids"][:1, :5], attention_mask=t5_batch["attention_mask"][:1, :5], labels=t5_batch["labels"][:1]
        ).logits
    assert (alone[0] - batch_logits[0]).abs().max() > 1e-3


def _gradients(t5_batch, checkpointing):
    model = smear_t5(expert_dropout=0.0)
    randomise_adapters(model)
    model.train()
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
    model(**t5_batch).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_gives_the_same_gradients(t5_batch):
    reference = _gradients(t5_batch, None)
    encoder_router = "base_model.model.encoder.block.0.layer.0.SelfAttention.smear_router.default.weight"
    assert reference[encoder_router].abs().sum() > 0
    for use_reentrant in (True, False):
        grads = _gradients(t5_batch, use_reentrant)
        assert grads.keys() == reference.keys()
        for name in reference:
            torch.testing.assert_close(grads[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)


def test_decoder_routing_gradient_flows_into_the_encoder(t5_batch):
    """Like the authors' code, decoder routers see the (non-detached) encoder output."""
    model = smear_t5(expert_dropout=0.0)
    randomise_adapters(model)
    model.train()
    encoder_states = model.get_encoder()(input_ids=t5_batch["input_ids"], attention_mask=t5_batch["attention_mask"])
    encoder_states.last_hidden_state.retain_grad()
    # only decoder routers depend on the encoder output through the pooled vector: freeze cross-attention values
    for layer in model.base_model.smear_layers():
        if layer.side == "decoder":
            layer.smear_router["default"].weight.data.mul_(50)
    out = model(encoder_outputs=encoder_states, attention_mask=t5_batch["attention_mask"], labels=t5_batch["labels"])
    out.loss.backward()
    with_routing = encoder_states.last_hidden_state.grad.clone()
    # the same model whose decoder routing input is detached must give a different encoder gradient
    import smear_peft.hooks as hooks

    original = hooks.RelayRoutingGradient
    encoder_states = model.get_encoder()(input_ids=t5_batch["input_ids"], attention_mask=t5_batch["attention_mask"])
    encoder_states.last_hidden_state.retain_grad()
    no_relay = mock.Mock(apply=lambda states, leaves, *sources: states)
    with mock.patch.object(hooks, "RelayRoutingGradient", no_relay):
        model(encoder_outputs=encoder_states, attention_mask=t5_batch["attention_mask"], labels=t5_batch["labels"]).loss.backward()
    assert original is hooks.RelayRoutingGradient
    assert (with_routing - encoder_states.last_hidden_state.grad).abs().max() > 1e-6


def test_greedy_generate_equals_step_by_step_decoding(t5_batch):
    model = smear_t5()
    randomise_adapters(model)
    inputs = {"input_ids": t5_batch["input_ids"], "attention_mask": t5_batch["attention_mask"]}
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        decoded = torch.zeros(3, 1, dtype=torch.long)
        for _ in range(5):
            logits = model(**inputs, decoder_input_ids=decoded).logits[:, -1]
            decoded = torch.cat([decoded, logits.argmax(-1, keepdim=True)], dim=1)
    finished = (generated == 1).cumsum(1) > 0  # positions after EOS are padding in generate
    assert torch.equal(generated.masked_fill(finished, 0)[:, : decoded.shape[1]], decoded.masked_fill(finished[:, : decoded.shape[1]], 0))


def test_beam_search_runs_and_matches_per_example_beam_search(t5_batch):
    model = smear_t5()
    randomise_adapters(model)
    inputs = {"input_ids": t5_batch["input_ids"], "attention_mask": t5_batch["attention_mask"]}
    with torch.no_grad():
        beams = model.generate(**inputs, num_beams=3, max_new_tokens=4, early_stopping=True)
        first = model.generate(input_ids=inputs["input_ids"][:1, :5], attention_mask=inputs["attention_mask"][:1, :5], num_beams=3, max_new_tokens=4, early_stopping=True)
    assert beams.shape[0] == 3
    assert torch.equal(beams[0, : first.shape[1]], first[0])


def test_save_and_load_give_identical_logits(tmp_path, t5_batch):
    model = smear_t5()
    randomise_adapters(model)
    with torch.no_grad():
        expected = model(**t5_batch).logits
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SMEAR" and saved["routing"] == "smear" and saved["num_experts"] == 4
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert all(".default" not in k for k in keys)
    assert any(k.endswith("smear_experts.down_weight") for k in keys)
    assert any(k.endswith("layer_norm.weight") for k in keys)  # the trained backbone layer norms travel too
    loaded = PeftModel.from_pretrained(tiny_t5(), tmp_path)
    assert type(loaded) is PeftModel  # task_type=None, as saved
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(**t5_batch).logits, expected, rtol=0, atol=0)
    other = PeftModel.from_pretrained(tiny_t5(), tmp_path, adapter_name="other")
    with torch.no_grad():
        torch.testing.assert_close(other(**t5_batch).logits, expected, rtol=0, atol=0)
    result = loaded.load_adapter(tmp_path, adapter_name="second")
    assert result.missing_keys == [] or all("second" not in k for k in result.missing_keys)


def test_load_from_hub_repo_id_through_offline_cache(tmp_path, t5_batch):
    model = smear_t5()
    randomise_adapters(model)
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    with torch.no_grad():
        expected = model(**t5_batch).logits
    snapshot = tmp_path / "hub" / "models--someuser--tiny-smear" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (snapshot / name).write_bytes((adapter_dir / name).read_bytes())
    (tmp_path / "hub" / "models--someuser--tiny-smear" / "refs").mkdir()
    (tmp_path / "hub" / "models--someuser--tiny-smear" / "refs" / "main").write_text("a" * 40)
    torch.save({k: v for k, v in t5_batch.items()}, tmp_path / "batch.pt")
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import torch, smear_peft
        from peft import PeftModel
        from tests.conftest import tiny_t5
        model = PeftModel.from_pretrained(tiny_t5(), "someuser/tiny-smear")
        batch = torch.load({str(tmp_path / 'batch.pt')!r})
        with torch.no_grad():
            logits = model(**batch).logits
        assert torch.equal(logits, torch.load({str(tmp_path / 'expected.pt')!r}))
        print("loaded", type(model).__name__)
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "loaded PeftModel\n" in result.stdout


def test_loading_without_import_names_the_missing_registration(tmp_path):
    smear_t5().save_pretrained(tmp_path)
    script = f"from peft import PeftConfig\nPeftConfig.from_pretrained({str(tmp_path)!r})"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode != 0 and "SMEAR" in result.stderr  # documented: `import smear_peft` first


def test_disable_adapter_gives_exactly_the_base_model(t5_batch):
    base = tiny_t5()
    with torch.no_grad():
        expected = base(**t5_batch).logits
    model = get_peft_model(tiny_t5(), SmearConfig(num_experts=4, reduction_factor=4)).eval()
    with torch.no_grad():
        assert (model(**t5_batch).logits - expected).abs().max() > 1e-3
        with model.disable_adapter():
            torch.testing.assert_close(model(**t5_batch).logits, expected, rtol=0, atol=0)


def test_several_adapters_switch_and_delete(t5_batch):
    model = smear_t5()
    randomise_adapters(model, seed=1)
    model.add_adapter("second", SmearConfig(num_experts=2, reduction_factor=8, routing="monolithic"))
    layer = next(model.base_model.smear_layers())
    assert set(layer.smear_experts) == {"default", "second"}
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".second" in n)
    with torch.no_grad():
        first = model(**t5_batch).logits
        model.set_adapter("second")
        assert any(p.requires_grad for n, p in model.named_parameters() if ".second" in n)
        second = model(**t5_batch).logits
        assert (first - second).abs().max() > 1e-3
        model.set_adapter("default")
        torch.testing.assert_close(model(**t5_batch).logits, first, rtol=0, atol=0)
        model.delete_adapter("second")
    assert set(layer.smear_experts) == {"default"} and "second" not in layer.smear_routing


def test_unload_returns_the_unchanged_base_model(t5_batch):
    base = tiny_t5()
    keys = set(base.state_dict())
    with torch.no_grad():
        expected = base(**t5_batch).logits
    model = get_peft_model(base, SmearConfig(num_experts=4, reduction_factor=4))
    unloaded = model.unload()
    assert not any(isinstance(m, SmearLayer) for m in unloaded.modules())
    assert set(unloaded.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(unloaded(**t5_batch).logits, expected, rtol=0, atol=0)
    assert not unloaded._forward_pre_hooks and not unloaded.get_decoder()._forward_pre_hooks


def test_merge_and_unload_explains_why_it_is_impossible():
    model = smear_t5()
    with pytest.raises(NotImplementedError, match="routing is input-dependent"):
        model.merge_and_unload()
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        next(model.base_model.smear_layers()).merge()


def test_save_pretrained_writes_the_smear_model_card_section(tmp_path):
    model = smear_t5()
    model.peft_config["default"].base_model_name_or_path = "google/t5-v1_1-base"
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "library_name: peft" in card and "smear-peft" in card and "routing:smear" in card
    assert "Routing: `smear`" in card and "Experts per block: 4" in card and "google/t5-v1_1-base" in card
    model.save_pretrained(tmp_path)  # saving again replaces the section
    assert (tmp_path / "README.md").read_text().count("## SMEAR adapter") == 1


def test_push_to_hub_uploads_the_adapter_with_a_smear_model_card(tmp_path):
    model = smear_t5()
    model.peft_config["default"].base_model_name_or_path = "google/t5-v1_1-base"
    uploaded = {}

    def fake_upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploaded["repo_id"] = repo_id
        uploaded["files"] = {name: open(os.path.join(folder_path, name), "rb").read() for name in os.listdir(folder_path)}

    fake_repo = mock.Mock(repo_id="someuser/smear-glue")
    with mock.patch("huggingface_hub.HfApi.create_repo", return_value=fake_repo) as create_repo, mock.patch(
        "huggingface_hub.HfApi.upload_folder", fake_upload_folder
    ):
        smear_peft.push_to_hub(model, "someuser/smear-glue", private=True)
    create_repo.assert_called_once()
    assert uploaded["repo_id"] == "someuser/smear-glue"
    assert set(uploaded["files"]) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    card = uploaded["files"]["README.md"].decode()
    assert "library_name: peft" in card and "smear-peft" in card
    assert "Routing: `smear`" in card and "Experts per block: 4" in card and "Routing blocks: 10" in card
    assert "google/t5-v1_1-base" in card and 'PeftModel.from_pretrained(base_model, "someuser/smear-glue")' in card


def test_push_saved_adapter_uploads_the_saved_files_only_and_refuses_an_empty_adapter(tmp_path):
    """What the example scripts upload under FSDP / ZeRO-3: the folder `save_adapter` wrote, never the module."""
    from safetensors.torch import save_file

    from smear_peft.hub import push_saved_adapter

    model = smear_t5()
    saved = tmp_path / "run"
    model.save_pretrained(saved)
    (saved / "extra.safetensors").write_bytes(b"x")
    (saved / "checkpoints").mkdir()  # the rest of an output folder stays local
    (saved / "metrics.json").write_text("{}")
    uploaded = {}

    def fake_upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploaded[repo_id] = {name: open(os.path.join(folder_path, name), "rb").read() for name in os.listdir(folder_path)}

    with mock.patch("huggingface_hub.HfApi.create_repo", side_effect=lambda repo_id, **k: mock.Mock(repo_id=repo_id)), \
            mock.patch("huggingface_hub.HfApi.upload_folder", fake_upload_folder), \
            mock.patch.object(type(model), "save_pretrained", side_effect=AssertionError("the module was saved")):
        push_saved_adapter(str(saved), "me/run", num_blocks=10, extra_files=["extra.safetensors"])
        files = uploaded["me/run"]
        assert set(files) == {"README.md", "adapter_config.json", "adapter_model.safetensors", "extra.safetensors"}
        assert files["adapter_model.safetensors"] == (saved / "adapter_model.safetensors").read_bytes()
        assert "Routing blocks: 10" in files["README.md"].decode() and "me/run" in files["README.md"].decode()
        with pytest.raises(FileNotFoundError, match="missing.bin"):
            push_saved_adapter(str(saved), "me/other", extra_files=["missing.bin"])
        # what a rank-0 save of a ZeRO-3 model holds: zero-element tensors; nothing is uploaded
        save_file({k: torch.empty(0) for k in load_file(saved / "adapter_model.safetensors")},
                  str(saved / "adapter_model.safetensors"))
        with pytest.raises(RuntimeError, match="empty tensors"):
            push_saved_adapter(str(saved), "me/empty")
    assert set(uploaded) == {"me/run"}
