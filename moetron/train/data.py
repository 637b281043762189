"""Byte-level training data: text files in, deterministic train/validation windows out.

Tokens are bytes (vocab 256), so any text in any encoding trains without a tokenizer.

- ``load_corpus(paths)`` reads text files and folders (sorted walk, hidden entries and ``__pycache__`` skipped) into
  one byte string, files joined by a newline. Without paths it reads the default corpus: the ``.py`` source files of
  the running interpreter's standard library (test suites left out), in sorted order, up to
  ``DEFAULT_CORPUS_BYTES``.
- ``ByteDataset`` splits that stream into up to ``SPLIT_BLOCKS`` equal blocks (8 KiB each for the default corpus)
  and holds every ``VAL_EVERY``-th block out for validation, so validation text samples the whole corpus. Coarser
  blocks made validation a handful of files: with 100 blocks it was 10 files, one of them ``html/entities.py`` (a
  table of character names) at 2.2 nats/byte against 1.2 for the rest.
- ``train_batch(step, micro)`` draws window starts from a generator seeded with (seed, step, micro) alone: the
  batch at a step never depends on what ran before, which is what makes ``--resume`` exact.
- ``val_batches()`` are fixed, evenly spaced windows: every evaluation scores the same text.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass

import torch

__all__ = ["Corpus", "ByteDataset", "load_corpus", "default_corpus_root", "DEFAULT_CORPUS_BYTES"]

# The default run sees about 3M training bytes in its ~3 minutes; 8 MiB of source is more than enough text and
# reads in well under a second.
DEFAULT_CORPUS_BYTES = 8 << 20
# Up to 1000 interleaved blocks (never shorter than one training window), every 10th held out: 10% validation
# spread evenly over the corpus.
SPLIT_BLOCKS = 1000
VAL_EVERY = 10
# Files are checked for NUL bytes (the mark of binary data) before anything trains on them.
_SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages"}
# The default corpus is the library's modules, not its test suites.
_TEST_DIRS = {"test", "tests", "idle_test"}


class DataError(ValueError):
    """A --data path that cannot be used (missing, empty, binary, too small)."""


@dataclass
class Corpus:
    data: bytes
    # Human-readable origin ("stdlib: /usr/lib/python3.11 (412 files)" or the paths given).
    source: str
    # Files read, in order.
    files: list[str]
    # Files skipped inside folders because they hold NUL bytes.
    skipped_binary: list[str]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def default_corpus_root() -> str:
    """The standard library folder of the running interpreter."""
    root = sysconfig.get_paths().get("stdlib") or os.path.dirname(os.__file__)
    return os.path.realpath(root)


def _walk(root: str, suffixes: tuple[str, ...] | None, skip_dirs=frozenset()) -> list[str]:
    """Files under root in a fixed order: a folder's own files (sorted), then its subfolders (sorted)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in _SKIP_DIRS
                             and d not in skip_dirs)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if suffixes is not None and not name.endswith(suffixes):
                continue
            out.append(os.path.join(dirpath, name))
    return out


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DataError(f"--data: cannot read {path!r}: {e.strerror or e}") from e


