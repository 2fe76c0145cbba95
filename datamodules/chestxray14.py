"""Reader of the NIH ChestX-ray14 box annotations (``BBox_List_2017.csv``) as grounding pairs.

The file's header reads ``Image Index,Finding Label,Bbox [x,y,w,h]`` followed by empty column
names, because the four box values sit in four columns under one title and the rows end with a
comma. The reader therefore takes the fields by position. All images are 1024 x 1024 pixels.
"""

import csv
import logging
import math
import os
from pathlib import Path

from datamodules.ms_cxr import GroundingPair, GroundingReadResult, clip_checked_box, is_flagged, make_pair_id

logger = logging.getLogger(__name__)

CHESTXRAY14_FINDINGS = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltrate",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
)

# Totals of the published BBox_List_2017.csv (NIH Clinical Center release of ChestX-ray14).
CHESTXRAY14_BOX_COUNT = 984
CHESTXRAY14_IMAGE_COUNT = 880
CHESTXRAY14_IMAGE_SIZE = 1024

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def index_chestxray14_images(images_dir: str | Path) -> dict[str, Path]:
    """Map each image file name to its path.

    Searches `images_dir` itself, ``images_dir/images/`` and the release's
    ``images_dir/images_001/images/`` .. ``images_012/images/`` folders.

    Raises:
        FileNotFoundError: `images_dir` does not exist.
    """
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(
            f"ChestX-ray14 image directory not found: {images_dir}. Download ChestX-ray14 from the NIH "
            "Clinical Center and set data.init_args.chestxray14_images_dir to the folder with images_001 .. images_012."
        )

    folders = [images_dir, images_dir / "images"]
    folders += sorted(path / "images" for path in images_dir.glob("images_*") if path.is_dir())

    index: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.lower().endswith(IMAGE_SUFFIXES) and entry.name not in index:
                    index[entry.name] = Path(entry.path)
    return index


def read_chestxray14_boxes(
    csv_path: str | Path,
    images_dir: str | Path,
    image_size: int,
    phrase_template: str = "{finding}",
    image_width: int = CHESTXRAY14_IMAGE_SIZE,
    image_height: int = CHESTXRAY14_IMAGE_SIZE,
) -> GroundingReadResult:
    """Read ``BBox_List_2017.csv`` into grounding pairs, one per (image, finding).

    Args:
        csv_path: The box list.
        images_dir: Folder that contains the images, directly, under ``images/`` or under
            ``images_001/images/`` .. ``images_012/images/``.
        image_size: Side S of the model input, to flag pairs whose boxes vanish in the crop.
        phrase_template: Format string for the phrase; ``{finding}`` is replaced by the
            finding label in lower case (``Effusion`` gives ``effusion``).
        image_width: Width of the annotated images in pixels.
        image_height: Height of the annotated images in pixels.

    Returns:
        The pairs (split empty), skipped rows per reason, clipped box count and warnings.

    Raises:
        FileNotFoundError: `csv_path` or `images_dir` does not exist.
        ValueError: The header is not the box list's header, or the template lacks
            ``{finding}``.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(
            f"ChestX-ray14 box list not found: {csv_path}. Download BBox_List_2017.csv from the NIH "
            "Clinical Center release and set data.init_args.chestxray14_csv to it."
        )
    if "{finding}" not in phrase_template:
        raise ValueError(f"phrase_template must contain '{{finding}}', got {phrase_template!r}.")

    image_index = index_chestxray14_images(images_dir)
    result = GroundingReadResult(pairs=[], source=str(csv_path))
    by_key: dict[tuple[str, str], GroundingPair] = {}
    box_count = 0

    with csv_path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        if len(header) < 3 or header[0] != "Image Index" or header[1] != "Finding Label" or not header[2].startswith("Bbox"):
            raise ValueError(
                f"{csv_path} does not start with the header 'Image Index,Finding Label,Bbox [x,y,w,h]'; "
                f"found {header[:4]}. Use the official BBox_List_2017.csv unchanged."
            )

        for line_number, fields in enumerate(reader, start=2):
            if not any(value.strip() for value in fields):
                continue
            reason = _add_row(fields, image_index, Path(images_dir), phrase_template, image_width, image_height, by_key, result)
            if reason is None:
                box_count += 1
                continue
            result.skipped_rows[reason] += 1
            if result.skipped_rows[reason] <= 3:
                logger.warning("Skipping row %d of %s: %s.", line_number, csv_path, reason)

    result.pairs = list(by_key.values())
    for pair in result.pairs:
        pair.flagged = is_flagged(pair.boxes, pair.image_width, pair.image_height, image_size)

    image_count = len({pair.image_id for pair in result.pairs})
    if csv_path.name == "BBox_List_2017.csv" and (box_count, image_count) != (CHESTXRAY14_BOX_COUNT, CHESTXRAY14_IMAGE_COUNT):
        result.warnings.append(
            f"{csv_path.name} gave {box_count} boxes on {image_count} images; the published file has "
            f"{CHESTXRAY14_BOX_COUNT} boxes on {CHESTXRAY14_IMAGE_COUNT} images."
        )
    for warning in result.warnings:
        logger.warning(warning)
    logger.info("Read %d ChestX-ray14 pairs (%d boxes) from %s.", len(result.pairs), box_count, csv_path)
    return result


def _add_row(
    fields: list[str],
    image_index: dict[str, Path],
    images_dir: Path,
    phrase_template: str,
    image_width: int,
    image_height: int,
    by_key: dict[tuple[str, str], GroundingPair],
    result: GroundingReadResult,
) -> str | None:
    """Validate one row and add its box to its pair; return a skip reason or None."""
    if len(fields) < 6 or any(value.strip() for value in fields[6:]):
        return "malformed row (expected image, finding and four box values)"

    image_name = fields[0].strip()
    finding = fields[1].strip()
    if not image_name:
        return "missing image name"
    if finding not in CHESTXRAY14_FINDINGS:
        return f"unknown finding {finding!r}"

    try:
        box = tuple(float(value) for value in fields[2:6])
    except ValueError:
        return "malformed number in box"
    if not all(math.isfinite(value) for value in box):
        return "malformed number in box"
    clipped, reason = clip_checked_box(box, image_width, image_height, result)
    if reason is not None:
        return reason

    key = (image_name, finding)
    pair = by_key.get(key)
    if pair is None:
        phrase = phrase_template.format(finding=finding.lower())
        pair = GroundingPair(
            pair_id=make_pair_id(image_name, finding, phrase),
            image_id=image_name,
            image_path=str(image_index.get(image_name, images_dir / image_name)),
            phrase=phrase,
            finding=finding,
            boxes=[],
            image_width=image_width,
            image_height=image_height,
        )
        by_key[key] = pair

    pair.boxes.append(clipped)
    return None
