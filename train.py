"""Command-line entry point: fine-tune, validate or test the latent diffusion model.

    python train.py --config configs/demo.yaml            # fit (the default subcommand)
    python train.py fit --config configs/cxrbert.yaml --trainer.max_steps=20
    python train.py validate --config configs/demo.yaml --ckpt_path runs/demo/checkpoints/last.ckpt

Configs are parsed by LightningCLI in omegaconf mode, so they may use ``${...}`` interpolation,
and every option can be overridden on the command line.
"""

from __future__ import annotations

import logging
import sys

from lightning.pytorch.cli import LightningCLI

from callbacks.wandb_setup import configure_wandb_logger
from lightning_modules.latent_diffusion import LatentDiffusionModule

log = logging.getLogger("train")

SUBCOMMANDS = ("fit", "validate", "test", "predict")


class GroundingCLI(LightningCLI):
    """LightningCLI that turns missing data or weights into one message and sets up W&B."""

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        configure_wandb_logger(config.get("trainer", {}))

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except FileNotFoundError as error:
            # A missing data set or model is a setup problem, not a bug: no traceback.
            log.error("%s", error)
            sys.exit(2)


def default_to_fit(argv: list[str]) -> list[str]:
    """Insert the ``fit`` subcommand when the arguments start with an option."""
    if not argv or argv[0] in SUBCOMMANDS or argv[0] in ("-h", "--help", "--version"):
        return argv
    return ["fit", *argv]


def main(argv: list[str] | None = None) -> None:
    """Run the CLI on ``argv`` (the process arguments by default)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    arguments = default_to_fit(sys.argv[1:] if argv is None else argv)
    GroundingCLI(
        LatentDiffusionModule,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=arguments,
    )


if __name__ == "__main__":
    main()
