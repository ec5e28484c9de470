"""Bank records: the decoded ``Instance``, JSON metadata, image codecs and content ids.

Stored formats are JSON (metadata) and PNG or WebP-lossless bytes (images). No pickle.
"""
from __future__ import annotations

import hashlib
import json
import struct
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from genval_aug.errors import BadInstanceError, BadRecordError
from genval_aug.quality import ALPHA_THRESHOLD, alpha_stats

CODECS = ("lz4", "zlib", "png", "webp")
# Measured on a real 256x109 cut-out (1 core; see README "The instance bank"): raw RGBA + LZ4 block encodes in
# 0.14 ms and decodes in 0.015 ms at 1.5x PNG's size; zlib-1 1.3 / 0.44 ms at 1.2x; PNG-1 1.7 / 0.65 ms;
# lossless WebP ~10 / 0.1-0.2 ms at ~0.65x. Decoding is the training-time hot path, so LZ4 is the default.
DEFAULT_CODEC = "lz4"
_HEADER = struct.Struct("<4sII")  # magic, height, width; then the compressed raw RGBA bytes
_ZLIB_MAGIC = b"GVZ1"
_LZ4_MAGIC = b"GVL1"
# The most raw bytes one compressed byte can stand for (LZ4 block: 255, deflate: 1032), plus slack for short
# inputs: a header declaring more pixels than its body can hold is corrupt, and is refused before any allocation.
_MAX_EXPANSION = {_LZ4_MAGIC: 256, _ZLIB_MAGIC: 1040}
MAX_PIXELS = 1 << 28  # 16384 x 16384 (1 GiB of RGBA): larger instances are refused on write and on read


@dataclass
class Instance:
    """A decoded bank instance. ``rgba`` is HxWx4 uint8 in RGB(A) order; alpha is the (soft) mask."""

    id: str
    category: str
    category_id: int
    rgba: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def alpha(self) -> np.ndarray:
        """The (soft) alpha channel, HxW uint8."""
        return self.rgba[..., 3]

    @property
    def mask(self) -> np.ndarray:
        """The label mask, ``alpha >= ALPHA_THRESHOLD`` (HxW bool)."""
        return self.rgba[..., 3] >= ALPHA_THRESHOLD

    @property
    def height(self) -> int:
        return int(self.rgba.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgba.shape[1])


