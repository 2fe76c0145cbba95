from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ground
from tests.conftest import REPO_ROOT, SHARED_DATA


def config_arguments(tmp_path: Path) -> list[str]:
    return [
        "--config",
        str(REPO_ROOT / "configs/demo.yaml"),
        f"--model.text_encoder_name_or_path={tmp_path / 'tiny_bert'}",
        f"--data.init_args.demo_root={tmp_path / 'phantoms'}",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        "--trainer.logger=false",
        "--trainer.callbacks.init_args.num_inference_steps=4",
        "--trainer.callbacks.init_args.timestep_window=3",
    ]


def real_radiograph() -> Path:
    images = sorted((SHARED_DATA / "real-cxr").glob("*.png"))
    if not images:
        pytest.skip(f"no real radiographs under {SHARED_DATA / 'real-cxr'}")
    return images[0]


def test_writes_heat_map_of_real_image(tmp_path: Path) -> None:
    output = tmp_path / "out" / "effusion.png"

    ground.main(
        ["--image", str(real_radiograph()), "--phrase", "small left pleural effusion", "--output", str(output), "--"]
        + config_arguments(tmp_path)
    )

    heat_map = np.load(output.with_suffix(".npy"))
    assert heat_map.shape == (32, 32)
    assert heat_map.min() >= 0.0
    assert heat_map.max() <= 1.0
    figure = Image.open(output)
    # The image, the lexical map and one panel for each of the four words.
    assert figure.width == 6 * figure.height


def test_unreadable_image_named(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")

    with pytest.raises(SystemExit, match="broken.jpg"):
        ground.main(
            ["--image", str(broken), "--phrase", "cardiomegaly", "--output", str(tmp_path / "x.png"), "--"]
            + config_arguments(tmp_path)
        )


def test_empty_phrase_rejected(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="phrase is empty"):
        ground.main(["--image", "x.png", "--phrase", "  ", "--output", str(tmp_path / "x.png")])


def test_missing_checkpoint_named_before_loading(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="Checkpoint not found"):
        ground.main(
            ["--image", str(real_radiograph()), "--phrase", "cardiomegaly", "--output", str(tmp_path / "x.png"),
             "--ckpt_path", str(tmp_path / "missing.ckpt")]
        )


def test_missing_config_named(tmp_path: Path) -> None:
    image = tmp_path / "image.png"
    image.write_bytes(b"not read before the config check")

    with pytest.raises(SystemExit, match="No config given.*-- --config configs/demo.yaml"):
        ground.main(["--image", str(image), "--phrase", "cardiomegaly", "--output", str(tmp_path / "x.png")])


def test_invalid_image_size_rejected(tmp_path: Path) -> None:
    image = tmp_path / "image.png"
    image.write_bytes(b"not read before the size check")

    with pytest.raises(SystemExit, match="positive multiple of 8, got -5"):
        ground.main(["--image", str(image), "--phrase", "cardiomegaly", "--output", str(tmp_path / "x.png"), "--image_size", "-5"])
