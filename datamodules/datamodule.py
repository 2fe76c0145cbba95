"""`CXRDataModule`: training pairs, grounding validation and test, and the phantom demo.

Batch layouts follow the data contracts of ``docs/architecture.md``. Each batch also carries
``failed_samples``, the images of the batch that failed to decode in lenient mode. The
`on_before_batch_transfer` hook removes that key, counts the failures and logs them before
the batch reaches the model. Under DDP, Lightning's distributed sampler may repeat a few grounding
pairs to even out the ranks; consumers deduplicate by ``pair_id``.
"""

import csv
import inspect
import json
import logging
import random
from collections import Counter
from dataclasses import asdict
from enum import Enum, unique
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.chestxray14 import read_chestxray14_boxes
from datamodules.image_io import DecodeMode
from datamodules.latent_cache import (
    LatentCache,
    LatentCacheKey,
    LatentCaptionDataset,
    LatentDtype,
    encode_posterior,
    image_list_digest,
    latent_shape,
    vae_digest,
)
from datamodules.mimic_cxr import (
    ACCESS_HINT,
    SPLIT_FILE,
    CaptionImageDataset,
    PairBuildStats,
    build_mimic_pairs,
    load_pair_list,
    read_official_csv,
    read_user_pairs,
    save_pair_list,
    settings_digest,
    subject_from_path,
)
from datamodules.ms_cxr import GroundingDataset, GroundingPair, GroundingReadResult, collate_grounding, read_ms_cxr

logger = logging.getLogger(__name__)

MS_CXR_HINT = "MS-CXR needs credentialed access on PhysioNet (physionet.org)."
CHESTXRAY14_HINT = "ChestX-ray14 is published by the NIH Clinical Center (nihcc.app.box.com/v/ChestXray-NIHCC)."
# Arguments that point to real data; with demo=true the phantoms replace them.
REAL_DATA_ARGUMENTS = (
    "mimic_cxr_jpg_root",
    "mimic_cxr_reports_root",
    "ms_cxr_csv",
    "train_csv",
)


@unique
class GroundingSource(str, Enum):
    """The annotation set of the grounding validation and test batches."""

    MS_CXR = "ms_cxr"
    CHESTXRAY14 = "chestxray14"


def collate_training(samples: list[dict], image_size: int = 0) -> dict:
    """Stack training samples (images or cached latents) into a batch and drop failed ones.

    Returns:
        ``{"pixel_values": [B, 3, S, S]}`` or ``{"latent_mean", "latent_logvar": [B, C, h, w]}``,
        plus ``captions`` and ``failed_samples`` (``(path, reason)`` pairs). B is 0 when every
        sample failed; the empty batch then has pixel values of shape ``[0, 3, S, S]``.
    """
    kept = [sample for sample in samples if "failed" not in sample]
    batch: dict[str, Any] = {
        "captions": [sample["caption"] for sample in kept],
        "failed_samples": [sample["failed"] for sample in samples if "failed" in sample],
    }
    if kept and "latent_mean" in kept[0]:
        batch["latent_mean"] = torch.stack([sample["latent_mean"] for sample in kept])
        batch["latent_logvar"] = torch.stack([sample["latent_logvar"] for sample in kept])
    elif kept:
        batch["pixel_values"] = torch.stack([sample["pixel_values"] for sample in kept])
    else:
        batch["pixel_values"] = torch.zeros(0, 3, image_size, image_size)
    return batch


def _choice(enum: type[Enum], value: str, key: str) -> Any:
    """Convert a config string to an Enum member, or raise naming the key and the allowed values."""
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(member.value for member in enum)
        raise ValueError(f"data.init_args.{key} must be one of {allowed}; got {value!r}.") from None


def _subset(items: list, max_items: int | None, seed: int) -> list:
    """Take a seeded random subset of at most `max_items`, in the original order."""
    if max_items is None or len(items) <= max_items:
        return items
    chosen = sorted(random.Random(seed).sample(range(len(items)), max_items))
    return [items[index] for index in chosen]


