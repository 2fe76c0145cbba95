"""Decoding of chest radiographs from JPEG, PNG and DICOM files into grayscale float arrays.

Every decoder returns a ``float32`` array of shape ``[H, W]`` with values in ``[0, 1]``, where
0 is the darkest value the file can encode (air) and 1 the brightest (bone, metal). The scaling
divides by the maximum of the file's bit depth, never by the image's own maximum, so that no
gradient is clipped and the relative brightness of two images of the same format is kept.
"""

import logging
from dataclasses import dataclass
from enum import Enum, unique
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

JPEG_SUFFIXES = frozenset({".jpg", ".jpeg"})
PNG_SUFFIXES = frozenset({".png"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})


class ImageDecodeError(RuntimeError):
    """Raised when an image file is missing, truncated, unreadable or decodes to invalid values."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"Cannot decode image {self.path}: {reason}")


@unique
class DecodeMode(str, Enum):
    """Handling of an image that fails to decode."""

    STRICT = "strict"
    """Raise an `ImageDecodeError` naming the file."""

    LENIENT = "lenient"
    """Skip the sample, log it and count it."""


@dataclass
class DecodedImage:
    """A decoded radiograph.

    Attributes:
        pixels: ``float32`` array ``[h, w]`` in ``[0, 1]``, air dark. Smaller than the original
            when a JPEG was decoded at reduced scale.
        original_height: Height H of the image stored in the file, in pixels.
        original_width: Width W of the image stored in the file, in pixels.
    """

    pixels: np.ndarray
    original_height: int
    original_width: int


def read_grayscale(path: str | Path) -> np.ndarray:
    """Decode a radiograph at full size into a ``float32`` array ``[H, W]`` in ``[0, 1]``.

    Raises:
        ImageDecodeError: As `decode_radiograph`.
    """
    return decode_radiograph(path).pixels


def decode_radiograph(path: str | Path, min_size: int | None = None) -> DecodedImage:
    """Decode a radiograph into a grayscale float array.

    Args:
        path: A JPEG, PNG (8-bit or 16-bit) or DICOM file.
        min_size: When set, a JPEG may be decoded at a reduced scale (libjpeg DCT scaling) as
            long as both sides stay at least as large as after resizing the shorter side to
            this many pixels. This makes decoding of large JPEGs several times faster before
            they are resized to the model's input size. Other formats ignore it.

    Returns:
        The pixels (``float32`` ``[h, w]`` in ``[0, 1]``, air dark) and the original size.

    Raises:
        ImageDecodeError: The file is missing, has an unsupported suffix, is truncated or
            corrupt, or decodes to values that are not finite or outside ``[0, 1]``.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageDecodeError(path, "file not found")

    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        image = _read_dicom(path)
        original_height, original_width = image.shape
    elif suffix in JPEG_SUFFIXES or suffix in PNG_SUFFIXES:
        image, (original_width, original_height) = _read_pillow(path, min_size)
    else:
        raise ImageDecodeError(path, f"unsupported suffix {suffix!r}; expected .jpg, .jpeg, .png or .dcm")

    _check_range(path, image)
    return DecodedImage(image, original_height, original_width)


