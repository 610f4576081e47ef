"""The one policy that turns a patient id into a file name (cached volumes, maps, pictures).

Ids come from folder names and CSV cells: they may hold `/`, `..`, glob metacharacters, dots
or be empty. A plain id (letters, digits, `-` and `_`, at most 64, not ending like a hashed
stem) names its files as it is, so that `<id>_cam.nii.gz` is found by the id a user knows;
any other id keeps its harmless characters and gains a hash of the exact id. Two ids never
share a stem: a plain stem never ends in `-<8 hex digits>`, every hashed one does, with the
hash of its own id. No stem holds a dot, so `<stem>.<anything>` splits back at the first dot.

No torch here.
"""

from __future__ import annotations

import hashlib
import re

STEM_CHARS = 64  # readable part of a file name
_PLAIN = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_-]{{0,{STEM_CHARS - 1}}}")
_HASHED = re.compile(r".*-[0-9a-f]{8}")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def hashed_stem(patient_id: str) -> str:
    """The id's harmless characters (at most 64) and 8 hex digits of the exact id's SHA-256."""
    safe = _UNSAFE.sub("_", patient_id)[:STEM_CHARS] or "_"
    return f"{safe}-{hashlib.sha256(patient_id.encode()).hexdigest()[:8]}"


def id_hash(patient_id: str) -> str:
    """16 hex digits of the id's SHA-256: names a patient in a shared file without the id."""
    return hashlib.sha256(patient_id.encode()).hexdigest()[:16]


def file_stem(patient_id: str) -> str:
    """The stem of every file named after this patient."""
    if _PLAIN.fullmatch(patient_id) and not _HASHED.fullmatch(patient_id):
        return patient_id
    return hashed_stem(patient_id)
