"""Sharded training on CPU: 2 gloo processes (torch FSDP2 and FSDP1 driven directly, as Accelerate runs neither on
CPU), compared with one process; BatchNorm statistics synchronisation; gathering, saving and reloading the adapter;
generation through the sharded root. See ``tests/distributed_worker.py``.

The default run covers one scenario per engine; the full matrix (4 routing methods x T5 / ResNet x FSDP2 / FSDP1 with
and without ``use_orig_params``) is marked ``slow``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
import warnings

import pytest
import torch
from safetensors.torch import save_file

from smear_peft.distributed import (
    CPU_SHARDING_ENV,
    check_grad_clipping,
    engine_of,
    adapter_state_dict,
    generate,
    load_adapter_state,
    make_accelerator,
    save_adapter,
    set_deepspeed_micro_batch,
    sync_batch_norm_statistics,
    verify_saved_adapter,
)

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
ROUTINGS = ["smear", "top_k", "ensemble", "reinforce"]
MODELS = ["t5", "resnet"]
FAST = ["fsdp2:t5:reinforce", "fsdp1:resnet:reinforce", "bn_sync:broadcast", "save:fsdp2:t5"]
FULL = [f"{engine}:{model}:{routing}" for engine in ("fsdp2", "fsdp1", "fsdp1_orig") for model in MODELS for routing in ROUTINGS]
FULL += ["bn_sync:mean", "save:fsdp1:t5", "save:fsdp1_orig:t5", "save:fsdp2:resnet", "save:fsdp1:resnet",
         "save:fsdp1_orig:resnet"]
FULL = [s for s in FULL if s not in FAST]


def _run(tmp_path_factory, scenarios):
    directory = tmp_path_factory.mktemp("distributed")
    out = directory / "results.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(__file__)), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, WORKER, str(out), *scenarios], env=env, capture_output=True, text=True, timeout=900)
    if not out.exists():
        raise AssertionError(f"distributed worker failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return json.loads(out.read_text())


DEEPSPEED_FAST = ["zero3:t5:reinforce"]
DEEPSPEED_FULL = ["zero3:resnet:reinforce", "zero2:t5:smear", "zero2:resnet:smear"]


@pytest.fixture(scope="module")
def deepspeed_fast_results(tmp_path_factory):
    pytest.importorskip("deepspeed")
    return _run(tmp_path_factory, DEEPSPEED_FAST)


@pytest.fixture(scope="module")
def deepspeed_full_results(tmp_path_factory):
    pytest.importorskip("deepspeed")
    return _run(tmp_path_factory, DEEPSPEED_FULL)


@pytest.fixture(scope="module")
def fast_results(tmp_path_factory):
    return _run(tmp_path_factory, FAST)


@pytest.fixture(scope="module")
def full_results(tmp_path_factory):
    return _run(tmp_path_factory, FULL)


def _check(result: dict, scenario: str) -> None:
    assert "error" not in result, result.get("error")
    engine = scenario.split(":")[0]
    if engine == "bn_sync":
        assert result["count"] > 0 and not result["missing"]
        assert result["stat_diff"] <= 1e-6 * max(1.0, result["stat_scale"])
        assert result["rank_spread_before"] > 1e-3  # FSDP / DeepSpeed alone leave them apart (no buffer broadcast)
        assert result["rank_spread_after"] == 0.0
    elif engine in ("zero2", "zero3"):
        assert not result["missing"] and abs(result["loss"] - result["ref_loss"]) < 1e-5
        assert result["grad_diff"] < 1e-5 * max(1.0, result["grad_scale"])
        assert result["saved_tensors"] > 0 and result["logit_diff"] < 1e-5
        if scenario.startswith("zero3"):  # rank 0 alone would have saved zero-element tensors: that is caught now
            assert result["naive_rejected"]
        if ":t5:" in scenario:
            assert result["same_generation"]
    elif engine == "save":
        assert result["saved_tensors"] > 0
        assert result["logit_diff"] < 1e-5  # the reloaded adapter computes what the sharded model computes
        assert result["rank_logit_spread"] == 0.0  # every process evaluates the same model (BatchNorm synchronised)
        if scenario.endswith(":t5"):
            assert result["same_generation"]
    else:
        assert result["units"] > 1 and not result["missing"]
        assert abs(result["loss"] - result["ref_loss"]) < 1e-5
        assert result["grad_diff"] < 1e-5 * max(1.0, result["grad_scale"])


@pytest.mark.parametrize("scenario", FAST)
def test_sharded_matches_one_process(fast_results, scenario):
    _check(fast_results[scenario], scenario)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", FULL)
def test_sharded_matches_one_process_full(full_results, scenario):
    _check(full_results[scenario], scenario)


@pytest.mark.parametrize("scenario", DEEPSPEED_FAST)
def test_deepspeed_matches_one_process_and_saves_a_reloadable_adapter(deepspeed_fast_results, scenario):
    """DeepSpeed ZeRO (CPU accelerator, gloo), driven directly: same step as one process; `save_adapter` gathers the
    ZeRO-3 partitions, and a naive rank-0 save_pretrained is rejected by `verify_saved_adapter`."""
    _check(deepspeed_fast_results[scenario], scenario)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", DEEPSPEED_FULL)
def test_deepspeed_matches_one_process_full(deepspeed_full_results, scenario):
    _check(deepspeed_full_results[scenario], scenario)


# -- single-process behaviour of the helpers -------------------------------------------------------------------------
def test_helpers_are_no_ops_without_a_process_group(tmp_path):
    from peft import get_peft_model

    from smear_peft import SmearConfig
    from tests.conftest import tiny_t5

    model = get_peft_model(tiny_t5(), SmearConfig(num_experts=2, reduction_factor=4)).eval()
    assert engine_of(model) == "none"
    assert sync_batch_norm_statistics(model) == 0
    inputs = torch.randint(2, 64, (2, 5))
    assert torch.equal(generate(model, input_ids=inputs, max_new_tokens=3, do_sample=False),
                       model.generate(input_ids=inputs, max_new_tokens=3, do_sample=False))
    saved = save_adapter(model, str(tmp_path / "adapter"))
    assert saved and all(v.numel() for v in saved.values())


def test_load_adapter_state_writes_a_gathered_copy_back_or_refuses():
    from peft import get_peft_model

    from smear_peft import SmearConfig
    from tests.conftest import tiny_t5

    model = get_peft_model(tiny_t5(), SmearConfig(num_experts=2, reduction_factor=4)).eval()
    best = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(1.0)
    load_adapter_state(model, best)
    assert all(torch.equal(adapter_state_dict(model)[k], v) for k, v in best.items())
    with pytest.raises(RuntimeError, match="keys the model lacks"):
        load_adapter_state(model, {**best, "base_model.model.nowhere.weight": torch.ones(1)})

    from unittest import mock

    for engine in ("fsdp1", "fsdp2"):  # flattened / DTensor parameters: refused, never written wrongly
        with mock.patch("smear_peft.distributed.engine_of", return_value=engine), \
                pytest.raises(NotImplementedError, match="Use DeepSpeed"):
            load_adapter_state(model, best)


def test_verify_saved_adapter_rejects_empty_and_missing_tensors(tmp_path):
    with pytest.raises(RuntimeError, match="No adapter_model"):
        verify_saved_adapter(str(tmp_path))
    save_file({"a": torch.ones(2), "b": torch.empty(0)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(RuntimeError, match="empty tensors"):
        verify_saved_adapter(str(tmp_path))
    save_file({"a": torch.ones(2)}, str(tmp_path / "adapter_model.safetensors"))
    verify_saved_adapter(str(tmp_path), {"a": torch.ones(2)})
    with pytest.raises(RuntimeError, match="lacks"):
        verify_saved_adapter(str(tmp_path), {"a": torch.ones(2), "c": torch.ones(1)})
    with pytest.raises(RuntimeError, match="differs"):
        verify_saved_adapter(str(tmp_path), {"a": torch.zeros(2)})


def test_check_grad_clipping_warns_and_sets_deepspeed_norm():
    without = types.SimpleNamespace(state=types.SimpleNamespace(deepspeed_plugin=None), _models=[])
    assert check_grad_clipping(without, 1.0) == 1.0

    class Engine:
        def __init__(self):
            self._config = types.SimpleNamespace(gradient_clipping=1.0)

        def zero_optimization_stage(self):
            return 3

        def gradient_clipping(self):
            return self._config.gradient_clipping

    engine = Engine()
    plugin = types.SimpleNamespace(deepspeed_config={"gradient_clipping": 1.0})
    accelerator = types.SimpleNamespace(state=types.SimpleNamespace(deepspeed_plugin=plugin), _models=[engine])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_grad_clipping(accelerator, 1.0) == 1.0
    with pytest.warns(UserWarning, match="gradient_clipping=1.0, not max_grad_norm=0.5"):
        assert check_grad_clipping(accelerator, 0.5) == 0.5
    assert engine.gradient_clipping() == 0.5 and plugin.deepspeed_config["gradient_clipping"] == 0.5


def test_set_deepspeed_micro_batch_fills_the_config_or_names_the_fix():
    set_deepspeed_micro_batch(types.SimpleNamespace(state=types.SimpleNamespace(deepspeed_plugin=None)), 8, 4)  # no-op
    plugin = types.SimpleNamespace(deepspeed_config={"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1})
    accelerator = types.SimpleNamespace(state=types.SimpleNamespace(deepspeed_plugin=plugin))
    set_deepspeed_micro_batch(accelerator, 8)
    assert plugin.deepspeed_config == {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1}
    with pytest.raises(ValueError, match="per_device_batch_size = batch_size / processes"):
        set_deepspeed_micro_batch(accelerator, 4, accumulation=2)
    plugin.deepspeed_config["gradient_accumulation_steps"] = 4
    with pytest.raises(ValueError, match="set it to 1"):
        set_deepspeed_micro_batch(accelerator, 8)


def test_cpu_sharding_switch_refuses_accelerates_cpu_flag(monkeypatch):
    """The test-only switch and ACCELERATE_USE_CPU (`--cpu`) contradict each other: a clear error, before Accelerate
    starts anything. (The switch itself runs in tests/examples: ZeRO-3 launches of glue.py and domainnet.py.)"""
    monkeypatch.setenv(CPU_SHARDING_ENV, "1")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    with pytest.raises(RuntimeError, match="launch without it"):
        make_accelerator()


def test_experts_and_baseline_expose_weight_for_peft_wrap_policy():
    """PEFT's fsdp_auto_wrap_policy wraps leaf modules whose `.weight` requires grad: the experts and the REINFORCE
    baseline must be their own units, or FSDP1 (use_orig_params=False) mixes frozen and trainable parameters."""
    from smear_peft.experts import Experts
    from smear_peft.routers import ReinforceBaseline

    experts = Experts(2, 8, 4)
    assert experts.weight is experts.down_weight
    baseline = ReinforceBaseline(8)
    assert baseline.weight is baseline.weight1
    assert "weight" not in dict(experts.named_parameters()) and "weight" not in baseline.state_dict()
