"""Reader of the MS-CXR phrase grounding annotations and the grounding data set.

MS-CXR (PhysioNet, credentialed access) ships one CSV per release with one row per box:
``dicom_id, category_name, label_text, path, x, y, w, h, image_width, image_height`` and, from
release 1.1.0, ``split``. A grounding pair is one (image, phrase) with all of its boxes.
"""

import csv
import hashlib
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from datamodules.image_io import DecodeMode, ImageDecodeError, read_grayscale
from datamodules.transforms import Box, CropGeometry, boxes_to_crop_mask, to_model_input_with_geometry

logger = logging.getLogger(__name__)

MS_CXR_FINDINGS = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Lung Opacity",
    "Pleural Effusion",
    "Pneumonia",
    "Pneumothorax",
)

# Pairs per finding in MS-CXR release 0.1 (MS_CXR_Local_Alignment_v1.0.0.csv), 1,162 in total.
MS_CXR_V1_0_0_PAIR_COUNTS = {
    "Atelectasis": 61,
    "Cardiomegaly": 333,
    "Consolidation": 117,
    "Edema": 46,
    "Lung Opacity": 82,
    "Pleural Effusion": 96,
    "Pneumonia": 182,
    "Pneumothorax": 245,
}

MS_CXR_COLUMNS = (
    "dicom_id",
    "category_name",
    "label_text",
    "path",
    "x",
    "y",
    "w",
    "h",
    "image_width",
    "image_height",
)


@dataclass
class GroundingPair:
    """One (image, phrase) pair with all of its boxes, from MS-CXR or ChestX-ray14.

    Attributes:
        pair_id: Stable id, unique in the data set: ``<image id>:<hash of finding and phrase>``.
        image_id: The image's id (MIMIC-CXR dicom_id or ChestX-ray14 file name).
        image_path: Absolute path of the image file.
        phrase: The grounded phrase (MS-CXR ``label_text``).
        finding: The finding category (MS-CXR ``category_name``).
        boxes: Boxes ``(x, y, w, h)`` in original pixels, clipped to the image.
        image_width: Width W of the original image in pixels, as annotated.
        image_height: Height H of the original image in pixels, as annotated.
        split: The release's split (``train``, ``val``, ``test``) or an empty string.
        flagged: True when every box falls outside the center crop, so the mask is empty.
    """

    pair_id: str
    image_id: str
    image_path: str
    phrase: str
    finding: str
    boxes: list[Box]
    image_width: int
    image_height: int
    split: str = ""
    flagged: bool = False


@dataclass
class GroundingReadResult:
    """The pairs read from a box annotation file and what was skipped on the way.

    Attributes:
        pairs: The grounding pairs, in order of first appearance in the file.
        source: The file that was read.
        skipped_rows: Number of skipped rows per reason.
        clipped_boxes: Number of boxes that extended beyond the image and were clipped.
        warnings: Human-readable warnings (count mismatches, missing split column).
    """

    pairs: list[GroundingPair]
    source: str
    skipped_rows: Counter = field(default_factory=Counter)
    clipped_boxes: int = 0
    warnings: list[str] = field(default_factory=list)

    def pairs_per_finding(self) -> dict[str, int]:
        """Count pairs per finding."""
        return dict(sorted(Counter(pair.finding for pair in self.pairs).items()))

    def flagged_pairs(self) -> list[str]:
        """Return the ids of pairs whose boxes vanish in the center crop."""
        return [pair.pair_id for pair in self.pairs if pair.flagged]


def make_pair_id(image_id: str, finding: str, phrase: str) -> str:
    """Build a stable pair id that does not depend on the row order of the file."""
    digest = hashlib.sha1(f"{finding}\n{phrase}".encode("utf-8")).hexdigest()[:10]
    return f"{image_id}:{digest}"


