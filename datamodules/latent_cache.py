"""A memory-mapped store of VAE posteriors, so that training never runs the VAE encoder.

Each training image is encoded once by the frozen VAE. The store keeps the posterior's mean and
log-variance (``[N, C, h, w]``, float16 or bfloat16) in ``.npy`` files that every data loader
worker maps read-only. The store's folder name is a hash of everything its content depends on:
the ordered image list, the VAE's config and weights, the image size, the JPEG decoding mode,
the storage dtype and the format version. A change to any of them selects another folder.

A build writes rows in batches and marks each finished row in ``status.npy`` after the rows are
flushed, so an interrupted build resumes where it stopped. A finished build stores CRC-32
checksums in ``meta.json``; a store that fails them is deleted and rebuilt, never used. An
exclusive file lock makes concurrent builders (several nodes sharing a file system, or a
second run) wait for the first instead of writing twice.
"""

import fcntl
import hashlib
import json
import logging
import shutil
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from enum import Enum, unique
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.mimic_cxr import CaptionImageDataset, choose_caption

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
STATUS_PENDING = 0
STATUS_DONE = 1
STATUS_FAILED = 2
CHECKSUM_CHUNK_BYTES = 64 * 1024 * 1024


@unique
class LatentDtype(str, Enum):
    """Storage dtype of the cached posterior."""

    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"


class LatentCacheError(RuntimeError):
    """Raised when a latent store is missing, incomplete or does not match its inputs."""


@dataclass(frozen=True)
class LatentCacheKey:
    """Everything the content of a latent store depends on.

    Attributes:
        image_list_digest: SHA-256 of the ordered image paths.
        vae_digest: SHA-256 of the VAE config and weights.
        image_size: Side S of the encoded images in pixels.
        fast_jpeg: Whether JPEGs were decoded at reduced DCT scale.
        dtype: Storage dtype.
        format_version: Version of this file layout.
    """

    image_list_digest: str
    vae_digest: str
    image_size: int
    fast_jpeg: bool
    dtype: LatentDtype
    format_version: int = CACHE_FORMAT_VERSION

    def digest(self) -> str:
        """Return the store's folder name, a short hash of the key."""
        payload = json.dumps(asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:20]


