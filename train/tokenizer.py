"""Tokenizers for the data pipeline: the built-in byte tokenizer and Hugging Face `tokenizer.json` files.

The pipeline only ever needs to turn documents into ids once (when a token file is built) and back into text for
samples; everything after that reads token files. So a tokenizer here is the small `Tokenizer` protocol, and the
`tokenizers` library is imported only when a `tokenizer.json` is actually used.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from treadle.train.errors import UserError

BYTE_TOKENIZER = "byte"

# Tried in order when `data.eos_id` is not given and tokenizer_config.json does not name one. `<|end_of_text|>`
# precedes chat end-of-turn markers (Llama 3's `<|eot_id|>`, Qwen's `<|im_end|>`), which are deliberately absent:
# documents in a pretraining stream end with the end-of-text token.
EOS_TOKEN_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|eos|>", "[EOS]")


class Tokenizer(Protocol):
    name: str  # what the token file's metadata records as "tokenizer"
    vocab_size: int
    eos_id: int
    bos_id: int | None

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...

    def fingerprint(self) -> str:
        """A string that changes whenever encoding could change; part of token-cache keys."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then EOS = 256 and BOS = 257 (vocab 258): needs no file and never fails."""

    name = BYTE_TOKENIZER
    vocab_size = 258
    eos_id = 256
    bos_id = 257

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        # "replace" because JSON may carry lone surrogates ("\ud800"), which have no UTF-8 encoding.
        return [np.frombuffer(t.encode("utf-8", errors="replace"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special_tokens: bool = False) -> str:
        """Bytes back to text; EOS/BOS show as `<|eos|>`/`<|bos|>` so document boundaries stay visible."""
        out: list[str] = []
        run = bytearray()
        for i in np.asarray(ids, dtype=np.int64).tolist():
            if 0 <= i < 256:
                run.append(i)
                continue
            # Split runs only at special ids so multi-byte characters still decode as one.
            out.append(run.decode("utf-8", errors="replace"))
            run.clear()
            if not skip_special_tokens:
                out.append({self.eos_id: "<|eos|>", self.bos_id: "<|bos|>"}.get(i, f"<|{i}|>"))
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def fingerprint(self) -> str:
        return "byte-v1"


class HFTokenizer:
    """A Hugging Face `tokenizer.json`, run through the `tokenizers` library (Rust, batch-parallel)."""

    def __init__(self, path: str | Path, *, eos_id: int | None = None) -> None:
        path = Path(path).expanduser()
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise UserError(
                f"data.tokenizer: {path} does not exist; set data.tokenizer to 'byte' or to the path of a "
                "Hugging Face tokenizer.json (or the directory holding it)"
            )
        try:
            from tokenizers import Tokenizer as _Tokenizer
        except ImportError as e:
            raise ImportError(
                f"data.tokenizer={path} needs the optional `tokenizers` package: pip install tokenizers"
            ) from e
        self.path = path.resolve()
        self.name = str(self.path)
        try:
            self._tok = _Tokenizer.from_file(str(self.path))
        except Exception as e:  # the Rust side raises a bare Exception for a malformed file
            raise UserError(f"data.tokenizer: {path} is not a valid Hugging Face tokenizer.json ({e})") from e
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._find_eos(eos_id)
        self.bos_id = None
        self._file_sha = hashlib.sha256(self.path.read_bytes()).hexdigest()

    def _find_eos(self, eos_id: int | None) -> int:
        if eos_id is not None:
            if not 0 <= eos_id < self.vocab_size:
                raise UserError(
                    f"data.eos_id={eos_id} is outside the vocabulary of {self.path} (size {self.vocab_size})"
                )
            return eos_id
        for name in (*self._configured_eos(), *EOS_TOKEN_NAMES):
            found = self._tok.token_to_id(name)
            if found is not None:
                return found
        raise UserError(
            f"data.tokenizer: found no end-of-text token in {self.path} (tried {', '.join(EOS_TOKEN_NAMES)}); "
            "set data.eos_id to the id that separates documents"
        )

    def _configured_eos(self) -> list[str]:
        """The `eos_token` of a tokenizer_config.json beside the tokenizer, as Hugging Face repos ship it."""
        config = self.path.with_name("tokenizer_config.json")
        try:
            eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
        except (OSError, ValueError, AttributeError):
            return []
        if isinstance(eos, dict):
            eos = eos.get("content")
        return [eos] if isinstance(eos, str) else []

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.uint32) for e in encodings]

    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, character offset where each token starts); special tokens in `text` are recognised."""
        encoding = self._tok.encode(text, add_special_tokens=False)
        starts = np.asarray([start for start, _ in encoding.offsets], dtype=np.int64)
        return np.asarray(encoding.ids, dtype=np.int64), starts

    def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(
            np.asarray(ids, dtype=np.int64).tolist(), skip_special_tokens=skip_special_tokens
        )

    def fingerprint(self) -> str:
        return f"hf-{self._file_sha}-eos{self.eos_id}"


def load_tokenizer(spec: str, *, eos_id: int | None = None) -> Tokenizer:
    """`spec` is `data.tokenizer`: "byte" or a path to a tokenizer.json; `eos_id` overrides a file's EOS."""
    if spec == BYTE_TOKENIZER:
        if eos_id is not None and eos_id != ByteTokenizer.eos_id:
            raise UserError(
                f"data.eos_id={eos_id} conflicts with the byte tokenizer, whose EOS is always "
                f"{ByteTokenizer.eos_id}; leave data.eos_id unset"
            )
        return ByteTokenizer()
    return HFTokenizer(spec, eos_id=eos_id)


def decode(ids: Sequence[int] | np.ndarray, *, skip_special_tokens: bool = False) -> str:
    """Byte-tokenizer ids back to text (the default corpus), e.g. for printing generated samples."""
    return ByteTokenizer().decode(ids, skip_special_tokens=skip_special_tokens)