def clip_box(box: Box, width: int, height: int) -> Box | None:
    """Clip a box to the image; return None when no area is left."""
    x, y, w, h = box
    x0, y0 = max(x, 0.0), max(y, 0.0)
    x1, y1 = min(x + w, float(width)), min(y + h, float(height))
    if x1 <= x0 or y1 <= y0:
        return None
    return (x0, y0, x1 - x0, y1 - y0)



def clip_checked_box(
    box: Box, image_width: int, image_height: int, result: GroundingReadResult
) -> tuple[Box | None, str | None]:
    """Clip a finite box ``(x, y, w, h)`` to the image, counting clipped boxes in ``result``.

    Returns:
        The clipped box and None, or None and the reason to skip the row: a zero or negative
        size, or a box entirely outside the image.
    """
    if box[2] <= 0 or box[3] <= 0:
        return None, "non-positive box width or height"
    clipped = clip_box(box, image_width, image_height)
    if clipped is None:
        return None, "box outside the image"
    if clipped != box:
        result.clipped_boxes += 1
    return clipped, None


def is_flagged(boxes: list[Box], width: int, height: int, image_size: int) -> bool:
    """Return whether no box keeps at least half a pixel in both directions after the crop."""
    geometry = CropGeometry.for_image(height, width, image_size)
    for box in boxes:
        moved = geometry.transform_box(box)
        if moved is not None and moved[2] >= 0.5 and moved[3] >= 0.5:
            return False
    return True


def map_ms_cxr_path(path: str, image_root: Path) -> Path:
    """Map the ``path`` column (a DICOM path relative to MIMIC-CXR) to the JPEG under `image_root`.

    Any prefix before ``files/`` (such as ``mimic-cxr-jpg/2.0.0/``) is dropped, because the
    JPEG tree under `image_root` starts at ``files/``.
    """
    relative = path.strip().replace("\\", "/").lstrip("/")
    marker = relative.find("files/")
    if marker > 0:
        relative = relative[marker:]
    mapped = Path(relative)
    if mapped.suffix.lower() == ".dcm":
        mapped = mapped.with_suffix(".jpg")
    return image_root / mapped


def read_ms_cxr(
    csv_path: str | Path,
    image_root: str | Path,
    image_size: int,
    splits: list[str] | None = None,
    findings: tuple[str, ...] = MS_CXR_FINDINGS,
) -> GroundingReadResult:
    """Read an MS-CXR local alignment CSV into grounding pairs.

    Args:
        csv_path: ``MS_CXR_Local_Alignment_v1.0.0.csv`` or ``..._v1.1.0.csv``.
        image_root: Root of MIMIC-CXR-JPG, the directory that contains ``files/``.
        image_size: Side S of the model input, to flag pairs whose boxes vanish in the crop.
        splits: Keep only rows of these splits. Ignored with a warning when the file has no
            ``split`` column (release 1.0.0), so that every pair is kept.
        findings: Allowed ``category_name`` values; other rows are skipped and counted.

    Returns:
        The pairs, the skipped rows per reason, the clipped box count and warnings.

    Raises:
        FileNotFoundError: `csv_path` does not exist.
        ValueError: The file lacks a required column.
    """
    csv_path = Path(csv_path)
    image_root = Path(image_root)
    if not csv_path.is_file():
        raise FileNotFoundError(
            f"MS-CXR file not found: {csv_path}. Download MS-CXR from PhysioNet (credentialed access) "
            "and set data.init_args.ms_cxr_csv to its MS_CXR_Local_Alignment_v1.x.0.csv."
        )

    result = GroundingReadResult(pairs=[], source=str(csv_path))
    by_key: dict[tuple[str, str, str], GroundingPair] = {}

    with csv_path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = [name.strip() for name in (reader.fieldnames or [])]
        missing = [name for name in MS_CXR_COLUMNS if name not in columns]
        if missing:
            raise ValueError(
                f"MS-CXR file {csv_path} lacks the columns {missing}; found {columns}. "
                "Use the official MS_CXR_Local_Alignment CSV unchanged."
            )
        reader.fieldnames = columns
        has_split = "split" in columns
        if splits is not None and not has_split:
            result.warnings.append(
                f"{csv_path.name} has no split column, so all pairs are used for every split {splits}."
            )

        for line_number, row in enumerate(reader, start=2):
            reason = _add_row(row, has_split, splits, findings, image_root, by_key, result)
            if reason is not None:
                result.skipped_rows[reason] += 1
                if result.skipped_rows[reason] <= 3:
                    logger.warning("Skipping row %d of %s: %s.", line_number, csv_path, reason)

    result.pairs = list(by_key.values())
    for pair in result.pairs:
        pair.flagged = is_flagged(pair.boxes, pair.image_width, pair.image_height, image_size)

    _check_release_counts(csv_path, result, splits if has_split else None)
    for warning in result.warnings:
        logger.warning(warning)
    logger.info(
        "Read %d MS-CXR pairs from %s (skipped rows: %s; flagged pairs: %d).",
        len(result.pairs),
        csv_path,
        dict(result.skipped_rows),
        len(result.flagged_pairs()),
    )
    return result


