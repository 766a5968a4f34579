import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from clibd.constants import MODALITIES
from clibd.loss import contrastive_loss, modality_pairs, supervised_contrastive_loss


def test_hand_computed_two_by_two():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # a->b logits [[1, .6], [0, .8]]; b->a logits [[1, 0], [.6, .8]]; temperature 1 (log scale 0)
    a_to_b = (-math.log(math.e / (math.e + math.exp(0.6))) - math.log(math.exp(0.8) / (1 + math.exp(0.8)))) / 2
    b_to_a = (-math.log(math.e / (math.e + 1)) - math.log(math.exp(0.8) / (math.exp(0.6) + math.exp(0.8)))) / 2
    loss = contrastive_loss({"image": a, "dna": b}, torch.tensor(0.0))
    assert loss.item() == pytest.approx((a_to_b + b_to_a) / 2, rel=1e-6)


def test_three_modalities_average_six_terms():
    torch.manual_seed(0)
    x, d, t = (F.normalize(torch.randn(5, 8), dim=-1) for _ in range(3))
    scale = torch.tensor(math.log(1 / 0.07))
    labels = torch.arange(5)
    terms = [F.cross_entropy(scale.exp() * p @ q.T, labels) for p, q in
             [(x, d), (d, x), (x, t), (t, x), (d, t), (t, d)]]
    assert contrastive_loss({"image": x, "dna": d, "text": t}, scale) == pytest.approx(torch.stack(terms).mean().item())
    assert modality_pairs(["text", "image", "dna"]) == [("image", "dna"), ("image", "text"), ("dna", "text")]


def test_temperature_is_learned():
    x, d = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    scale = torch.tensor(1.0, requires_grad=True)
    contrastive_loss({"image": x, "dna": d}, scale).backward()
    assert scale.grad is not None and scale.grad != 0


GLOBAL_BATCH, DIM = 8, 6


def _model_and_data():
    torch.manual_seed(1)
    encoders = torch.nn.ModuleDict({m: torch.nn.Linear(DIM, DIM) for m in MODALITIES})
    logit_scale = torch.nn.Parameter(torch.tensor(2.0))
    inputs = {m: torch.randn(GLOBAL_BATCH, DIM) for m in MODALITIES}
    # species ids: positives on the same process and across processes, one unknown (-1)
    inputs["labels"] = torch.tensor([0, 0, 1, 2, 2, 3, 0, -1])
    return encoders, logit_scale, inputs


def _loss_and_grads(encoders, logit_scale, inputs):
    embeds = {m: F.normalize(encoders[m](inputs[m]), dim=-1) for m in MODALITIES}
    loss = contrastive_loss(embeds, logit_scale) + supervised_contrastive_loss(embeds["dna"], inputs["labels"])
    loss.backward()
    grads = [p.grad.clone() for p in encoders.parameters()] + [logit_scale.grad.clone()]
    return loss.detach(), grads


def _worker(rank, world_size, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    encoders, logit_scale, inputs = _model_and_data()
    shard = GLOBAL_BATCH // world_size
    local = {m: x[rank * shard : (rank + 1) * shard] for m, x in inputs.items()}
    loss, grads = _loss_and_grads(encoders, logit_scale, local)
    dist.all_reduce(loss)
    for g in grads:  # what DDP does: average gradients over processes
        dist.all_reduce(g)
        g /= world_size
    if rank == 0:
        torch.save({"loss": loss / world_size, "grads": grads}, out_path)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_gloo_equals_single_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out_path = tmp_path / "rank0.pt"
    mp.start_processes(_worker, args=(2, port, str(out_path)), nprocs=2, join=True, start_method="spawn")
    distributed = torch.load(out_path, weights_only=True)
    encoders, logit_scale, inputs = _model_and_data()
    loss, grads = _loss_and_grads(encoders, logit_scale, inputs)
    assert distributed["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    for ours, reference in zip(distributed["grads"], grads, strict=True):
        assert torch.allclose(ours, reference, atol=1e-6)


def test_losses_run_in_float32_under_bf16_autocast():
    """The official training runs the towers under bf16 autocast and the loss on fp32 features
    outside it: a bf16 matmul of the logits (what autocast does to `@`) must not happen here."""
    torch.manual_seed(0)
    x, d, t = (F.normalize(torch.randn(16, 64), dim=-1) for _ in range(3))
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, -1])
    scale = torch.tensor(math.log(1 / 0.07))
    reference = contrastive_loss({"image": x, "dna": d, "text": t}, scale)
    supcon_reference = supervised_contrastive_loss(d, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = contrastive_loss({"image": x, "dna": d, "text": t}, scale)
        supcon = supervised_contrastive_loss(d, labels)
    assert loss.dtype == supcon.dtype == torch.float32
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    assert supcon.item() == pytest.approx(supcon_reference.item(), rel=1e-6)
    # features that come out of a bf16 tower are scored in float32 too
    low = {"image": x.bfloat16(), "dna": d.bfloat16()}
    expected = contrastive_loss({m: v.float() for m, v in low.items()}, scale)
    assert contrastive_loss(low, scale).item() == pytest.approx(expected.item(), rel=1e-6)


def test_model_logits_and_loss_are_float32_under_bf16_autocast():
    from clibd import CLIBDConfig, CLIBDModel

    torch.manual_seed(0)
    model = CLIBDModel(CLIBDConfig.tiny()).eval()
    inputs = {"pixel_values": torch.randn(6, 3, 32, 32), "dna_input_ids": torch.randint(3, 1000, (6, 133)),
              "text_input_ids": torch.randint(1000, 2000, (6, 12))}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs, return_loss=True)
    for name in ("image_embeds", "dna_embeds", "text_embeds", "logits_image_dna", "logits_image_text",
                 "logits_dna_text", "loss"):
        assert out[name].dtype == torch.float32, name
    embeds = {"image": out.image_embeds, "dna": out.dna_embeds, "text": out.text_embeds}
    reference = contrastive_loss(embeds, model.logit_scale.detach())  # outside autocast, float32
    assert out.loss.item() == pytest.approx(reference.item(), rel=1e-6)
    expected = model.logit_scale.detach().exp() * out.image_embeds @ out.dna_embeds.T
    assert torch.allclose(out.logits_image_dna, expected, atol=1e-6)
