"""Training pairs (image, caption) from MIMIC-CXR-JPG and the MIMIC-CXR reports, or from a user CSV.

MIMIC-CXR-JPG (PhysioNet, credentialed access) ships ``mimic-cxr-2.0.0-split.csv.gz``,
``mimic-cxr-2.0.0-metadata.csv.gz`` and ``mimic-cxr-2.0.0-chexpert.csv.gz`` next to ``files/``,
where an image lives at ``files/p<first 2 digits>/p<subject_id>/s<study_id>/<dicom_id>.jpg``.
The reports archive of MIMIC-CXR uses the same tree with one ``s<study_id>.txt`` per study.
"""

import hashlib
import json
import logging
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import Dataset

from datamodules.image_io import DecodeMode, ImageDecodeError, decode_radiograph
from datamodules.transforms import CropGeometry, to_model_input_with_geometry

logger = logging.getLogger(__name__)

SPLIT_FILE = "mimic-cxr-2.0.0-split.csv.gz"
METADATA_FILE = "mimic-cxr-2.0.0-metadata.csv.gz"
CHEXPERT_FILE = "mimic-cxr-2.0.0-chexpert.csv.gz"
PAIR_LIST_COLUMNS = ("image_path", "caption", "subject_id", "study_id", "dicom_id")
CAPTION_SEPARATOR = "|"

# A section header starts a line with upper-case words followed by a colon, as in
# "IMPRESSION:" or "WET READ:".
SECTION_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z &/()-]{1,40}?)[ \t]*:", re.MULTILINE)
# MIMIC-CXR replaces protected health information with three or more underscores.
DEIDENTIFIED = re.compile(r"_{2,}")
SPACE_BEFORE_PUNCTUATION = re.compile(r"\s+([.,;:])")
SUBJECT_IN_PATH = re.compile(r"p(\d{7,9})[/\\]s\d+")

ACCESS_HINT = "MIMIC-CXR-JPG and the MIMIC-CXR reports need credentialed access on PhysioNet (physionet.org)."


@dataclass
class PairBuildStats:
    """Counts of a pair list build.

    Attributes:
        kept: Pairs in the list.
        candidates: Images of the chosen splits and views before captions were checked.
        skipped: Skipped images per reason (missing report, empty caption, missing image).
        excluded_by_leakage_guard: Images left out because their subject appears in MS-CXR.
        excluded_subjects: Distinct subjects left out by the leakage guard.
        leakage_guard: Whether the leakage guard was on and had a subject list.
    """

    kept: int = 0
    candidates: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    excluded_by_leakage_guard: int = 0
    excluded_subjects: int = 0
    leakage_guard: bool = False


def extract_sections(report: str) -> dict[str, str]:
    """Split a free-text report into its sections.

    Returns:
        A dict from the upper-case header (``IMPRESSION``, ``FINDINGS``, ...) to the raw text
        up to the next header. Text before the first header is under ``""``. A repeated
        header keeps its last occurrence.
    """
    sections: dict[str, str] = {}
    matches = list(SECTION_HEADER.finditer(report))
    sections[""] = report[: matches[0].start()] if matches else report
    for index, match in enumerate(matches):
        end = matches[index + 1].start() if index + 1 < len(matches) else len(report)
        sections[match.group(1).strip()] = report[match.end() : end]
    return sections


def normalize_caption(text: str, placeholder_replacement: str = "") -> str:
    """Collapse whitespace and replace de-identification placeholders (``___``).

    Args:
        text: Raw section text.
        placeholder_replacement: Text that replaces each run of two or more underscores.

    Returns:
        The caption on one line, with no space before ``. , ; :``.
    """
    text = DEIDENTIFIED.sub(placeholder_replacement, text)
    text = " ".join(text.split())
    return SPACE_BEFORE_PUNCTUATION.sub(r"\1", text)


def caption_from_report(
    report: str,
    section: str = "IMPRESSION",
    fallback_section: str | None = "FINDINGS",
    placeholder_replacement: str = "",
) -> str:
    """Take a report's caption: the chosen section, else the fallback section, else ``""``."""
    sections = extract_sections(report)
    for name in (section, fallback_section):
        if name is None:
            continue
        caption = normalize_caption(sections.get(name.upper(), ""), placeholder_replacement)
        if caption:
            return caption
    return ""