def _add_row(
    row: dict,
    has_split: bool,
    splits: list[str] | None,
    findings: tuple[str, ...],
    image_root: Path,
    by_key: dict[tuple[str, str, str], GroundingPair],
    result: GroundingReadResult,
) -> str | None:
    """Validate one CSV row and add its box to its pair; return a skip reason or None."""
    if None in row or any(value is None for value in row.values()):
        return "malformed row (wrong number of fields)"

    if has_split and splits is not None and row["split"].strip() not in splits:
        return None

    dicom_id = row["dicom_id"].strip()
    finding = row["category_name"].strip()
    phrase = " ".join(row["label_text"].split())
    if not dicom_id or not row["path"].strip():
        return "missing dicom_id or path"
    if finding not in findings:
        return f"unknown category {finding!r}"
    if not phrase:
        return "empty phrase"

    try:
        box = tuple(float(row[name]) for name in ("x", "y", "w", "h"))
        width = int(float(row["image_width"]))
        height = int(float(row["image_height"]))
    except ValueError:
        return "malformed number in box or image size"
    if not all(math.isfinite(value) for value in box):
        return "malformed number in box or image size"
    if width <= 0 or height <= 0:
        return "non-positive image size"
    clipped, reason = clip_checked_box(box, width, height, result)
    if reason is not None:
        return reason

    key = (dicom_id, finding, phrase)
    pair = by_key.get(key)
    if pair is None:
        pair = GroundingPair(
            pair_id=make_pair_id(dicom_id, finding, phrase),
            image_id=dicom_id,
            image_path=str(map_ms_cxr_path(row["path"], image_root)),
            phrase=phrase,
            finding=finding,
            boxes=[],
            image_width=width,
            image_height=height,
            split=row["split"].strip() if has_split else "",
        )
        by_key[key] = pair
    elif (pair.image_width, pair.image_height) != (width, height):
        return "image size differs from an earlier row of the same image"

    pair.boxes.append(clipped)
    return None


def _check_release_counts(csv_path: Path, result: GroundingReadResult, splits: list[str] | None) -> None:
    """Warn when a complete release 1.0.0 file does not have the published pair counts."""
    # NOTE: only release 1.0.0 has published per-finding counts to hold a file against here;
    # a 1.1.0 file is read and counted, but not checked.
    if "v1.0.0" not in csv_path.name or splits is not None:
        return

    counts = result.pairs_per_finding()
    differences = {
        finding: (counts.get(finding, 0), expected)
        for finding, expected in MS_CXR_V1_0_0_PAIR_COUNTS.items()
        if counts.get(finding, 0) != expected
    }
    if differences:
        details = ", ".join(f"{name}: {got} (expected {want})" for name, (got, want) in differences.items())
        result.warnings.append(
            f"{csv_path.name} has {len(result.pairs)} pairs instead of 1162; pairs per finding differ: {details}."
        )


