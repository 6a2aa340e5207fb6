"""Strategy keys in recipes, and the DeepSpeed/FSDP2 files filled from them (no process started)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from affinage.distributed import configs as dcfg
from affinage.distributed.launch import launch_command, launch_env
from affinage.recipe.loader import RecipeError, load_recipe, load_recipe_dict

BASE = {
    "name": "cfg", "task": "cpt", "model": {"name_or_path": "./m", "init": "random"},
    "method": {"kind": "full"},
    "data": {"sources": [{"path": "d.jsonl", "format": "text"}]},
    "training": {"global_batch_size": 32, "micro_batch_size": 2, "duration": "10 steps", "learning_rate": 1e-4,
                 "max_grad_norm": 0.7, "weight_decay": 0.01, "adam_beta2": 0.95},
}


def recipe(**distributed):
    data = json.loads(json.dumps(BASE))
    if distributed:
        data["distributed"] = distributed
    return load_recipe_dict(data)


def render_ds(r, world=4, gpu=True):
    return dcfg.render_deepspeed_config(r, world_size=world, accumulation=r.training.gradient_accumulation(world),
                                        on_gpu=gpu, hidden_size=64)


# ------------------------------------------------------------------------------------- schema
def test_dist_default_strategy_is_ddp_and_keys_are_checked():
    assert recipe().distributed.strategy == "ddp"
    with pytest.raises(RecipeError, match="offload_optimizer: true with strategy ddp"):
        recipe(strategy="ddp", offload_optimizer=True)
    with pytest.raises(RecipeError, match="ZeRO-2 keeps a full copy"):
        recipe(strategy="zero2", offload_params=True)
    with pytest.raises(RecipeError, match="FSDP2 offloads parameters, gradients and the optimizer step together"):
        recipe(strategy="fsdp2", offload_optimizer=True)
    with pytest.raises(RecipeError, match="strategy"):
        recipe(strategy="zero4")
    with pytest.raises(RecipeError, match="Did you mean 'offload_params'"):
        recipe(strategy="zero3", offload_param=True)
    assert recipe(strategy="zero3_offload").distributed.offloads() == (True, True)
    assert recipe(strategy="zero3_offload", offload_params=False).distributed.offloads() == (True, False)


def test_dist_qlora_with_parameter_offload_is_a_clear_error():
    data = json.loads(json.dumps(BASE))
    data["model"] = {"name_or_path": "./m"}
    data["method"] = {"kind": "qlora", "lora": {"r": 8}, "quantization": {}}
    data["distributed"] = {"strategy": "zero3_offload"}
    with pytest.raises(RecipeError, match="qlora.*parameter offload.*not supported.*zero3"):
        load_recipe_dict(data)
    data["distributed"] = {"strategy": "zero3_offload", "offload_params": False}
    assert load_recipe_dict(data).distributed.offloads() == (True, False)
    for ok in ("zero2", "zero3", "fsdp2", "ddp"):
        data["distributed"] = {"strategy": ok}
        load_recipe_dict(data)


def test_dist_config_path_is_relative_to_the_recipe(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "r.yaml"
    data = json.loads(json.dumps(BASE))
    data["distributed"] = {"strategy": "zero3", "config": "../my-zero3.json"}
    import yaml

    path.write_text(yaml.safe_dump(data))
    assert load_recipe(path).distributed.config == str(tmp_path / "my-zero3.json")


# ---------------------------------------------------------------------------------- DeepSpeed
@pytest.mark.parametrize("strategy", ["zero2", "zero3", "zero3_offload"])
def test_dist_shipped_deepspeed_files_are_filled_from_the_recipe(strategy):
    pytest.importorskip("deepspeed")
    r = recipe(strategy=strategy)
    cfg = render_ds(r, world=4)
    assert cfg["train_micro_batch_size_per_gpu"] == 2 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["train_batch_size"] == 32 and cfg["gradient_clipping"] == 0.7
    assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False  # model.dtype auto on a GPU
    assert cfg["zero_optimization"]["stage"] == (2 if strategy == "zero2" else 3)
    assert "auto" not in json.dumps(cfg)
    if strategy == "zero3_offload":
        assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
        assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
        assert cfg["optimizer"] == {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.01}}
    if strategy != "zero2":
        assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
        assert cfg["zero_optimization"]["stage3_param_persistence_threshold"] == 640  # 10 × hidden, as transformers
    dcfg.check_deepspeed_config(cfg, world_size=4)  # DeepSpeed's own parser accepts it
    # on CPU: fp32, no pinned memory
    cpu = render_ds(r, world=2, gpu=False)
    assert cpu["bf16"]["enabled"] is False and cpu["gradient_accumulation_steps"] == 8
    for section in ("offload_optimizer", "offload_param"):
        if section in cpu["zero_optimization"]:
            assert cpu["zero_optimization"][section]["pin_memory"] is False


def test_dist_offload_flags_edit_the_deepspeed_config():
    pytest.importorskip("deepspeed")
    cfg = render_ds(recipe(strategy="zero2", offload_optimizer=True))
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["optimizer"]["type"] == "AdamW"  # DeepSpeed's CPU Adam runs the offloaded step
    cfg = render_ds(recipe(strategy="zero3_offload", offload_params=False))
    assert "offload_param" not in cfg["zero_optimization"] and "offload_optimizer" in cfg["zero_optimization"]


def write(path: Path, data) -> Path:
    path.write_text(json.dumps(data) if path.suffix == ".json" else data)
    return path


def test_dist_own_deepspeed_file_cannot_contradict_the_recipe(tmp_path):
    pytest.importorskip("deepspeed")
    own = write(tmp_path / "own.json", {"zero_optimization": {"stage": 3}, "gradient_accumulation_steps": 2,
                                         "train_micro_batch_size_per_gpu": "auto"})
    with pytest.raises(dcfg.DistributedConfigError, match="gradient_accumulation_steps is 2 but the recipe owns"):
        render_ds(recipe(strategy="zero3", config=str(own)))
    write(own, {"zero_optimization": {"stage": 2}})
    with pytest.raises(dcfg.DistributedConfigError, match="stage is 2 but distributed.strategy is zero3"):
        render_ds(recipe(strategy="zero3", config=str(own)))
    write(own, {"zero_optimization": {"stage": 3}, "scheduler": {"type": "WarmupLR"}})
    with pytest.raises(dcfg.DistributedConfigError, match="scheduler section would replace"):
        render_ds(recipe(strategy="zero3", config=str(own)))
    write(own, {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}})
    with pytest.raises(dcfg.DistributedConfigError, match="normal save_pretrained folder"):
        render_ds(recipe(strategy="zero3", config=str(own)))
    write(own, {"zero_optimization": {"stage": 3}, "gradient_clipping": 0.7, "optimizer": {"type": "AdamW", "params": {"lr": 3e-4}}})
    with pytest.raises(dcfg.DistributedConfigError, match="optimizer.params.lr is 0.0003.*training.learning_rate"):
        render_ds(recipe(strategy="zero3", config=str(own)))
    write(own, {"zero_optimization": {"stage": 3}, "gradient_clipping": 0.7})  # equal to the recipe: accepted
    assert render_ds(recipe(strategy="zero3", config=str(own)))["gradient_clipping"] == 0.7


def test_dist_deepspeed_parser_rejects_a_bad_value_before_launch(tmp_path):
    pytest.importorskip("deepspeed")
    own = write(tmp_path / "own.json", {"zero_optimization": {"stage": 3, "stage3_max_live_parameters": "many"}})
    cfg = render_ds(recipe(strategy="zero3", config=str(own)))
    with pytest.raises(dcfg.DistributedConfigError, match="DeepSpeed refuses the config.*stage3_max_live_parameters"):
        dcfg.check_deepspeed_config(cfg, world_size=4)
    own = write(tmp_path / "own2.json", {"zero_optimization": {"stage": 3, "overlap_com": True}})
    cfg = render_ds(recipe(strategy="zero3", config=str(own)))
    with pytest.raises(dcfg.DistributedConfigError, match="overlap_com"):
        dcfg.check_deepspeed_config(cfg, world_size=4)


# --------------------------------------------------------------------------------------- FSDP2
def test_dist_fsdp2_yaml_becomes_training_arguments_fsdp_config(tmp_path):
    cfg = dcfg.render_fsdp_config(recipe(strategy="fsdp2"), on_gpu=True)
    assert cfg == {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "reshard_after_forward": True,
                   "state_dict_type": "SHARDED_STATE_DICT", "cpu_ram_efficient_loading": True, "cpu_offload": False,
                   "activation_checkpointing": False}
    assert dcfg.render_fsdp_config(recipe(strategy="fsdp2", offload_params=True), on_gpu=True)["cpu_offload"] is True
    own = write(tmp_path / "own.yaml", "distributed_type: FSDP\nmixed_precision: fp16\nfsdp_config: {fsdp_version: 2}\n")
    with pytest.raises(dcfg.DistributedConfigError, match="mixed_precision is 'fp16' but the recipe's model.dtype gives 'bf16'"):
        dcfg.render_fsdp_config(recipe(strategy="fsdp2", config=str(own)), on_gpu=True)
    write(own, "fsdp_config: {fsdp_reshard_after_foward: false}\n")
    with pytest.raises(dcfg.DistributedConfigError, match="Did you mean 'fsdp_reshard_after_forward'"):
        dcfg.render_fsdp_config(recipe(strategy="fsdp2", config=str(own)), on_gpu=True)
    write(own, "fsdp_config: {fsdp_version: 1}\n")
    with pytest.raises(dcfg.DistributedConfigError, match="uses FSDP version 2"):
        dcfg.render_fsdp_config(recipe(strategy="fsdp2", config=str(own)), on_gpu=True)
    write(own, "fsdp_config: {fsdp_activation_checkpointing: true}\n")
    r = recipe(strategy="fsdp2", config=str(own))
    r.training.gradient_checkpointing = True
    with pytest.raises(dcfg.DistributedConfigError, match="keep one"):
        dcfg.render_fsdp_config(r, on_gpu=True)


# -------------------------------------------------------------------------------------- launch
def test_dist_launch_command_one_node_and_several():
    one = launch_command("r.yaml", 4, run_dir="/runs/x", extra_args=["--fresh"], python="py")
    assert one == ["py", "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=4",
                   "-m", "affinage.cli", "train", "r.yaml", "--run-dir", "/runs/x", "--fresh"]
    many = launch_command("r.yaml", 4, nnodes=2, rdzv_endpoint="node1:29400", rdzv_id="42", python="py")
    assert "--rdzv_backend=c10d" in many and "--rdzv_endpoint=node1:29400" in many and "--nnodes=2" in many
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        launch_command("r.yaml", 4, nnodes=2)
    env = launch_env(2, gpu=False, base={})
    assert env["ACCELERATE_USE_CPU"] == "1" and env["DS_ACCELERATOR"] == "cpu" and int(env["OMP_NUM_THREADS"]) >= 1
    assert "ACCELERATE_USE_CPU" not in launch_env(2, gpu=True, base={})


def test_dist_train_refuses_nproc_that_the_launcher_contradicts(monkeypatch, tmp_path, capsys):
    from affinage.cli import main

    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = tmp_path / "r.yaml"
    r.write_text("name: x\n")
    assert main(["train", str(r), "--nproc", "4"]) == 2
    assert "--nproc 4 under a launcher that started 2 processes" in capsys.readouterr().err


def test_dist_plan_checks_the_strategy_config(tmp_path, tiny_llama_dir, demo_data, capsys):
    pytest.importorskip("deepspeed")
    from affinage.cli import main

    data = json.loads(json.dumps(BASE))
    data["model"] = {"name_or_path": str(tiny_llama_dir)}
    data["data"]["sources"][0]["path"] = str(demo_data / "droit.jsonl")
    own = write(tmp_path / "own.json", {"zero_optimization": {"stage": 3, "overlap_com": True}})
    data["distributed"] = {"strategy": "zero3", "config": str(own)}
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["plan", str(path), "--world-size", "4"]) == 2
    assert "DeepSpeed refuses the config" in capsys.readouterr().err
    data["distributed"] = {"strategy": "zero3"}
    path.write_text(yaml.safe_dump(data))
    assert main(["plan", str(path), "--world-size", "4", "--gpu", "a100-40"]) == 0
    out = capsys.readouterr().out
    assert "zero3 *" in out and "fit on a100-40" in out and "checked" in out


def test_dist_relaunch_reports_a_requested_stop_as_exit_3(tmp_path, monkeypatch):
    """torchrun turns the trainer's "stopped after a checkpoint" (exit 3) into 1: the launcher reads summary.json."""
    import affinage.distributed.launch as launch

    calls = []

    def fake_torchrun(cmd, env):
        calls.append((cmd, env))
        (tmp_path / "summary.json").write_text(json.dumps({"completed": completed}))
        return rc

    monkeypatch.setattr(launch.subprocess, "call", fake_torchrun)
    for completed, rc, expected in ((False, 1, 3), (True, 1, 1), (True, 0, 0)):
        assert launch.relaunch_train("r.yaml", 2, run_dir=str(tmp_path), extra_args=["--fresh"]) == expected
    cmd, env = calls[0]
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"] and cmd[-1] == "--fresh"
    assert "--nproc_per_node=2" in cmd


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_auto_sizes_equal_what_transformers_fills(stage, tmp_path):
    """Our pre-model fill of the hidden-size "auto" keys is transformers' own formula (no drift)."""
    from types import SimpleNamespace

    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from affinage.distributed.configs import _auto_sizes

    keys = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")
    zero = {"stage": stage, **{k: "auto" for k in keys}}
    theirs = HfTrainerDeepSpeedConfig({"zero_optimization": dict(zero), "train_micro_batch_size_per_gpu": 1})
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    theirs.trainer_config_finalize(args, SimpleNamespace(config=SimpleNamespace(hidden_size=96)), 10)
    _auto_sizes(zero, 96)
    filled = {k: v for k, v in theirs.config["zero_optimization"].items() if v != "auto"}
    assert filled and all(zero[k] == v for k, v in filled.items()), (zero, theirs.config["zero_optimization"])
