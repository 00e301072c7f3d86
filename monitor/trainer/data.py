"""Deterministic batches: synthetic motif sequences or character-level text.

Batch `i` is drawn from its own generator seeded by (seed, i), never from the global RNG, so a
batch depends only on the seed and its index: resuming at step s needs no data state, and nothing
else in the process (the monitor included) can shift the data stream.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

_TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")


def _generator(seed: int, index: int) -> torch.Generator:
    # A distinct seed per (seed, index), kept non-negative and below 2**61 by the modulus.
    return torch.Generator().manual_seed((seed * 1_000_003 + index * 7_919 + 1) % (2**61 - 1))


class SyntheticData:
    """Sequences made of motifs from a fixed random bank of `n_motifs` motifs of `motif_len` tokens.

    Inside a motif the next token is determined by which motif it is and where, which the model
    learns from context (attention); only motif boundaries are unpredictable, so the loss falls
    from ln(vocab) towards ~ln(n_motifs)/motif_len within a couple of hundred steps.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        block_size: int,
        batch_size: int,
        seed: int,
        device: torch.device | str = "cpu",
        n_motifs: int = 16,
        motif_len: int = 8,
    ) -> None:
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.device = torch.device(device)
        self.motif_len = motif_len
        self.motifs = torch.randint(vocab_size, (n_motifs, motif_len), generator=_generator(seed, -1))

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = _generator(self.seed, index)
        B, T, L = self.batch_size, self.block_size, self.motif_len
        n = (T + 1) // L + 2
        ids = torch.randint(len(self.motifs), (B, n), generator=g)
        seq = self.motifs[ids].view(B, n * L)
        offset = torch.randint(L, (B, 1), generator=g)  # windows start anywhere inside a motif
        seq = seq.gather(1, offset + torch.arange(T + 1))
        return _to_device(seq, self.device)


def default_text_paths() -> list[Path]:
    """Top-level *.py files of the standard library, sorted: on every Python install, no downloads.
    Only the top level, so that site-packages (install-dependent) never leaks in."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def read_corpus(paths: list[str] | list[Path] | None, max_bytes: int) -> str:
    files: list[Path] = []
    for p in map(Path, paths) if paths else default_text_paths():
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.suffix in _TEXT_SUFFIXES and f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"text path not found: {p}")
    chunks, size = [], 0
    for f in files:
        data = f.read_bytes()[: max_bytes - size]
        chunks.append(data.decode("utf-8", errors="replace"))
        size += len(data)
        if size >= max_bytes:
            break
    text = "".join(chunks)
    if len(text) < 2:
        raise ValueError(f"text corpus is empty (paths: {paths or 'stdlib default'})")
    return text


class TextData:
    """Character-level language modelling on a local corpus; the vocab is the corpus's characters."""

    def __init__(
        self, text: str, *, block_size: int, batch_size: int, seed: int, device: torch.device | str = "cpu"
    ) -> None:
        # Vectorised encoding: code points via UTF-32, vocab = sorted unique code points.
        cps = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32).long()
        self.vocab = torch.unique(cps)  # sorted
        self.tokens = torch.searchsorted(self.vocab, cps)
        if len(self.tokens) <= block_size + 1:
            raise ValueError(f"text corpus ({len(self.tokens)} chars) shorter than block_size+1")
        self.vocab_size = len(self.vocab)
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.device = torch.device(device)

    @classmethod
    def from_paths(cls, paths: list[str] | None, max_bytes: int, **kw) -> TextData:
        return cls(read_corpus(paths, max_bytes), **kw)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        return "".join(chr(int(self.vocab[i])) for i in ids)

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = _generator(self.seed, index)
        starts = torch.randint(len(self.tokens) - self.block_size - 1, (self.batch_size, 1), generator=g)
        seq = self.tokens[starts + torch.arange(self.block_size + 1)]
        return _to_device(seq, self.device)


def _to_device(seq: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = seq[:, :-1], seq[:, 1:]
    if device.type == "cuda":  # pinned + non_blocking: the copy overlaps the previous step's kernels
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.contiguous(), y.contiguous()


def build_data(cfg, device: torch.device) -> SyntheticData | TextData:
    """The dataset a TrainConfig asks for; `.vocab_size` sizes the model."""
    common = dict(block_size=cfg.block_size, batch_size=cfg.batch_size, seed=cfg.seed, device=device)
    if cfg.data == "synthetic":
        return SyntheticData(vocab_size=cfg.synthetic_vocab, **common)
    return TextData.from_paths(cfg.text_paths, cfg.text_max_bytes, **common)