class GroundingDataset(Dataset):
    """Grounding samples: the model input, the phrase and the transformed box mask of each pair.

    An item is a dict with ``pixel_values`` (``FloatTensor[3, S, S]`` in ``[-1, 1]``),
    ``phrase``, ``finding``, ``pair_id``, ``gt_mask`` (``BoolTensor[S, S]``) and ``boxes`` (crop
    coordinates). In lenient mode an image that fails to decode yields a dict with the key
    ``failed`` (path and reason) instead, which the collate function drops and counts.

    Args:
        pairs: The grounding pairs.
        image_size: Side S of the model input.
        decode_mode: Raise on an unreadable image, or return a failure record.
    """

    def __init__(self, pairs: list[GroundingPair], image_size: int, decode_mode: DecodeMode) -> None:
        self.pairs = pairs
        self.image_size = image_size
        self.decode_mode = DecodeMode(decode_mode)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        pair = self.pairs[index]
        try:
            gray = read_grayscale(pair.image_path)
        except ImageDecodeError as error:
            if self.decode_mode is DecodeMode.STRICT:
                raise
            logger.warning("Skipping grounding pair %s: %s", pair.pair_id, error)
            return {"failed": (pair.image_path, error.reason)}

        # The annotation's size is authoritative for the boxes; rescale them when the file on
        # disk has another size (for example a downscaled copy of MIMIC-CXR-JPG).
        height, width = gray.shape
        boxes = pair.boxes
        if (width, height) != (pair.image_width, pair.image_height):
            scale_x = width / pair.image_width
            scale_y = height / pair.image_height
            boxes = [(x * scale_x, y * scale_y, w * scale_x, h * scale_y) for x, y, w, h in boxes]
            logger.warning(
                "Image %s is %dx%d but annotated as %dx%d; the boxes were rescaled.",
                pair.image_path,
                width,
                height,
                pair.image_width,
                pair.image_height,
            )

        geometry = CropGeometry.for_image(height, width, self.image_size)
        crop_boxes = [moved for moved in (geometry.transform_box(box) for box in boxes) if moved is not None]
        return {
            "pixel_values": to_model_input_with_geometry(gray, geometry),
            "phrase": pair.phrase,
            "finding": pair.finding,
            "pair_id": pair.pair_id,
            "gt_mask": boxes_to_crop_mask(boxes, geometry),
            "boxes": crop_boxes,
        }


def collate_grounding(samples: list[dict], image_size: int = 0) -> dict:
    """Stack grounding samples into a batch and drop failed ones.

    Args:
        samples: Items of `GroundingDataset`.
        image_size: Side S, used for the shape of an empty batch.

    Returns:
        A dict with ``pixel_values`` ``[B, 3, S, S]``, ``phrases``, ``findings``, ``pair_ids``,
        ``gt_masks`` ``[B, S, S]``, ``boxes`` and ``failed_samples`` (a list of
        ``(path, reason)``, removed again by the data module before the batch reaches the
        model). B is 0 when every sample failed.
    """
    kept = [sample for sample in samples if "failed" not in sample]
    failed = [sample["failed"] for sample in samples if "failed" in sample]

    if kept:
        pixel_values = torch.stack([sample["pixel_values"] for sample in kept])
        gt_masks = torch.stack([sample["gt_mask"] for sample in kept])
    else:
        pixel_values = torch.zeros(0, 3, image_size, image_size)
        gt_masks = torch.zeros(0, image_size, image_size, dtype=torch.bool)

    return {
        "pixel_values": pixel_values,
        "phrases": [sample["phrase"] for sample in kept],
        "findings": [sample["finding"] for sample in kept],
        "pair_ids": [sample["pair_id"] for sample in kept],
        "gt_masks": gt_masks,
        "boxes": [sample["boxes"] for sample in kept],
        "failed_samples": failed,
    }
