"""The typed Config: presets, its command line, --resume, and the JSON round trip a resumed run relies on."""

import json

import pytest

from acim_fast.config import Config, default_preset, parse_args, smoke_preset
from acim_fast.execution.sandbox import SandboxOptions
from acim_kernels import LossConfig


def test_defaults_round_trip_through_json():
    config = default_preset()
    values = json.loads(config.to_json())
    assert values["loss"]["objective"] == "clip" and values["algo"] == "em"
    assert Config.from_dict(values) == config
    assert Config.from_dict(json.loads(smoke_preset().to_json())) == smoke_preset()


def test_cli_overrides_top_level_and_nested_fields():
    config, resume = parse_args(["--seed", "7", "--loss.eps_high", "0.28", "--loss.dual_clip", "3",
                                 "--loss.return_entropy", "true", "--model", "/ckpt", "--estep.k_code", "3",
                                 "--mstep.lr", "0.001", "--eval.k", "2"])
    assert resume is None and config.seed == 7 and config.model == "/ckpt"
    assert config.loss == LossConfig(objective="clip", sft_coef=1.0, eps_high=0.28, dual_clip=3.0,
                                     return_entropy=True)
    assert config.estep.k_code == 3 and config.mstep.lr == 0.001 and config.eval.k == 2
    assert config.estep.k_prose == default_preset().estep.k_prose  # untouched fields keep the preset's
    assert parse_args(["--loss.dual_clip", "none"])[0].loss.dual_clip is None
    smoke, _ = parse_args(["--preset", "smoke", "--iterations", "3"])
    assert smoke.iterations == 3 and smoke.problems_per_iter == smoke_preset().problems_per_iter


def test_flags_take_either_spelling_and_the_rollout_backend_is_one():
    config, _ = parse_args(["--rollout-backend", "vllm", "--estep.k-code", "3", "--vllm.block-size", "64",
                            "--vllm.cpu_kv_cache_gib", "2"])
    assert config.rollout_backend == "vllm" and config.estep.k_code == 3
    assert config.vllm.block_size == 64 and config.vllm.cpu_kv_cache_gib == 2
    assert parse_args([])[0].rollout_backend == "ours"  # our sampler unless asked


def test_the_sandbox_isolation_is_a_flag_and_namespaces_by_default():
    assert parse_args([])[0].sandbox.isolation == "namespaces"
    config, _ = parse_args(["--sandbox.isolation", "weak", "--sandbox.max-failed-share", "0.5"])
    assert (config.sandbox.isolation, config.sandbox.max_failed_share) == ("weak", 0.5)
    assert config.sandbox.options(3.0) == SandboxOptions(timeout_s=3.0, isolation="weak")


def test_the_kl_coefficient_is_a_flag_and_off_by_default():
    assert parse_args([])[0].loss.kl_coef == 0.0
    config, _ = parse_args(["--preset", "smoke", "--loss.kl-coef", "0.05"])
    assert config.loss.kl_coef == 0.05 and config.effective_loss().kl_coef == 0.05
    assert parse_args(["--algo", "grpo", "--loss.kl_coef", "0.05"])[0].effective_loss().kl_coef == 0.05


def test_grpo_is_one_flag_and_defines_its_own_loss():
    config, _ = parse_args(["--algo", "grpo"])
    assert config.loss.objective == "clip"  # as given ...
    assert config.effective_loss() == LossConfig(objective="ppo", sft_coef=0.0)  # ... the baseline's definition


@pytest.mark.parametrize("argv, message", [
    (["--seed", "x"], "--seed: expected int"),
    (["--seed", "-1"], "Config.seed"),
    (["--loss.objective", "grpo"], "LossConfig.objective"),
    (["--loss.return_entropy", "maybe"], "expected true/false"),
    (["--estep.k_free", "0"], "EStepConfig.k_free"),
    (["--algo", "ppo"], "Config.algo"),
    (["--dtype", "float16"], "Config.dtype"),
    (["--rollout-backend", "sglang"], "Config.rollout_backend"),
    (["--vllm.gpu_memory_utilization", "1.5"], "VLLMOptions.gpu_memory_utilization"),
    (["--vllm.block_size", "0"], "VLLMOptions.block_size"),
    (["--estep.temperature", "0.7"], "Config.loss.temperature (1.0) must equal Config.estep.temperature (0.7)"),
    (["--loss.kl_coef", "-0.1"], "LossConfig.kl_coef must be finite and >= 0, got -0.1"),
    (["--loss.kl_coef", "nan"], "LossConfig.kl_coef must be finite and >= 0, got nan"),
    (["--loss.kl_coef", "inf"], "LossConfig.kl_coef must be finite and >= 0, got inf"),
    (["--loss.sft_coef", "nan"], "LossConfig.sft_coef must be finite and >= 0, got nan"),
    (["--loss.entropy_coef", "-1"], "LossConfig.entropy_coef must be finite and >= 0, got -1.0"),
    (["--sandbox.isolation", "shared-uid"], "SandboxConfig.isolation must be one of ('namespaces', 'weak')"),
    (["--sandbox.max_failed_share", "1.5"], "SandboxConfig.max_failed_share must be in [0, 1]"),
    (["--no-such-flag", "1"], "unrecognized arguments"),
    (["--resume", "runs/x", "--seed", "1"], "--resume takes the saved config of the run as it is; drop --seed"),
])
def test_bad_values_exit_naming_the_field(argv, message, capsys):
    with pytest.raises(SystemExit) as error:
        parse_args(argv)
    assert error.value.code == 2
    assert message in capsys.readouterr().err


def test_resume_reads_the_saved_config(tmp_path, capsys):
    config = smoke_preset()
    (tmp_path / "config.json").write_text(config.to_json())
    assert parse_args(["--resume", str(tmp_path)]) == (config, tmp_path)
    (tmp_path / "config.json").write_text('{"seed": 1, "estep": {"k_cod": 2}}')
    with pytest.raises(ValueError, match=r"config.json: unknown field\(s\) \['estep.k_cod'\]"):
        parse_args(["--resume", str(tmp_path)])
    with pytest.raises(SystemExit):
        parse_args(["--resume", str(tmp_path / "missing")])
    assert "cannot read" in capsys.readouterr().err


def test_config_validates_in_post_init():
    with pytest.raises(ValueError, match="Config.out_dir"):
        Config(out_dir="")
    with pytest.raises(ValueError, match="Config.dtype"):
        Config(dtype="fp8")
    with pytest.raises(ValueError, match="where: unknown field 'sed'"):
        Config.from_dict({"sed": 1}, where="where")
