from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import train
from tests.conftest import REPO_ROOT


class ParseOnlyCLI(train.GroundingCLI):
    """The project's CLI without building the model, data or trainer."""

    def instantiate_classes(self) -> None:
        pass


def parse(arguments: list[str]) -> Any:
    """Parse as ``fit`` does; with ``run=False`` the config has no subcommand level."""
    cli = ParseOnlyCLI(
        train.LatentDiffusionModule,
        parser_kwargs={"parser_mode": "omegaconf+"},
        args=arguments,
        run=False,
    )
    return cli.config


def test_fit_is_default_subcommand() -> None:
    assert train.default_to_fit(["--config", "x.yaml"]) == ["fit", "--config", "x.yaml"]
    assert train.default_to_fit(["validate", "--config", "x.yaml"]) == ["validate", "--config", "x.yaml"]
    assert train.default_to_fit(["--help"]) == ["--help"]


def test_command_line_overrides_config_file() -> None:
    config = parse(
        ["--config", str(REPO_ROOT / "configs/demo.yaml"), "--trainer.max_steps=20", "--model.condition_dropout=0.25"]
    )

    assert config.trainer.max_steps == 20
    assert config.model.condition_dropout == 0.25
    assert config.model.latent == "identity"


def test_interpolation_follows_overrides() -> None:
    config = parse(["--config", str(REPO_ROOT / "configs/demo.yaml"), "--trainer.default_root_dir=/tmp/elsewhere"])

    checkpoint = next(callback for callback in config.trainer.callbacks if callback.class_path.endswith("ModelCheckpoint"))
    assert checkpoint.init_args.dirpath == "/tmp/elsewhere/checkpoints"


def test_grounding_option_set_from_command_line() -> None:
    config = parse(["--config", str(REPO_ROOT / "configs/demo.yaml"), "--trainer.callbacks.init_args.num_inference_steps=7"])

    grounding = config.trainer.callbacks[-1]
    assert grounding.class_path.endswith("GroundingEvaluation")
    assert grounding.init_args.num_inference_steps == 7


@pytest.mark.parametrize(
    ("devices", "num_nodes", "expected"),
    [(8, 1, 2), (4, 1, 4), (8, 2, 1), (1, 1, 16)],
)
def test_accumulation_keeps_effective_batch(devices: int, num_nodes: int, expected: int) -> None:
    config = parse(
        [
            "--config",
            str(REPO_ROOT / "configs/cxrbert.yaml"),
            f"--trainer.devices={devices}",
            f"--trainer.num_nodes={num_nodes}",
        ]
    )

    assert config.trainer.accumulate_grad_batches == expected


def test_accumulation_rejects_indivisible_batch() -> None:
    with pytest.raises(ValueError, match="not a multiple"):
        train.gradient_accumulation_steps(256, 16, 3, 1)


def test_real_config_stops_with_one_message(tmp_path: Path) -> None:
    environment = {
        **os.environ,
        "SD15_DIR": str(tmp_path / "missing-sd15"),
        "CXR_BERT_DIR": str(tmp_path / "missing-cxr-bert"),
        "WANDB_MODE": "offline",
    }
    started = time.monotonic()

    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train.py"), "--config", str(REPO_ROOT / "configs/cxrbert.yaml")],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 2
    assert time.monotonic() - started < 30
    assert "missing-sd15" in result.stderr
    assert "not found" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--config", "configs/demo.yaml", "--trainer.callbacks.init_args.mode=bogus"], "Invalid sampling mode 'bogus'"),
        (["--config", "configs/demo.yaml", "--model.condition_dropout=1.5"], "condition_dropout must lie in [0, 1]"),
        (["--config", "configs/cxrbert.yaml", "--data.init_args.train_batch_size=12"], "is not a multiple of train_batch_size 12"),
        (["--config", "configs/demo.yaml", "--trainer.callbacks.init_args.layer_subsets={bad: [99]}"], "Layer subset 'bad'"),
        (["--config", "configs/demo.yaml", "--trainer.callbacks.init_args.token_strategy=nouns"], "Allowed: ['lexical'"),
        (["--config", "configs/demo.yaml", "--ckpt_path=missing.ckpt"], "Checkpoint not found: missing.ckpt"),
    ],
)
def test_invalid_value_stops_with_one_message(
    overrides: list[str], message: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    arguments = [overrides[0], str(REPO_ROOT / overrides[1]), *overrides[2:], f"--trainer.default_root_dir={tmp_path}"]

    with caplog.at_level("ERROR", logger="train"), pytest.raises(SystemExit) as stopped:
        train.main(arguments)

    assert stopped.value.code == 2
    assert message in caplog.text


def test_demo_config_matches_shipped_unet() -> None:
    import json

    from tests.helpers.models import demo_unet_config

    config = parse(["--config", str(REPO_ROOT / "configs/demo.yaml")])
    shipped = json.loads((REPO_ROOT / "demo_assets/demo_unet/config.json").read_text())

    assert dict(config.model.unet_config) == demo_unet_config()
    for key, value in demo_unet_config().items():
        assert shipped[key] == value, key
