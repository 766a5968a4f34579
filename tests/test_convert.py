"""Official-layout checkpoints built here, converted, and checked against independent computations."""

import pytest
import timm
import torch
import torch.nn.functional as F
from transformers import AutoModel, BertConfig, BertModel

from clibd import CLIBDModel
from clibd.cli import main as cli
from clibd.convert import convert_official, convert_state_dict

P = 48  # projection / embedding dim of the tiny official model
NAMES = {"old": ("lora_vit", "lora_barcode_bert", "lora_bert"),
         "new": ("base_image_encoder", "base_dna_encoder", "base_language_encoder")}


def lora_hook(a: torch.Tensor, b: torch.Tensor, rows: slice | None = None):
    """Forward hook adding the unmerged LoRA update x A^T B^T (to `rows` of the output)."""
    def hook(module, inputs, output):
        update = inputs[0] @ a.T @ b.T
        if rows is None:
            return output + update
        output = output.clone()
        output[..., rows] += update
        return output
    return hook


class Official:
    """A tiny CLIBD checkpoint in the official key layout, with the official forward done by hand."""

    def __init__(self, naming: str, lora: bool, with_text: bool):
        torch.manual_seed(0)
        image_name, dna_name, text_name = NAMES[naming]
        self.vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=P, img_size=32,
                                     patch_size=8, embed_dim=64, depth=2, num_heads=1).eval()
        self.state = {"logit_scale": torch.tensor(2.3)}
        self.vit_lora = {}
        for key, value in self.vit.state_dict().items():
            if ".attn.qkv." in key:
                stem, kind = key.rsplit(".", 1)
                self.state[f"image_encoder.{image_name}.{stem}.qkv.{kind}"] = value
                if kind == "weight":
                    loras = {n: torch.randn(4, 64) * 0.1 if "_a_" in n else torch.randn(64, 4) * 0.1
                             for n in ("linear_a_q", "linear_b_q", "linear_a_v", "linear_b_v")}
                    self.vit_lora[stem] = loras
                    for n, t in loras.items():
                        self.state[f"image_encoder.{image_name}.{stem}.{n}.weight"] = t
            else:
                self.state[f"image_encoder.{image_name}.{key}"] = value

        dna_config = BertConfig(vocab_size=1027, hidden_size=64, num_hidden_layers=2, num_attention_heads=1,
                                intermediate_size=128, max_position_embeddings=160)
        self.dna = BertModel(dna_config, add_pooling_layer=False).eval()
        self.dna_dense, self.dna_norm = torch.nn.Linear(64, 64), torch.nn.LayerNorm(64, eps=1e-12)
        self.dna_decoder = torch.nn.Linear(64, P)
        self.dna_lora, self.text_lora = {}, {}
        self._add_bert(self.dna, f"dna_encoder.{dna_name}.bert.", lora, self.dna_lora)
        prefix = f"dna_encoder.{dna_name}.cls.predictions."
        self.state[prefix + "bias"] = torch.zeros(1027)  # orphaned in the official model
        for name, module in (("transform.dense", self.dna_dense), ("transform.LayerNorm", self.dna_norm),
                             ("decoder", self.dna_decoder)):
            for k, v in module.state_dict().items():
                self.state[f"{prefix}{name}.{k}"] = v
        self.text = None
        if with_text:
            text_config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=1,
                                     intermediate_size=128, max_position_embeddings=64)
            self.text = BertModel(text_config).eval()  # with the (unused) pooler, as released
            self._add_bert(self.text, f"language_encoder.{text_name}.", lora, self.text_lora)
            self.text_proj = torch.nn.Linear(64, P)
            for k, v in self.text_proj.state_dict().items():
                self.state[f"language_encoder.proj.{k}"] = v

    def _add_bert(self, bert, prefix, lora, store):
        for key, value in bert.state_dict().items():
            self.state[prefix + key] = value
        self.state[prefix + "embeddings.position_ids"] = torch.arange(bert.config.max_position_embeddings)[None]
        if not lora:
            return
        for layer in range(bert.config.num_hidden_layers):
            for proj in ("query", "value"):
                stem = f"encoder.layer.{layer}.attention.self.{proj}"
                a, b = torch.randn(4, 64) * 0.1, torch.randn(64, 4) * 0.1
                store[stem] = (a, b)
                self.state[f"{prefix}{stem}.w.weight"] = self.state.pop(f"{prefix}{stem}.weight")
                self.state[f"{prefix}{stem}.w.bias"] = self.state.pop(f"{prefix}{stem}.bias")
                self.state[f"{prefix}{stem}.w_a.weight"], self.state[f"{prefix}{stem}.w_b.weight"] = a, b

    @torch.no_grad()
    def image_embeddings(self, pixels):
        handles = []
        for stem, ab in self.vit_lora.items():
            qkv = self.vit.get_submodule(stem)
            handles.append(qkv.register_forward_hook(lora_hook(ab["linear_a_q"], ab["linear_b_q"], slice(0, 64))))
            handles.append(qkv.register_forward_hook(lora_hook(ab["linear_a_v"], ab["linear_b_v"], slice(128, 192))))
        out = self.vit(pixels)
        for h in handles:
            h.remove()
        return F.normalize(out, dim=-1)

    def _hooks(self, bert, store):
        return [bert.get_submodule(stem).register_forward_hook(lora_hook(a, b)) for stem, (a, b) in store.items()]

    @torch.no_grad()
    def dna_embeddings(self, ids):
        handles = self._hooks(self.dna, self.dna_lora)
        hidden = self.dna(input_ids=ids).last_hidden_state  # no attention mask, as the official tower
        for h in handles:
            h.remove()
        logits = self.dna_decoder(self.dna_norm(F.gelu(self.dna_dense(hidden))))
        return F.normalize(logits.softmax(dim=-1).mean(dim=1), dim=-1)  # over all 133 tokens

    @torch.no_grad()
    def text_embeddings(self, enc):
        handles = self._hooks(self.text, self.text_lora)
        hidden = self.text(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                           token_type_ids=enc["token_type_ids"]).last_hidden_state
        for h in handles:
            h.remove()
        return F.normalize(self.text_proj(hidden.mean(dim=1)), dim=-1)  # unmasked mean over 20 positions


