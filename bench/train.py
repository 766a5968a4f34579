"""Training throughput: samples/s, step time split into data / forward / backward+optimiser, peak
memory, the data loader's own records/s, and model FLOPs utilisation where a GPU peak is known.

    python bench/train.py --config configs/smoke.yaml --steps 20
    python bench/train.py --config configs/demo.yaml --steps 10
    python bench/train.py --config configs/bioscan1m_image_dna_text.yaml --synthetic --batch-size 500 --steps 20

`--synthetic` feeds random tensors of the right shapes (for the paper configs, whose BIOSCAN data
is not here); otherwise batches come from the config's real records through the real collator.
Prints one table; figures go in bench/README.md with the device named.
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from clibd import CLIBDModel
from clibd.data import load_splits
from clibd.data.collate import LABEL_PREFIX, ContrastiveCollator, has_modalities
from clibd.objectives import Objective, output_embeds, split_labels
from clibd.processing import CLIBDProcessor
from clibd.training import ExperimentConfig
from clibd.training.loop import build_model

# Dense bf16 peak FLOP/s of GPUs we may be lent (vendor figures, without sparsity).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def tower_flops_per_sample(model: CLIBDModel, batch: dict[str, torch.Tensor]) -> float:
    """Training FLOPs per sample: 6 x parameters x tokens for a trained encoder, 2 x for a frozen
    one (forward only); embedding tables excluded, attention scores included."""
    total = 0.0
    dna_key = "dna_input_ids" if "dna_input_ids" in batch else "dna_profile"
    towers = {"image": ("pixel_values", model.image_encoder), "dna": (dna_key, model.dna_encoder),
              "text": ("text_input_ids", model.text_encoder)}
    for name, (key, tower) in towers.items():
        if tower is None or key not in batch:
            continue
        if name == "image":
            patch = tower.patch_embed.patch_size[0]
            tokens = (batch[key].shape[-1] // patch) ** 2 + 1
            width, depth = tower.embed_dim, len(tower.blocks)
        elif hasattr(tower, "bert"):
            tokens = batch[key].shape[1]
            width, depth = tower.bert.config.hidden_size, tower.bert.config.num_hidden_layers
        else:  # an MLP tower (k-mer profiles): one "token", no attention
            tokens, width, depth = 1, 0, 0
        params = sum(p.numel() for n, p in tower.named_parameters() if "embed" not in n and "word_embeddings" not in n)
        trained = any(p.requires_grad for n, p in tower.named_parameters() if "projection" not in n and "head" not in n)
        factor = 6 if trained else 2
        attention = 2 * 2 * depth * tokens * tokens * width  # QK^T and AV, forward
        total += factor * params * tokens + (3 if trained else 1) * attention
    return total


def synthetic_batch(model: CLIBDModel, processor: CLIBDProcessor, size: int,
                    label_ranks: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """A batch of random inputs of the right shapes: random pixels, random barcodes and taxa
    through the model's own processor (so any DNA tower kind gets its own inputs)."""
    generator = torch.Generator().manual_seed(0)
    bases = torch.randint(0, 4, (size, 658), generator=generator)
    batch = {}
    if model.image_encoder is not None:
        side = model.config.image_config.image_size
        batch["pixel_values"] = torch.rand(size, 3, side, side, generator=generator)
    if model.dna_encoder is not None:
        batch.update(processor.process_barcodes(["".join("ACGT"[b] for b in row) for row in bases.tolist()]))
    if model.text_encoder is not None:
        batch.update(processor.process_taxonomy([f"Order{i % 7};Family{i % 31};Genus{i % 97};Species{i}"
                                                 for i in range(size)]))
    for rank in label_ranks:  # about 8 records per label, as in a real batch of common species
        batch[f"{LABEL_PREFIX}{rank}"] = torch.randint(0, max(size // 8, 1), (size,), generator=generator)
    return batch


def build(args: argparse.Namespace, config: ExperimentConfig) -> tuple[CLIBDModel, CLIBDProcessor, Objective]:
    """The configured model on `args.device` with its processor and objective, set up as training does."""
    model_config = config.model_config()
    if args.no_pretrained or args.synthetic:
        model_config.image_config.pretrained = False
        model_config.text_config.pretrained_model_name_or_path = None
        model_config.dna_config.pretrained_model_name_or_path = None
    model, processor, objective = build_model(config, model_config)
    return model.to(args.device), processor, objective


def batch_source(args: argparse.Namespace, config: ExperimentConfig, model: CLIBDModel, processor: CLIBDProcessor,
                 objective: Objective, batch_size: int) -> tuple[Iterator[dict[str, torch.Tensor]], float]:
    """Batches (synthetic, or the config's real records through the real collator) and the
    loader's own records/s (NaN for synthetic batches)."""
    if args.synthetic:
        fixed = synthetic_batch(model, processor, batch_size, objective.label_ranks)
        return iter(lambda: fixed, None), float("nan")
    splits = load_splits(config.data)
    train_set = has_modalities(splits["train_seen"], model.config.modalities)
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=True,
                        num_workers=config.data.num_workers,
                        collate_fn=ContrastiveCollator(processor, model.config.modalities, train=True,
                                                       label_ranks=objective.label_ranks))
    start, count = time.perf_counter(), 0
    for count, _ in enumerate(loader, start=1):
        if count >= args.steps:
            break
    return iter(loader), count * batch_size / (time.perf_counter() - start)


def time_steps(args: argparse.Namespace, model: CLIBDModel, objective: Objective, batches: Iterator,
               bf16: bool) -> tuple[dict[str, float], float]:
    """Seconds spent on data, forward (loss included) and backward + optimiser over `args.steps`
    steps after `args.warmup`, and the training FLOPs per sample."""
    device = torch.device(args.device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    timings = {"data": 0.0, "forward": 0.0, "backward": 0.0}
    flops = 0.0
    model.train()
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        inputs, labels = split_labels({k: v.to(device, non_blocking=True) for k, v in next(batches).items()})
        sync()
        t1 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            output = model(**inputs)
        loss = objective(output_embeds(output), labels, output.logit_scale)
        sync()
        t2 = time.perf_counter()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        if step >= args.warmup:
            timings["data"] += t1 - t0
            timings["forward"] += t2 - t1
            timings["backward"] += t3 - t2
            flops = tower_flops_per_sample(model, inputs)
    return timings, flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, help="override train.batch_size")
    parser.add_argument("--synthetic", action="store_true", help="random tensors instead of real records")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-pretrained", action="store_true", help="random tower weights (no downloads)")
    args = parser.parse_args()

    config = ExperimentConfig.from_yaml(args.config)
    batch_size = args.batch_size or config.train.batch_size
    model, processor, objective = build(args, config)
    device = torch.device(args.device)
    bf16 = device.type == "cuda" and config.train.mixed_precision in ("auto", "bf16")
    batches, loader_rate = batch_source(args, config, model, processor, objective, batch_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timings, flops = time_steps(args, model, objective, batches, bf16)
    total = sum(timings.values())
    samples_per_s = args.steps * batch_size / total
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        name, peak = f"cpu ({torch.get_num_threads()} threads)", None
    mfu = f"{100 * samples_per_s * flops / peak:.1f} %" if peak else "n/a"
    print(f"config={args.config} device={name} batch={batch_size} steps={args.steps} bf16={bf16} "
          f"synthetic={args.synthetic} torch={torch.__version__}")
    print("| samples/s | data ms | forward ms | backward+opt ms | peak memory MB | GFLOP/sample | MFU | loader rec/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    per_step = {k: 1000 * v / args.steps for k, v in timings.items()}
    print(f"| {samples_per_s:.1f} | {per_step['data']:.0f} | {per_step['forward']:.0f} | {per_step['backward']:.0f} "
          f"| {peak_mb:.0f} | {flops / 1e9:.1f} | {mfu} | {loader_rate:.0f} |")


if __name__ == "__main__":
    main()
