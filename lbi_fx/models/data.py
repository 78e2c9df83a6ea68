"""Byte-level corpus built from the CPython standard library's ``.py`` sources.

Every machine that runs Python has these files, so the demo needs no download. The sorted
file list is shuffled with a fixed seed (deterministic, but a ``max_bytes`` prefix then
samples the whole library instead of only the modules whose names start with "a".."e").
Files are joined with a NUL separator (a byte that does not occur in source text, so file
boundaries stay visible), and the last ``val_fraction`` of the files becomes the
validation split: train and val never share a file, so validation loss measures
generalisation rather than memorisation of a neighbouring chunk.
"""

from __future__ import annotations

import os
import random
import sysconfig
from dataclasses import dataclass, field

import torch

SEP = b"\x00"
# Third-party code, tests, and generated data (codec tables, the 750 kB pydoc topics blob).
_SKIP_DIRS = {
    "site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__",
    "encodings", "pydoc_data",
}  # fmt: skip


def stdlib_py_files(root: str | None = None) -> list[str]:
    """Sorted paths (relative to ``root``) of the standard library's ``.py`` files."""
    root = root or sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for f in filenames:
            if f.endswith(".py"):
                out.append(os.path.relpath(os.path.join(dirpath, f), root))
    return sorted(out)


@dataclass
class ByteCorpus:
    """Train/val byte streams (uint8) plus the files each was built from."""

    train: torch.Tensor
    val: torch.Tensor
    train_files: list[str] = field(default_factory=list)
    val_files: list[str] = field(default_factory=list)

    def get_batch(
        self,
        split: str,
        batch_size: int,
        seq_len: int,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: x (B, T) int64 and y = x shifted left by one byte."""
        data = {"train": self.train, "val": self.val}[split]
        assert data.numel() > seq_len + 1, f"{split} split too small for seq_len={seq_len}"
        ix = torch.randint(data.numel() - seq_len - 1, (batch_size, 1), generator=generator)
        chunk = data[ix + torch.arange(seq_len + 1)].long()  # (B, T+1)
        return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


def load_corpus(
    max_bytes: int = 4_000_000, val_fraction: float = 0.1, root: str | None = None
) -> ByteCorpus:
    """Read stdlib sources up to ``max_bytes`` and split them by file into train/val."""
    root = root or sysconfig.get_paths()["stdlib"]
    names: list[str] = []
    blobs: list[bytes] = []
    total = 0
    files = stdlib_py_files(root)
    random.Random(0).shuffle(files)
    for name in files:
        with open(os.path.join(root, name), "rb") as f:
            blob = f.read().replace(SEP, b"")
        if not blob:
            continue
        blob = blob[: max_bytes - total]  # the last file may be truncated to fit
        names.append(name)
        blobs.append(blob)
        total += len(blob) + len(SEP)
        if total >= max_bytes:
            break
    assert len(names) >= 2, f"found too few .py files under {root}"
    n_val = min(len(names) - 1, max(1, round(len(names) * val_fraction)))
    n_train = len(names) - n_val

    def to_tensor(parts: list[bytes]) -> torch.Tensor:
        return torch.frombuffer(bytearray(SEP.join(parts) + SEP), dtype=torch.uint8)

    return ByteCorpus(
        train=to_tensor(blobs[:n_train]),
        val=to_tensor(blobs[n_train:]),
        train_files=names[:n_train],
        val_files=names[n_train:],
    )
