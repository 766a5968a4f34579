"""The model card generated for a run: towers, data, objective and metrics from resolved configs."""

import yaml

from clibd import CLIBDConfig, CLIBDModel, CLIBDProcessor
from clibd.model_card import render_model_card

RUN_YAML = {
    "model": {"preset": "tiny", "modalities": ["dna", "text"], "dna": {"pooling": "mean"}, "text": {}},
    "data": {"source": "table", "path": "bold.tsv", "split": "paper", "split_seed": 42},
    "train": {"epochs": 2, "batch_size": 128, "max_lr": 2e-3, "weight_decay": 0.01, "mixed_precision": "auto",
              "freeze": ["text"], "lora": False},
}


def write_run(run, config: CLIBDConfig, yaml_values: dict, text_tokenizer=None) -> None:
    CLIBDModel(config).save_pretrained(run / "best")
    CLIBDProcessor.from_model_config(config, text_tokenizer).save_pretrained(run / "best")
    (run / "config.yaml").write_text(yaml.safe_dump(yaml_values))
    (run / "metrics.md").write_text("| query -> key | order seen |\n|---|---:|\n| DNA -> DNA | 98.6 |")
    (run / "splits.md").write_text("| split | records |\n|---|---:|\n| train_seen | 14855 |")


def test_model_card_filled_from_run(tmp_path, text_tokenizer):
    write_run(tmp_path, CLIBDConfig.tiny(modalities=["dna", "text"], dna_config={"pooling": "mean"}), RUN_YAML,
              text_tokenizer)
    card = render_model_card(tmp_path, repo_id="me/clibd-demo")
    assert card.startswith("---\nlicense: mit\nlibrary_name: clibd")
    assert "# me/clibd-demo" in card and "| DNA -> DNA | 98.6 |" in card and "| train_seen | 14855 |" in card
    assert "frozen encoders: text" in card and "BarcodeBERT" in card and "CC BY 3.0" in card
    assert "$" not in card.split("## Licences")[0]  # every placeholder filled
    # the sizes come from the saved model (the YAML only names the tiny preset)
    assert "| DNA | BERT over non-overlapping 5-mers (2 layers, width 32; compat vocabulary, mean pooling) | random |" \
        in card
    assert "| taxonomy text | BERT (2 layers, width 32; compat pooling) | random |" in card
    assert "CLIP-style contrastive loss" in card and "truncated to 660 bp" in card
    assert "does not list the species it was trained on" in card


def test_model_card_says_how_many_species_the_model_trained_on(tmp_path):
    config = CLIBDConfig.tiny(modalities=["dna", "text"], trained_species=["Aus bus", "Aus cus", "Dus eus"])
    write_run(tmp_path, config, RUN_YAML)
    assert "lists the 3 species it was trained on" in render_model_card(tmp_path)


def test_model_card_of_a_kmer_profile_run(tmp_path):
    dna = {"model_type": "clibd_kmer_profile", "kmer_size": 3, "hidden_size": 16, "sketch_dim": 8}
    values = {**RUN_YAML, "model": {"modalities": ["dna"], "dna": dna},
              "train": {**RUN_YAML["train"], "freeze": [], "objective": "supcon",
                        "supcon_weights": {"species": 1.0, "genus": 0.5}}}
    write_run(tmp_path, CLIBDConfig.tiny(modalities=["dna"], dna_config=dna), values)
    card = render_model_card(tmp_path)
    assert "| DNA | MLP over overlapping 3-mer counts (hidden 16) + a fixed 8-d random projection" in card
    assert "BERT over" not in card and "supervised contrastive loss" in card and "positional model" not in card
    assert "DNA embedding 40 dimensions" in card and "read whole, as k-mer counts" in card
    aligned = CLIBDConfig.tiny(modalities=["dna"], dna_config={**dna, "aligned": True})
    CLIBDModel(aligned).save_pretrained(tmp_path / "best")
    card = render_model_card(tmp_path)
    assert "+ an MLP and a positional model over the barcode aligned to the COI-5P region" in card
    assert f"DNA embedding {32 + 8 + 32 + 4 * 658} dimensions" in card
