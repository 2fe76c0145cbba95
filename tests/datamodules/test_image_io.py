"""Tests of radiograph decoding: 8 and 16-bit PNG, JPEG, DICOM, and unreadable files."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.image_io import ImageDecodeError, decode_radiograph, read_grayscale

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
REAL_DICOM = SHARED_DATA / "dicom" / "RG1_UNCR.dcm"


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,
) -> Path:
    """Write a minimal uncompressed single-frame DICOM file with pydicom."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = photometric
    dataset.BitsAllocated = 16
    dataset.BitsStored = bits_stored
    dataset.HighBit = bits_stored - 1
    dataset.PixelRepresentation = 0
    if slope is not None:
        dataset.RescaleSlope = slope
        dataset.RescaleIntercept = intercept or 0.0
    if window is not None:
        dataset.WindowCenter, dataset.WindowWidth = window
    dataset.PixelData = pixels.astype(np.uint16).tobytes()
    dataset.save_as(path, enforce_file_format=True)
    return path


def test_png_8bit(tmp_path: Path) -> None:
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(pixels).save(tmp_path / "image.png")

    image = read_grayscale(tmp_path / "image.png")

    assert image.dtype == np.float32
    assert image.shape == (16, 16)
    assert image.min() == 0.0
    assert image.max() == 1.0
    assert len(np.unique(image)) == 256


def test_png_16bit_keeps_gradient(tmp_path: Path) -> None:
    # A ramp over the whole 16-bit range: every level must survive, none clipped.
    pixels = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    Image.fromarray(pixels).save(tmp_path / "image.png")

    image = read_grayscale(tmp_path / "image.png")

    assert image.min() == 0.0
    assert image.max() == 1.0
    assert len(np.unique(image)) == 64 * 64
    np.testing.assert_allclose(image, pixels / 65535.0, atol=1e-6)


def test_png_16bit_low_values_not_stretched(tmp_path: Path) -> None:
    # A 12-bit image stored in 16 bits stays dark instead of being stretched to its own maximum.
    pixels = np.full((8, 8), 4095, dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / "image.png")

    assert read_grayscale(tmp_path / "image.png").max() == pytest.approx(4095 / 65535)


def test_jpeg_rgb_to_gray(tmp_path: Path) -> None:
    pixels = np.zeros((32, 48, 3), dtype=np.uint8)
    pixels[:, 24:] = 255
    Image.fromarray(pixels).save(tmp_path / "image.jpg", quality=95)

    image = read_grayscale(tmp_path / "image.jpg")

    assert image.shape == (32, 48)
    assert image[:, :20].mean() < 0.05
    assert image[:, 28:].mean() > 0.95


def test_jpeg_reduced_decoding_keeps_original_size(tmp_path: Path) -> None:
    Image.fromarray(np.full((1200, 1000), 128, dtype=np.uint8)).save(tmp_path / "large.jpg")

    decoded = decode_radiograph(tmp_path / "large.jpg", min_size=200)

    assert (decoded.original_height, decoded.original_width) == (1200, 1000)
    assert min(decoded.pixels.shape) >= 200
    assert decoded.pixels.shape[1] < 1000


def test_missing_file_names_path(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match="missing.jpg.*file not found"):
        read_grayscale(tmp_path / "missing.jpg")


def test_truncated_jpeg_names_path(tmp_path: Path) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256), dtype=np.uint8)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])

    with pytest.raises(ImageDecodeError, match="truncated.jpg"):
        read_grayscale(tmp_path / "truncated.jpg")


def test_garbage_file_rejected(tmp_path: Path) -> None:
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")

    with pytest.raises(ImageDecodeError, match="garbage.png"):
        read_grayscale(tmp_path / "garbage.png")


def test_unsupported_suffix_rejected(tmp_path: Path) -> None:
    (tmp_path / "image.tiff").write_bytes(b"")

    with pytest.raises(ImageDecodeError, match="unsupported suffix"):
        read_grayscale(tmp_path / "image.tiff")


def test_dicom_rescale_and_window(tmp_path: Path) -> None:
    # Stored 0..4095 with slope 2 and intercept -1000 -> -1000..7190; window 3000 +- 2000.
    pixels = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (4, 1))
    path = write_dicom(tmp_path / "image.dcm", pixels, slope=2.0, intercept=-1000.0, window=(3000.0, 4000.0))

    image = read_grayscale(path)

    values = pixels * 2.0 - 1000.0
    inside = (values > 1100) & (values < 4900)
    assert image[values < 1000].max() == pytest.approx(0.0, abs=1e-6)
    assert image[values > 5000].min() == pytest.approx(1.0, abs=1e-6)
    assert (np.diff(image[0][inside[0]]) > 0).all()


def test_dicom_monochrome1_inverted(tmp_path: Path) -> None:
    pixels = np.array([[0, 4095]], dtype=np.uint16).repeat(4, axis=0)
    path = write_dicom(tmp_path / "image.dcm", pixels, photometric="MONOCHROME1")

    image = read_grayscale(path)

    assert image[0, 0] == pytest.approx(1.0)
    assert image[0, 1] == pytest.approx(0.0)


def test_dicom_corrupt_names_path(tmp_path: Path) -> None:
    (tmp_path / "broken.dcm").write_bytes(b"DICM" * 10)

    with pytest.raises(ImageDecodeError, match="broken.dcm"):
        read_grayscale(tmp_path / "broken.dcm")


@pytest.mark.skipif(not REAL_DICOM.is_file(), reason=f"real DICOM sample not found at {REAL_DICOM}")
def test_real_dicom_monochrome1() -> None:
    image = read_grayscale(REAL_DICOM)
    height, width = image.shape

    # Lungs (left of the spine, upper half) are darker than the spine and mediastinum.
    lung = image[height // 3 : height // 2, width // 5 : width // 3].mean()
    spine = image[height // 3 : height // 2, width // 2 - 50 : width // 2 + 50].mean()
    assert (height, width) == (1955, 1841)
    assert lung < spine - 0.15
    assert lung < 0.7

    # 15-bit data through a wide window: thousands of levels and no pile-up at 0 or 1.
    assert len(np.unique(image)) > 10_000
    assert (image <= 0.0).mean() < 0.001
    assert (image >= 1.0).mean() < 0.001
