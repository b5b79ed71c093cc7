"""Token files and the sources that produce them.

Every source reduces to one format (nanoGPT style): `<name>.bin` holds raw little-endian uint16 or uint32 token ids,
each document followed by the EOS id, and a sidecar `<name>.json` holds

    {"format": "treadle-tokens-v1", "dtype": "uint16", "num_tokens": N, "vocab_size": V, "eos_id": E,
     "tokenizer": "...", "source": "..."}

(plus informational `bos_id` and `num_documents`). Writers are atomic: they write a temporary file in the target
directory and `os.replace` it, the .bin first and the sidecar last, so a sidecar's presence means the pair is
complete and concurrent builders (several ranks, several nodes on a shared file system) cannot tear a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import sysconfig
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from treadle.train.errors import UserError
from treadle.train.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

TOKEN_FORMAT = "treadle-tokens-v1"
TOKEN_DTYPES = ("uint16", "uint32")
# Suffixes of document files in a directory given as input (sorted walk, hidden files skipped).
DOCUMENT_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")
# Bump when the bytes a builder writes for the same inputs change, so old caches are not reused.
_BUILDER_VERSION = "1"


@dataclass(frozen=True)
class TokenFileMeta:
    dtype: str
    num_tokens: int
    vocab_size: int | None  # None for a .bin without a sidecar
    eos_id: int | None  # None when neither a sidecar nor data.eos_id gives it
    tokenizer: str | None = None
    source: str | None = None


def sidecar_path(bin_path: str | Path) -> Path:
    return Path(bin_path).with_suffix(".json")


def token_dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def _atomic_write(path: Path, write: Any) -> None:
    """Call `write(file)` on a temporary file beside `path`, then move it into place in one rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def write_token_file(
    bin_path: str | Path,
    documents: Iterable[str],
    tokenizer: Tokenizer,
    *,
    source: str,
    batch_size: int = 1024,
) -> TokenFileMeta:
    """Tokenize `documents` into `bin_path` and its sidecar, each non-empty document followed by EOS."""
    bin_path = Path(bin_path)
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype_for(tokenizer.vocab_size)
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    counts = {"tokens": 0, "documents": 0}

    def write(f: Any) -> None:
        for texts in _batched(documents, batch_size):
            parts: list[np.ndarray] = []
            for ids in tokenizer.encode_batch(texts):
                if len(ids):
                    parts += [ids.astype(dtype, copy=False), eos]
            if parts:
                chunk = np.concatenate(parts)
                f.write(chunk.astype(np.dtype(dtype).newbyteorder("<"), copy=False).tobytes())
                counts["tokens"] += len(chunk)
                counts["documents"] += len(parts) // 2

    _atomic_write(bin_path, write)
    meta = TokenFileMeta(
        dtype=dtype,
        num_tokens=counts["tokens"],
        vocab_size=tokenizer.vocab_size,
        eos_id=tokenizer.eos_id,
        tokenizer=tokenizer.name,
        source=source,
    )
    sidecar = {
        "format": TOKEN_FORMAT,
        "dtype": meta.dtype,
        "num_tokens": meta.num_tokens,
        "vocab_size": meta.vocab_size,
        "eos_id": meta.eos_id,
        "tokenizer": meta.tokenizer,
        "source": meta.source,
        "bos_id": tokenizer.bos_id,
        "num_documents": counts["documents"],
    }
    _atomic_write(sidecar_path(bin_path), lambda f: f.write(json.dumps(sidecar, indent=1).encode() + b"\n"))
    logger.info("wrote %d tokens (%d documents) to %s", meta.num_tokens, counts["documents"], bin_path)
    return meta


def _read_sidecar(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"data.path: cannot read the sidecar {path} ({e}); regenerate it or delete it") from e
    if not isinstance(meta, dict) or meta.get("format") != TOKEN_FORMAT:
        raise UserError(
            f"data.path: sidecar {path} is not a {TOKEN_FORMAT!r} file; regenerate it or delete it"
        )
    if meta.get("dtype") not in TOKEN_DTYPES or not isinstance(meta.get("num_tokens"), int):
        raise UserError(
            f"data.path: sidecar {path} needs 'dtype' (one of {', '.join(TOKEN_DTYPES)}) and an integer "
            "'num_tokens'; regenerate it"
        )
    return meta


