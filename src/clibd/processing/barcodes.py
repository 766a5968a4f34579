"""DNA barcodes -> non-overlapping k-mer token ids, in the official (`compat`) or new BarcodeBERT vocabulary.

Usage:
    tokenizer = BarcodeTokenizer(flavour="compat")
    encoded = tokenizer(["AACTTTATATTTTATTTTTGG"], ids=["BIOUG001-A01"])
    encoded.input_ids          # LongTensor [1, 133]
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where tensors are made: `clibd tokenize` starts without it
    import torch

logger = logging.getLogger(__name__)

BASES = "ACGT"
# IUPAC ambiguity codes: a base is there but it is not known which; the k-mer becomes unknown.
IUPAC_AMBIGUITY = "RYSWKMBDHVN"
_REMOVED = re.compile(r"[\s\-]")
_NOT_NUCLEOTIDE = re.compile(f"[^{BASES}{IUPAC_AMBIGUITY}]")
_AMBIGUOUS = re.compile(f"[{IUPAC_AMBIGUITY}]")
_NORMAL_BASES = str.maketrans("", "", BASES + "N")  # deletes what a normalised barcode is made of


def normalise_barcode(sequence: str, record: str = "record") -> str:
    """Upper-case, drop alignment gaps and whitespace, turn IUPAC ambiguity codes into N.

    Raises `ValueError` naming `record` for anything that is not a nucleotide, for an empty
    sequence and for one that holds no A, C, G or T.
    """
    if not isinstance(sequence, str):
        raise ValueError(f"{record}: must be a string, got {type(sequence).__name__}")
    if sequence and not sequence.translate(_NORMAL_BASES):  # already upper-case A, C, G, T, N only
        cleaned = sequence  # the common case (stored references, aligned each query): no regexes
    else:
        cleaned = _REMOVED.sub("", sequence.upper())
        bad = sorted(set(_NOT_NUCLEOTIDE.findall(cleaned)))
        if bad:
            raise ValueError(
                f"{record}: holds characters that are not nucleotides or IUPAC codes: {''.join(bad)!r}"
            )
        if not cleaned:
            raise ValueError(f"{record}: is empty (after removing gaps and whitespace)")
        cleaned = _AMBIGUOUS.sub("N", cleaned)
    if cleaned.count("N") == len(cleaned):
        raise ValueError(f"{record}: holds only N (no A, C, G or T)")
    return cleaned


@dataclass
class BarcodeEncoding:
    """Token ids and attention mask of a batch, with the records whose barcode was truncated."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    truncated: list[str] = field(default_factory=list)


class BarcodeTokenizer:
    """Split barcodes into non-overlapping k-mers after padding with N (or truncating) to `max_length`.

    `compat` (the official CLIBD/old BarcodeBERT vocabulary): <MASK>=0, <CLS>=1, <UNK>=2, the 4^k
    k-mers over ACGT in lexicographic order from id 3, any k-mer with N -> <UNK>, and id 0 (not
    <CLS>) prepended; the attention mask is all ones, as the official model sees no mask.
    `barcodebert` (new BarcodeBERT): [MASK]=0, [UNK]=1, k-mers from id 2, nothing prepended; the
    attention mask is 0 on k-mers made only of padding.
    """

    def __init__(self, flavour: str = "compat", kmer_size: int = 5, max_length: int = 660):
        if flavour not in ("compat", "barcodebert"):
            raise ValueError(f"unknown barcode tokenizer flavour {flavour!r}; use 'compat' or 'barcodebert'")
        if max_length % kmer_size:
            raise ValueError(f"max_length ({max_length}) must be a multiple of kmer_size ({kmer_size})")
        self.flavour = flavour
        self.kmer_size = kmer_size
        self.max_length = max_length
        self.mask_id = 0
        self.unk_id = 2 if flavour == "compat" else 1
        first = self.unk_id + 1
        kmers = ("".join(p) for p in itertools.product(BASES, repeat=kmer_size))
        self.vocab = {kmer: first + i for i, kmer in enumerate(kmers)}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + self.unk_id + 1

    @property
    def num_tokens(self) -> int:
        return self.max_length // self.kmer_size + (self.flavour == "compat")

    def encode(self, sequence: str, record: str = "record") -> tuple[list[int], list[int], bool]:
        """Ids and mask of one barcode, and whether it was truncated."""
        bases = normalise_barcode(sequence, record)
        truncated = len(bases) > self.max_length
        real_length = min(len(bases), self.max_length)
        bases = bases[: self.max_length].ljust(self.max_length, "N")
        k = self.kmer_size
        ids = [self.vocab.get(bases[i : i + k], self.unk_id) for i in range(0, self.max_length, k)]
        if all(token == self.unk_id for token in ids):  # its embedding would say nothing of it, yet be answered
            raise ValueError(f"{record}: {unreadable_reason(k, words=True)}")
        mask = [1 if i < real_length else 0 for i in range(0, self.max_length, k)]
        if self.flavour == "compat":
            ids = [self.mask_id, *ids]
            mask = [1] * len(ids)
        return ids, mask, truncated

    def __call__(
        self, sequences: Sequence[str], ids: Sequence[str] | None = None, warn_truncated: bool = True
    ) -> BarcodeEncoding:
        """Encode a batch; `ids` name records in errors. Truncated records are listed in the result
        and, unless `warn_truncated=False` (callers that report them once themselves), logged."""
        if isinstance(sequences, str):
            sequences = [sequences]
        if ids is not None and len(ids) != len(sequences):
            raise ValueError(f"got {len(ids)} barcode ids for {len(sequences)} barcodes")
        names = [f"barcode {i!r}" for i in ids] if ids is not None else [f"barcode #{i}" for i in range(len(sequences))]
        all_ids, all_masks, truncated = [], [], []
        for sequence, name in zip(sequences, names, strict=True):
            token_ids, mask, was_truncated = self.encode(sequence, name)
            all_ids.append(token_ids)
            all_masks.append(mask)
            if was_truncated:
                truncated.append(name)
        if truncated and warn_truncated:
            logger.warning(
                "%d of %d barcodes were longer than %d bp and were truncated: %s",
                len(truncated), len(sequences), self.max_length, ", ".join(truncated[:10])
                + (" ..." if len(truncated) > 10 else ""),
            )
        import torch

        return BarcodeEncoding(
            input_ids=torch.tensor(all_ids, dtype=torch.long),
            attention_mask=torch.tensor(all_masks, dtype=torch.long),
            truncated=truncated,
        )


