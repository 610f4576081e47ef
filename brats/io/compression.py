"""gzip streams and checksums: ISA-L when installed (about twice zlib's speed on the same
checks, bench/RESULTS.md "Verified read"), zlib otherwise; the one place that chooses.

No torch here: predict.py reads and writes NIfTI with it.
"""

from __future__ import annotations

import zlib
from types import ModuleType

try:
    from isal import isal_zlib as ZLIB_MODULE
except ImportError:
    ZLIB_MODULE = zlib

GZIP_MAGIC = b"\x1f\x8b"
GZIP_WBITS = 31  # 16 + 15: the gzip wrapper and a 32 KB window


class UnusableFile(Exception):
    """Why one file cannot be used, ending in the fix; the caller adds the patient and the file.

    `unreadable` phrases it as "cannot read <file>: <reason>"; otherwise the reason follows the
    file's name ("<file> has NaN or Inf voxels: ...")."""

    def __init__(self, reason: str, unreadable: bool = True):
        super().__init__(reason)
        self.reason, self.unreadable = reason, unreadable


def inflate(data: bytes, zlib_module: ModuleType | None = None) -> bytes:
    """Decompress every member of a gzip stream, checking each member's CRC-32 and length.

    ITK's NIfTI reader checks neither and fills a short stream with zeros, so a damaged file would
    be graded on wrong voxels. Zero bytes after the last member (padding some tools write) are
    allowed, as gzip allows them.
    """
    zlib_module = zlib_module or ZLIB_MODULE
    parts = []
    rest = data
    while True:
        if rest[:2] != GZIP_MAGIC:
            raise UnusableFile(
                f"corrupt gzip data ({len(rest)} bytes after the end of the stream are neither gzip "
                "nor padding): the file was damaged or overwritten; re-copy or re-download it"
            )
        member = zlib_module.decompressobj(GZIP_WBITS)
        try:
            parts.append(member.decompress(rest))
        except zlib_module.error as e:
            raise UnusableFile(
                f"corrupt gzip data ({e}): the file was damaged on disk or in transfer; "
                "re-copy or re-download it"
            ) from e
        if not member.eof:
            raise UnusableFile(
                "truncated: the gzip stream ends early (an interrupted copy or download?); "
                "re-copy or re-download it"
            )
        rest = member.unused_data
        if rest.count(0) == len(rest):
            return parts[0] if len(parts) == 1 else b"".join(parts)


def gzip_packer(level: int):
    """A compressor that writes one gzip member at `level` (1 is fastest)."""
    return ZLIB_MODULE.compressobj(level, ZLIB_MODULE.DEFLATED, GZIP_WBITS)


def checksum(data: memoryview | bytes) -> int:
    """CRC-32 of `data` (ISA-L's when installed, faster than zlib's)."""
    return ZLIB_MODULE.crc32(data) & 0xFFFFFFFF