def read_token_meta(
    path: str | Path, *, token_dtype: str = "auto", eos_id: int | None = None
) -> TokenFileMeta:
    """Validate a token file against its sidecar (or `data.token_dtype`/`data.eos_id` without one)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"data.path: {path} does not exist; set data.path to a .bin token file")
    if not path.is_file():
        raise UserError(
            f"data.path: {path} is not a file; for data.source=tokens set it to the .bin token file"
        )
    if token_dtype not in ("auto", *TOKEN_DTYPES):
        raise UserError(f"data.token_dtype={token_dtype!r} is not one of auto, {', '.join(TOKEN_DTYPES)}")
    sidecar = sidecar_path(path)
    meta: dict[str, Any] = {}
    if sidecar.is_file() and sidecar != path:
        meta = _read_sidecar(sidecar)
        if token_dtype != "auto" and token_dtype != meta["dtype"]:
            raise UserError(
                f"data.token_dtype={token_dtype} disagrees with {sidecar} (dtype {meta['dtype']}); "
                "set data.token_dtype to auto"
            )
        if eos_id is not None and meta.get("eos_id") is not None and eos_id != meta["eos_id"]:
            raise UserError(
                f"data.eos_id={eos_id} disagrees with {sidecar} (eos_id {meta['eos_id']}); leave data.eos_id unset"
            )
        token_dtype = meta["dtype"]
    elif token_dtype == "auto":
        raise UserError(
            f"data.token_dtype: {path} has no sidecar {sidecar.name}, so its dtype is unknown; set "
            "data.token_dtype to uint16 or uint32 (and data.eos_id to the document separator)"
        )
    itemsize = np.dtype(token_dtype).itemsize
    size = path.stat().st_size
    if size % itemsize:
        raise UserError(
            f"data.path: {path} is {size} bytes, not a multiple of {itemsize} ({token_dtype}); the file is "
            "truncated or data.token_dtype is wrong"
        )
    if meta and meta["num_tokens"] * itemsize != size:
        raise UserError(
            f"data.path: sidecar {sidecar} says num_tokens={meta['num_tokens']} ({token_dtype}, "
            f"{meta['num_tokens'] * itemsize} bytes) but {path} is {size} bytes; the pair is out of sync: "
            "regenerate it (launch/prepare_data.py)"
        )
    return TokenFileMeta(
        dtype=token_dtype,
        num_tokens=size // itemsize,
        vocab_size=meta.get("vocab_size"),
        eos_id=meta["eos_id"] if meta.get("eos_id") is not None else eos_id,
        tokenizer=meta.get("tokenizer"),
        source=meta.get("source"),
    )


_MAX_ID_CHUNK = 1 << 26  # tokens per read of the max-id scan (128 MiB of uint16)


def max_token_id(path: str | Path, meta: TokenFileMeta, cache_dir: str | Path) -> int:
    """The largest token id in the file (-1 if empty), scanned once and kept in `cache_dir/token_max/`
    under the file's path, size and modification time, so a changed file is scanned again."""
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    cache = (
        Path(cache_dir).expanduser()
        / "token_max"
        / f"{_key(path, stat.st_size, stat.st_mtime_ns, meta.dtype)}.json"
    )
    with contextlib.suppress(OSError, ValueError, KeyError):
        return int(json.loads(cache.read_text(encoding="utf-8"))["max_id"])
    tokens = np.memmap(path, dtype=np.dtype(meta.dtype).newbyteorder("<"), mode="r", shape=(meta.num_tokens,))
    max_id = -1
    for start in range(0, meta.num_tokens, _MAX_ID_CHUNK):
        max_id = max(max_id, int(tokens[start : start + _MAX_ID_CHUNK].max()))
    # A read-only cache directory only costs a rescan next time.
    with contextlib.suppress(OSError):
        cache.parent.mkdir(parents=True, exist_ok=True)
        record = json.dumps({"path": str(path), "max_id": max_id}).encode()
        _atomic_write(cache, lambda f: f.write(record))
    return max_id


# ---- documents ----


