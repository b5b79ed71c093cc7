"""Tokenize text, JSON-lines or parquet files into a treadle token file (PREFIX.bin + PREFIX.json).

    python launch/prepare_data.py data/*.jsonl --tokenizer path/to/tokenizer.json --out /data/mycorpus
    # then train with: data.source=tokens data.path=/data/mycorpus.bin

Directories are walked in sorted order for .jsonl/.json/.parquet/.txt files; a file named explicitly is read as
plain text (one document) unless it is .jsonl/.json/.parquet.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from treadle.train.corpus import iter_documents, list_document_files, write_token_file
from treadle.train.tokenizer import load_tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("inputs", nargs="+", help="document files or directories")
    parser.add_argument("--out", required=True, help="output prefix: writes PREFIX.bin and PREFIX.json")
    parser.add_argument("--tokenizer", default="byte", help="'byte' or a Hugging Face tokenizer.json")
    parser.add_argument("--text-field", default="text", help="JSON field / parquet column holding the text")
    parser.add_argument(
        "--eos-id", type=int, default=None, help="document separator id (default: the tokenizer's)"
    )
    args = parser.parse_args(argv)

    out = Path(args.out.removesuffix(".bin")).expanduser()
    try:
        tokenizer = load_tokenizer(args.tokenizer, eos_id=args.eos_id)
        files = [f for p in args.inputs for f in list_document_files(p, key="input")]
        documents = iter_documents(files, text_field=args.text_field, field_key="--text-field")
        sources = ", ".join(str(Path(p).expanduser().resolve()) for p in args.inputs)
        meta = write_token_file(out.with_name(out.name + ".bin"), documents, tokenizer, source=sources)
    except ValueError as e:
        parser.error(str(e))
    print(
        f"wrote {meta.num_tokens} tokens ({meta.dtype}, vocab {meta.vocab_size}, eos {meta.eos_id}) to {out}.bin"
    )


if __name__ == "__main__":
    main()