def spec_ids(sequence: str) -> torch.Tensor:
    """Token ids as the spec describes them: pad with N to 660, 5-mers, <UNK>=2, k-mers from 3, 0 first."""
    sequence = sequence[:660].ljust(660, "N")
    ids = [0]
    for i in range(0, 660, 5):
        kmer = sequence[i : i + 5]
        ids.append(2 if "N" in kmer else 3 + sum("ACGT".index(c) * 4 ** (4 - j) for j, c in enumerate(kmer)))
    return torch.tensor([ids])


@pytest.mark.parametrize("naming", ["old", "new"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("with_text", [False, True], ids=["image_dna", "image_dna_text"])
def test_converted_model_matches_official_forward(naming, lora, with_text, tmp_path, minilm_path, text_tokenizer):
    official = Official(naming, lora, with_text)
    path = tmp_path / "best.pth"
    torch.save(official.state, path)
    model, processor = convert_official(path, text_tokenizer=minilm_path)
    assert model.config.modalities == (["image", "dna", "text"] if with_text else ["image", "dna"])
    assert model.config.dna_config.tokenizer_flavour == "compat" and model.config.dna_config.pooling == "compat"
    assert model.logit_scale.item() == pytest.approx(2.3)

    barcode = "AACTTTATATTTTATTTTTGGAGCTTGAGCAGGAATAGTAGGAACTTCTTTAAGAATTTTAATTCGAGCTGAATTAGGACATCC" * 3
    batch = processor(barcodes=[barcode])
    assert torch.equal(batch["dna_input_ids"], spec_ids(barcode))
    with torch.no_grad():
        assert torch.allclose(model.get_dna_features(**batch), official.dna_embeddings(spec_ids(barcode)), atol=1e-5)
        pixels = torch.rand(2, 3, 32, 32)
        assert torch.allclose(model.get_image_features(pixels), official.image_embeddings(pixels), atol=1e-5)
        if with_text:
            enc = text_tokenizer(["Diptera Cecidomyiidae not_classified not_classified"], padding="max_length",
                                 max_length=20, truncation=True, return_tensors="pt")
            ours = processor(taxonomy=[{"order": "Diptera", "family": "Cecidomyiidae"}])
            assert torch.equal(ours["text_input_ids"], enc["input_ids"])
            assert torch.allclose(model.get_text_features(**ours), official.text_embeddings(enc), atol=1e-5)

    model.save_pretrained(tmp_path / "converted")
    processor.save_pretrained(tmp_path / "converted")
    reloaded = AutoModel.from_pretrained(tmp_path / "converted", trust_remote_code=False).eval()
    assert isinstance(reloaded, CLIBDModel)
    with torch.no_grad():
        assert torch.equal(reloaded.get_dna_features(**batch), model.get_dna_features(**batch))
        assert torch.equal(reloaded.get_image_features(pixels), model.get_image_features(pixels))


def test_unexpected_and_missing_keys_are_named(tmp_path):
    state = Official("old", False, True).state
    with pytest.raises(ValueError, match=r"unexpected keys .*'optimizer_step'"):
        convert_state_dict({**state, "optimizer_step": torch.tensor(1)})
    broken = dict(state)
    broken.pop("dna_encoder.lora_barcode_bert.bert.encoder.layer.1.output.dense.weight")
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"missing: \['dna_encoder\.bert\.encoder\.layer\.1\.output\.dense\.weight'\]"):
        convert_official(tmp_path / "broken.pth", text_tokenizer=None)
    extra = dict(state)
    extra["dna_encoder.lora_barcode_bert.cls.seq_relationship.weight"] = torch.zeros(2, 64)
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"unexpected: \['dna_encoder\.UNMAPPED\.cls\.seq_relationship\.weight'\]"):
        convert_official(tmp_path / "extra.pth", text_tokenizer=None)


def test_pickled_objects_are_refused(tmp_path):
    import argparse  # any pickled object that is not a tensor: weights_only must refuse to build it

    torch.save({"logit_scale": torch.tensor(1.0), "payload": argparse.Namespace(run="code")}, tmp_path / "evil.pth")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        convert_official(tmp_path / "evil.pth", text_tokenizer=None)


def test_hub_download_is_used_for_released_names(tmp_path, monkeypatch):
    path = tmp_path / "best.pth"
    torch.save(Official("new", False, False).state, path)
    calls = []

    def fake_download(repo_id, filename, cache_dir=None):
        calls.append((repo_id, filename))
        return str(path)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert cli(["convert-official", "bioscan-5m-image-dna", "--out", str(tmp_path / "m")]) == 0
    assert calls == [("bioscan-ml/clibd", "ckpt/bioscan_clip/ver_1_0/bioscan_5m/image_dna_4gpu/best.pth")]
    assert (tmp_path / "m" / "model.safetensors").exists() and (tmp_path / "m" / "processor_config.json").exists()
    convert_official("hf://someone/other-repo/run/best.pth", text_tokenizer=None)
    assert calls[-1] == ("someone/other-repo", "run/best.pth")
