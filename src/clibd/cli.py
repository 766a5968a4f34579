"""`clibd` command line: argument parsing only; the work lives in the package.

Usage:
    clibd index build --model runs/demo/best --records refs.tsv --modality dna --out refs/
    clibd index add refs/ --records new_species.fasta
    clibd identify --index refs/ --fasta queries.fasta --out preds.tsv
    clibd convert-official bioscan-1m-image-dna-text --out clibd-1m
    clibd plot attention --model runs/demo/best --image photo.jpg --out attention.png
    clibd demo [--data-dir ../shared/data]
    clibd tokenize ACGTACGT... [--flavour compat|barcodebert]
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from pathlib import Path

# Only constants at module level: each command imports what it needs, so `clibd --help` and
# `clibd tokenize` answer without loading torch, transformers and datasets.
from .constants import (
    DEFAULT_TEXT_MODEL,
    INDEX_MODALITIES,
    KEY_KINDS,
    QUERY_MODALITIES,
    RANKS,
    SEARCH_BACKENDS,
    STRATEGIES,
)


def _demo(args: argparse.Namespace) -> int:
    from .data import shared_data_dir
    from .demo import run_demo

    data_dir = Path(args.data_dir or shared_data_dir())
    run_demo(data_dir, sys.stdout, limit=args.limit, show=args.show, seed=args.seed)
    if not args.no_library:
        from .demo import run_library_demo

        run_library_demo(data_dir, sys.stdout, Path(args.library) if args.library else None,
                         limit=args.limit or 200, seed=args.seed)
    return 0


def _tokenize(args: argparse.Namespace) -> int:
    from .processing.barcodes import BarcodeTokenizer

    tokenizer = BarcodeTokenizer(args.flavour, args.kmer_size, args.max_length)
    token_ids, _, truncated = tokenizer.encode(args.sequence, args.id)  # lists: no torch needed
    print(" ".join(map(str, token_ids)))
    if truncated:
        print(f"(truncated to {args.max_length} bp)", file=sys.stderr)
    return 0


def _summary(folder: str, index) -> str:
    """One line on an index (a single-modality `ReferenceIndex`) or a multi-modal `ReferenceLibrary`."""
    if not hasattr(index, "key_sets"):
        weights = {rank: weight for rank, weight in index.margin_weights.items() if weight}
        sample = index.meta.get("calibration_sample", {})
        return (f"{folder}: {index.meta['count']} {index.modality} references; thresholds {index.thresholds}"
                + (f"; compared with the similarity + weight x taxon margin at {weights}" if weights else "")
                + (f"; calibrated on {sample['references']} references of the {sample['new_species_held']} species "
                   "the model did not train on" if sample.get("untrained_only") else ""))
    held = ", ".join(f"{len(keys.records)} {m} keys" for m, keys in index.key_sets.items())
    is_du = index.meta.get("is_du", {}).get("threshold")
    new_only = [name for name, pair in index.meta.get("pairs", {}).items() if pair.get("sample", {}).get("untrained_only")]
    return (f"{folder}: {index.meta['count']} records; {held}; {len(index.meta.get('pairs', {}))} query/key pairs "
            f"calibrated" + (f"; IS+DU threshold {is_du:.4f}" if is_du is not None else "")
            + (f"; {', '.join(new_only)} on the species the model did not train on" if new_only else ""))


def _index_build(args: argparse.Namespace) -> int:
    from .index import build_index

    records = _read_with_errors([args.records])
    asked = (("identity_cutoff", args.identity_cutoff), ("novel_named", args.novel_named),
             ("margin_weight", args.species_margin_weight))
    check = False if args.no_species_check else {k: v for k, v in asked if v is not None}
    # one key modality: the single-modality index folder it always was; several: a library
    index = build_index(args.model, records, args.modality, args.out, batch_size=args.batch_size,
                        on_bad_input=args.on_bad_input, precision=args.precision, species_check=check)
    print(_summary(args.out, index))
    return 0


def _index_add(args: argparse.Namespace) -> int:
    from .index import add_to_index

    records = _read_with_errors([args.records])
    index = add_to_index(args.index, records, replace=args.replace, batch_size=args.batch_size,
                         on_bad_input=args.on_bad_input)
    print(_summary(args.index, index))
    return 0


def _index_recalibrate(args: argparse.Namespace) -> int:
    from .index import recalibrate_index

    print(_summary(args.index, recalibrate_index(args.index, precision=args.precision)))
    return 0


def _read_with_errors(paths: list[str]) -> list[dict[str, str]]:
    """Records of TSV/CSV/FASTA files; a row a reader cannot use becomes a record carrying its
    `error` (file, line, why), so identify writes an error row for it and index build names it
    (or lists it in skipped.tsv) instead of it vanishing."""
    from .data import BadRows, read_records

    bad, records = BadRows("skip"), []
    for path in paths:
        records += read_records(path, bad_rows=bad)
    where = [f"{row.file}:{row.line}" for row in bad.rows]  # the id of a row without one, else part of why
    return records + [{"id": row.id or at, **dict.fromkeys(RANKS, ""), "dna": "", "image": "",
                       "error": f"{at}: {row.reason}" if row.id else row.reason} for row, at in zip(bad.rows, where, strict=True)]


def _read_queries(args: argparse.Namespace) -> list[dict[str, str]]:
    """Query records from every source given (see `_read_with_errors`)."""
    from .identify import image_records

    queries = _read_with_errors([*(args.records or []), *(args.fasta or [])])
    for i, sequence in enumerate(args.dna or []):
        queries.append({"id": f"dna{i + 1}", **dict.fromkeys(RANKS, ""), "dna": sequence, "image": ""})
    return queries + image_records(args.image or [])


def _identify(args: argparse.Namespace) -> int:
    from .identify import Identifier, identify_to_tsv
    from .predictions_tsv import PredictionTally, check_predictions_out

    if args.out:
        check_predictions_out(args.out)  # before the model loads: seconds, for a mistyped --out
    queries = _read_queries(args)
    if not queries:
        raise ValueError("no queries: give --records, --fasta, --dna or --image")
    identifier = Identifier.load(args.index, model_dir=args.model, backend=args.search, batch_size=args.batch_size,
                                 progress=True, on_bad_input=args.on_bad_input, device=args.device)
    plan = {"keys": args.keys, "query": args.query, "strategy": args.strategy, "is_du_threshold": args.is_du_threshold}
    check = identifier.species_check(identifier.plan_for(queries, **plan))
    tally = PredictionTally(check.identity_cutoff if check else None)
    identify_to_tsv(identifier, queries, args.out, top_k=args.top_k, on_batch=tally.add, **plan)
    if args.out:  # on stdout the table is all there is; rows an earlier, interrupted run wrote are not counted
        print(f"clibd identify: {args.out}: this run, {tally.line()}", file=sys.stderr)
    return 0


def _plot_attention(args: argparse.Namespace) -> int:
    from .attention import attention_towers, class_token_maps
    from .plots import plot_attention
    from .processing import CLIBDProcessor

    if not (args.model and args.image):
        raise ValueError("plot attention needs --model (a saved clibd model folder) and --image (a photo)")
    towers, note = attention_towers(args.model, args.unaligned)
    pixels = CLIBDProcessor.from_pretrained(args.model).process_images([args.image])
    blocks = _block_range(args.blocks)
    maps = {name: class_token_maps(tower, pixels, blocks)[0] for name, tower in towers.items()}
    plot_attention(pixels[0], maps, args.out, title=Path(args.image).name)
    if note:
        print(f"clibd plot attention: {note}", file=sys.stderr)
    print(f"wrote {args.out}")
    return 0


def _block_range(text: str) -> tuple[int, int] | None:
    """`--blocks`: "all", "N" or "FIRST-LAST" (counted from 1)."""
    if text == "all":
        return None
    first, _, last = text.partition("-")
    try:
        return int(first), int(last or first)
    except ValueError:
        raise ValueError(f"--blocks {text!r}: give FIRST-LAST (e.g. 2-6, counted from 1), N or all") from None


def _plot(args: argparse.Namespace) -> int:
    if args.kind == "attention":
        return _plot_attention(args)
    from .data import read_records
    from .identify import read_predictions_tsv
    from .index import ReferenceIndex
    from .plots import plot_accuracy_by_key_count, plot_umap

    if not args.index:
        raise ValueError(f"plot {args.kind} needs --index")
    index = ReferenceIndex.load(args.index)
    if args.kind == "umap":
        plot_umap(index.embeddings, index.labels(args.colour_by), args.out,
                  title=f"{index.modality} references coloured by {args.colour_by}")
    else:
        if not (args.predictions and args.records):
            raise ValueError("plot keys needs --predictions (from clibd identify) and --records (true labels)")
        truth = {r["id"]: r["species"] for r in read_records(args.records)}
        predictions = [p for p in read_predictions_tsv(args.predictions) if p.query_id in truth]
        result = plot_accuracy_by_key_count([truth[p.query_id] for p in predictions],
                                            [p.hits[0].taxonomy["species"] for p in predictions],
                                            Counter(index.labels("species")), args.out)
        for name, n, accuracy in result:
            print(f"keys {name:>5}: {n:4d} species, accuracy {100 * accuracy:.1f}%")
    print(f"wrote {args.out}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert_official

    model, processor = convert_official(args.checkpoint, text_tokenizer=args.text_tokenizer)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    print(f"{args.out}: CLIBD model ({', '.join(model.config.modalities)}; compat tokenizer and pooling)")
    return 0


def _convert_barcodebert(args: argparse.Namespace) -> int:
    import yaml

    from .convert.barcodebert import convert_barcodebert

    settings = convert_barcodebert(args.source, args.out, cache_dir=args.cache_dir)
    print(f"{args.out}: BarcodeBERT weights for the DNA tower; in a config:")
    print(yaml.safe_dump({"model": {"dna": settings}}, sort_keys=False), end="")
    return 0


def _push(args: argparse.Namespace) -> int:
    from .hub import push_run

    print(push_run(args.run_dir, args.repo_id, private=args.private))
    return 0


def _index_push(args: argparse.Namespace) -> int:
    from .hub import push_index

    print(push_index(args.index, args.repo_id, private=args.private))
    return 0


def _index_pull(args: argparse.Namespace) -> int:
    from .hub import pull_index

    print(pull_index(args.repo_id, args.out))
    return 0


def _add_index_commands(commands: argparse._SubParsersAction) -> None:
    index = commands.add_parser("index", help="build or grow a reference library")
    index_commands = index.add_subparsers(dest="index_command", required=True)
    build = index_commands.add_parser("build", help="embed labelled records into a new index")
    build.add_argument("--model", required=True, help="a saved CLIBD model folder (model + processor)")
    build.add_argument("--records", required=True, help="labelled records: TSV/CSV export or FASTA")
    build.add_argument("--modality", nargs="+", choices=INDEX_MODALITIES, default=["dna"],
                       help="key modalities: one (dna or image: a single-modality index) or several (e.g. image dna "
                            "text: a multi-modal library; text keys are the taxa of the records at every rank)")
    build.add_argument("--out", required=True, help="index folder to create")
    build.add_argument("--batch-size", type=int, default=256)
    build.add_argument("--on-bad-input", choices=("error", "skip"), default="error",
                       help="records that cannot be indexed: stop with an error naming them (default), or leave "
                            "them out, warn and list them in the index's skipped.tsv")
    build.add_argument("--precision", type=float,
                       help="set each rank's threshold so that answers are right at least this often on species "
                            "held out of the library at calibration, borne out at 95 %% confidence (e.g. 0.95); "
                            "default: the threshold that best separates right from wrong answers")
    build.add_argument("--identity-cutoff", type=float,
                       help="DNA: a reference at least this identical (aligned) names the species (default 0.97)")
    build.add_argument("--novel-named", type=float,
                       help="DNA: the share of calibration specimens of species held out of the library that the "
                            "embedding may name as a held species where alignment does not settle it (default "
                            "0.02; lower: fewer novel species named, more known ones flagged novel)")
    build.add_argument("--species-margin-weight", type=float,
                       help="DNA: the weight of the species margin in the embedding's species confidence where "
                            "alignment does not settle it (default 1; 0: the novelty similarity alone)")
    build.add_argument("--no-species-check", action="store_true",
                       help="DNA: decide the species from the embedding alone (no alignment of the nearest references)")
    build.set_defaults(run=_index_build)
    add = index_commands.add_parser("add", help="add labelled records (new species too) without retraining")
    add.add_argument("index", help="an index folder")
    add.add_argument("--records", required=True)
    add.add_argument("--replace", action="store_true", help="overwrite records whose id is already indexed")
    add.add_argument("--batch-size", type=int, default=256)
    add.add_argument("--on-bad-input", choices=("error", "skip"), default="error", help="as for index build")
    add.set_defaults(run=_index_add)
    recalibrate = index_commands.add_parser("recalibrate", help="calibrate an index's thresholds again and store them")
    recalibrate.add_argument("index", help="an index folder")
    recalibrate.add_argument("--precision", type=float, help="as for index build (default: the index's own)")
    recalibrate.set_defaults(run=_index_recalibrate)

    push_idx = index_commands.add_parser("push", help="upload an index to a Hub dataset repo")
    push_idx.add_argument("index")
    push_idx.add_argument("repo_id")
    push_idx.add_argument("--private", action="store_true")
    push_idx.set_defaults(run=_index_push)
    pull_idx = index_commands.add_parser("pull", help="download an index from a Hub dataset repo")
    pull_idx.add_argument("repo_id")
    pull_idx.add_argument("--out", required=True)
    pull_idx.set_defaults(run=_index_pull)


def _add_identify_command(commands: argparse._SubParsersAction) -> None:
    ident = commands.add_parser("identify", help="identify barcodes or photos against an index")
    ident.add_argument("--index", required=True)
    ident.add_argument("--model", help="the model folder, when it is not where the index was built (checked by hash)")
    ident.add_argument("--records", nargs="+", help="TSV/CSV files of query records")
    ident.add_argument("--fasta", nargs="+", help="FASTA files of query barcodes")
    ident.add_argument("--dna", nargs="+", help="barcode sequences given on the command line")
    ident.add_argument("--image", "--images", dest="image", nargs="+", help="photo files or folders of photos")
    ident.add_argument("--query", choices=QUERY_MODALITIES,
                       help="what a query is embedded from: its photo, its barcode, its taxonomy (text: the ranks "
                            "of --records), the mean of photo and barcode (image+dna) or the two concatenated "
                            "(image+dna-concat); default: the index's modality, or dna where queries have "
                            "barcodes, else image")
    ident.add_argument("--keys", nargs="+", choices=KEY_KINDS,
                       help="key kinds to search (several: stacked, the paper's 'all'; image+dna, "
                            "image+dna-concat: the image and DNA keys of records with both, averaged or "
                            "concatenated, searched alone); default: the query's own")
    ident.add_argument("--strategy", choices=STRATEGIES, default=None,
                       help="nearest (default): the nearest key answers; is-du: photos whose best image-key "
                            "similarity is above the library's IS+DU threshold are answered from image keys "
                            "(species seen in photos), the others from DNA keys (the route column says which)")
    ident.add_argument("--is-du-threshold", type=float,
                       help="is-du: this threshold instead of the one calibrated on the library")
    ident.add_argument("--device", help="where queries are embedded (default: cuda when there is a GPU, else cpu)")
    ident.add_argument("--top-k", type=int, default=5)
    ident.add_argument("--search", choices=SEARCH_BACKENDS, default="torch",
                       help="exact search with torch or faiss, or approximate with a faiss inverted file "
                            "(libraries of millions; pip install 'clibd[faiss]')")
    ident.add_argument("--out", help="predictions TSV (default: stdout); an existing file is resumed")
    ident.add_argument("--batch-size", type=int, default=256)
    ident.add_argument("--on-bad-input", choices=("skip", "error"), default="skip",
                       help="queries that cannot be identified (unreadable photo, bad barcode, repeated id): write "
                            "an error row saying why and go on (default), or stop with an error naming them")
    ident.set_defaults(run=_identify)


def _add_plot_command(commands: argparse._SubParsersAction) -> None:
    plot = commands.add_parser("plot", help="figures: UMAP of an index, accuracy by number of keys, attention "
                                            "rollout of the image tower on a photo")
    plot.add_argument("kind", choices=("umap", "keys", "attention"))
    plot.add_argument("--index", help="umap, keys: an index folder")
    plot.add_argument("--out", required=True, help="PNG file")
    plot.add_argument("--colour-by", default="order", choices=RANKS)
    plot.add_argument("--predictions", help="keys: a clibd identify TSV")
    plot.add_argument("--records", help="keys: the queries' true labels (TSV/CSV/FASTA)")
    plot.add_argument("--model", help="attention: a saved clibd model folder (its image tower)")
    plot.add_argument("--image", help="attention: a photo")
    plot.add_argument("--unaligned", help="attention: a clibd model folder whose image tower is the unaligned one "
                                          "(default: the pretrained timm weights the model's config names)")
    plot.add_argument("--blocks", default="2-6",
                      help="attention: the blocks rolled out, FIRST-LAST counted from 1, or all (default 2-6, "
                           "the paper's Fig. 5)")
    plot.set_defaults(run=_plot)


def build_parser() -> argparse.ArgumentParser:
    """The `clibd` argument parser; each command's `run` is the function that does its work."""
    parser = argparse.ArgumentParser(prog="clibd", description="Identify insects from photos and DNA barcodes.")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_index_commands(commands)
    _add_identify_command(commands)

    push = commands.add_parser("push", help="upload a training run (model, processor, metrics, card) to the Hub")
    push.add_argument("run_dir")
    push.add_argument("repo_id")
    push.add_argument("--private", action="store_true")
    push.set_defaults(run=_push)

    convert = commands.add_parser("convert-official", help="turn an official CLIBD best.pth into a clibd model")
    convert.add_argument("checkpoint", help="a local .pth, a released name (bioscan-1m-image-dna-text, ...) "
                                            "or hf://OWNER/REPO/path.pth")
    convert.add_argument("--out", required=True, help="folder for the model and processor")
    convert.add_argument("--text-tokenizer", default=DEFAULT_TEXT_MODEL,
                         help="tokenizer of the text tower (a Hub id or a local folder)")
    convert.set_defaults(run=_convert)

    barcodebert = commands.add_parser("convert-barcodebert",
                                      help="turn a BarcodeBERT checkpoint into starting weights for the DNA tower")
    barcodebert.add_argument("source", help="a released name (barcodebert-canada-1.5m-5mer, ...), a local "
                                            ".pth/.pt/.safetensors, a URL or hf://OWNER/REPO/path")
    barcodebert.add_argument("--out", required=True, help="folder for the converted weights")
    barcodebert.add_argument("--cache-dir", help="where downloads are kept")
    barcodebert.set_defaults(run=_convert_barcodebert)

    _add_plot_command(commands)

    demo = commands.add_parser("demo", help="embed the shared real barcodes and photos, print nearest neighbours")
    demo.add_argument("--data-dir", help="the shared/data folder (default: $CLIBD_SHARED_DATA or ../shared/data)")
    demo.add_argument("--limit", type=int, default=None, help="read at most this many barcode records")
    demo.add_argument("--show", type=int, default=12, help="rows to print per table")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--library", help="keep the demo's model (LIBRARY/model) and multi-modal library (LIBRARY/refs) "
                                        "here, to try `clibd identify --index LIBRARY/refs ...` on them")
    demo.add_argument("--no-library", action="store_true", help="skip the multi-modal library and photo identify part")
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
    # clibd's warnings (skipped rows, truncated barcodes, thresholds it could not learn) reach the user
    logging.basicConfig(level=logging.WARNING, format="clibd: %(levelname)s: %(message)s")
    try:
        return args.run(args)
    except KeyboardInterrupt:  # Ctrl-C: what was kept and how to go on, not a traceback from wherever it stopped
        print(f"clibd {args.command}: interrupted{_after_interrupt(args)}", file=sys.stderr)
        return 130
    except Exception as error:
        if _is_network_error(error):
            print(f"clibd {args.command}: error: cannot reach the Hugging Face Hub or the download site "
                  f"({type(error).__name__}: {error}); check the network (and HF_TOKEN for private repos)",
                  file=sys.stderr)
        elif isinstance(error, (ValueError, FileNotFoundError)):
            print(f"clibd {args.command}: error: {error}", file=sys.stderr)
        else:
            raise
        return 2


def _after_interrupt(args: argparse.Namespace) -> str:
    """What an interrupted command left, and how to go on (identify and index build/add resume)."""
    if args.command == "identify" and args.out:
        if not Path(args.out).exists():
            return f"; nothing was written to {args.out} yet"
        return f"; the rows written so far are kept in {args.out}: run the same command again to go on from there"
    if args.command == "index" and args.index_command in ("build", "add"):
        from .index import SHARD_SIZE  # loaded already: the command was embedding

        target = args.out if args.index_command == "build" else args.index
        return (f"; {target} is as it was; finished shards of embeddings ({SHARD_SIZE} records each) are kept and "
                "reused when the same command runs again")
    return ""


def _is_network_error(error: Exception) -> bool:
    """Whether `error` comes from the network: the HTTP clients or the Hub client, or a refused,
    reset or timed-out connection."""
    roots = {"httpx", "httpcore", "requests", "urllib3", "huggingface_hub"}
    return isinstance(error, (ConnectionError, TimeoutError)) or any(
        cls.__module__.split(".")[0] in roots for cls in type(error).__mro__)


if __name__ == "__main__":
    sys.exit(main())
