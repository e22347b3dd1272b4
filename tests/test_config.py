"""The typed Config, its command line, and the entry point's honesty about what it cannot do yet."""

import json

import pytest

from acim_fast.config import Config, default_preset, parse_args
from acim_fast.run import main
from acim_kernels import LossConfig


def test_defaults_round_trip_through_json():
    config = default_preset()
    assert json.loads(config.to_json())["loss"]["objective"] == "ppo"


def test_cli_overrides_top_level_and_nested_fields():
    config = parse_args(["--seed", "7", "--loss.eps_high", "0.28", "--loss.dual_clip", "3",
                         "--loss.return_entropy", "true", "--model", "/ckpt"])
    assert config.seed == 7 and config.model == "/ckpt"
    assert config.loss == LossConfig(eps_high=0.28, dual_clip=3.0, return_entropy=True)
    assert parse_args(["--loss.dual_clip", "none"]).loss.dual_clip is None


@pytest.mark.parametrize("argv, message", [
    (["--seed", "x"], "--seed: expected int"),
    (["--seed", "-1"], "Config.seed"),
    (["--loss.objective", "grpo"], "LossConfig.objective"),
    (["--loss.return_entropy", "maybe"], "expected true/false"),
    (["--no-such-flag", "1"], "unrecognized arguments"),
])
def test_bad_values_exit_naming_the_field(argv, message, capsys):
    with pytest.raises(SystemExit) as error:
        parse_args(argv)
    assert error.value.code == 2
    assert message in capsys.readouterr().err


def test_config_validates_in_post_init():
    with pytest.raises(ValueError, match="Config.out_dir"):
        Config(out_dir="")


def test_run_says_plainly_that_training_is_not_available(capsys):
    assert main([]) == 3
    captured = capsys.readouterr()
    assert "nothing was trained" in captured.err
    assert json.loads(captured.out.split("\n", 1)[1])["seed"] == 0
