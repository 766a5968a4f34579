import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel

from clibd import CLIBDConfig, CLIBDModel

BARCODES = ["ACGTACGTTTGACCA" * 20, "TTTAAACCCGGGATG" * 30, "GGACTTATTAT" * 15]
TAXONOMY = [{"order": "Diptera", "family": "Cecidomyiidae"}, "Coleoptera;Carabidae;Carabus;",
            {"order": "Lepidoptera", "family": "Noctuidae", "genus": "Apamea", "species": "Apamea crenata"}]


@pytest.fixture
def batch(tiny_processor):
    torch.manual_seed(0)
    images = [torch.rand(3, 48, 40) for _ in range(3)]
    from torchvision.transforms.functional import to_pil_image

    return tiny_processor(images=[to_pil_image(i) for i in images], barcodes=BARCODES, taxonomy=TAXONOMY)


def test_forward_all_modalities(tiny_config, batch):
    model = CLIBDModel(tiny_config).eval()
    out = model(**batch, return_loss=True)
    for embeds in (out.image_embeds, out.dna_embeds, out.text_embeds):
        assert embeds.shape == (3, 32)
        assert torch.allclose(embeds.norm(dim=-1), torch.ones(3), atol=1e-5)
    # forward returns exactly what get_*_features return
    assert torch.equal(out.dna_embeds, model.get_dna_features(batch["dna_input_ids"], batch["dna_attention_mask"]))
    assert torch.equal(out.image_embeds, model.get_image_features(batch["pixel_values"]))
    assert torch.equal(out.text_embeds, model.get_text_features(batch["text_input_ids"], batch["text_attention_mask"],
                                                                batch.get("text_token_type_ids")))
    scale = model.logit_scale.exp()
    assert torch.allclose(out.logits_image_dna, scale * out.image_embeds @ out.dna_embeds.T)
    assert torch.allclose(out.logits_dna_text, scale * out.dna_embeds @ out.text_embeds.T)
    assert out.loss.ndim == 0
    out.loss.backward()
    assert model.logit_scale.grad is not None


def test_any_subset_of_modalities(tiny_config, batch):
    model = CLIBDModel(tiny_config).eval()
    dna_only = model(dna_input_ids=batch["dna_input_ids"], dna_attention_mask=batch["dna_attention_mask"])
    assert dna_only.image_embeds is None and dna_only.logits_image_dna is None and dna_only.loss is None
    pair = model(dna_input_ids=batch["dna_input_ids"], text_input_ids=batch["text_input_ids"],
                 text_attention_mask=batch["text_attention_mask"], return_loss=True)
    assert pair.logits_dna_text.shape == (3, 3) and pair.logits_image_text is None and pair.loss is not None
    with pytest.raises(ValueError, match="at least two modalities"):
        model(pixel_values=batch["pixel_values"], return_loss=True)
    with pytest.raises(ValueError, match="give at least one"):
        model()


def test_missing_tower_is_a_clear_error(batch):
    model = CLIBDModel(CLIBDConfig.tiny(modalities=["image", "dna"]))
    assert model.text_encoder is None
    with pytest.raises(ValueError, match="no text tower"):
        model(text_input_ids=batch["text_input_ids"])


def test_logit_scale_initialised_to_paper_value(tiny_config):
    model = CLIBDModel(tiny_config)
    assert model.logit_scale.requires_grad
    assert torch.isclose(model.logit_scale.exp(), torch.tensor(1 / 0.07))


def test_compat_dna_pooling_matches_hand_computation(tiny_config, batch):
    model = CLIBDModel(tiny_config).eval()
    tower = model.dna_encoder
    ids = batch["dna_input_ids"]
    hidden = tower.bert(input_ids=ids).last_hidden_state
    t = tower.head_transform
    transformed = t.LayerNorm(torch.nn.functional.gelu(t.dense(hidden)))
    expected = torch.softmax(transformed @ tower.projection.weight.T + tower.projection.bias, dim=-1).mean(dim=1)
    expected = expected / expected.norm(dim=-1, keepdim=True)
    assert torch.allclose(model.get_dna_features(ids), expected, atol=1e-5)