def report_path(reports_root: Path, subject_id: str, study_id: str) -> Path:
    """Return ``files/p<first 2 digits>/p<subject_id>/s<study_id>.txt`` under `reports_root`."""
    return reports_root / "files" / f"p{subject_id[:2]}" / f"p{subject_id}" / f"s{study_id}.txt"


def image_path(image_root: Path, subject_id: str, study_id: str, dicom_id: str) -> Path:
    """Return ``files/p<first 2 digits>/p<subject_id>/s<study_id>/<dicom_id>.jpg`` under `image_root`."""
    return image_root / "files" / f"p{subject_id[:2]}" / f"p{subject_id}" / f"s{study_id}" / f"{dicom_id}.jpg"


def subject_from_path(path: str) -> str | None:
    """Return the subject id in a MIMIC-CXR path (``.../p10000032/s50414267...``), or None."""
    match = SUBJECT_IN_PATH.search(path)
    return match.group(1) if match else None


def read_official_csv(path: Path, config_key: str) -> pd.DataFrame:
    """Read a MIMIC-CXR CSV (gzip or plain) with every column as a string.

    Raises:
        FileNotFoundError: The file does not exist; the message names `config_key`.
    """
    if not path.is_file():
        raise FileNotFoundError(f"MIMIC-CXR file not found: {path}. Set data.init_args.{config_key}. {ACCESS_HINT}")
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _require_columns(frame: pd.DataFrame, columns: tuple[str, ...], path: Path) -> None:
    """Raise ValueError when a CSV lacks required columns."""
    missing = [name for name in columns if name not in frame.columns]
    if missing:
        raise ValueError(f"{path} lacks the columns {missing}; found {list(frame.columns)}.")


def build_mimic_pairs(
    image_root: str | Path,
    reports_root: str | Path,
    splits: list[str],
    views: list[str],
    section: str = "IMPRESSION",
    fallback_section: str | None = "FINDINGS",
    placeholder_replacement: str = "",
    excluded_subjects: set[str] | None = None,
    check_images: bool = True,
) -> tuple[pd.DataFrame, PairBuildStats]:
    """Build the (image, caption) pair list from the official MIMIC-CXR-JPG files.

    Args:
        image_root: MIMIC-CXR-JPG root with the CSVs and ``files/``.
        reports_root: Root of the reports archive (the folder with ``files/``).
        splits: Values of the split CSV's ``split`` column to keep (``train``, ``validate``,
            ``test``).
        views: ``ViewPosition`` values to keep, such as ``["PA", "AP"]``.
        section: Report section used as the caption.
        fallback_section: Section used when `section` is missing or empty; None for none.
        placeholder_replacement: Replacement of the ``___`` de-identification placeholders.
        excluded_subjects: Subjects to leave out (the leakage guard); None to keep all.
        check_images: Skip pairs whose image file does not exist.

    Returns:
        The pair list with the columns of `PAIR_LIST_COLUMNS`, and its build counts.

    Raises:
        FileNotFoundError: An official CSV is missing.
        ValueError: A CSV lacks a required column.
    """
    image_root = Path(image_root)
    reports_root = Path(reports_root)
    stats = PairBuildStats(leakage_guard=excluded_subjects is not None)
    skipped: Counter = Counter()

    # Images of the chosen splits and frontal views.
    split_frame = read_official_csv(image_root / SPLIT_FILE, "mimic_cxr_jpg_root")
    _require_columns(split_frame, ("dicom_id", "study_id", "subject_id", "split"), image_root / SPLIT_FILE)
    metadata = read_official_csv(image_root / METADATA_FILE, "mimic_cxr_jpg_root")
    _require_columns(metadata, ("dicom_id", "ViewPosition"), image_root / METADATA_FILE)

    frame = split_frame[split_frame["split"].isin(splits)]
    frame = frame.merge(metadata[["dicom_id", "ViewPosition"]], on="dicom_id", how="left")
    frame = frame[frame["ViewPosition"].isin(views)]
    stats.candidates = len(frame)

    # The leakage guard removes whole subjects, not only the images that MS-CXR annotates.
    if excluded_subjects is not None:
        leaked = frame["subject_id"].isin(excluded_subjects)
        stats.excluded_by_leakage_guard = int(leaked.sum())
        stats.excluded_subjects = int(frame.loc[leaked, "subject_id"].nunique())
        frame = frame[~leaked]

    # One report per study; several images share it.
    captions: dict[tuple[str, str], str | None] = {}
    rows = []
    for subject_id, study_id, dicom_id in frame[["subject_id", "study_id", "dicom_id"]].itertuples(index=False):
        key = (subject_id, study_id)
        if key not in captions:
            path = report_path(reports_root, subject_id, study_id)
            if path.is_file():
                report = path.read_text(encoding="utf-8", errors="replace")
                captions[key] = caption_from_report(report, section, fallback_section, placeholder_replacement)
            else:
                captions[key] = None

        caption = captions[key]
        if caption is None:
            skipped["missing report"] += 1
            continue
        if not caption:
            skipped["empty caption"] += 1
            continue

        path = image_path(image_root, subject_id, study_id, dicom_id)
        if check_images and not path.is_file():
            skipped["missing image"] += 1
            continue
        rows.append((str(path), caption, subject_id, study_id, dicom_id))

    pairs = pd.DataFrame(rows, columns=list(PAIR_LIST_COLUMNS))
    stats.kept = len(pairs)
    stats.skipped = dict(skipped)
    logger.info(
        "MIMIC-CXR pairs: %d kept of %d frontal images in splits %s; skipped %s; %d images of %d subjects "
        "excluded by the MS-CXR leakage guard.",
        stats.kept,
        stats.candidates,
        splits,
        stats.skipped,
        stats.excluded_by_leakage_guard,
        stats.excluded_subjects,
    )
    return pairs, stats