def normalize_rgba(rgba: np.ndarray, *, what: str = "instance") -> np.ndarray:
    """Validate an RGBA array and zero the colour under fully transparent pixels.

    Zeroing makes the stored bytes canonical (lossless WebP drops that colour anyway), so the content id
    of an instance does not depend on invisible pixels.
    """
    a = np.asarray(rgba)
    if a.ndim != 3 or a.shape[2] != 4:
        raise BadInstanceError(f"{what}: expected an HxWx4 RGBA image, got shape {a.shape}")
    if a.dtype != np.uint8:
        raise BadInstanceError(f"{what}: expected uint8 RGBA, got dtype {a.dtype}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise BadInstanceError(f"{what}: empty image of shape {a.shape}")
    if a.shape[0] * a.shape[1] > MAX_PIXELS:
        raise BadInstanceError(f"{what}: {a.shape[0]}x{a.shape[1]} pixels, more than the bank's limit of {MAX_PIXELS}")
    if not a[..., 3].any():
        raise BadInstanceError(f"{what}: alpha channel is empty (fully transparent)")
    out = np.ascontiguousarray(a).copy()
    out[out[..., 3] == 0, :3] = 0
    return out


def content_id(category: str, rgba: np.ndarray) -> str:
    """Stable id of (category, pixels): re-adding the same instance is a no-op."""
    h = hashlib.sha256()
    h.update(category.encode("utf-8"))
    h.update(np.asarray(rgba.shape, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(rgba))  # hashed through the buffer protocol: no copy of the pixels
    return h.hexdigest()[:32]


def check_image(record_id: str, category: str, data: bytes, *, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Decode a stored image and check it is the one its record names: the (H, W) ``shape`` of the metadata when
    given, and the content id (category + pixels), the only integrity check LZ4/zlib-raw bytes have.
    Returns the pixels; ``BadRecordError`` naming the record otherwise."""
    rgba = decode_rgba(data, record_id=record_id)
    if shape is not None and rgba.shape[:2] != tuple(shape):
        raise BadRecordError(f"record {record_id}: image is {rgba.shape[:2]}, metadata says {tuple(shape)}")
    if content_id(category, rgba) != record_id:
        raise BadRecordError(f"record {record_id}: decoded pixels do not match the record's content id "
                             f"(the image bytes were altered)")
    return rgba


def encode_rgba(rgba: np.ndarray, codec: str = DEFAULT_CODEC) -> bytes:
    """Lossless bytes of an RGBA image: ``zlib`` (raw RGBA, 12-byte header), ``png`` or ``webp``."""
    if codec in ("lz4", "zlib"):
        h, w = rgba.shape[:2]
        raw = np.ascontiguousarray(rgba).tobytes()
        if codec == "lz4":
            import cramjam

            return _HEADER.pack(_LZ4_MAGIC, h, w) + bytes(cramjam.lz4.compress_block(raw))
        return _HEADER.pack(_ZLIB_MAGIC, h, w) + zlib.compress(raw, 1)
    bgra = cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA)
    if codec == "png":
        ok, buf = cv2.imencode(".png", bgra, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    elif codec == "webp":
        ok, buf = cv2.imencode(".webp", bgra, [cv2.IMWRITE_WEBP_QUALITY, 101])
    else:
        raise ValueError(f"unknown codec {codec!r}; choose one of {CODECS}")
    if not ok:
        raise BadInstanceError(f"OpenCV could not encode a {rgba.shape} image as {codec}")
    return buf.tobytes()


def decode_rgba(data: bytes, *, record_id: str = "?") -> np.ndarray:
    """Decode stored bytes to HxWx4 uint8 RGBA; raise ``BadRecordError`` naming the record."""
    magic = bytes(data[:4])
    if magic in (_LZ4_MAGIC, _ZLIB_MAGIC):
        try:
            _, h, w = _HEADER.unpack_from(data)
            body = memoryview(data)[_HEADER.size:]
            size = h * w * 4
            # the header is checked against the stored bytes before anything is allocated: a corrupt one
            # claiming e.g. 100000x100000 pixels must fail at once, not reserve 40 GB first
            if not h or not w or h * w > MAX_PIXELS or size > _MAX_EXPANSION[magic] * len(body):
                raise ValueError(f"header declares {h}x{w} pixels, impossible for {len(body)} compressed bytes")
            if magic == _LZ4_MAGIC:
                import cramjam

                stored = int.from_bytes(body[:4], "little")  # cramjam's block format leads with the raw size
                if stored != size:
                    raise ValueError(f"header declares {h}x{w}x4 = {size} bytes, the LZ4 block {stored}")
                # straight into the array (its size is known from the header): no intermediate copy
                out = np.empty((h, w, 4), np.uint8)
                n = cramjam.lz4.decompress_block_into(body, out.reshape(-1))
                if n != out.size:
                    raise ValueError(f"{n} bytes decoded, {h}x{w}x4 = {out.size} expected")
                return out
            z = zlib.decompressobj()
            raw = bytearray(z.decompress(body, size + 1))  # never (much) more than the header says
            if len(raw) != size or not z.eof:
                raise ValueError(f"the zlib stream does not hold exactly {h}x{w}x4 = {size} bytes")
            return np.frombuffer(raw, np.uint8).reshape(h, w, 4)
        except Exception as e:  # noqa: BLE001 - any decoder failure means a corrupt record
            raise BadRecordError(f"record {record_id}: corrupt {magic.decode(errors='replace')} image ({e})") from None
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    if arr is None or arr.ndim != 3 or arr.shape[2] != 4:
        shape = None if arr is None else arr.shape
        raise BadRecordError(f"record {record_id}: image bytes do not decode to RGBA (got {shape})")
    if arr.dtype != np.uint8:
        raise BadRecordError(f"record {record_id}: image bytes decode to {arr.dtype} RGBA, not uint8")
    rgba = cv2.cvtColor(arr, cv2.COLOR_BGRA2RGBA)
    if data[:4] == b"RIFF":  # lossless WebP does not keep colour under alpha == 0: make it canonical
        rgba[rgba[..., 3] == 0, :3] = 0
    return rgba


def build_meta(
    rid: str,
    rgba: np.ndarray,
    *,
    category: str,
    category_id: int,
    codec: str,
    source: dict[str, Any] | None,
    verdict: dict[str, Any] | None,
) -> dict[str, Any]:
    """The JSON metadata stored beside an image."""
    stats = alpha_stats(rgba)
    score = None
    if verdict is not None:
        score = verdict.get("score")
        if score is not None:
            score = float(score)
    return {
        "id": rid,
        "category": category,
        "category_id": int(category_id),
        "width": int(rgba.shape[1]),
        "height": int(rgba.shape[0]),
        "codec": codec,
        "mask": stats.to_dict(),
        "source": dict(source or {"kind": "unknown"}),
        "verdict": dict(verdict) if verdict is not None else None,
        "score": score,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def dumps(obj: Any) -> bytes:
    """Compact, key-sorted JSON bytes (numpy scalars and arrays become plain JSON)."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, default=_json_default).encode("utf-8")


def loads(data: bytes, *, what: str = "record") -> Any:
    """Parse stored JSON; ``BadRecordError`` naming ``what`` when it is not valid JSON."""
    try:
        return json.loads(bytes(data))
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRecordError(f"{what}: metadata is not valid JSON ({e})") from None


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"metadata value of type {type(o).__name__} is not JSON serializable")