class CXRDataModule(L.LightningDataModule):
    """Chest X-ray data for latent diffusion fine-tuning and phrase grounding evaluation.

    Training pairs come from MIMIC-CXR-JPG with report impressions (or a user CSV); grounding
    batches come from MS-CXR (or the ChestX-ray14 boxes). With ``demo=True`` the same code
    reads a phantom data set that `prepare_data` writes in the official layouts.

    Args:
        mimic_cxr_jpg_root: MIMIC-CXR-JPG 2.0.0 root, the folder with
            ``mimic-cxr-2.0.0-split.csv.gz``, ``mimic-cxr-2.0.0-metadata.csv.gz`` and ``files/``.
        mimic_cxr_reports_root: Root of the MIMIC-CXR reports archive (the folder with
            ``files/``); None to use `mimic_cxr_jpg_root`.
        ms_cxr_csv: MS-CXR ``MS_CXR_Local_Alignment_v1.x.0.csv``; its ``path`` column is
            relative to `mimic_cxr_jpg_root`. None disables MS-CXR grounding and the leakage guard.
        train_csv: Optional CSV of (image path, caption) pairs that replaces the MIMIC-CXR pair
            list. Relative paths resolve against `mimic_cxr_jpg_root`.
        train_csv_path_column: Image path column of `train_csv`.
        train_csv_caption_column: Caption column of `train_csv`; ``|`` separates several captions.
        grounding_source: ``ms_cxr`` or ``chestxray14`` for the validation and test batches.
        chestxray14_csv: ChestX-ray14 ``BBox_List_2017.csv``.
        chestxray14_images_dir: ChestX-ray14 image folder (with ``images_001`` .. ``images_012``).
        chestxray14_phrase_template: Phrase of a ChestX-ray14 pair; ``{finding}`` is the
            lower-case finding label.
        image_size: Side S of the square model input in pixels.
        train_batch_size: Training batch size per device.
        eval_batch_size: Grounding batch size per device.
        num_workers: Data loader worker processes per device.
        pin_memory: Use pinned host memory for faster transfer to the GPU.
        persistent_workers: Keep workers alive between epochs (only with ``num_workers > 0``).
        views: MIMIC-CXR ``ViewPosition`` values kept for training.
        caption_section: Report section used as the caption.
        caption_fallback_section: Section used when `caption_section` is missing or empty;
            None for no fallback.
        placeholder_replacement: Text that replaces the ``___`` de-identification placeholders.
        train_splits: MIMIC-CXR splits (``train``, ``validate``, ``test``) of the training pairs.
        val_splits: MS-CXR splits of the validation grounding pairs (release 1.1.0 has
            ``train``, ``val``, ``test``; release 1.0.0 has no split column and uses all pairs).
        test_splits: MS-CXR splits of the test grounding pairs.
        leakage_guard: Leave out of training every subject that appears in `ms_cxr_csv`.
        use_latent_cache: Train from cached VAE posteriors instead of images.
        vae_name_or_path: VAE for the latent cache: a diffusers model folder with ``vae/``,
            a bare ``AutoencoderKL`` folder, or a hub id.
        latent_cache_dir: Folder of latent stores; None for ``<work_dir>/latent_cache``.
        latent_dtype: Storage dtype of the cached posteriors (``float16`` or ``bfloat16``).
        verify_latent_cache: Verify the store's checksums in `prepare_data` (reads it once).
        cache_batch_size: Images per VAE call while building the cache.
        work_dir: Folder for the cached pair list CSV and, by default, the latent cache.
        decode_mode: ``lenient`` skips, logs and counts unreadable images; ``strict`` raises.
        fast_jpeg: Decode large training JPEGs at reduced DCT scale (several times faster;
            grounding images are always decoded at full size).
        check_image_files: Skip training pairs whose image file does not exist while building
            the pair list.
        max_train_pairs: Use a seeded random subset of at most this many training pairs.
        max_eval_pairs: Use a seeded random subset of at most this many grounding pairs per stage.
        subset_seed: Seed of both subsets.
        demo: Write a phantom data set under `demo_root` and use it instead of the real data.
        demo_root: Folder of the phantom data set.
        demo_options: Fields of ``datamodules.phantoms.PhantomConfig`` (``num_train``, ``seed``, ...).
    """

    def __init__(
        self,
        mimic_cxr_jpg_root: str = "data/mimic-cxr-jpg/2.0.0",
        mimic_cxr_reports_root: str | None = None,
        ms_cxr_csv: str | None = "data/ms-cxr/MS_CXR_Local_Alignment_v1.1.0.csv",
        train_csv: str | None = None,
        train_csv_path_column: str = "path",
        train_csv_caption_column: str = "caption",
        grounding_source: str = GroundingSource.MS_CXR.value,
        chestxray14_csv: str | None = None,
        chestxray14_images_dir: str | None = None,
        chestxray14_phrase_template: str = "{finding}",
        image_size: int = 512,
        train_batch_size: int = 16,
        eval_batch_size: int = 8,
        num_workers: int = 8,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        views: tuple[str, ...] = ("PA", "AP"),
        caption_section: str = "IMPRESSION",
        caption_fallback_section: str | None = "FINDINGS",
        placeholder_replacement: str = "",
        train_splits: tuple[str, ...] = ("train",),
        val_splits: tuple[str, ...] = ("val",),
        test_splits: tuple[str, ...] = ("test",),
        leakage_guard: bool = True,
        use_latent_cache: bool = False,
        vae_name_or_path: str | None = None,
        latent_cache_dir: str | None = None,
        latent_dtype: str = LatentDtype.FLOAT16.value,
        verify_latent_cache: bool = True,
        cache_batch_size: int = 16,
        work_dir: str = "runs/data",
        decode_mode: str = DecodeMode.LENIENT.value,
        fast_jpeg: bool = True,
        check_image_files: bool = True,
        max_train_pairs: int | None = None,
        max_eval_pairs: int | None = None,
        subset_seed: int = 0,
        demo: bool = False,
        demo_root: str = "data/demo",
        demo_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()

        if image_size <= 0 or image_size % 8 != 0:
            raise ValueError(f"image_size must be a positive multiple of 8 (the VAE's downsampling factor), got {image_size}.")
        for name, value in (("train_batch_size", train_batch_size), ("eval_batch_size", eval_batch_size), ("cache_batch_size", cache_batch_size)):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}.")
        if num_workers < 0:
            raise ValueError(f"num_workers must be zero or positive, got {num_workers}.")
        if use_latent_cache and not vae_name_or_path:
            raise ValueError("use_latent_cache=true needs data.init_args.vae_name_or_path (a diffusers model folder, a VAE folder or a hub id).")

        # Plain strings in the signature, because LightningCLI parses an Enum by member name
        # (FLOAT16) while configs use the values (float16).
        self.grounding_source = _choice(GroundingSource, grounding_source, "grounding_source")
        self.decode_mode = _choice(DecodeMode, decode_mode, "decode_mode")
        self.latent_dtype = _choice(LatentDtype, latent_dtype, "latent_dtype")

        if demo:
            root = Path(demo_root)
            self.image_root = root
            self.reports_root = root
            self.ms_cxr_csv: Path | None = root / "MS_CXR_Local_Alignment_v1.1.0.csv"
            self.train_csv: Path | None = None
        else:
            self.image_root = Path(mimic_cxr_jpg_root)
            self.reports_root = Path(mimic_cxr_reports_root) if mimic_cxr_reports_root else self.image_root
            self.ms_cxr_csv = Path(ms_cxr_csv) if ms_cxr_csv else None
            self.train_csv = Path(train_csv) if train_csv else None

        self.work_dir = Path(work_dir)
        self.latent_cache_dir = Path(latent_cache_dir) if latent_cache_dir else self.work_dir / "latent_cache"

        self.train_pairs = None
        self.train_stats: PairBuildStats | None = None
        self.grounding: dict[str, GroundingReadResult] = {}
        self.train_dataset: Dataset | None = None
        self.grounding_datasets: dict[str, GroundingDataset] = {}
        self.failed_samples: Counter = Counter()
        self.failed_examples: list[tuple[str, str]] = []
        self._warned_unused_paths = False
        self._pair_list_logged = False

    @property
    def train_batch_size(self) -> int:
        """Training batch size per device."""
        return self.hparams.train_batch_size

    def check_paths(self) -> None:
        """Raise when a configured file or folder is missing, naming the config key.

        ``train.py`` calls it right after building the datamodule, and ``prepare_data`` calls it
        again, so that a real config stops before any model work. The constructor does not check,
        because jsonargparse builds the class once while it validates the config.
        """
        if self.hparams.demo:
            self._warn_unused_real_paths()
            return
        required: list[tuple[Path | None, str, str]] = []
        if self.train_csv is not None:
            required.append((self.train_csv, "train_csv", "Point it to your CSV of image paths and captions."))
        else:
            required.append((self.image_root, "mimic_cxr_jpg_root", ACCESS_HINT))
            required.append((self.reports_root, "mimic_cxr_reports_root", ACCESS_HINT))
        if self.grounding_source is GroundingSource.MS_CXR:
            required.append((self.ms_cxr_csv, "ms_cxr_csv", MS_CXR_HINT))
        else:
            csv_path = self.hparams.chestxray14_csv
            images_dir = self.hparams.chestxray14_images_dir
            required.append((Path(csv_path) if csv_path else None, "chestxray14_csv", CHESTXRAY14_HINT))
            required.append((Path(images_dir) if images_dir else None, "chestxray14_images_dir", CHESTXRAY14_HINT))

        for path, key, hint in required:
            if path is None and key == "ms_cxr_csv":
                continue
            if path is None:
                raise ValueError(f"data.init_args.{key} is not set but grounding_source={self.grounding_source.value} needs it. {hint}")
            if not path.exists():
                raise FileNotFoundError(f"Data path not found: {path} (set by data.init_args.{key}). {hint}")

    def _warn_unused_real_paths(self) -> None:
        """Warn once when ``demo`` is on but real data paths were changed from their defaults."""
        if self._warned_unused_paths:
            return
        self._warned_unused_paths = True

        defaults = inspect.signature(CXRDataModule.__init__).parameters
        changed = [
            f"{name}={self.hparams[name]}"
            for name in REAL_DATA_ARGUMENTS
            if self.hparams[name] != defaults[name].default
        ]
        if changed:
            logger.warning(
                "demo=true, so the phantoms under %s are used and %s is ignored. "
                "Set data.init_args.demo=false to use the real data.",
                self.hparams.demo_root,
                ", ".join(changed),
            )

    # ------------------------------------------------------------------ one-time work

    def prepare_data(self) -> None:
        """Write the phantoms (demo), build and cache the pair list, and build the latent cache."""
        self.check_paths()
        if self.hparams.demo:
            self.write_demo_data()
        self.train_pair_list()
        if self.hparams.use_latent_cache:
            self.build_latent_cache()

    def write_demo_data(self) -> None:
        """Write the phantom data set under `demo_root` unless an identical one is there."""
        from datamodules.phantoms import PhantomConfig, write_phantom_dataset

        config = PhantomConfig(**(self.hparams.demo_options or {}))
        write_phantom_dataset(self.hparams.demo_root, config)

    def _excluded_subjects(self) -> set[str] | None:
        """Return the subjects of every MS-CXR row (all splits), or None when the guard is off."""
        if not self.hparams.leakage_guard or self.ms_cxr_csv is None:
            return None
        if not self.ms_cxr_csv.is_file():
            raise FileNotFoundError(f"Data path not found: {self.ms_cxr_csv} (set by data.init_args.ms_cxr_csv). {MS_CXR_HINT}")

        # Read with the csv module, so that a malformed row cannot hide the others.
        with self.ms_cxr_csv.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = [name.strip() for name in (reader.fieldnames or [])]
            if "dicom_id" not in columns or "path" not in columns:
                raise ValueError(
                    f"MS-CXR file {self.ms_cxr_csv} lacks the dicom_id or path column (found {columns}), "
                    "so the leakage guard cannot find its subjects. Use the official CSV unchanged."
                )
            reader.fieldnames = columns
            rows = [(row.get("dicom_id") or "", row.get("path") or "") for row in reader]

        subjects = {subject for subject in (subject_from_path(path) for _, path in rows) if subject}

        # Rows whose path has no p<subject>/s<study> are resolved through the split CSV.
        unresolved = {dicom.strip() for dicom, path in rows if not subject_from_path(path)}
        if unresolved and (self.image_root / SPLIT_FILE).is_file():
            split_frame = read_official_csv(self.image_root / SPLIT_FILE, "mimic_cxr_jpg_root")
            subjects |= set(split_frame.loc[split_frame["dicom_id"].isin(unresolved), "subject_id"])
        logger.info("Leakage guard: any training image of the %d MS-CXR subjects is left out.", len(subjects))
        return subjects

    def pair_list_path(self) -> Path:
        """Return the pair list CSV path, keyed by every setting and source file it depends on."""
        hp = self.hparams
        sources = [self.train_csv] if self.train_csv else [self.image_root / SPLIT_FILE]
        if self.ms_cxr_csv is not None and hp.leakage_guard:
            sources.append(self.ms_cxr_csv)
        settings = {
            "image_root": str(self.image_root.absolute()),
            "reports_root": str(self.reports_root.absolute()),
            "train_csv": str(self.train_csv.absolute()) if self.train_csv else None,
            "columns": [hp.train_csv_path_column, hp.train_csv_caption_column],
            "views": list(hp.views),
            "splits": list(hp.train_splits),
            "sections": [hp.caption_section, hp.caption_fallback_section, hp.placeholder_replacement],
            "guard": [hp.leakage_guard, str(self.ms_cxr_csv)],
            "check_image_files": hp.check_image_files,
            "sources": [(str(path), path.stat().st_size, path.stat().st_mtime_ns) for path in sources if path.is_file()],
        }
        return self.work_dir / f"train_pairs_{settings_digest(settings)}.csv"

    def train_pair_list(self) -> tuple[Any, PairBuildStats]:
        """Load the cached training pair list or build and cache it."""
        path = self.pair_list_path()
        cached = load_pair_list(path)
        if cached is not None:
            # prepare_data and setup both read the list, so the second read logs at DEBUG level.
            level = logging.DEBUG if self._pair_list_logged else logging.INFO
            logger.log(level, "Using the cached training pair list %s (%d pairs).", path, len(cached[0]))
            self._pair_list_logged = True
            return cached

        hp = self.hparams
        excluded = self._excluded_subjects()
        if self.train_csv is not None:
            pairs, stats = read_user_pairs(
                self.train_csv,
                hp.train_csv_path_column,
                hp.train_csv_caption_column,
                image_root=self.image_root if self.image_root.is_dir() else None,
                excluded_subjects=excluded,
                check_images=hp.check_image_files,
            )
        else:
            pairs, stats = build_mimic_pairs(
                self.image_root,
                self.reports_root,
                splits=list(hp.train_splits),
                views=list(hp.views),
                section=hp.caption_section,
                fallback_section=hp.caption_fallback_section,
                placeholder_replacement=hp.placeholder_replacement,
                excluded_subjects=excluded,
                check_images=hp.check_image_files,
            )
        if stats.kept == 0:
            raise ValueError(
                f"No training pairs are left (skipped: {stats.skipped}; excluded by the leakage guard: "
                f"{stats.excluded_by_leakage_guard}). Check the data paths, views {list(hp.views)} and splits {list(hp.train_splits)}."
            )
        save_pair_list(pairs, stats, path)
        logger.info("Wrote the training pair list %s.", path)
        return pairs, stats

    def _load_vae(self) -> torch.nn.Module:
        """Load the frozen VAE from a diffusers model folder, a bare VAE folder or a hub id."""
        from diffusers import AutoencoderKL

        name = self.hparams.vae_name_or_path
        local = Path(name)
        if local.is_dir() and (local / "vae").is_dir():
            vae = AutoencoderKL.from_pretrained(local, subfolder="vae")
        elif local.is_dir():
            vae = AutoencoderKL.from_pretrained(local)
        elif local.exists() or name.startswith((".", "/", "~")):
            raise FileNotFoundError(f"VAE not found at {name} (set by data.init_args.vae_name_or_path); expected a folder.")
        else:
            vae = AutoencoderKL.from_pretrained(name, subfolder="vae")
        return vae.eval().requires_grad_(False)

    def _latent_cache(self, vae: torch.nn.Module, image_paths: list[str]) -> LatentCache:
        """Describe the latent store of these images and this VAE."""
        key = LatentCacheKey(
            image_list_digest=image_list_digest(image_paths),
            vae_digest=vae_digest(vae),
            image_size=self.hparams.image_size,
            fast_jpeg=self.hparams.fast_jpeg,
            dtype=self.latent_dtype,
        )
        return LatentCache(self.latent_cache_dir, key, len(image_paths), latent_shape(vae, self.hparams.image_size))

    def _store_record(self) -> dict[str, Any]:
        """Return the settings that select a latent store, besides the VAE weights."""
        hp = self.hparams
        return {
            "pair_list": self.pair_list_path().name,
            "vae_name_or_path": hp.vae_name_or_path,
            "image_size": hp.image_size,
            "fast_jpeg": hp.fast_jpeg,
            "dtype": self.latent_dtype.value,
        }

    def build_latent_cache(self) -> None:
        """Encode every training image once with the frozen VAE (or reuse the valid store).

        Lightning calls `prepare_data` on one process per node while the other ranks wait, and
        the store's file lock makes a second node wait for the first, so each store is written
        once.
        """
        pairs, _ = self.train_pair_list()
        image_paths = list(pairs["image_path"])
        vae = self._load_vae()
        if torch.cuda.is_available():
            vae = vae.to("cuda")
        cache = self._latent_cache(vae, image_paths)
        images = CaptionImageDataset(image_paths, list(pairs["caption"]), self.hparams.image_size, self.decode_mode, fast_jpeg=self.hparams.fast_jpeg)
        report = cache.build(
            images,
            partial(encode_posterior, vae),
            batch_size=self.hparams.cache_batch_size,
            num_workers=self.hparams.num_workers,
            verify_checksums=self.hparams.verify_latent_cache,
        )
        record = {**self._store_record(), "directory": str(cache.directory.absolute())}
        self.work_dir.mkdir(parents=True, exist_ok=True)
        (self.work_dir / "latent_cache_record.json").write_text(json.dumps(record, indent=2))
        logger.info("Latent cache: %s", asdict(report))

    # ------------------------------------------------------------------ per-process state

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets of `stage` (``fit``, ``validate``, ``test``); safe to call twice."""
        if stage in (None, "fit") and self.train_dataset is None:
            self._setup_training()
        if stage in (None, "fit", "validate"):
            self._setup_grounding("val")
        if stage in (None, "test"):
            self._setup_grounding("test")

    def _setup_training(self) -> None:
        """Build the training dataset from the pair list, and from the latent store when it is on."""
        pairs, stats = self.train_pair_list()
        self.train_stats = stats
        image_paths = list(pairs["image_path"])
        captions = list(pairs["caption"])

        if self.hparams.use_latent_cache:
            store = self._find_latent_store(image_paths)
            indices = store.usable_indices()
            indices = np.asarray(_subset(list(indices), self.hparams.max_train_pairs, self.hparams.subset_seed))
            self.train_dataset = LatentCaptionDataset(store.directory, self.latent_dtype, indices, captions)
        else:
            chosen = _subset(list(range(len(image_paths))), self.hparams.max_train_pairs, self.hparams.subset_seed)
            self.train_dataset = CaptionImageDataset(
                [image_paths[index] for index in chosen],
                [captions[index] for index in chosen],
                self.hparams.image_size,
                self.decode_mode,
                random_caption=True,
                fast_jpeg=self.hparams.fast_jpeg,
            )
        logger.info("Training on %d pairs (latent cache %s).", len(self.train_dataset), "on" if self.hparams.use_latent_cache else "off")

    def _find_latent_store(self, image_paths: list[str]) -> LatentCache:
        """Find the store built in `prepare_data` without loading the VAE again on every rank."""
        # NOTE: a VAE whose weights changed in place under the same path is caught by the key
        # check in prepare_data, not here, because this lookup does not load the VAE.
        record_path = self.work_dir / "latent_cache_record.json"
        try:
            record = json.loads(record_path.read_text())
            directory = Path(record.pop("directory"))
            meta = json.loads((directory / "meta.json").read_text())
        except (OSError, ValueError, KeyError):
            record, meta = None, None

        if record == self._store_record() and meta is not None:
            key = LatentCacheKey(**{**meta["key"], "dtype": LatentDtype(meta["key"]["dtype"])})
            if key.image_list_digest == image_list_digest(image_paths) and key.digest() == directory.name:
                return LatentCache(directory.parent, key, meta["num_images"], tuple(meta["shape"]))

        # No matching record: load the VAE to compute the key (slower, but exact).
        return self._latent_cache(self._load_vae(), image_paths)

    def read_grounding(self, stage: str) -> GroundingReadResult | None:
        """Read the grounding pairs of ``val`` or ``test``; None when no annotation file is set."""
        hp = self.hparams
        splits = list(hp.val_splits if stage == "val" else hp.test_splits)
        if self.grounding_source is GroundingSource.CHESTXRAY14:
            return read_chestxray14_boxes(hp.chestxray14_csv, hp.chestxray14_images_dir, hp.image_size, hp.chestxray14_phrase_template)
        if self.ms_cxr_csv is None:
            return None
        return read_ms_cxr(self.ms_cxr_csv, self.image_root, hp.image_size, splits=splits)

    def _setup_grounding(self, stage: str) -> None:
        """Build the grounding dataset of ``val`` or ``test`` once."""
        if stage in self.grounding_datasets or stage in self.grounding:
            return
        result = self.read_grounding(stage)
        if result is None:
            logger.warning("No grounding annotations are configured, so there are no %s grounding batches.", stage)
            return
        self.grounding[stage] = result
        pairs: list[GroundingPair] = _subset(result.pairs, self.hparams.max_eval_pairs, self.hparams.subset_seed)
        self.grounding_datasets[stage] = GroundingDataset(pairs, self.hparams.image_size, self.decode_mode)

    # ------------------------------------------------------------------ loaders

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, collate: Any, drop_last: bool) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=workers,
            pin_memory=self.hparams.pin_memory,
            persistent_workers=self.hparams.persistent_workers and workers > 0,
            collate_fn=partial(collate, image_size=self.hparams.image_size),
            drop_last=drop_last,
        )

    def train_dataloader(self) -> DataLoader:
        """Yield training batches: ``pixel_values`` or ``latent_mean``/``latent_logvar``, and ``captions``."""
        if self.train_dataset is None:
            self.setup("fit")
        drop_last = len(self.train_dataset) >= self.hparams.train_batch_size
        return self._loader(self.train_dataset, self.hparams.train_batch_size, True, collate_training, drop_last)

    def _grounding_loader(self, stage: str) -> DataLoader | list:
        if stage not in self.grounding_datasets:
            self._setup_grounding(stage)
        if stage not in self.grounding_datasets:
            return []
        return self._loader(self.grounding_datasets[stage], self.hparams.eval_batch_size, False, collate_grounding, False)

    def val_dataloader(self) -> DataLoader | list:
        """Yield grounding batches of the validation pairs (an empty list when none are configured)."""
        return self._grounding_loader("val")

    def test_dataloader(self) -> DataLoader | list:
        """Yield grounding batches of the test pairs (an empty list when none are configured)."""
        return self._grounding_loader("test")

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Remove ``failed_samples`` from a batch, then count and log the failed images."""
        if isinstance(batch, dict) and "failed_samples" in batch:
            for path, reason in batch.pop("failed_samples"):
                self.failed_samples[reason] += 1
                if len(self.failed_examples) < 100:
                    self.failed_examples.append((path, reason))
                logger.warning("Dropped an unreadable image from a batch: %s (%s).", path, reason)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Return the decode failure counts so that they survive a resumed run."""
        return {"failed_samples": dict(self.failed_samples)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the decode failure counts."""
        self.failed_samples = Counter(state_dict.get("failed_samples", {}))