def read_user_pairs(
    csv_path: str | Path,
    path_column: str = "path",
    caption_column: str = "caption",
    image_root: str | Path | None = None,
    excluded_subjects: set[str] | None = None,
    check_images: bool = True,
) -> tuple[pd.DataFrame, PairBuildStats]:
    """Read a user CSV of (image path, caption) pairs.

    Relative paths resolve against `image_root`, or against the CSV's folder when it is None.
    The leakage guard takes the subject from a ``subject_id`` column or, failing that, from a
    MIMIC-CXR style path (``p<subject_id>/s<study_id>``).

    Raises:
        FileNotFoundError: `csv_path` does not exist.
        ValueError: A named column is missing.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"Training pair CSV not found: {csv_path}. Set data.init_args.train_csv to an existing file.")
    frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    _require_columns(frame, (path_column, caption_column), csv_path)

    base = Path(image_root) if image_root is not None else csv_path.parent
    stats = PairBuildStats(candidates=len(frame), leakage_guard=excluded_subjects is not None)
    skipped: Counter = Counter()
    excluded: set[str] = set()
    unknown_subjects = 0
    rows = []

    for record in frame.to_dict("records"):
        raw_path = record[path_column].strip()
        captions = [normalize_caption(part) for part in record[caption_column].split(CAPTION_SEPARATOR)]
        caption = CAPTION_SEPARATOR.join(part for part in captions if part)
        if not raw_path:
            skipped["missing path"] += 1
            continue
        if not caption:
            skipped["empty caption"] += 1
            continue

        subject_id = record.get("subject_id", "").strip() or subject_from_path(raw_path) or ""
        if excluded_subjects is not None:
            if not subject_id:
                unknown_subjects += 1
            elif subject_id in excluded_subjects:
                stats.excluded_by_leakage_guard += 1
                excluded.add(subject_id)
                continue

        path = Path(raw_path) if Path(raw_path).is_absolute() else base / raw_path
        if check_images and not path.is_file():
            skipped["missing image"] += 1
            continue
        rows.append((str(path), caption, subject_id, record.get("study_id", ""), record.get("dicom_id", path.stem)))

    if unknown_subjects:
        logger.warning(
            "The leakage guard cannot check %d rows of %s: no subject_id column and no p<subject>/s<study> in the path.",
            unknown_subjects,
            csv_path,
        )

    pairs = pd.DataFrame(rows, columns=list(PAIR_LIST_COLUMNS))
    stats.kept = len(pairs)
    stats.skipped = dict(skipped)
    stats.excluded_subjects = len(excluded)
    logger.info("User pairs from %s: %d kept, skipped %s, %d excluded by the leakage guard.", csv_path, stats.kept, stats.skipped, stats.excluded_by_leakage_guard)
    return pairs, stats


def settings_digest(settings: dict) -> str:
    """Hash a JSON-serialisable dict of build settings into a short hex key."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]


