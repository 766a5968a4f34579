"""bench/novel_species.py end to end on a slice of the shared BOLD records: train, index, identify, table."""

import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_novel_species_bench_prints_the_table(data_dir, tmp_path):
    # The first 4,000 records: the small file has too few records per species for the paper split
    # to keep any seen species (9+ records) for training.
    config = {
        "model": {"preset": "tiny", "modalities": ["dna"],
                  "dna": {"encoder": "kmer_profile", "profile_kmer_size": 5, "profile_hidden_size": 128,
                          "profile_sketch_dim": 64}},
        "data": {"path": str(data_dir / "insect_bold_coi" / "insect_bold_coi.tsv"), "limit": 4000},
        "train": {"output_dir": str(tmp_path / "run"), "objective": "supcon", "epochs": 3, "batch_size": 128,
                  "max_lr": 1e-3, "checkpoint_every": 1000, "eval_from_epoch": 99},
    }
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "novel_species.py"), "--config",
                             str(tmp_path / "bench.yaml"), "--kmax", "6", "--variants", "--misses", "--examples"],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "| method | order | family | genus | AUROC seen vs novel |" in out
    rows = {name: [float(x) for x in values.split(" | ")] for name, values in
            re.findall(r"^\| (clibd \(learned DNA tower, 1-NN\)|raw 5-mer counts, 1-NN[^|]*) \| ([\d. |]+) \|$",
                       out, flags=re.M)}
    assert set(rows) >= {"clibd (learned DNA tower, 1-NN)"} and any(n.startswith("raw 5-mer") for n in rows)
    assert all(0 <= v <= 100 for values in rows.values() for v in values[:3])
    assert rows["clibd (learned DNA tower, 1-NN)"][3] > 0.9  # AUROC: novel species are told from known ones
    flagged = float(re.search(r"clibd identify on the novel queries: ([\d.]+) % flagged novel", out).group(1))
    assert flagged >= 80
    assert "| species of the query's genus in training | queries (species) | clibd genus |" in out
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    # --variants: the nearest-reference row of its table is the main table's clibd row
    variant = re.search(r"^\| clibd, nearest reference \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", out, flags=re.M)
    assert [float(v) for v in variant.groups()] == rows["clibd (learned DNA tower, 1-NN)"][:3]
    assert "Novel species placed at the wrong genus by clibd" in out
    examples = re.findall(r"^\| \S+ \| .* \| (true|false) \| [\d.]+ \| \*.+\* \((.+)\) \|$", out, flags=re.M)
    assert examples and all(flag == "false" for flag, kind in examples if kind == "known species")
