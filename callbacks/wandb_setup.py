"""Weights & Biases set-up: offline mode without credentials, and the sync command at the end."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

log = logging.getLogger(__name__)

WANDB_HOST = "api.wandb.ai"


def has_wandb_credentials() -> bool:
    """Tell whether W&B can log online: an API key in the environment or in ``~/.netrc``."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc_file = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if not netrc_file.is_file():
        return False
    try:
        return netrc.netrc(netrc_file).authenticators(WANDB_HOST) is not None
    except (netrc.NetrcParseError, OSError):
        return False


def _is_wandb_logger(logger_config: Any) -> bool:
    class_path = logger_config.get("class_path", "") if hasattr(logger_config, "get") else ""
    return str(class_path).endswith("WandbLogger")


def configure_wandb_logger(trainer_config: Any) -> None:
    """Switch configured ``WandbLogger`` entries to offline mode when W&B cannot log online.

    ``WANDB_MODE`` set by the user wins. Otherwise, without credentials, the run is written
    offline and :class:`WandbSyncNotice` prints the ``wandb sync`` command when it ends.
    """
    loggers = trainer_config.get("logger") if hasattr(trainer_config, "get") else None
    if loggers in (None, False, True):
        return
    if not isinstance(loggers, list):
        loggers = [loggers]
    if os.environ.get("WANDB_MODE") or has_wandb_credentials():
        return
    for logger_config in loggers:
        if _is_wandb_logger(logger_config):
            logger_config["init_args"]["offline"] = True
            log.info("No W&B credentials found (WANDB_API_KEY or ~/.netrc): logging offline.")


class WandbSyncNotice(Callback):
    """Log where an offline W&B run was written and the command that uploads it."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._notify(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != "fit":
            self._notify(trainer)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._notify(trainer)

    def _notify(self, trainer: L.Trainer) -> None:
        for logger in trainer.loggers:
            if not isinstance(logger, WandbLogger) or not logger._offline:
                continue
            run_dir = Path(logger.experiment.dir).parent
            rank_zero_info(f"W&B run written offline to {run_dir}; upload it with: wandb sync {run_dir}")