def test_mean_pooling_ignores_padding(text_tokenizer):
    config = CLIBDConfig.tiny(dna_config={"tokenizer_flavour": "barcodebert", "pooling": "mean"},
                              text_config={"pooling": "mean"})
    model = CLIBDModel(config).eval()
    from clibd import CLIBDProcessor

    processor = CLIBDProcessor.from_model_config(config, text_tokenizer)
    enc = processor(barcodes=["ACGTAGGCTA" * 10])
    ids, mask = enc["dna_input_ids"], enc["dna_attention_mask"]
    assert mask.sum() == 20
    changed = ids.clone()
    changed[0, 20:] = 7  # whatever sits under the padding must not matter
    assert torch.allclose(model.get_dna_features(ids, mask), model.get_dna_features(changed, mask), atol=1e-6)
    assert not torch.allclose(model.get_dna_features(ids, None), model.get_dna_features(changed, None))


def test_save_load_round_trip_identical(tiny_config, batch, tmp_path):
    model = CLIBDModel(tiny_config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    loaded = CLIBDModel.from_pretrained(tmp_path).eval()
    auto = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(auto, CLIBDModel)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), CLIBDConfig)
    with torch.no_grad():
        a, b, c = model(**batch), loaded(**batch), auto(**batch)
    for name in ("image_embeds", "dna_embeds", "text_embeds", "logits_image_text"):
        assert torch.equal(a[name], b[name]) and torch.equal(a[name], c[name])


def test_mismatched_checkpoint_names_the_tensor(tiny_config, tmp_path):
    CLIBDModel(tiny_config).save_pretrained(tmp_path)
    wider = CLIBDConfig.tiny(dna_config={"intermediate_size": 128})
    with pytest.raises(ValueError, match=r"dna_encoder\.bert\.encoder\.layer\.0\.intermediate\.dense\.weight "
                                         r"\(checkpoint \(64, 32\), model \(128, 32\)\)"):
        CLIBDModel.from_pretrained(tmp_path, config=wider)


def test_missing_and_unexpected_tensors_named(tiny_config, tmp_path):
    CLIBDModel(tiny_config).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state.pop("text_encoder.projection.weight")
    state["dna_encoder.cls.predictions.bias"] = torch.zeros(3)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as error:
        CLIBDModel.from_pretrained(tmp_path)
    assert "missing from the checkpoint: text_encoder.projection.weight" in str(error.value)
    assert "not in the model: dna_encoder.cls.predictions.bias" in str(error.value)


def test_pretrained_text_tower_from_local_minilm(minilm_path):
    config = CLIBDConfig.tiny(modalities=["dna", "text"], text_config={"pretrained_model_name_or_path": minilm_path})
    model = CLIBDModel.from_pretrained_towers(config)
    reference = AutoModel.from_pretrained(minilm_path)
    assert model.config.text_config.hidden_size == reference.config.hidden_size == 384
    ours = model.text_encoder.bert.state_dict()
    for key, value in reference.state_dict().items():
        if not key.startswith("pooler."):
            assert torch.equal(ours[key], value), key


def test_paper_config_sizes_on_meta_device():
    config = CLIBDConfig()
    with torch.device("meta"):
        model = CLIBDModel(config)
    assert model.image_encoder.pos_embed.shape == (1, 197, 768)
    assert model.image_encoder.head.weight.shape == (768, 768)
    assert model.dna_encoder.bert.embeddings.word_embeddings.weight.shape == (1027, 768)
    assert len(model.dna_encoder.bert.encoder.layer) == 12
    assert model.dna_encoder.projection.weight.shape == (768, 768)
    assert len(model.text_encoder.bert.encoder.layer) == 4
    assert model.text_encoder.projection.weight.shape == (768, 512)
    total = sum(p.numel() for p in model.parameters())
    assert 200e6 < total < 260e6  # ViT-B (86M) + BERT-base (86M) + BERT-small (29M) + projections
