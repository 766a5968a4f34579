"""`clibd` command line: argument parsing only; the work lives in the package.

Usage:
    clibd demo [--data-dir ../shared/data]
    clibd tokenize ACGTACGT... [--flavour compat|barcodebert]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .data import shared_data_dir


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.data_dir), sys.stdout, limit=args.limit, show=args.show, seed=args.seed)
    return 0


def _tokenize(args: argparse.Namespace) -> int:
    from .processing import BarcodeTokenizer

    tokenizer = BarcodeTokenizer(args.flavour, args.kmer_size, args.max_length)
    encoded = tokenizer([args.sequence], ids=[args.id])
    print(" ".join(str(i) for i in encoded.input_ids[0].tolist()))
    if encoded.truncated:
        print(f"(truncated to {args.max_length} bp)", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clibd", description="Identify insects from photos and DNA barcodes.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="embed the shared real barcodes and photos, print nearest neighbours")
    demo.add_argument("--data-dir", default=str(shared_data_dir()), help="the shared/data folder")
    demo.add_argument("--limit", type=int, default=None, help="read at most this many barcode records")
    demo.add_argument("--show", type=int, default=12, help="rows to print per table")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)

    tokenize = commands.add_parser("tokenize", help="print the k-mer token ids of one barcode")
    tokenize.add_argument("sequence")
    tokenize.add_argument("--id", default="argument", help="record name used in error messages")
    tokenize.add_argument("--flavour", choices=("compat", "barcodebert"), default="compat")
    tokenize.add_argument("--kmer-size", type=int, default=5)
    tokenize.add_argument("--max-length", type=int, default=660)
    tokenize.set_defaults(run=_tokenize)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"clibd {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