def list_document_files(path: str | Path, *, key: str = "data.path") -> list[Path]:
    """A file itself, or every document file under a directory in sorted order (deterministic token order)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{key}: {path} does not exist")
    if path.is_file():
        return [path]
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix in DOCUMENT_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise UserError(f"{key}: {path} holds no {'/'.join(DOCUMENT_SUFFIXES)} files")
    return files


def _record_text(record: Any, text_field: str, where: str, field_key: str) -> str:
    if not isinstance(record, dict):
        raise UserError(
            f"{where}: expected a JSON object with field {text_field!r}, got {type(record).__name__}"
        )
    if text_field not in record:
        fields = ", ".join(map(repr, list(record)[:10]))
        raise UserError(
            f"{where}: no field {text_field!r} (fields: {fields}); set {field_key} to the field holding the text"
        )
    text = record[text_field]
    if not isinstance(text, str):
        raise UserError(f"{where}: field {text_field!r} is a {type(text).__name__}, not a string")
    return text


def _jsonl_texts(path: Path, text_field: str, field_key: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        head = f.read(1024).lstrip()
        f.seek(0)
        if path.suffix == ".json" and head.startswith("["):
            records = json.load(f)
            for i, record in enumerate(records):
                yield _record_text(record, text_field, f"{path} item {i}", field_key)
            return
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise UserError(
                    f"{path}:{lineno} is not valid JSON ({e}); each line must be one JSON object (JSON lines)"
                ) from None
            yield _record_text(record, text_field, f"{path}:{lineno}", field_key)


def _parquet_texts(path: Path, text_field: str, field_key: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"reading {path} needs the optional `pyarrow` package: pip install pyarrow") from e
    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        fields = ", ".join(map(repr, pf.schema_arrow.names[:10]))
        raise UserError(
            f"{path}: no column {text_field!r} (columns: {fields}); set {field_key} to the column holding the text"
        )
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text


def iter_documents(
    files: Iterable[Path], *, text_field: str, field_key: str = "data.text_field"
) -> Iterator[str]:
    """Texts of JSON-lines (.jsonl, .json; a .json may also be one array), parquet and plain-text files.

    `field_key` is how error messages name the text-field setting (the CLI passes its flag).
    """
    for path in files:
        if path.suffix == ".parquet":
            yield from _parquet_texts(path, text_field, field_key)
        elif path.suffix in (".jsonl", ".json"):
            yield from _jsonl_texts(path, text_field, field_key)
        else:
            try:
                yield path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise UserError(
                    f"{path} is not UTF-8 text ({e}); documents come from .jsonl/.json/.parquet or text files "
                    "(a token .bin is read with data.source=tokens)"
                ) from None


# ---- cached sources ----


def _key(*parts: object) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:16]


def stdlib_files() -> list[Path]:
    """The standard library's .py files, sorted by relative path; installed packages are not the stdlib."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")]
        files += [Path(dirpath, name) for name in filenames if name.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _stdlib_texts(files: list[Path]) -> Iterator[str]:
    for path in files:
        try:
            yield path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            # The stdlib ships a few deliberately mis-encoded test files; skipping them is deterministic.
            continue


def stdlib_token_path(cache_dir: str | Path, tokenizer: Tokenizer) -> tuple[Path, list[Path]]:
    """Where the stdlib corpus for this interpreter and tokenizer is cached, and the files it is built from."""
    files = stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    listing = "\n".join(f"{p.relative_to(root).as_posix()}\t{p.stat().st_size}" for p in files)
    version = ".".join(map(str, sys.version_info[:3]))
    key = _key(_BUILDER_VERSION, listing, tokenizer.fingerprint())
    return Path(cache_dir).expanduser() / f"stdlib-{version}-{key}.bin", files


def ensure_stdlib_tokens(cache_dir: str | Path, tokenizer: Tokenizer) -> Path:
    bin_path, files = stdlib_token_path(cache_dir, tokenizer)
    if not sidecar_path(bin_path).is_file():
        logger.info("building the stdlib corpus from %d files into %s", len(files), bin_path)
        source = f"stdlib:{sysconfig.get_paths()['stdlib']}"
        write_token_file(bin_path, _stdlib_texts(files), tokenizer, source=source)
    return bin_path


def hf_token_path(
    path: str | Path, *, text_field: str, cache_dir: str | Path, tokenizer: Tokenizer
) -> tuple[Path, list[Path]]:
    """Cache location keyed by the input files (paths, sizes, mtimes), the tokenizer and the text field."""
    root = Path(path).expanduser().resolve()
    files = list_document_files(root)
    stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = _key(_BUILDER_VERSION, stats, tokenizer.fingerprint(), text_field)
    return Path(cache_dir).expanduser() / f"hf-{root.stem or 'data'}-{key}.bin", files


def ensure_hf_tokens(
    path: str | Path, *, text_field: str, cache_dir: str | Path, tokenizer: Tokenizer
) -> Path:
    bin_path, files = hf_token_path(path, text_field=text_field, cache_dir=cache_dir, tokenizer=tokenizer)
    if not sidecar_path(bin_path).is_file():
        logger.info("tokenizing %d files under %s into %s", len(files), path, bin_path)
        source = str(Path(path).expanduser().resolve())
        write_token_file(bin_path, iter_documents(files, text_field=text_field), tokenizer, source=source)
    return bin_path
