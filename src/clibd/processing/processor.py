"""`CLIBDProcessor`: photos, barcodes and taxonomy in, the tensors `CLIBDModel` takes out.

Usage:
    processor = CLIBDProcessor.from_pretrained("path/or/hub-id")
    batch = processor(images=[photo], barcodes=["AACT..."], taxonomy=[{"order": "Diptera"}])
    outputs = model(**batch)
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import AutoTokenizer, BatchFeature, PreTrainedTokenizerBase
from transformers.utils import PushToHubMixin, cached_file

from ..atomic import atomic_write_text
from .alignment import align_barcode, consensus_profile, onehot_codes
from .barcodes import BarcodeTokenizer, barcode_names, kmer_profiles, unreadable_reason
from .images import ImageInput, image_transform, load_image
from .taxonomy import taxonomy_text

if TYPE_CHECKING:  # the model layer sits above processing: its config is only read here
    from ..configuration_clibd import CLIBDConfig

PROCESSOR_CONFIG_NAME = "processor_config.json"
ALIGNMENT_MEMO_SIZE = 100_000  # barcodes whose COI-5P placement a processor remembers (~1.4 kB each)


def _refuse_empty_profiles(profiles: torch.Tensor, k: int, ids: Sequence[str] | None) -> None:
    """A `ValueError` naming the first barcode without a single k-mer of A, C, G, T (shorter than
    k, or N every few bases): its profile is all zeros, and its embedding would say nothing of it
    yet still be searched and answered (flagged as a novel species)."""
    empty = torch.nonzero(profiles.abs().sum(dim=1) == 0).flatten().tolist()
    if empty:
        name = barcode_names(len(profiles), ids)[empty[0]]
        raise ValueError(f"{name}: {unreadable_reason(k)}"
                         + (f" ({len(empty)} such barcodes in the batch)" if len(empty) > 1 else ""))


class CLIBDProcessor(PushToHubMixin):
    """Turns raw inputs of any subset of the three modalities into one batch for `CLIBDModel`.

    Outputs: `pixel_values` [B, 3, H, W]; `dna_input_ids`, `dna_attention_mask` [B, tokens];
    `text_input_ids`, `text_attention_mask`, `text_token_type_ids` [B, text_max_length].
    `max_image_pixels` caps width x height of the photos it opens (default `$CLIBD_MAX_IMAGE_PIXELS`,
    else PIL's limit); a limit of this machine, not of the model, so it is not saved.
    """

    def __init__(
        self,
        text_tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        dna_tokenizer_flavour: str = "compat",
        kmer_size: int = 5,
        max_sequence_length: int = 660,
        text_max_length: int = 20,
        image_size: int = 224,
        resize_size: int = 256,
        dna_profile_kmer_size: int | None = None,
        dna_aligned: bool = False,
        max_image_pixels: int | None = None,
    ):
        self.text_tokenizer = text_tokenizer
        self.max_image_pixels = max_image_pixels
        self.dna_profile_kmer_size = dna_profile_kmer_size
        self.dna_aligned = dna_aligned
        # Training meets the same barcodes every epoch; placing one costs more than the rest of its
        # processing, so it is done once (a pure function of the barcode: no effect on outputs).
        self._alignment_memo: dict[str, np.ndarray] = {}
        self.barcode_tokenizer = BarcodeTokenizer(dna_tokenizer_flavour, kmer_size, max_sequence_length)
        self.text_max_length = text_max_length
        self.image_size = image_size
        self.resize_size = resize_size
        self.eval_transform = image_transform(image_size, resize_size, train=False)
        self.train_transform = image_transform(image_size, resize_size, train=True)

    @classmethod
    def from_model_config(
        cls, config: CLIBDConfig, text_tokenizer: PreTrainedTokenizerBase | None = None
    ) -> CLIBDProcessor:
        """The processor that matches a model config (tokenizer flavour, lengths, image sizes)."""
        settings = {"text_max_length": config.text_config.max_length, "image_size": config.image_config.image_size,
                    "resize_size": config.image_config.resize_size}
        return cls(text_tokenizer, **settings, **config.dna_config.processor_settings())

    def to_dict(self) -> dict[str, Any]:
        return {
            "processor_class": type(self).__name__,
            "dna_tokenizer_flavour": self.barcode_tokenizer.flavour,
            "kmer_size": self.barcode_tokenizer.kmer_size,
            "max_sequence_length": self.barcode_tokenizer.max_length,
            "text_max_length": self.text_max_length,
            "image_size": self.image_size,
            "resize_size": self.resize_size,
            "dna_profile_kmer_size": self.dna_profile_kmer_size,
            "dna_aligned": self.dna_aligned,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_dict()}, text_tokenizer={type(self.text_tokenizer).__name__})"

    # --- the three modalities -------------------------------------------------------------------
    def process_images(self, images: Sequence[ImageInput], train: bool = False) -> torch.Tensor:
        transform = self.train_transform if train else self.eval_transform
        return torch.stack([transform(load_image(image, max_pixels=self.max_image_pixels)) for image in images])

    def process_barcodes(
        self, barcodes: Sequence[str], ids: Sequence[str] | None = None, warn_truncated: bool = True
    ) -> dict[str, torch.Tensor]:
        if self.dna_profile_kmer_size is not None:  # a k-mer-profile DNA tower reads whole barcodes
            out = {"dna_profile": kmer_profiles(barcodes, self.dna_profile_kmer_size, ids)}
            _refuse_empty_profiles(out["dna_profile"], self.dna_profile_kmer_size, ids)
            if self.dna_aligned:  # ... and, with aligned branches, barcodes on the COI-5P positions
                out["dna_aligned"] = onehot_codes(self._aligned_codes(barcodes, ids)).flatten(1)
            return out
        encoded = self.barcode_tokenizer(barcodes, ids, warn_truncated=warn_truncated)
        return {"dna_input_ids": encoded.input_ids, "dna_attention_mask": encoded.attention_mask}

    def _aligned_codes(self, barcodes: Sequence[str], ids: Sequence[str] | None) -> np.ndarray:
        placed, profile = {}, consensus_profile()
        for barcode, name in zip(barcodes, barcode_names(len(barcodes), ids), strict=True):
            if barcode not in self._alignment_memo and barcode not in placed:
                placed[barcode] = align_barcode(barcode, profile, name).astype(np.int8)
        if len(self._alignment_memo) + len(placed) <= ALIGNMENT_MEMO_SIZE:
            self._alignment_memo.update(placed)
        return np.stack([placed[b] if b in placed else self._alignment_memo[b] for b in barcodes])

    def process_taxonomy(self, taxonomy: Sequence[Any], ids: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        if self.text_tokenizer is None:
            raise ValueError("this processor has no text tokenizer, so it cannot encode taxonomy; "
                             "pass text_tokenizer= or load a processor saved with one")
        names = [f"taxonomy {i!r}" for i in ids] if ids is not None else [f"taxonomy #{i}" for i in range(len(taxonomy))]
        texts = [taxonomy_text(item, name) for item, name in zip(taxonomy, names, strict=True)]
        encoded = self.text_tokenizer(texts, padding="max_length", truncation=True,
                                      max_length=self.text_max_length, return_tensors="pt")
        out = {"text_input_ids": encoded["input_ids"], "text_attention_mask": encoded["attention_mask"]}
        if "token_type_ids" in encoded:
            out["text_token_type_ids"] = encoded["token_type_ids"]
        return out

    def __call__(
        self,
        images: Sequence[ImageInput] | ImageInput | None = None,
        barcodes: Sequence[str] | str | None = None,
        taxonomy: Sequence[Any] | None = None,
        *,
        ids: Sequence[str] | None = None,
        train: bool = False,
        return_tensors: str = "pt",
    ) -> BatchFeature:
        """Encode any subset of images, barcodes and taxonomy; `ids` name records in error messages.

        `train=True` applies the paper's random augmentations to the images.
        """
        if return_tensors != "pt":
            raise ValueError(f"only return_tensors='pt' is supported, got {return_tensors!r}")
        if images is None and barcodes is None and taxonomy is None:
            raise ValueError("give at least one of images, barcodes or taxonomy")
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        if isinstance(barcodes, str):
            barcodes = [barcodes]
        if isinstance(taxonomy, (str, dict)):
            taxonomy = [taxonomy]
        sizes = {name: len(v) for name, v in (("images", images), ("barcodes", barcodes), ("taxonomy", taxonomy))
                 if v is not None}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"every modality needs one entry per specimen, got {sizes}")
        data: dict[str, torch.Tensor] = {}
        if images is not None:
            data["pixel_values"] = self.process_images(images, train=train)
        if barcodes is not None:
            data.update(self.process_barcodes(barcodes, ids))
        if taxonomy is not None:
            data.update(self.process_taxonomy(taxonomy, ids))
        return BatchFeature(data=data, tensor_type="pt")

    # --- save / load ----------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """Write `processor_config.json` and the text tokenizer files; `push_to_hub=True` (with
        `repo_id=`) then uploads them, as transformers processors do."""
        os.makedirs(save_directory, exist_ok=True)
        atomic_write_text(Path(save_directory) / PROCESSOR_CONFIG_NAME, json.dumps(self.to_dict(), indent=2))
        if self.text_tokenizer is not None:
            self.text_tokenizer.save_pretrained(save_directory)
        if push_to_hub:
            repo_id = kwargs.pop("repo_id", os.path.basename(os.path.normpath(save_directory)))
            kwargs.pop("max_shard_size", None)
            self.push_to_hub(repo_id, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> CLIBDProcessor:
        """Load from a local directory or a Hub repo id (kwargs go to the Hub download)."""
        config_file = cached_file(pretrained_model_name_or_path, PROCESSOR_CONFIG_NAME, **kwargs)
        with open(config_file) as f:
            settings = json.load(f)
        settings.pop("processor_class", None)
        tokenizer_file = cached_file(pretrained_model_name_or_path, "tokenizer_config.json",
                                     _raise_exceptions_for_missing_entries=False, **kwargs)
        text_tokenizer = (AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs)
                          if tokenizer_file else None)
        return cls(text_tokenizer, **settings)