def image_list_digest(image_paths: list[str]) -> str:
    """Hash the ordered image paths.

    NOTE: the key covers the paths, not the file contents, so an image replaced in place under
    the same path is not detected; delete the cache folder after editing images.
    """
    digest = hashlib.sha256()
    for path in image_paths:
        digest.update(path.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def vae_digest(vae: torch.nn.Module) -> str:
    """Hash a VAE's config (when it has one) and every tensor of its state dict."""
    digest = hashlib.sha256()
    config = getattr(vae, "config", None)
    if config is not None:
        digest.update(json.dumps(dict(config), sort_keys=True, default=str).encode("utf-8"))
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode("utf-8"))
        digest.update(str(tensor.dtype).encode("utf-8"))
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def latent_shape(vae: torch.nn.Module, image_size: int) -> tuple[int, int, int]:
    """Return ``(C, h, w)`` of a diffusers `AutoencoderKL` latent for an ``S x S`` image."""
    config = vae.config
    factor = 2 ** (len(config.block_out_channels) - 1)
    if image_size % factor != 0:
        raise ValueError(f"image_size {image_size} is not a multiple of the VAE's downsampling factor {factor}.")
    return (int(config.latent_channels), image_size // factor, image_size // factor)


def encode_posterior(vae: torch.nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode ``[B, 3, S, S]`` images in ``[-1, 1]`` into posterior mean and log-variance ``[B, C, h, w]``."""
    parameter = next(vae.parameters())
    with torch.no_grad():
        posterior = vae.encode(pixel_values.to(device=parameter.device, dtype=parameter.dtype)).latent_dist
    return posterior.mean.float().cpu(), posterior.logvar.float().cpu()


def _to_storage(values: torch.Tensor, dtype: LatentDtype) -> np.ndarray:
    """Convert float latents to the storage array (bfloat16 is kept as its raw 16 bits in int16)."""
    if dtype is LatentDtype.BFLOAT16:
        return values.to(torch.bfloat16).view(torch.int16).numpy()
    return values.to(torch.float16).numpy()


def _from_storage(values: np.ndarray, dtype: LatentDtype) -> torch.Tensor:
    """Convert stored rows back to ``float32``."""
    tensor = torch.from_numpy(np.array(values))
    if dtype is LatentDtype.BFLOAT16:
        tensor = tensor.view(torch.bfloat16)
    return tensor.float()


def _file_crc32(path: Path) -> int:
    """Compute the CRC-32 of a file, reading it in chunks."""
    checksum = 0
    with path.open("rb") as handle:
        while chunk := handle.read(CHECKSUM_CHUNK_BYTES):
            checksum = zlib.crc32(chunk, checksum)
    return checksum


@dataclass
class CacheBuildReport:
    """The outcome of `LatentCache.build`.

    Attributes:
        directory: The store's folder.
        hit: True when a complete, valid store already existed.
        encoded: Images encoded in this call.
        resumed_from: Images already done when this call started (an interrupted build).
        failed: Images that failed to decode (lenient mode) and are left out of training.
        rebuilt_reason: Why an existing store was deleted, or an empty string.
    """

    directory: str
    hit: bool
    encoded: int = 0
    resumed_from: int = 0
    failed: int = 0
    rebuilt_reason: str = ""


class _IndexedImages(Dataset):
    """Items of a `CaptionImageDataset` by position, with the position in the item."""

    def __init__(self, images: CaptionImageDataset, indices: np.ndarray) -> None:
        self.images = images
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict:
        index = int(self.indices[position])
        sample = self.images.load_image(index)
        sample["index"] = index
        return sample


def _collate_indexed(samples: list[dict]) -> dict:
    """Stack decoded images and keep the indices of the failed ones apart."""
    kept = [sample for sample in samples if "failed" not in sample]
    return {
        "indices": [sample["index"] for sample in kept],
        "pixel_values": torch.stack([sample["pixel_values"] for sample in kept]) if kept else None,
        "failed_indices": [sample["index"] for sample in samples if "failed" in sample],
    }


class LatentCache:
    """One latent store: a folder ``<root>/<key digest>`` with ``mean.npy``, ``logvar.npy``,
    ``status.npy`` and ``meta.json``.

    Args:
        root: Parent folder of all stores.
        key: What the content depends on.
        num_images: Rows N of the store.
        shape: Latent shape ``(C, h, w)`` of one row.
    """

    def __init__(self, root: str | Path, key: LatentCacheKey, num_images: int, shape: tuple[int, int, int]) -> None:
        self.root = Path(root)
        self.key = key
        self.num_images = num_images
        self.shape = tuple(shape)
        self.directory = self.root / key.digest()

    @property
    def storage_dtype(self) -> np.dtype:
        """The numpy dtype of the stored rows."""
        return np.dtype(np.int16) if self.key.dtype is LatentDtype.BFLOAT16 else np.dtype(np.float16)

    def _meta(self) -> dict | None:
        """Read ``meta.json``; None when it is missing or unreadable."""
        try:
            return json.loads((self.directory / "meta.json").read_text())
        except (OSError, ValueError):
            return None

    def _key_dict(self) -> dict:
        return {name: (value.value if isinstance(value, Enum) else value) for name, value in asdict(self.key).items()}

    def _write_meta(self, complete: bool, checksums: dict[str, int] | None = None) -> None:
        """Write ``meta.json`` atomically."""
        meta = {
            "key": self._key_dict(),
            "num_images": self.num_images,
            "shape": list(self.shape),
            "complete": complete,
            "checksums": checksums or {},
        }
        temporary = self.directory / "meta.json.tmp"
        temporary.write_text(json.dumps(meta, indent=2))
        temporary.replace(self.directory / "meta.json")

    def _expected_shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {
            "mean.npy": ((self.num_images, *self.shape), self.storage_dtype),
            "logvar.npy": ((self.num_images, *self.shape), self.storage_dtype),
            "status.npy": ((self.num_images,), np.dtype(np.uint8)),
        }

    def problem(self, verify_checksums: bool) -> str | None:
        """Check the store; return why it cannot be used, or None when it is complete and valid.

        Args:
            verify_checksums: Also read every file and compare its CRC-32 (reads the whole store).
        """
        meta = self._meta()
        if meta is None:
            return "missing or unreadable meta.json"
        if meta.get("key") != self._key_dict() or meta.get("num_images") != self.num_images or meta.get("shape") != list(self.shape):
            return "meta.json does not match the requested inputs"
        if not meta.get("complete"):
            return "incomplete build"

        for name, (shape, dtype) in self._expected_shapes().items():
            try:
                array = np.load(self.directory / name, mmap_mode="r")
            except (OSError, ValueError) as error:
                return f"{name} is unreadable ({error})"
            if array.shape != shape or array.dtype != dtype:
                return f"{name} has shape {array.shape} and dtype {array.dtype}, expected {shape} and {dtype}"

        status = np.load(self.directory / "status.npy")
        if (status == STATUS_PENDING).any():
            return f"{int((status == STATUS_PENDING).sum())} rows were never written"

        if verify_checksums:
            for name, expected in meta.get("checksums", {}).items():
                if _file_crc32(self.directory / name) != expected:
                    return f"checksum mismatch in {name}"
            if set(meta.get("checksums", {})) != set(self._expected_shapes()):
                return "meta.json lacks checksums"
        return None

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """Hold an exclusive lock on ``<root>/<digest>.lock`` (POSIX `flock`)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / f"{self.directory.name}.lock").open("w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def build(
        self,
        images: CaptionImageDataset,
        encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        batch_size: int = 16,
        num_workers: int = 0,
        verify_checksums: bool = True,
    ) -> CacheBuildReport:
        """Encode every image into the store, or reuse a valid one, or resume a partial one.

        Args:
            images: The training images in store order; its decode mode decides whether an
                unreadable image raises or is marked failed.
            encode: Maps ``[B, 3, S, S]`` images to posterior mean and log-variance ``[B, C, h, w]``.
            batch_size: Images per encoder call.
            num_workers: Data loader workers that decode images.
            verify_checksums: Verify an existing complete store's checksums before reusing it.

        Returns:
            What was reused, encoded, resumed and failed.

        Raises:
            ImageDecodeError: An image failed to decode in strict mode; the rows done so far
                stay, so the next call resumes.
        """
        if len(images) != self.num_images:
            raise ValueError(f"The store has {self.num_images} rows but {len(images)} images were given.")

        with self._lock():
            problem = self.problem(verify_checksums)
            if problem is None:
                status = np.load(self.directory / "status.npy")
                logger.info("Latent cache hit: %s (%d images).", self.directory, self.num_images)
                return CacheBuildReport(str(self.directory), hit=True, failed=int((status == STATUS_FAILED).sum()))

            report = CacheBuildReport(str(self.directory), hit=False)
            arrays = self._open_for_writing(problem, report)
            self._encode_pending(images, encode, arrays, batch_size, num_workers, report)

            checksums = {}
            for name, array in arrays.items():
                array.flush()
                checksums[name] = _file_crc32(self.directory / name)
            del arrays
            self._write_meta(complete=True, checksums=checksums)

        logger.info(
            "Latent cache built: %s (%d encoded, %d resumed, %d failed).",
            self.directory,
            report.encoded,
            report.resumed_from,
            report.failed,
        )
        return report

    def _open_for_writing(self, problem: str, report: CacheBuildReport) -> dict[str, np.memmap]:
        """Reopen a partial store to resume it, or delete whatever is there and start anew."""
        meta = self._meta()
        resumable = problem == "incomplete build" and meta is not None
        if resumable:
            try:
                arrays = {
                    name: np.lib.format.open_memmap(self.directory / name, mode="r+")
                    for name in self._expected_shapes()
                }
                if all(arrays[name].shape == shape and arrays[name].dtype == dtype for name, (shape, dtype) in self._expected_shapes().items()):
                    report.resumed_from = int((arrays["status.npy"] != STATUS_PENDING).sum())
                    logger.info("Resuming the latent cache %s at %d of %d images.", self.directory, report.resumed_from, self.num_images)
                    return arrays
            except (OSError, ValueError):
                pass
            problem = "partial store with unreadable arrays"

        if self.directory.exists():
            logger.warning("Rebuilding the latent cache %s: %s.", self.directory, problem)
            report.rebuilt_reason = problem
            shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True)
        self._write_meta(complete=False)
        return {
            name: np.lib.format.open_memmap(self.directory / name, mode="w+", dtype=dtype, shape=shape)
            for name, (shape, dtype) in self._expected_shapes().items()
        }

    def _encode_pending(
        self,
        images: CaptionImageDataset,
        encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        arrays: dict[str, np.memmap],
        batch_size: int,
        num_workers: int,
        report: CacheBuildReport,
    ) -> None:
        """Encode the rows whose status is pending, flushing each batch before marking it done."""
        status = arrays["status.npy"]
        pending = np.flatnonzero(status == STATUS_PENDING)
        loader = DataLoader(
            _IndexedImages(images, pending),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=_collate_indexed,
        )

        for batch in loader:
            if batch["indices"]:
                indices = np.asarray(batch["indices"])
                mean, logvar = encode(batch["pixel_values"])
                if mean.shape[1:] != self.shape:
                    raise LatentCacheError(f"The encoder returned latents of shape {tuple(mean.shape[1:])}, expected {self.shape}.")
                arrays["mean.npy"][indices] = _to_storage(mean, self.key.dtype)
                arrays["logvar.npy"][indices] = _to_storage(logvar, self.key.dtype)
                arrays["mean.npy"].flush()
                arrays["logvar.npy"].flush()
                status[indices] = STATUS_DONE
                report.encoded += len(indices)

            if batch["failed_indices"]:
                status[np.asarray(batch["failed_indices"])] = STATUS_FAILED
                report.failed += len(batch["failed_indices"])
            status.flush()

    def usable_indices(self) -> np.ndarray:
        """Return the rows that hold a latent (not failed).

        Raises:
            LatentCacheError: The store is missing or incomplete.
        """
        problem = self.problem(verify_checksums=False)
        if problem is not None:
            raise LatentCacheError(
                f"The latent cache {self.directory} cannot be used: {problem}. "
                "It is built in prepare_data; run it again, or set data.init_args.use_latent_cache=false."
            )
        return np.flatnonzero(np.load(self.directory / "status.npy") == STATUS_DONE)