def _read_pillow(path: Path, min_size: int | None) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode a JPEG or PNG with Pillow, scaled by its bit depth to ``[0, 1]``; also return (W, H)."""
    try:
        with Image.open(path) as opened:
            original_size = opened.size
            if min_size is not None and opened.format == "JPEG":
                # draft() picks the smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides at
                # or above the requested size, so the later resize still only shrinks.
                opened.draft("L", _draft_size(opened.size, min_size))
            opened.load()
            image = _pillow_to_unit_float(path, opened)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        # Pillow raises OSError for truncated data, UnidentifiedImageError for garbage and
        # SyntaxError or ValueError for some malformed headers.
        raise ImageDecodeError(path, f"{type(error).__name__}: {error}") from error

    return image, original_size


def _draft_size(size: tuple[int, int], min_size: int) -> tuple[int, int]:
    """Return the smallest (width, height) request for `Image.draft` that keeps the shorter side."""
    width, height = size
    scale = min_size / min(width, height)
    return max(1, int(np.ceil(width * scale))), max(1, int(np.ceil(height * scale)))


def _pillow_to_unit_float(path: Path, image: Image.Image) -> np.ndarray:
    """Convert a loaded Pillow image of any grayscale or color mode to ``float32`` in ``[0, 1]``."""
    mode = image.mode

    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(image, dtype=np.uint16).astype(np.float32) / 65535.0

    if mode == "I":
        # 16-bit PNGs open as 32-bit integer images in some Pillow versions.
        array = np.asarray(image, dtype=np.int32)
        if array.min() < 0 or array.max() > 65535:
            raise ImageDecodeError(path, f"32-bit integer pixels outside 0..65535 ({array.min()}..{array.max()})")
        return array.astype(np.float32) / 65535.0

    if mode == "F":
        raise ImageDecodeError(path, "floating-point images have no defined intensity range; convert them to 8 or 16 bit")

    if mode in ("RGB", "RGBA", "LA", "P", "CMYK", "YCbCr", "1"):
        image = image.convert("L")
    elif mode != "L":
        raise ImageDecodeError(path, f"unsupported image mode {mode!r}")

    return np.asarray(image, dtype=np.uint8).astype(np.float32) / 255.0


def _read_dicom(path: Path) -> np.ndarray:
    """Decode a DICOM radiograph: modality LUT, VOI LUT or window, MONOCHROME1 inversion."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        dataset = pydicom.dcmread(path)
        pixels = dataset.pixel_array
    except (InvalidDicomError, OSError, ValueError, AttributeError, KeyError, RuntimeError) as error:
        raise ImageDecodeError(path, f"{type(error).__name__}: {error}") from error

    if pixels.ndim != 2:
        raise ImageDecodeError(path, f"expected one grayscale frame, got pixel array of shape {pixels.shape}")

    photometric = str(getattr(dataset, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageDecodeError(path, f"unsupported photometric interpretation {photometric!r}")

    # Rescale slope and intercept first, then the VOI LUT or window. pydicom's apply_voi_lut
    # keeps the output in the input's units, so the range for scaling comes from the window
    # or LUT itself, not from the image.
    values = apply_modality_lut(pixels, dataset).astype(np.float64)
    low, high = _value_range(dataset)
    if _has_voi(dataset):
        values = apply_voi_lut(values, dataset, prefer_lut=True).astype(np.float64)
        low, high = _voi_output_range(dataset, low, high)

    if high <= low:
        raise ImageDecodeError(path, f"empty intensity range {low}..{high}")
    image = (values - low) / (high - low)
    image = np.clip(image, 0.0, 1.0)

    # MONOCHROME1 stores air as the highest value; invert so that air is dark as in MONOCHROME2.
    if photometric == "MONOCHROME1":
        image = 1.0 - image

    return image.astype(np.float32)


def _has_voi(dataset: object) -> bool:
    """Return whether a DICOM data set defines a VOI LUT sequence or a window."""
    return "VOILUTSequence" in dataset or ("WindowCenter" in dataset and "WindowWidth" in dataset)


def _value_range(dataset: object) -> tuple[float, float]:
    """Return the range the stored bits can encode after the modality LUT."""
    bits_stored = int(getattr(dataset, "BitsStored", 16))
    signed = int(getattr(dataset, "PixelRepresentation", 0)) == 1
    raw_low = -(2 ** (bits_stored - 1)) if signed else 0
    raw_high = 2 ** (bits_stored - 1) - 1 if signed else 2**bits_stored - 1

    slope = float(getattr(dataset, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(dataset, "RescaleIntercept", 0.0) or 0.0)
    ends = sorted((raw_low * slope + intercept, raw_high * slope + intercept))

    # A modality LUT sequence maps to 0 .. 2**bits - 1 of its own descriptor.
    if "ModalityLUTSequence" in dataset:
        bits = int(dataset.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**bits - 1)
    return ends[0], ends[1]


def _voi_output_range(dataset: object, low: float, high: float) -> tuple[float, float]:
    """Return the output range of the VOI transform that `apply_voi_lut` applied."""
    if "VOILUTSequence" in dataset:
        item = dataset.VOILUTSequence[0]
        descriptor = item.LUTDescriptor
        bits = int(descriptor[2])
        return 0.0, float(2**bits - 1)

    # pydicom 3.0's apply_windowing maps into the range of the stored bits after rescale,
    # which is the [low, high] computed by _value_range.
    return low, high


def _check_range(path: Path, image: np.ndarray) -> None:
    """Raise when a decoded image is empty, not finite or outside ``[0, 1]``."""
    if image.ndim != 2 or image.size == 0:
        raise ImageDecodeError(path, f"decoded to an array of shape {image.shape}, expected [H, W]")
    if not np.isfinite(image).all():
        raise ImageDecodeError(path, "decoded values are not finite")

    low, high = float(image.min()), float(image.max())
    if low < 0.0 or high > 1.0:
        raise ImageDecodeError(path, f"decoded values {low}..{high} lie outside [0, 1]")
    if low == high:
        logger.warning("Image %s is constant (value %.3f); check that it is a radiograph.", path, low)
