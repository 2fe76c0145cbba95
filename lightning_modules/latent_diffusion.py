"""Fine-tuning of a text-conditioned latent diffusion U-Net with a frozen text encoder."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from lightning_modules.components.diffusion_models import (
    IdentityLatent,
    encode_images,
    load_noise_scheduler,
    load_unet,
    load_vae,
)
from lightning_modules.components.text_encoders import (
    CXR_BERT_HUB_ID,
    CXR_BERT_REVISION,
    DEFAULT_MAX_LENGTH,
    EncodedText,
    load_text_encoder,
)
from lightning_modules.ema import ema_decay_at, update_ema

log = logging.getLogger(__name__)

# Frozen parts come from their own source when a checkpoint is loaded, so checkpoints stay small.
FROZEN_PREFIXES = ("vae.", "text_encoder.")


class LatentDiffusionModule(L.LightningModule):
    """Fine-tunes a diffusers ``UNet2DConditionModel`` on (image, caption) pairs.

    The VAE and the text encoder are frozen; only the U-Net (and the optional text adapter) is
    trained, with epsilon-prediction MSE under the base model's DDPM schedule. A share of captions
    (``condition_dropout``) is replaced by ``""`` before encoding, so that the model also learns
    the unconditional embedding that classifier-free guidance uses. An fp32 exponential moving
    average of the trained weights (``ema_unet``) is what validation, test, sampling and the
    diffusers export use. Method: Nützel et al., "Generate to Ground", MIDL 2025.

    Args:
        pretrained_model_name_or_path: a Stable Diffusion 1.5 directory in diffusers layout or a hub
            id; the U-Net, VAE and scheduler load from it. ``None`` builds a U-Net from
            ``unet_config`` (demo and tests).
        unet_config: ``UNet2DConditionModel`` keyword arguments for a randomly initialised U-Net.
        unet_seed: seed of that random initialisation.
        unet_name_or_path: a fine-tuned U-Net in diffusers format (a directory or hub id) that
            replaces the base model's, for evaluating published weights without a checkpoint.
        unet_subfolder: the U-Net's folder inside ``unet_name_or_path`` (``""`` for a bare U-Net).
        latent: ``vae`` encodes images with the frozen VAE; ``identity`` uses the ``[-1, 1]`` image
            itself as the latent (the demo, which has no trained VAE).
        scheduler_config: ``DDPMScheduler`` keyword arguments when no pretrained directory is given.
        text_encoder_name_or_path: a hub id or local directory of the frozen text encoder.
        text_encoder_type: ``cxr_bert``, ``clip``, ``auto`` (any transformers AutoModel) or
            ``tiny_bert`` (the demo's random BERT, built in ``text_encoder_name_or_path`` when missing).
        text_encoder_revision: the hub revision of the text encoder.
        trust_remote_code: run the encoder checkpoint's own model code (explicit opt-in).
        max_length: token positions per caption.
        text_adapter: add a trained linear map from the encoder's hidden size to the U-Net's
            ``cross_attention_dim``; without it a size mismatch raises.
        condition_dropout: probability of replacing a caption by ``""`` in training.
        learning_rate: AdamW learning rate (not scaled by the batch size).
        adam_betas: AdamW betas.
        adam_weight_decay: AdamW weight decay.
        adam_epsilon: AdamW epsilon.
        lr_scheduler: ``cosine`` (decay to 0 at the last step) or ``constant``, both after warm-up.
        lr_warmup_steps: linear warm-up length in optimizer steps.
        ema_decay: decay of the exponential moving average of the U-Net weights.
        ema_warmup: use ``min(ema_decay, (1 + n) / (10 + n))`` after ``n`` updates.
        seed: base seed of the per-step noise, timesteps and dropout draws, which depend only on
            (seed, optimizer step, micro-batch, rank), so that a resumed run draws what an
            uninterrupted one would.

    Raises:
        ValueError: on an invalid option or a hidden-size mismatch without adapter.
        MissingWeightsError: when a configured model directory or hub id cannot be loaded.
    """

    def __init__(
        self,
        pretrained_model_name_or_path: str | None = None,
        unet_config: dict[str, Any] | None = None,
        unet_seed: int = 0,
        unet_name_or_path: str | None = None,
        unet_subfolder: str = "unet",
        latent: Literal["vae", "identity"] = "vae",
        scheduler_config: dict[str, Any] | None = None,
        text_encoder_name_or_path: str = CXR_BERT_HUB_ID,
        text_encoder_type: Literal["cxr_bert", "clip", "auto", "tiny_bert"] = "cxr_bert",
        text_encoder_revision: str | None = CXR_BERT_REVISION,
        trust_remote_code: bool = False,
        max_length: int = DEFAULT_MAX_LENGTH,
        text_adapter: bool = False,
        condition_dropout: float = 0.3,
        learning_rate: float = 5e-5,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_weight_decay: float = 1e-2,
        adam_epsilon: float = 1e-8,
        lr_scheduler: Literal["cosine", "constant"] = "cosine",
        lr_warmup_steps: int = 1000,
        ema_decay: float = 0.9999,
        ema_warmup: bool = True,
        seed: int = 4200,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._check_options()

        # Diffusion parts.
        if unet_name_or_path:
            self.unet = load_unet(unet_name_or_path, subfolder=unet_subfolder, option="model.unet_name_or_path")
        else:
            self.unet = load_unet(pretrained_model_name_or_path, unet_config, seed=unet_seed)
        if latent == "vae":
            if not pretrained_model_name_or_path:
                raise ValueError("latent='vae' needs model.pretrained_model_name_or_path; use latent='identity' without a VAE.")
            self.vae: nn.Module = load_vae(pretrained_model_name_or_path)
        else:
            self.vae = IdentityLatent()
        self.noise_scheduler = load_noise_scheduler(pretrained_model_name_or_path, scheduler_config)

        # Frozen text encoder and the optional adapter to the U-Net's width.
        self.text_encoder = load_text_encoder(
            text_encoder_name_or_path,
            encoder_type=text_encoder_type,
            revision=text_encoder_revision,
            trust_remote_code=trust_remote_code,
            max_length=max_length,
        )
        self.text_adapter = self._build_text_adapter()

        # The EMA copies are fp32 and never trained.
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False).float().eval()
        self.ema_text_adapter = copy.deepcopy(self.text_adapter).requires_grad_(False).float().eval()
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))

    def _check_options(self) -> None:
        hparams = self.hparams
        if not 0.0 <= hparams.condition_dropout <= 1.0:
            raise ValueError(f"model.condition_dropout must lie in [0, 1], got {hparams.condition_dropout}.")
        if hparams.learning_rate <= 0:
            raise ValueError(f"model.learning_rate must be positive, got {hparams.learning_rate}.")
        if hparams.lr_warmup_steps < 0:
            raise ValueError(f"model.lr_warmup_steps must be non-negative, got {hparams.lr_warmup_steps}.")
        if not 0.0 <= hparams.ema_decay <= 1.0:
            raise ValueError(f"model.ema_decay must lie in [0, 1], got {hparams.ema_decay}.")

    def _build_text_adapter(self) -> nn.Module:
        hidden_size = self.text_encoder.hidden_size
        cross_attention_dim = self.unet.config.cross_attention_dim
        if hidden_size == cross_attention_dim:
            return nn.Identity()
        if not self.hparams.text_adapter:
            raise ValueError(
                f"The text encoder's hidden size ({hidden_size}) differs from the U-Net's "
                f"cross_attention_dim ({cross_attention_dim}). Choose an encoder of width "
                f"{cross_attention_dim}, or set model.text_adapter=true to train a linear adapter."
            )
        log.info("Training a linear text adapter from %d to %d", hidden_size, cross_attention_dim)
        return nn.Linear(hidden_size, cross_attention_dim)

    # ----------------------------------------------------------------------------------------
    # Conditioning and latents, shared by training and the grounding evaluation.

    def train(self, mode: bool = True) -> LatentDiffusionModule:
        """Switch the trained parts; the frozen encoders and the EMA copies stay in eval mode."""
        super().train(mode)
        self.vae.eval()
        self.text_encoder.eval()
        self.ema_unet.eval()
        self.ema_text_adapter.eval()
        return self

    def encode_text(self, texts: list[str], use_ema: bool = True) -> tuple[torch.Tensor, EncodedText]:
        """Encode texts into the U-Net's ``encoder_hidden_states``.

        Returns:
            ``[B, max_length, cross_attention_dim]`` hidden states after the adapter (the EMA
            adapter when ``use_ema``), and the raw encoder output with offsets.
        """
        encoded = self.text_encoder(texts)
        adapter = self.ema_text_adapter if use_ema else self.text_adapter
        hidden_states = encoded.last_hidden_state
        if not isinstance(adapter, nn.Identity):
            hidden_states = adapter(hidden_states.to(next(adapter.parameters()).dtype))
        return hidden_states, encoded

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Encode ``[B, 3, H, W]`` images in ``[-1, 1]`` to scaled latents (posterior mean)."""
        return encode_images(self.vae, pixel_values, sample=False)

    def _training_latents(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        """Latents of a training batch: a posterior sample from the cache, or from the VAE."""
        if "latent_mean" in batch:
            mean = batch["latent_mean"].float()
            std = torch.exp(0.5 * batch["latent_logvar"].float())
            noise = torch.randn(mean.shape, generator=generator, device=mean.device)
            return (mean + std * noise) * self.vae.config.scaling_factor
        if isinstance(self.vae, IdentityLatent):
            return batch["pixel_values"]
        with torch.no_grad():
            posterior = self.vae.encode(batch["pixel_values"].to(self.vae.dtype)).latent_dist
            noise = torch.randn(posterior.mean.shape, generator=generator, device=posterior.mean.device)
            latents = posterior.mean + posterior.std * noise
        return latents.float() * self.vae.config.scaling_factor

    def _step_generator(self, batch_idx: int) -> torch.Generator:
        """A generator seeded from (seed, optimizer step, micro-batch within the step, rank).

        The micro-batch counts within the optimizer step, not the epoch, because a run resumed
        from a mid-epoch checkpoint numbers its batches differently.
        """
        accumulation = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        micro_batch = batch_idx % accumulation
        seed_sequence = np.random.SeedSequence([self.hparams.seed, self.global_step, micro_batch, self.global_rank])
        generator = torch.Generator(device=self.device)
        generator.manual_seed(int(seed_sequence.generate_state(1, dtype=np.uint64)[0]) >> 1)
        return generator

    def drop_captions(self, captions: list[str], generator: torch.Generator) -> list[str]:
        """Replace each caption by ``""`` with probability ``condition_dropout``."""
        draws = torch.rand(len(captions), generator=generator, device=generator.device).tolist()
        return ["" if draw < self.hparams.condition_dropout else caption for caption, draw in zip(captions, draws)]

    # ----------------------------------------------------------------------------------------
    # Training.

    def diffusion_loss(
        self, latents: torch.Tensor, captions: list[str], generator: torch.Generator, use_ema: bool = False
    ) -> torch.Tensor:
        """Noise ``latents`` at random timesteps and return the MSE of the U-Net's prediction."""
        unet = self.ema_unet if use_ema else self.unet

        # Noise and timesteps.
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        num_timesteps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, num_timesteps, (latents.shape[0],), generator=generator, device=latents.device)
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)

        # Text conditioning.
        encoder_hidden_states, _ = self.encode_text(captions, use_ema=use_ema)

        # Target of the base model's parametrisation.
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"Unsupported prediction type {prediction_type!r}; use epsilon or v_prediction.")

        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
        return F.mse_loss(model_pred.float(), target.float())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        # The collate drops unreadable images; a batch left empty is skipped, not a NaN loss.
        if len(batch["captions"]) == 0:
            return None
        generator = self._step_generator(batch_idx)
        latents = self._training_latents(batch, generator)
        captions = self.drop_captions(list(batch["captions"]), generator)

        loss = self.diffusion_loss(latents, captions, generator)
        self.log("train/loss", loss, prog_bar=True, batch_size=latents.shape[0])
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Step the optimizer, then move the EMA towards the new weights.

        The update happens here rather than in a batch-end hook, so that a checkpoint written by
        a callback after this step already contains the updated average.
        """
        super().optimizer_step(*args, **kwargs)
        decay = ema_decay_at(int(self.ema_updates), self.hparams.ema_decay, self.hparams.ema_warmup)
        update_ema(self.ema_unet, self.unet, decay)
        update_ema(self.ema_text_adapter, self.text_adapter, decay)
        self.ema_updates += 1
        self.log("train/ema_decay", decay, batch_size=1)

    def on_train_start(self) -> None:
        trainer = self.trainer
        effective_batch = (
            getattr(trainer.datamodule, "train_batch_size", None) or 0
        ) * trainer.accumulate_grad_batches * trainer.world_size
        log.info(
            "Training the U-Net (%.1f M parameters): effective batch %s, %d optimizer steps, precision %s",
            sum(p.numel() for p in self.unet.parameters()) / 1e6,
            effective_batch or "unknown",
            trainer.estimated_stepping_batches,
            trainer.precision,
        )

    def on_train_end(self) -> None:
        self.export_ema_unet(Path(self.trainer.default_root_dir) / "unet_ema")

    @rank_zero_only
    def export_ema_unet(self, directory: str | Path) -> None:
        """Save the EMA U-Net in diffusers format (and the EMA text adapter, when trained)."""
        directory = Path(directory)
        self.ema_unet.save_pretrained(directory)
        if not isinstance(self.ema_text_adapter, nn.Identity):
            torch.save(self.ema_text_adapter.state_dict(), directory / "text_adapter.pt")
        log.info("Saved the EMA U-Net in diffusers format to %s", directory)

    # ----------------------------------------------------------------------------------------
    # Validation and test: a denoising loss with the EMA weights; grounding runs in a callback.

    def _evaluation_step(self, batch: dict[str, Any], batch_idx: int, stage: str) -> torch.Tensor | None:
        if len(batch["phrases"]) == 0:
            return None
        generator = self._step_generator(batch_idx)
        latents = self.encode_images(batch["pixel_values"])
        loss = self.diffusion_loss(latents, list(batch["phrases"]), generator, use_ema=True)
        self.log(f"{stage}/loss", loss, sync_dist=True, batch_size=latents.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        return self._evaluation_step(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        return self._evaluation_step(batch, batch_idx, "test")

    # ----------------------------------------------------------------------------------------
    # Optimizer and checkpoints.

    def configure_optimizers(self) -> dict[str, Any]:
        hparams = self.hparams
        parameters = [p for p in list(self.unet.parameters()) + list(self.text_adapter.parameters()) if p.requires_grad]
        optimizer = torch.optim.AdamW(
            parameters,
            lr=hparams.learning_rate,
            betas=tuple(hparams.adam_betas),
            weight_decay=hparams.adam_weight_decay,
            eps=hparams.adam_epsilon,
        )
        if hparams.lr_scheduler == "cosine":
            total_steps = int(self.trainer.estimated_stepping_batches)
            scheduler = get_cosine_schedule_with_warmup(optimizer, hparams.lr_warmup_steps, total_steps)
        else:
            scheduler = get_constant_schedule_with_warmup(optimizer, hparams.lr_warmup_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state_dict = checkpoint["state_dict"]
        for key in [key for key in state_dict if key.startswith(FROZEN_PREFIXES)]:
            del state_dict[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state_dict = checkpoint["state_dict"]
        for key, value in self.state_dict().items():
            if key.startswith(FROZEN_PREFIXES):
                state_dict.setdefault(key, value)
