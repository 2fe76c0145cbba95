"""Tests of the latent cache: hits, misses, VAE changes, interrupted and corrupt builds, DDP-style locking."""

import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from datamodules.datamodule import CXRDataModule
from datamodules.image_io import DecodeMode, ImageDecodeError
from datamodules.latent_cache import (
    LatentCache,
    LatentCacheError,
    LatentCacheKey,
    LatentCaptionDataset,
    LatentDtype,
    encode_posterior,
    image_list_digest,
    latent_shape,
    vae_digest,
)
from datamodules.mimic_cxr import CaptionImageDataset

IMAGE_SIZE = 32


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=IMAGE_SIZE,
    )
    return vae.eval().requires_grad_(False)


@pytest.fixture()
def images(tmp_path: Path) -> CaptionImageDataset:
    """Seven PNG images of different sizes with captions."""
    from PIL import Image

    paths = []
    for index in range(7):
        pixels = np.random.default_rng(index).integers(0, 255, (40 + index, 48), dtype=np.uint8)
        path = tmp_path / "images" / f"{index}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return CaptionImageDataset(paths, [f"caption {index}" for index in range(7)], IMAGE_SIZE, DecodeMode.STRICT)


def make_cache(root: Path, images: CaptionImageDataset, vae: AutoencoderKL, dtype: LatentDtype = LatentDtype.FLOAT16) -> LatentCache:
    key = LatentCacheKey(image_list_digest(images.image_paths), vae_digest(vae), IMAGE_SIZE, fast_jpeg=True, dtype=dtype)
    return LatentCache(root, key, len(images), latent_shape(vae, IMAGE_SIZE))


