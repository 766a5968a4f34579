import pytest
import torch
from PIL import Image

from clibd import CLIBDConfig, CLIBDProcessor


def test_processor_outputs_and_round_trip(tiny_processor, tmp_path, data_dir):
    photo = data_dir / "bioscan_imgfilter_images" / "images" / "AACTA1595-20.jpg"
    inputs = dict(images=[str(photo), Image.open(photo)], barcodes=["ACGTAACGTA", "ttttt-ggggg"],
                  taxonomy=[{"order": "Diptera"}, "Coleoptera;Carabidae;;"])
    batch = tiny_processor(**inputs)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["dna_input_ids"].shape == (2, 133)
    assert batch["text_input_ids"].shape == (2, 20)
    tiny_processor.save_pretrained(tmp_path)
    assert (tmp_path / "processor_config.json").exists() and (tmp_path / "tokenizer_config.json").exists()
    loaded = CLIBDProcessor.from_pretrained(tmp_path)
    again = loaded(**inputs)
    for key in batch:
        assert torch.equal(batch[key], again[key]), key
    assert loaded.to_dict() == tiny_processor.to_dict()


def test_processor_follows_model_config():
    config = CLIBDConfig(dna_config={"tokenizer_flavour": "barcodebert", "kmer_size": 4, "max_sequence_length": 640})
    processor = CLIBDProcessor.from_model_config(config)
    assert processor.barcode_tokenizer.num_tokens == config.dna_config.num_tokens == 160
    assert processor.barcode_tokenizer.vocab_size == config.dna_config.vocab_size == 4**4 + 2


def test_processor_errors(tiny_processor):
    with pytest.raises(ValueError, match="one entry per specimen"):
        tiny_processor(barcodes=["ACGT", "ACGT"], taxonomy=[{"order": "Diptera"}])
    with pytest.raises(ValueError, match="at least one"):
        tiny_processor()
    with pytest.raises(ValueError, match="no text tokenizer"):
        CLIBDProcessor()(taxonomy=[{"order": "Diptera"}])
    with pytest.raises(ValueError, match="barcode 'B2'"):
        tiny_processor(barcodes=["ACGTACGTAC", "AC?T"], ids=["B1", "B2"])
    with pytest.raises(ValueError, match="taxonomy 'B2': unknown taxonomic rank"):
        tiny_processor(taxonomy=[{"order": "Diptera"}, {"kingdom": "Animalia"}], ids=["B1", "B2"])
