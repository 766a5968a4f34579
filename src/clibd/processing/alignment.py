"""COI barcodes on common coordinates, without pairwise alignment.

A COI barcode is one stretch of one gene, so it can be placed on the 658 positions of the COI-5P
barcode region by sliding pieces of it along a base-frequency profile of that region: each piece
of about 220 bases is kept at the shift where it matches the profile best (pieces absorb the rare
indel and a barcode that starts early or late). The k-mer-profile DNA tower's aligned branches
read the result (`clibd.towers.kmer_profile`); see "Aligned barcodes" in bench/README.md.

Usage:
    onehot = aligned_onehot(barcodes)               # [B, 658, 4] on the insect COI-5P consensus
    profile = coi_base_profile(training_barcodes)   # or [658, 4] base frequencies of your own barcodes
    onehot = aligned_onehot(barcodes, profile)      # zeros where a barcode has no base
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .barcodes import barcode_names, base_codes

COI_BARCODE_LENGTH = 658
# The most frequent base at each position of the full-length barcodes in the shared BOLD insect
# records (clibd.processing.coi_base_profile). Aligning to it instead of the base-frequency profile
# of the training barcodes places 98.4 % of them identically (printed by bench/aligned_tower.py at commit 19b8be4).
INSECT_COI5P_CONSENSUS = (
    "AACATTATATTTTATTTTTGGAATTTGAGCAGGAATAGTAGGAACTTCTTTAAGATTATTAATTCGAGCTGAATTAGGAAATCCTGGATCTTTAA"
    "TTGGAGATGATCAAATTTATAATACTATTGTTACAGCTCATGCTTTTATTATAATTTTTTTTATAGTTATACCTATTATAATTGGAGGATTTGGA"
    "AATTGATTAGTTCCTTTAATATTAGGAGCCCCTGATATAGCTTTCCCTCGAATAAATAATATAAGATTTTGATTACTACCCCCTTCTTTAACTCT"
    "ATTAATTTCAAGAAGAATTGTAGAAAATGGAGCAGGAACAGGATGAACAGTTTACCCCCCTCTATCATCTAATATTGCTCATGGAGGAACATCAG"
    "TAGATTTAGCTATTTTTTCTCTACATTTAGCTGGAATTTCTTCAATTTTAGGAGCTATTAATTTTATTACAACAATTATTAATATACGATTAAAT"
    "AGAATATCATTTGATCAAATACCTTTATTTGTTTGAGCTGTAGGAATTACAGCTTTTTTATTATTATTATCTTTACCTGTTTTAGCTGGAGCTATT"
    "ACTATATTATTAACAGATCGAAATTTAAATACTTCATTTTTTGATCCTGCAGGAGGAGGAGATCCTATTTTATATCAACATTTATTT"
)
# The usual first bases of a full-length COI-5P barcode (after the LCO1490 primer).
_USUAL_START = [0, 0, 1]  # A A C


def coi_base_profile(sequences: Sequence[str], ids: Sequence[str] | None = None) -> np.ndarray:
    """[658, 4] A/C/G/T frequencies at each position, over the full-length barcodes (658 bases,
    starting AAC) among `sequences`; the others are ignored.

    Usage:
        profile = coi_base_profile(records["dna"])
    """
    counts = np.zeros((COI_BARCODE_LENGTH, 4))
    positions = np.arange(COI_BARCODE_LENGTH)
    for sequence, name in zip(sequences, barcode_names(len(sequences), ids), strict=True):
        codes = base_codes(sequence, name)
        if len(codes) == COI_BARCODE_LENGTH and codes[:3].tolist() == _USUAL_START:
            known = codes >= 0
            counts[positions[known], codes[known]] += 1
    if counts.sum(axis=1).min() == 0:
        raise ValueError(f"no full-length COI-5P barcode ({COI_BARCODE_LENGTH} bases, starting AAC) covers every "
                         f"position among the {len(sequences)} barcodes: cannot build the profile")
    return counts / counts.sum(axis=1, keepdims=True)


def align_barcode(sequence: str, profile: np.ndarray, record: str = "record", piece: int = 220,
                  max_shift: int = 80) -> np.ndarray:
    """[658] base codes (0-3: A, C, G, T) on the profile's coordinates; -1 where the barcode has
    no base (or an N). Bases beyond the region are dropped.

    Usage:
        codes = align_barcode("AACATTATATTTTATTTTTGG...", profile)
    """
    codes = base_codes(sequence, record)
    padded = np.pad(profile, ((max_shift, max_shift + len(codes)), (0, 0)))  # row max_shift: position 0
    out = np.full(len(profile), -1, dtype=np.int64)
    chunks = np.array_split(codes, max(1, round(len(codes) / piece)))  # no short piece left at the end
    starts = np.cumsum([0] + [len(chunk) for chunk in chunks[:-1]])
    for start, chunk in zip(starts, chunks, strict=True):
        window = padded[start : start + 2 * max_shift + len(chunk)]
        # expected matches at every shift, one correlation per base
        scores = sum(np.correlate(window[:, b], (chunk == b).astype(float), mode="valid") for b in range(4))
        positions = start + int(np.argmax(scores)) - max_shift + np.arange(len(chunk))
        keep = (positions >= 0) & (positions < len(profile)) & (chunk >= 0)
        keep[keep] &= out[positions[keep]] == -1  # an earlier piece keeps a contested position
        out[positions[keep]] = chunk[keep]
    return out


def consensus_profile(consensus: str = INSECT_COI5P_CONSENSUS) -> np.ndarray:
    """[len(consensus), 4] one-hot of a consensus barcode: a profile for `align_barcode`."""
    return np.eye(4)[base_codes(consensus, "consensus")]


def onehot_codes(codes: np.ndarray) -> torch.Tensor:
    """[B, L, 4] float one-hot of [B, L] base codes; all zeros where a code is -1."""
    onehot = np.zeros((*codes.shape, 4), dtype=np.float32)
    rows, positions = np.nonzero(codes >= 0)
    onehot[rows, positions, codes[rows, positions]] = 1
    return torch.from_numpy(onehot)


def aligned_onehot(sequences: Sequence[str], profile: np.ndarray | None = None,
                   ids: Sequence[str] | None = None) -> torch.Tensor:
    """[B, 658, 4] one-hot bases of the aligned barcodes (all zeros where a barcode has no base);
    `profile` defaults to the insect COI-5P consensus.

    Usage:
        onehot = aligned_onehot(["AACATTATATTTTATTTTTGG...", ...], ids=["BIOUG001-A01", ...])
    """
    profile = consensus_profile() if profile is None else profile
    names = barcode_names(len(sequences), ids)
    codes = [align_barcode(sequence, profile, name) for sequence, name in zip(sequences, names, strict=True)]
    return onehot_codes(np.stack(codes) if codes else np.zeros((0, len(profile)), dtype=np.int64))