def save_pair_list(pairs: pd.DataFrame, stats: PairBuildStats, path: Path) -> None:
    """Write the pair list CSV and its counts (``<name>.json``) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".csv.tmp")
    pairs.to_csv(temporary, index=False)
    path.with_suffix(".json").write_text(json.dumps(asdict(stats), indent=2))
    temporary.replace(path)


def load_pair_list(path: Path) -> tuple[pd.DataFrame, PairBuildStats] | None:
    """Read a pair list written by `save_pair_list`; return None when it is missing or invalid."""
    stats_path = path.with_suffix(".json")
    if not path.is_file() or not stats_path.is_file():
        return None
    try:
        pairs = pd.read_csv(path, dtype=str, keep_default_na=False)
        stats = PairBuildStats(**json.loads(stats_path.read_text()))
    except (OSError, ValueError, TypeError, pd.errors.ParserError) as error:
        logger.warning("Ignoring the unreadable pair list %s (%s); it will be rebuilt.", path, error)
        return None
    if tuple(pairs.columns) != PAIR_LIST_COLUMNS or len(pairs) != stats.kept:
        logger.warning("Ignoring the pair list %s: its columns or length do not match its counts; it will be rebuilt.", path)
        return None
    return pairs, stats


def choose_caption(entry: str, random_choice: bool) -> str:
    """Pick one of several ``|``-separated captions: a random one, or the first.

    The random draw uses torch's global generator, which the DataLoader seeds differently in
    each worker and each epoch (and Lightning's ``seed_everything(workers=True)`` makes
    reproducible), so workers do not repeat each other's choices.
    """
    options = [part for part in entry.split(CAPTION_SEPARATOR) if part.strip()] or [""]
    if not random_choice or len(options) == 1:
        return options[0]
    return options[int(torch.randint(len(options), (1,)).item())]


class CaptionImageDataset(Dataset):
    """Training samples: the model input and one caption per image.

    An item is ``{"pixel_values": FloatTensor[3, S, S] in [-1, 1], "caption": str}``; in
    lenient mode an image that fails to decode yields ``{"failed": (path, reason)}``.

    Args:
        image_paths: Image files.
        captions: One entry per image, possibly several captions separated by ``|``.
        image_size: Side S of the model input.
        decode_mode: Raise on an unreadable image, or return a failure record.
        random_caption: Pick a random caption of an entry (training) instead of the first.
        fast_jpeg: Decode JPEGs at reduced DCT scale when they are much larger than S.
    """

    def __init__(
        self,
        image_paths: list[str],
        captions: list[str],
        image_size: int,
        decode_mode: DecodeMode,
        random_caption: bool = True,
        fast_jpeg: bool = True,
    ) -> None:
        if len(image_paths) != len(captions):
            raise ValueError(f"Got {len(image_paths)} image paths but {len(captions)} captions.")
        self.image_paths = image_paths
        self.captions = captions
        self.image_size = image_size
        self.decode_mode = DecodeMode(decode_mode)
        self.random_caption = random_caption
        self.fast_jpeg = fast_jpeg

    def __len__(self) -> int:
        return len(self.image_paths)

    def load_image(self, index: int) -> dict:
        """Decode and transform one image; return ``pixel_values`` or a ``failed`` record."""
        path = self.image_paths[index]
        try:
            decoded = decode_radiograph(path, self.image_size if self.fast_jpeg else None)
        except ImageDecodeError as error:
            if self.decode_mode is DecodeMode.STRICT:
                raise
            logger.warning("Skipping training image: %s", error)
            return {"failed": (path, error.reason)}

        geometry = CropGeometry.for_image(decoded.original_height, decoded.original_width, self.image_size)
        return {"pixel_values": to_model_input_with_geometry(decoded.pixels, geometry)}

    def __getitem__(self, index: int) -> dict:
        sample = self.load_image(index)
        if "failed" not in sample:
            sample["caption"] = choose_caption(self.captions[index], self.random_caption)
        return sample