class LatentCaptionDataset(Dataset):
    """Training samples from a latent store: posterior mean, log-variance and one caption.

    An item is ``{"latent_mean": FloatTensor[C, h, w], "latent_logvar": FloatTensor[C, h, w],
    "caption": str}``. The memory maps are opened lazily in each worker process, so the
    dataset pickles without copying the store.

    Args:
        directory: The store's folder.
        dtype: The store's dtype.
        indices: Rows to serve (the usable ones).
        captions: Caption entries of all N rows, possibly ``|``-separated.
        random_caption: Pick a random caption of an entry instead of the first.
    """

    def __init__(self, directory: str | Path, dtype: LatentDtype, indices: np.ndarray, captions: list[str], random_caption: bool = True) -> None:
        self.directory = Path(directory)
        self.dtype = LatentDtype(dtype)
        self.indices = np.asarray(indices)
        self.captions = captions
        self.random_caption = random_caption
        self._mean: np.ndarray | None = None
        self._logvar: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_mean"] = None
        state["_logvar"] = None
        return state

    def __getitem__(self, position: int) -> dict:
        if self._mean is None:
            self._mean = np.load(self.directory / "mean.npy", mmap_mode="r")
            self._logvar = np.load(self.directory / "logvar.npy", mmap_mode="r")

        index = int(self.indices[position])
        return {
            "latent_mean": _from_storage(self._mean[index], self.dtype),
            "latent_logvar": _from_storage(self._logvar[index], self.dtype),
            "caption": choose_caption(self.captions[index], self.random_caption),
        }
