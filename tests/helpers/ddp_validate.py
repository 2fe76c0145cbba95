"""Run one grounding validation of a tiny model on phantoms, on 1 or more CPU processes.

Usage: ``python tests/helpers/ddp_validate.py WORK_DIR DEVICES``. Lightning's ``ddp`` strategy
starts the other ranks by running this script again, so it must be a file, not a test function.
The grounding results land in ``WORK_DIR/run-<DEVICES>/grounding``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from callbacks.grounding_evaluation import GroundingEvaluation  # noqa: E402
from lightning_modules.components.tiny_bert import build_tiny_bert  # noqa: E402
from lightning_modules.latent_diffusion import LatentDiffusionModule  # noqa: E402
from tests.helpers.models import TINY_HIDDEN_SIZE, phantom_datamodule, quiet_trainer, tiny_unet_config  # noqa: E402


def main(work_dir: Path, devices: int) -> None:
    L.seed_everything(0)
    bert_dir = build_tiny_bert(work_dir / "tiny_bert", hidden_size=TINY_HIDDEN_SIZE, seed=0)
    module = LatentDiffusionModule(
        unet_config=tiny_unet_config(),
        latent="identity",
        text_encoder_name_or_path=str(bert_dir),
        text_encoder_type="auto",
        text_encoder_revision=None,
    )
    datamodule = phantom_datamodule(
        work_dir,
        {"num_train": 4, "num_validate": 5, "num_test": 0, "seed": 3, "max_findings_per_image": 1, "normal_fraction": 0.0},
        train_batch_size=2,
        eval_batch_size=2,
        work_dir=str(work_dir / f"data-{devices}"),
    )
    run_dir = work_dir / f"run-{devices}"
    grounding = GroundingEvaluation(
        output_dir=str(run_dir / "grounding"),
        num_inference_steps=4,
        timestep_window=3,
        extra_timestep_windows=[2],
        steps_per_forward=4,
        num_overlays=2,
    )
    trainer = quiet_trainer(
        run_dir, devices=devices, strategy="ddp" if devices > 1 else "auto", callbacks=[grounding]
    )
    trainer.validate(module, datamodule=datamodule)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