# Barcodes whose k-mers `kmer_profiles` counts at once (about 1.3 M bases of COI barcodes).
PROFILE_CHUNK = 2048
_BASE_CODES = np.full(256, -1, dtype=np.int64)
for _code, _base in enumerate(BASES):
    _BASE_CODES[ord(_base)] = _code


def base_codes(sequence: str, record: str = "record") -> np.ndarray:
    """The normalised barcode as codes 0-3 for A, C, G, T and -1 for N (`normalise_barcode` errors)."""
    return _BASE_CODES[np.frombuffer(normalise_barcode(sequence, record).encode(), dtype=np.uint8)]


def readable(barcode: str, k: int, words: bool = False, max_length: int | None = None) -> bool:
    """Whether a model reading `k`-mers finds one of A, C, G, T alone in `barcode` (normalised): anywhere
    (overlapping k-mer profiles), or with `words` as a whole word of the non-overlapping ones from
    its start, within `max_length` bases (BarcodeBERT). A barcode without one embeds as nothing.

    Usage:
        readable("ACGTACG", 7)   # True; readable("ACGTNACG", 7) is False
    """
    bases = barcode[:max_length] if max_length else barcode
    if not words:
        return re.search(f"[ACGT]{{{k}}}", bases) is not None
    return any(re.fullmatch(f"[ACGT]{{{k}}}", bases[i : i + k]) for i in range(0, len(bases) - k + 1, k))


def unreadable_reason(k: int, words: bool = False) -> str:
    """Why a barcode that is not `readable` cannot be embedded (the error names the barcode before it)."""
    if words:
        return (f"holds no whole {k}-base word without N (the model reads a barcode as {k}-base words from its "
                "start): too short or too ambiguous to embed")
    return f"holds no run of {k} bases without N: too short or too ambiguous for the model's {k}-mer profile"


def barcode_names(count: int, ids: Sequence[str] | None = None) -> list[str]:
    """How errors name `count` barcodes: by id when given, else by position."""
    return [f"barcode {i!r}" for i in ids] if ids is not None else [f"barcode #{i}" for i in range(count)]


def kmer_profiles(sequences: Sequence[str], k: int = 6, ids: Sequence[str] | None = None) -> torch.Tensor:
    """L2-normalised counts of overlapping k-mers over ACGT [B, 4^k] (k-mers with N or an
    ambiguity code are skipped). The whole barcode is used: a profile has no length limit.

    Usage:
        profiles = kmer_profiles(["ACGTAC...", ...], k=6)
    """
    import torch

    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    names = barcode_names(len(sequences), ids)
    out = torch.zeros(len(sequences), 4**k)
    for start in range(0, len(sequences), PROFILE_CHUNK):  # bounded working memory besides `out`
        stop = min(start + PROFILE_CHUNK, len(sequences))
        _count_kmers(sequences[start:stop], names[start:stop], k, out[start:stop])
    return torch.nn.functional.normalize(out, dim=-1)


def _count_kmers(sequences: Sequence[str], names: Sequence[str], k: int, out: torch.Tensor) -> None:
    """Add each barcode's k-mer counts to its row of `out`, the batch's k-mers counted at once."""
    import torch

    # every barcode's codes end to end, each followed by an N so that no k-mer spans two of them
    pieces = [np.append(base_codes(sequence, name).astype(np.int8), -1)
              for sequence, name in zip(sequences, names, strict=True)]
    codes = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int8)
    starts = len(codes) - k + 1
    if starts <= 0:
        return
    kmers = np.zeros(starts, dtype=np.int64)
    unknown = np.zeros(starts, dtype=bool)
    for offset in range(k):  # base-4 number of each window, and whether it holds an N
        window = codes[offset : offset + starts]
        kmers *= 4
        kmers += np.maximum(window, 0)
        unknown |= window < 0
    rows = np.repeat(np.arange(len(pieces)), [len(piece) for piece in pieces])[:starts]  # each window's barcode
    known = ~unknown
    cells = torch.from_numpy(rows[known] * 4**k + kmers[known])
    out.view(-1).index_add_(0, cells, torch.ones(len(cells)))