class CountingEncoder:
    """Wraps `encode_posterior`, counts images and can fail after a number of calls."""

    def __init__(self, vae: AutoencoderKL, fail_after_calls: int | None = None) -> None:
        self.vae = vae
        self.fail_after_calls = fail_after_calls
        self.calls = 0
        self.images = 0

    def __call__(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fail_after_calls is not None and self.calls >= self.fail_after_calls:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        self.images += len(pixel_values)
        return encode_posterior(self.vae, pixel_values)


def stored_rows(cache: LatentCache, dtype: LatentDtype = LatentDtype.FLOAT16) -> torch.Tensor:
    dataset = LatentCaptionDataset(cache.directory, dtype, np.arange(cache.num_images), ["x"] * cache.num_images)
    return torch.stack([dataset[index]["latent_mean"] for index in range(len(dataset))])


def test_miss_then_hit(tmp_path: Path, images: CaptionImageDataset) -> None:
    vae = tiny_vae()
    cache = make_cache(tmp_path / "cache", images, vae)
    encoder = CountingEncoder(vae)

    first = cache.build(images, encoder, batch_size=3)
    second = cache.build(images, encoder, batch_size=3)

    assert not first.hit
    assert first.encoded == 7
    assert second.hit
    assert second.encoded == 0
    assert encoder.images == 7


def test_stored_values_match_encoder(tmp_path: Path, images: CaptionImageDataset) -> None:
    vae = tiny_vae()
    cache = make_cache(tmp_path / "cache", images, vae)
    cache.build(images, partial(encode_posterior, vae), batch_size=4)

    pixel_values = torch.stack([images.load_image(index)["pixel_values"] for index in range(7)])
    mean, logvar = encode_posterior(vae, pixel_values)
    dataset = LatentCaptionDataset(cache.directory, LatentDtype.FLOAT16, np.arange(7), images.captions, random_caption=False)

    item = dataset[5]
    torch.testing.assert_close(item["latent_mean"], mean[5], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(item["latent_logvar"], logvar[5], atol=2e-3, rtol=2e-3)
    assert item["caption"] == "caption 5"
    assert item["latent_mean"].dtype == torch.float32


def test_bfloat16_storage(tmp_path: Path, images: CaptionImageDataset) -> None:
    vae = tiny_vae()
    cache = make_cache(tmp_path / "cache", images, vae, LatentDtype.BFLOAT16)
    cache.build(images, partial(encode_posterior, vae), batch_size=4)

    pixel_values = torch.stack([images.load_image(index)["pixel_values"] for index in range(7)])
    mean, _ = encode_posterior(vae, pixel_values)
    torch.testing.assert_close(stored_rows(cache, LatentDtype.BFLOAT16), mean, atol=2e-2, rtol=1e-2)


def test_vae_change_invalidates(tmp_path: Path, images: CaptionImageDataset) -> None:
    first_vae, second_vae = tiny_vae(0), tiny_vae(1)
    first = make_cache(tmp_path / "cache", images, first_vae)
    second = make_cache(tmp_path / "cache", images, second_vae)
    first.build(images, partial(encode_posterior, first_vae))

    report = second.build(images, partial(encode_posterior, second_vae))

    assert first.directory != second.directory
    assert not report.hit
    assert report.encoded == 7


def test_interrupted_build_resumes(tmp_path: Path, images: CaptionImageDataset) -> None:
    vae = tiny_vae()
    cache = make_cache(tmp_path / "cache", images, vae)

    with pytest.raises(KeyboardInterrupt):
        cache.build(images, CountingEncoder(vae, fail_after_calls=1), batch_size=3)
    assert cache.problem(verify_checksums=True) == "incomplete build"

    encoder = CountingEncoder(vae)
    report = cache.build(images, encoder, batch_size=3)

    assert report.resumed_from == 3
    assert report.encoded == 4
    assert encoder.images == 4
    assert cache.problem(verify_checksums=True) is None

    # The resumed store equals an uninterrupted one.
    reference = make_cache(tmp_path / "reference", images, vae)
    reference.build(images, partial(encode_posterior, vae), batch_size=3)
    torch.testing.assert_close(stored_rows(cache), stored_rows(reference))


def test_corrupt_store_rebuilt(tmp_path: Path, images: CaptionImageDataset) -> None:
    vae = tiny_vae()
    cache = make_cache(tmp_path / "cache", images, vae)
    cache.build(images, partial(encode_posterior, vae))
    expected = stored_rows(cache)
    mean_file = cache.directory / "mean.npy"
    data = bytearray(mean_file.read_bytes())
    data[-10:] = b"\xff" * 10
    mean_file.write_bytes(bytes(data))

    report = cache.build(images, partial(encode_posterior, vae))

    assert not report.hit
    assert report.rebuilt_reason == "checksum mismatch in mean.npy"
    assert report.encoded == 7
    torch.testing.assert_close(stored_rows(cache), expected)


def test_truncated_store_rebuilt(tmp_path: Path, images: CaptionImageDataset) -> None:
    vae = tiny_vae()
    cache = make_cache(tmp_path / "cache", images, vae)
    cache.build(images, partial(encode_posterior, vae))
    logvar_file = cache.directory / "logvar.npy"
    logvar_file.write_bytes(logvar_file.read_bytes()[:200])

    report = cache.build(images, partial(encode_posterior, vae), verify_checksums=False)

    assert not report.hit
    assert "logvar.npy is unreadable" in report.rebuilt_reason
    assert cache.problem(verify_checksums=True) is None


def test_lenient_failures_excluded(tmp_path: Path, images: CaptionImageDataset) -> None:
    Path(images.image_paths[2]).write_bytes(b"broken")
    images.decode_mode = DecodeMode.LENIENT
    vae = tiny_vae()
    cache = make_cache(tmp_path / "cache", images, vae)

    report = cache.build(images, partial(encode_posterior, vae), batch_size=3)

    assert report.failed == 1
    assert report.encoded == 6
    assert list(cache.usable_indices()) == [0, 1, 3, 4, 5, 6]


def test_strict_failure_raises(tmp_path: Path, images: CaptionImageDataset) -> None:
    Path(images.image_paths[4]).unlink()
    vae = tiny_vae()
    cache = make_cache(tmp_path / "cache", images, vae)

    with pytest.raises(ImageDecodeError, match="4.png"):
        cache.build(images, partial(encode_posterior, vae), batch_size=3)


def test_concurrent_builders_write_once(tmp_path: Path, images: CaptionImageDataset) -> None:
    vae = tiny_vae()
    encoder = CountingEncoder(vae)
    reports = []

    def build() -> None:
        reports.append(make_cache(tmp_path / "cache", images, vae).build(images, encoder, batch_size=2))

    threads = [threading.Thread(target=build) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert encoder.images == 7
    assert sorted(report.hit for report in reports) == [False, True, True]


def test_usable_indices_rejects_missing_store(tmp_path: Path, images: CaptionImageDataset) -> None:
    cache = make_cache(tmp_path / "cache", images, tiny_vae())

    with pytest.raises(Exception, match="use_latent_cache=false"):
        cache.usable_indices()


@pytest.mark.parametrize("layout", ["diffusers", "bare"])
def test_datamodule_trains_from_cache(mimic_root, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    vae_dir = tmp_path / "sd"
    tiny_vae().save_pretrained(vae_dir / "vae" if layout == "diffusers" else vae_dir)
    datamodule = CXRDataModule(
        mimic_cxr_jpg_root=str(mimic_root.root),
        ms_cxr_csv=str(mimic_root.ms_cxr_csv),
        image_size=IMAGE_SIZE,
        train_batch_size=2,
        num_workers=0,
        pin_memory=False,
        work_dir=str(tmp_path / "work"),
        use_latent_cache=True,
        vae_name_or_path=str(vae_dir),
    )
    datamodule.prepare_data()

    # Training must never load or run the VAE again.
    def fail(*args, **kwargs):
        raise AssertionError("the VAE was used after prepare_data")

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", fail)
    monkeypatch.setattr(AutoencoderKL, "encode", fail)
    datamodule.setup("fit")
    batch = datamodule.on_before_batch_transfer(next(iter(datamodule.train_dataloader())), 0)

    assert set(batch) == {"latent_mean", "latent_logvar", "captions"}
    assert batch["latent_mean"].shape == (2, 4, 16, 16)
    assert batch["latent_logvar"].shape == (2, 4, 16, 16)
    assert len(batch["captions"]) == 2


def test_datamodule_missing_vae_path(mimic_root, tmp_path: Path) -> None:
    datamodule = CXRDataModule(
        mimic_cxr_jpg_root=str(mimic_root.root),
        ms_cxr_csv=str(mimic_root.ms_cxr_csv),
        image_size=IMAGE_SIZE,
        num_workers=0,
        work_dir=str(tmp_path / "work"),
        use_latent_cache=True,
        vae_name_or_path=str(tmp_path / "no_such_vae"),
    )

    with pytest.raises(FileNotFoundError, match="vae_name_or_path"):
        datamodule.prepare_data()


def test_datamodule_never_uses_stale_store(mimic_root, tmp_path: Path) -> None:
    vae_dir = tmp_path / "vae"
    tiny_vae().save_pretrained(vae_dir)
    arguments = {
        "mimic_cxr_jpg_root": str(mimic_root.root),
        "ms_cxr_csv": str(mimic_root.ms_cxr_csv),
        "image_size": IMAGE_SIZE,
        "num_workers": 0,
        "work_dir": str(tmp_path / "work"),
        "use_latent_cache": True,
        "vae_name_or_path": str(vae_dir),
    }
    CXRDataModule(**arguments).prepare_data()

    # Another storage dtype without prepare_data: the float16 store must not be used.
    stale = CXRDataModule(**{**arguments, "latent_dtype": "bfloat16"})
    with pytest.raises(LatentCacheError, match="run it again"):
        stale.setup("fit")