def load_corpus(paths: list[str] | str | None = None, *, max_bytes: int | None = None) -> Corpus:
    """Read the training text. ``paths``: files or folders (None or empty: the default stdlib corpus).

    An explicitly named file that is missing, empty or binary (contains a NUL byte) raises ``DataError``. Inside a
    folder, binary files are skipped and listed in ``Corpus.skipped_binary``; a folder with no text raises.
    ``max_bytes`` stops reading once that many bytes are in (None: no cap; the default corpus uses
    ``DEFAULT_CORPUS_BYTES``)."""
    if isinstance(paths, str):
        paths = [paths]
    chunks: list[bytes] = []
    files: list[str] = []
    skipped: list[str] = []
    total = 0

    def add(path: str, data: bytes) -> bool:
        nonlocal total
        if max_bytes is not None and total + len(data) > max_bytes:
            data = data[: max_bytes - total]
        chunks.append(data)
        files.append(path)
        total += len(data) + 1
        return max_bytes is not None and total >= max_bytes

    if not paths:
        root = default_corpus_root()
        cap = DEFAULT_CORPUS_BYTES if max_bytes is None else max_bytes
        max_bytes = cap
        for path in _walk(root, (".py",), _TEST_DIRS):
            data = _read(path)
            if not data or b"\0" in data:
                continue
            if add(path, data):
                break
        if not files:
            raise DataError(f"the default corpus (the .py files of the standard library in {root!r}) is empty; "
                            "pass --data PATH")
        capped = total >= cap
        source = (f"python stdlib .py files in {root} ({len(files)} files"
                  + (f", capped at {cap:,} bytes)" if capped else ", all of them)"))
    else:
        for p in paths:
            if not os.path.exists(p):
                raise DataError(f"--data: no such file or folder: {p!r}")
            if os.path.isdir(p):
                found = _walk(p, None)
                n_text = 0
                for path in found:
                    data = _read(path)
                    if not data:
                        continue
                    if b"\0" in data:
                        skipped.append(path)
                        continue
                    n_text += 1
                    if add(path, data):
                        break
                if n_text == 0:
                    what = (f"only binary files ({len(skipped)}, e.g. {skipped[0]!r})" if skipped
                            else "no non-empty files")
                    raise DataError(f"--data: folder {p!r} holds {what}; it needs text files")
            else:
                data = _read(p)
                if not data:
                    raise DataError(f"--data: file {p!r} is empty")
                if b"\0" in data:
                    at = data.index(b"\0")
                    raise DataError(f"--data: file {p!r} is not a text file (it contains a NUL byte at offset "
                                    f"{at}); pass text files or folders of them")
                add(p, data)
            if max_bytes is not None and total >= max_bytes:
                break
        source = ", ".join(paths)
    return Corpus(b"\n".join(chunks), source, files, skipped)


class ByteDataset:
    """Train/validation byte streams with deterministic batches (see the module docstring)."""

    def __init__(self, corpus: Corpus | bytes, seq_len: int, *, seed: int = 0):
        data = corpus.data if isinstance(corpus, Corpus) else bytes(corpus)
        self.seq_len = seq_len
        self.seed = seed
        window = seq_len + 1
        n_blocks = min(SPLIT_BLOCKS, len(data) // window)
        if n_blocks < 2 * VAL_EVERY:
            need = 2 * VAL_EVERY * window
            raise DataError(f"--data holds {len(data)} bytes; with seq_len={seq_len} it needs at least {need} "
                            f"({2 * VAL_EVERY} blocks of one {window}-byte window each, every {VAL_EVERY}th held "
                            "out for validation)")
        block = len(data) // n_blocks
        all_bytes = torch.frombuffer(bytearray(data[: block * n_blocks]), dtype=torch.uint8)
        blocks = all_bytes.view(n_blocks, block)
        is_val = torch.arange(n_blocks) % VAL_EVERY == VAL_EVERY - 1
        self.train = blocks[~is_val].reshape(-1).clone()
        self.val = blocks[is_val].reshape(-1).clone()
        self._offsets = torch.arange(window)

    def _windows(self, stream: torch.Tensor, starts: torch.Tensor):
        idx = starts[:, None] + self._offsets[None, :]
        w = stream[idx].long()
        return w[:, :-1], w[:, 1:]

    def train_batch(self, step: int, micro: int, batch_size: int):
        """(inputs, labels) [batch_size, seq_len] int64 on the CPU; a pure function of (seed, step, micro)."""
        key = hashlib.blake2b(f"{self.seed}:{step}:{micro}".encode(), digest_size=8).digest()
        g = torch.Generator()
        g.manual_seed(int.from_bytes(key, "little"))
        high = self.train.numel() - self.seq_len - 1
        starts = torch.randint(0, high + 1, (batch_size,), generator=g)
        return self._windows(self.train, starts)

    def val_batches(self, num_batches: int, batch_size: int):
        """The same ``num_batches`` validation batches every time: windows at evenly spaced starts."""
        n = num_batches * batch_size
        high = self.val.numel() - self.seq_len - 1
        starts = torch.linspace(0, high, n).long()
        return [self._windows(self.val, starts[i * batch_size:(i + 1) * batch_size]) for i in range(num_batches)]


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(ids) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


if __name__ == "__main__":  # quick look at the default corpus
    c = load_corpus(sys.argv[1:] or None)
    print(c.source, len(c.data), "bytes", c.sha256[:12])
