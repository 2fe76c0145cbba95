from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_modules.ema import ema_decay_at, update_ema
from lightning_modules.latent_diffusion import LatentDiffusionModule
from tests.helpers.models import tiny_unet_config

CAPTIONS = ["small left pleural effusion", "right upper lobe opacity", "cardiomegaly", "left pneumothorax"]


class CaptionedImages(Dataset):
    """Fixed random images with captions, in a fixed order."""

    def __init__(self, size: int = 16, image_size: int = 32) -> None:
        generator = torch.Generator().manual_seed(123)
        self.images = torch.rand(size, 3, image_size, image_size, generator=generator) * 2 - 1
        self.captions = [CAPTIONS[index % len(CAPTIONS)] for index in range(size)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"pixel_values": self.images[index], "captions": self.captions[index]}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "captions": [item["captions"] for item in items],
    }


def make_loader() -> DataLoader:
    return DataLoader(CaptionedImages(), batch_size=4, shuffle=False, collate_fn=collate)


def make_trainer(tmp_path: Path, max_steps: int, **kwargs: Any) -> L.Trainer:
    return L.Trainer(
        default_root_dir=tmp_path,
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing="callbacks" in kwargs,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
        **kwargs,
    )


def flat_parameters(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([parameter.detach().flatten() for parameter in module.parameters()])


def test_condition_dropout_rate(tiny_module_kwargs: dict[str, Any]) -> None:
    module = LatentDiffusionModule(**tiny_module_kwargs, condition_dropout=0.3)
    generator = torch.Generator().manual_seed(0)

    dropped = module.drop_captions(["caption"] * 20000, generator)

    rate = dropped.count("") / len(dropped)
    assert abs(rate - 0.3) < 0.015


def test_condition_dropout_extremes(tiny_module_kwargs: dict[str, Any]) -> None:
    generator = torch.Generator().manual_seed(0)
    never = LatentDiffusionModule(**tiny_module_kwargs, condition_dropout=0.0)
    always = LatentDiffusionModule(**tiny_module_kwargs, condition_dropout=1.0)

    assert never.drop_captions(CAPTIONS, generator) == CAPTIONS
    assert always.drop_captions(CAPTIONS, generator) == [""] * len(CAPTIONS)


def test_dropped_caption_encodes_like_empty(tiny_module_kwargs: dict[str, Any]) -> None:
    module = LatentDiffusionModule(**tiny_module_kwargs, condition_dropout=0.5)
    generator = torch.Generator().manual_seed(3)
    captions = module.drop_captions(CAPTIONS * 4, generator)
    assert "" in captions

    hidden_states, _ = module.encode_text(captions)
    empty_states, _ = module.encode_text([""])

    for row, caption in enumerate(captions):
        if caption == "":
            torch.testing.assert_close(hidden_states[row], empty_states[0])
        else:
            assert not torch.allclose(hidden_states[row], empty_states[0])


def test_invalid_dropout_rejected(tiny_module_kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="condition_dropout"):
        LatentDiffusionModule(**tiny_module_kwargs, condition_dropout=1.5)


def test_hidden_size_mismatch_needs_adapter(tiny_module_kwargs: dict[str, Any]) -> None:
    kwargs = {**tiny_module_kwargs, "unet_config": tiny_unet_config(cross_attention_dim=48)}
    with pytest.raises(ValueError, match="cross_attention_dim"):
        LatentDiffusionModule(**kwargs)

    module = LatentDiffusionModule(**kwargs, text_adapter=True)
    hidden_states, _ = module.encode_text(["left pleural effusion"])
    assert hidden_states.shape == (1, 77, 48)


def test_ema_decay_schedule() -> None:
    assert ema_decay_at(0, 0.999, warmup=True) == pytest.approx(0.1)
    assert ema_decay_at(10, 0.999, warmup=True) == pytest.approx(11 / 20)
    assert ema_decay_at(10**6, 0.999, warmup=True) == pytest.approx(0.999)
    assert ema_decay_at(5, 0.9, warmup=False) == 0.9
    with pytest.raises(ValueError, match="decay"):
        ema_decay_at(0, 1.5, warmup=False)


def test_ema_update_hand_computed() -> None:
    trained = torch.nn.Linear(2, 1)
    ema = torch.nn.Linear(2, 1)
    torch.nn.init.constant_(trained.weight, 1.0)
    torch.nn.init.constant_(trained.bias, 1.0)
    torch.nn.init.constant_(ema.weight, 0.0)
    torch.nn.init.constant_(ema.bias, 0.0)

    update_ema(ema, trained, decay=0.9)
    torch.testing.assert_close(ema.weight, torch.full((1, 2), 0.1))

    torch.nn.init.constant_(trained.weight, 2.0)
    update_ema(ema, trained, decay=0.9)
    torch.testing.assert_close(ema.weight, torch.full((1, 2), 0.9 * 0.1 + 0.1 * 2.0))


def test_ema_follows_training(tmp_path: Path, tiny_module_kwargs: dict[str, Any]) -> None:
    # Without warm-up the first step has a non-zero learning rate.
    module = LatentDiffusionModule(**{**tiny_module_kwargs, "lr_warmup_steps": 0})
    initial = flat_parameters(module.unet).clone()

    make_trainer(tmp_path, max_steps=1).fit(module, train_dataloaders=make_loader())

    trained = flat_parameters(module.unet)
    assert not torch.allclose(trained, initial)
    torch.testing.assert_close(flat_parameters(module.ema_unet), 0.9 * initial + 0.1 * trained)
    assert int(module.ema_updates) == 1


def test_ema_updates_once_per_optimizer_step(tmp_path: Path, tiny_module_kwargs: dict[str, Any]) -> None:
    module = LatentDiffusionModule(**tiny_module_kwargs)

    make_trainer(tmp_path, max_steps=2, accumulate_grad_batches=2).fit(module, train_dataloaders=make_loader())

    assert module.global_step == 2
    assert int(module.ema_updates) == 2


def test_validation_uses_ema_weights(tiny_module_kwargs: dict[str, Any]) -> None:
    module = LatentDiffusionModule(**tiny_module_kwargs)
    batch = {"pixel_values": CaptionedImages().images[:4], "phrases": CAPTIONS}

    def evaluation_loss() -> float:
        generator = module._step_generator(0)
        latents = module.encode_images(batch["pixel_values"])
        return float(module.diffusion_loss(latents, batch["phrases"], generator, use_ema=True))

    reference = evaluation_loss()
    with torch.no_grad():
        for parameter in module.unet.parameters():
            parameter.add_(0.5)
    assert evaluation_loss() == pytest.approx(reference)

    with torch.no_grad():
        for parameter in module.ema_unet.parameters():
            parameter.add_(0.5)
    assert evaluation_loss() != pytest.approx(reference)


def test_resume_matches_uninterrupted_run(tmp_path: Path, tiny_module_kwargs: dict[str, Any]) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    # The uninterrupted run saves a checkpoint at step 4 as a crashed run would have.
    L.seed_everything(0)
    uninterrupted = LatentDiffusionModule(**tiny_module_kwargs)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=4, save_top_k=-1)
    make_trainer(tmp_path / "full", max_steps=8, callbacks=[checkpoints]).fit(uninterrupted, train_dataloaders=make_loader())
    checkpoint = tmp_path / "checkpoints" / "epoch=0-step=4.ckpt"
    assert checkpoint.is_file()

    L.seed_everything(1)
    resumed = LatentDiffusionModule(**tiny_module_kwargs)
    make_trainer(tmp_path / "resumed", max_steps=8).fit(resumed, train_dataloaders=make_loader(), ckpt_path=checkpoint)

    assert resumed.global_step == 8
    torch.testing.assert_close(flat_parameters(resumed.unet), flat_parameters(uninterrupted.unet), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(flat_parameters(resumed.ema_unet), flat_parameters(uninterrupted.ema_unet), rtol=1e-5, atol=1e-6)


def test_checkpoint_leaves_out_frozen_encoders(tmp_path: Path, tiny_module_kwargs: dict[str, Any]) -> None:
    module = LatentDiffusionModule(**tiny_module_kwargs)
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.fit(module, train_dataloaders=make_loader())
    trainer.save_checkpoint(tmp_path / "model.ckpt")

    state_dict = torch.load(tmp_path / "model.ckpt", weights_only=False)["state_dict"]

    assert not any(key.startswith("text_encoder.") for key in state_dict)
    assert any(key.startswith("ema_unet.") for key in state_dict)
    restored = LatentDiffusionModule.load_from_checkpoint(tmp_path / "model.ckpt")
    torch.testing.assert_close(flat_parameters(restored.ema_unet), flat_parameters(module.ema_unet))


def test_export_ema_unet_loads_in_diffusers(tmp_path: Path, tiny_module_kwargs: dict[str, Any]) -> None:
    from diffusers import UNet2DConditionModel

    module = LatentDiffusionModule(**tiny_module_kwargs)
    module.export_ema_unet(tmp_path / "unet_ema")

    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet_ema")
    torch.testing.assert_close(flat_parameters(loaded), flat_parameters(module.ema_unet))
