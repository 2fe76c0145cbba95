"""Command-line entry point: fine-tune, validate or test the latent diffusion model.

    python train.py --config configs/demo.yaml            # fit (the default subcommand)
    python train.py fit --config configs/cxrbert.yaml --trainer.max_steps=20
    python train.py validate --config configs/demo.yaml --ckpt_path runs/demo/checkpoints/last.ckpt

Configs are parsed by LightningCLI in omegaconf mode (``omegaconf+``: interpolations resolve after
the command-line overrides are applied), so they may use ``${...}``, and every option can be
overridden on the command line.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from callbacks.grounding_evaluation import GroundingEvaluation
from callbacks.wandb_setup import configure_wandb_logger
from lightning_modules.latent_diffusion import LatentDiffusionModule

log = logging.getLogger("train")

SUBCOMMANDS = ("fit", "validate", "test", "predict")
CHECKPOINT_NAMES = ("last", "best", "hpc", "registry")


def gradient_accumulation_steps(effective_batch_size: int, per_device_batch_size: int, devices: int, num_nodes: int) -> int:
    """Derive the accumulation steps that keep ``effective_batch_size`` for the given scale-out.

    Used in configs as ``${accumulation:256,${data.init_args.train_batch_size},${trainer.devices},${trainer.num_nodes}}``.

    Raises:
        ValueError: when the effective batch is not a multiple of the per-step batch.
    """
    per_step = int(per_device_batch_size) * int(devices) * int(num_nodes)
    if per_step <= 0 or int(effective_batch_size) % per_step != 0:
        raise ValueError(
            f"The effective batch size {effective_batch_size} is not a multiple of train_batch_size "
            f"{per_device_batch_size} x devices {devices} x num_nodes {num_nodes} = {per_step}; "
            "change one of them or set trainer.accumulate_grad_batches directly."
        )
    return int(effective_batch_size) // per_step


OmegaConf.register_resolver("accumulation", gradient_accumulation_steps, replace=True)
# Configs write absolute keys (``${trainer.default_root_dir}``); under a subcommand the parsed
# config is nested below ``fit``/``validate``/``test``, so the keys are made relative on load.
set_parsing_settings(omegaconf_absolute_to_relative_paths=True)


def innermost_message(error: BaseException) -> str:
    """Return the message of the first exception in the chain of causes (the one that was raised first)."""
    while error.__cause__ is not None:
        error = error.__cause__
    return str(error)


def exit_with_configuration_error(error: BaseException) -> None:
    """Log one line for a setup problem (missing file, invalid value) and exit with status 2."""
    # The traceback stays available at DEBUG level for the case that it is a bug after all.
    log.debug("Configuration error", exc_info=error)
    log.error("%s", innermost_message(error))
    sys.exit(2)


class GroundingCLI(LightningCLI):
    """LightningCLI that turns missing files and invalid values into one message and sets up W&B."""

    def parse_arguments(self, parser: Any, args: Any) -> None:
        try:
            super().parse_arguments(parser, args)
        except OmegaConfBaseException as error:
            # For example the accumulation resolver rejecting a batch size that does not divide 256.
            exit_with_configuration_error(error)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        configure_wandb_logger(config.get("trainer", {}))

    def instantiate_classes(self) -> None:
        try:
            self._check_checkpoint_path()
            super().instantiate_classes()
            check_paths = getattr(self.datamodule, "check_paths", None)
            if check_paths is not None:
                check_paths()
            # Layer subsets of the grounding evaluation are checked against the U-Net before any work.
            for callback in self.trainer.callbacks:
                if isinstance(callback, GroundingEvaluation):
                    callback.evaluator.check_layers(self.model.ema_unet)
        except (FileNotFoundError, ValueError) as error:
            # A missing data set or model, or a value a constructor rejects, is a setup problem.
            exit_with_configuration_error(error)


    def _check_checkpoint_path(self) -> None:
        """Raise when ``--ckpt_path`` names a file that does not exist, before any model is built."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        path = config.get("ckpt_path")
        # Lightning also accepts "last", "best", "hpc", registry names and remote URLs in place of a file.
        named = path in CHECKPOINT_NAMES or str(path).startswith("registry") or "://" in str(path)
        if path and not named and not Path(path).is_file():
            raise FileNotFoundError(f"Checkpoint not found: {path} (set by --ckpt_path).")


def default_to_fit(argv: list[str]) -> list[str]:
    """Insert the ``fit`` subcommand when the arguments start with an option."""
    if not argv or argv[0] in SUBCOMMANDS or argv[0] in ("-h", "--help", "--version"):
        return argv
    return ["fit", *argv]


def main(argv: list[str] | None = None) -> None:
    """Run the CLI on ``argv`` (the process arguments by default)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if argv is None:
        # LightningCLI reads sys.argv itself; only the default subcommand is added.
        sys.argv[1:] = default_to_fit(sys.argv[1:])
        arguments = None
    else:
        arguments = default_to_fit(argv)
    GroundingCLI(
        LatentDiffusionModule,
        parser_kwargs={"parser_mode": "omegaconf+"},
        save_config_kwargs={"overwrite": True},
        args=arguments,
    )


if __name__ == "__main__":
    main()
