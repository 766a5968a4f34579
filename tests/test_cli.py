import re
import subprocess
import sys

import pytest

from clibd.cli import main


def test_demo_prints_real_neighbour_table(data_dir, capsys):
    assert main(["demo", "--data-dir", str(data_dir), "--limit", "40", "--show", "5"]) == 0
    out = capsys.readouterr().out
    assert "40 real BOLD barcodes" in out
    rows = [line for line in out.splitlines() if re.match(r"^[A-Z]+\d+-\d+ ", line)]
    assert len(rows) == 5
    agreement = re.search(r"1-NN rank agreement: order ([\d.]+)%", out)
    assert agreement and 0 <= float(agreement.group(1)) <= 100
    assert "order-labelled BIOSCAN-1M photos" in out


def test_demo_without_data_is_a_clear_error(tmp_path, capsys):
    assert main(["demo", "--data-dir", str(tmp_path)]) == 2
    assert "insect_bold_coi_small.tsv not found" in capsys.readouterr().err


def test_tokenize(capsys):
    assert main(["tokenize", "AAAAAAAAAC", "--max-length", "10"]) == 0
    assert capsys.readouterr().out.split() == ["0", "3", "4"]
    assert main(["tokenize", "ACGTZ", "--id", "rec9"]) == 2
    assert "rec9" in capsys.readouterr().err


def test_help_and_tokenize_start_without_torch():
    """`clibd --help` and `clibd tokenize` import no torch, transformers or datasets (lazy imports):
    they answer in well under a second instead of several."""
    probe = ("import sys\nfrom clibd.cli import main\n"
             "assert main(['tokenize', 'ACGTACGTAC', '--flavour', 'barcodebert']) == 0\n"
             "heavy = sorted(m for m in ('torch', 'transformers', 'datasets', 'timm') if m in sys.modules)\n"
             "print('HEAVY', heavy)\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert "HEAVY []" in result.stdout
    assert result.stdout.split()[0].isdigit()  # the token ids were printed
    import clibd

    assert clibd.CLIBDModel.__name__ == "CLIBDModel"  # names still resolve, on first use
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        clibd.NoSuchThing  # noqa: B018
