"""The data pipeline the trainer sees: config, packed token datasets, batches, and the step loader.

Shape legend: B micro-batch rows, S sequence length (`data.seq_len`).

Every source (`stdlib`, `tokens`, `hf`) reduces to one flat token file read through `np.memmap` (see
`treadle.train.corpus`). Sample i is the window tokens[i*S : i*S + S + 1]; windows overlap by one token so the
labels are the next tokens. The last `val_fraction` of the windows is the validation split.

The loader is stateless apart from one global count: the sample stream is a pure function of (seed, global sample
index), and DP rank r takes fixed rows of each global batch. Checkpointing `consumed_samples` therefore resumes
exactly, and resuming with another DP size or micro-batch size continues the same global stream.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from treadle.models.ops import IGNORE_INDEX
from treadle.train.batch import Batch
from treadle.train.corpus import (
    TOKEN_DTYPES,
    TokenFileMeta,
    ensure_hf_tokens,
    ensure_stdlib_tokens,
    max_token_id,
    read_token_meta,
)
from treadle.train.errors import UserError
from treadle.train.sft import PackedConversations, ensure_sft_tokens
from treadle.train.tokenizer import BYTE_TOKENIZER, HFTokenizer, load_tokenizer

logger = logging.getLogger(__name__)

SOURCES = ("stdlib", "tokens", "hf", "chat")


@dataclass(kw_only=True)
class DataConfig:
    source: str = "stdlib"  # stdlib | tokens | hf | chat (SFT conversations, see `treadle.train.sft`)
    path: str | None = None  # tokens: the .bin file; hf, chat: a .jsonl/.json/.parquet file or a directory
    tokenizer: str = "byte"  # "byte" (built in) or a path to a Hugging Face tokenizer.json
    text_field: str = "text"  # hf: the field holding the document text
    messages_field: str = "messages"  # chat: the field holding the list of {role, content} messages
    chat_template: str | None = (
        None  # chat: model directory whose chat template renders them (default: tokenizer's)
    )
    token_dtype: str = "auto"  # tokens without a .json sidecar: uint16 | uint32 (auto = read sidecar)
    eos_id: int | None = None  # tokens without a sidecar: the document separator id
    seq_len: int = 256
    document_mask: bool = True  # positions restart per document and attention is masked per document
    val_fraction: float = 0.005  # held-out tail of the token stream
    shuffle: bool = True
    cache_dir: str = "~/.cache/treadle"


def validate_data_config(cfg: DataConfig) -> None:
    """Single-key checks; raises ValueError naming the key and the fix."""
    if cfg.source not in SOURCES:
        raise UserError(f"data.source={cfg.source!r} is not one of {', '.join(SOURCES)}")
    if cfg.source == "chat" and cfg.tokenizer == BYTE_TOKENIZER:
        raise UserError(
            "data.source=chat needs the model's Hugging Face tokenizer and chat template; set data.tokenizer to the "
            "model directory (or its tokenizer.json)"
        )
    if cfg.source in ("tokens", "hf", "chat") and not cfg.path:
        what = (
            "the .bin token file" if cfg.source == "tokens" else "a .jsonl/.json/.parquet file or a directory"
        )
        raise UserError(f"data.path is required for data.source={cfg.source}; set it to {what}")
    if cfg.source == "stdlib" and cfg.path:
        raise UserError(
            f"data.path={cfg.path} is set, but data.source=stdlib trains on the embedded corpus and would ignore "
            "it; fix: add data=tokens (a .bin token file from launch/prepare_data.py) or data=hf (documents, "
            "with data.tokenizer), or drop data.path"
        )
    if cfg.seq_len < 1:
        raise UserError(f"data.seq_len={cfg.seq_len} must be at least 1")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise UserError(f"data.val_fraction={cfg.val_fraction} must be in [0, 1)")
    if cfg.token_dtype not in ("auto", *TOKEN_DTYPES):
        raise UserError(f"data.token_dtype={cfg.token_dtype!r} is not one of auto, {', '.join(TOKEN_DTYPES)}")


def pack_windows(windows_BS1: torch.Tensor, *, eos_id: int | None, document_mask: bool) -> Batch:
    """Turn [B, S+1] token windows into a Batch: inputs, next-token labels and per-document positions."""
    tokens_BS = windows_BS1[:, :-1].contiguous()
    labels_BS = windows_BS1[:, 1:].clone()
    num_rows, seq_len = tokens_BS.shape
    arange_BS = torch.arange(seq_len).expand(num_rows, seq_len)
    if not document_mask:
        return Batch(tokens_BS, labels_BS, arange_BS.contiguous(), None)
    assert eos_id is not None, "document_mask needs an eos_id"
    is_eos_BS = tokens_BS == eos_id
    eos_BS = is_eos_BS.long()
    # EOS belongs to the document it ends, so a position's document is the number of EOS strictly before it.
    doc_ids_BS = eos_BS.cumsum(1) - eos_BS
    starts_BS = torch.zeros_like(is_eos_BS)
    starts_BS[:, 0] = True
    starts_BS[:, 1:] = is_eos_BS[:, :-1]
    doc_start_BS = torch.where(starts_BS, arange_BS, 0).cummax(1).values
    # The label after an EOS is the next document's first token, which nothing in this document can predict.
    labels_BS[is_eos_BS] = IGNORE_INDEX
    return Batch(tokens_BS, labels_BS, arange_BS - doc_start_BS, doc_ids_BS)


class Dataset(Protocol):
    def __len__(self) -> int: ...

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> Batch: ...


class PackedTokens:
    """Random access to the windows [first_window, first_window + num_windows) of a flat token array."""

    def __init__(
        self,
        tokens: np.ndarray,
        *,
        seq_len: int,
        eos_id: int | None,
        document_mask: bool,
        first_window: int = 0,
        num_windows: int | None = None,
    ) -> None:
        total = (len(tokens) - 1) // seq_len
        num_windows = total - first_window if num_windows is None else num_windows
        assert first_window >= 0 and first_window + num_windows <= total, (first_window, num_windows, total)
        assert eos_id is not None or not document_mask, "document_mask needs an eos_id"
        self.tokens = tokens
        self.seq_len = seq_len
        self.eos_id = eos_id
        self.document_mask = document_mask
        self.first_window = first_window
        self.num_windows = num_windows

    def __len__(self) -> int:
        return self.num_windows

    def window(self, index: int) -> np.ndarray:
        """The S+1 raw tokens of sample `index` (inputs and labels)."""
        if not 0 <= index < self.num_windows:
            raise IndexError(f"sample {index} out of range for {self.num_windows} samples")
        start = (self.first_window + index) * self.seq_len
        return np.asarray(self.tokens[start : start + self.seq_len + 1])

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> Batch:
        # Contiguous slices of the memmap, one per row: each is a single sequential read.
        windows = np.stack([self.window(int(i)) for i in indices]).astype(np.int64)
        return pack_windows(torch.from_numpy(windows), eos_id=self.eos_id, document_mask=self.document_mask)


class StepLoader:
    """This DP rank's micro-batches for each optimizer step, from a global stream fixed by (seed, sample index).

    Global sample g is `perm(seed, g // N)[g % N]` over N samples, so epochs wrap with a fresh permutation.
    Step t covers global samples [consumed, consumed + global_batch_size); rank r's micro-batch m is rows
    [(r * grad_accum + m) * micro_batch_size, +micro_batch_size) of that global batch.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        shuffle: bool,
    ) -> None:
        assert len(dataset) > 0, "empty dataset"
        assert 0 <= dp_rank < dp_size, (dp_rank, dp_size)
        assert global_batch_size % (micro_batch_size * dp_size) == 0, (
            global_batch_size,
            micro_batch_size,
            dp_size,
        )
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.grad_accum = global_batch_size // (micro_batch_size * dp_size)
        self.seed = seed
        self.shuffle = shuffle
        self.consumed_samples = 0
        self._perms: dict[int, np.ndarray] = {}

    @property
    def epoch(self) -> int:
        return self.consumed_samples // len(self.dataset)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            # A global batch spans at most two epochs, so two cached permutations suffice.
            if len(self._perms) >= 2:
                del self._perms[min(self._perms)]
            rng = np.random.default_rng([self.seed % 2**63, epoch])
            self._perms[epoch] = rng.permutation(len(self.dataset))
        return self._perms[epoch]

    def sample_indices(self, global_indices: np.ndarray) -> np.ndarray:
        """Dataset indices of global sample indices (the stream every rank and layout agrees on)."""
        num_samples = len(self.dataset)
        epochs, offsets = np.divmod(np.asarray(global_indices, dtype=np.int64), num_samples)
        if not self.shuffle:
            return offsets
        out = np.empty_like(offsets)
        for epoch in np.unique(epochs).tolist():
            sel = epochs == epoch
            out[sel] = self._permutation(epoch)[offsets[sel]]
        return out

    def next_step(self) -> list[Batch]:
        rows = self.grad_accum * self.micro_batch_size
        first = self.consumed_samples + self.dp_rank * rows
        indices = self.sample_indices(np.arange(first, first + rows))
        self.consumed_samples += self.global_batch_size
        mb = self.micro_batch_size
        return [self.dataset.get_batch(indices[m * mb : (m + 1) * mb]) for m in range(self.grad_accum)]

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consumed_samples = int(state["consumed_samples"])


def eval_batches(
    dataset: Dataset, micro_batch_size: int, dp_rank: int, dp_size: int, num_batches: int | None = None
) -> Iterator[Batch]:
    """The held-out samples [0, num_batches × micro_batch_size) of the validation split (the whole split
    with `num_batches=None`), the same samples whatever the data-parallel size, so the held-out loss does not
    depend on the number of processes. They are dealt out in micro-batches: rank r's batch b holds samples
    [(b * dp_size + r) * micro_batch_size, +micro_batch_size).

    Every rank yields the same number of batches, as the eval loop's collectives need: rows past the last
    sample are filled with repeats whose labels are all IGNORE_INDEX, so they count no tokens. Sample indices
    wrap around a split smaller than what is asked for (those repeats do count, on every layout alike).
    """
    num_samples = len(dataset)
    if num_samples == 0:
        return
    total = num_samples if num_batches is None else num_batches * micro_batch_size
    for b in range(math.ceil(total / (micro_batch_size * dp_size))):
        first = (b * dp_size + dp_rank) * micro_batch_size
        indices = np.arange(first, first + micro_batch_size)
        batch = dataset.get_batch(indices % num_samples)
        batch.labels[torch.from_numpy(indices >= total)] = IGNORE_INDEX
        yield batch


def _token_file(cfg: DataConfig) -> tuple[Path, TokenFileMeta]:
    """The token file `cfg` reads, built into `cfg.cache_dir` first if its source needs that."""
    if cfg.source == "tokens":
        assert cfg.path is not None
        path = Path(cfg.path).expanduser()
        return path, read_token_meta(path, token_dtype=cfg.token_dtype, eos_id=cfg.eos_id)
    tokenizer = load_tokenizer(cfg.tokenizer, eos_id=cfg.eos_id)
    if cfg.source == "stdlib":
        path = ensure_stdlib_tokens(cfg.cache_dir, tokenizer)
    else:
        assert cfg.path is not None
        path = ensure_hf_tokens(
            cfg.path, text_field=cfg.text_field, cache_dir=cfg.cache_dir, tokenizer=tokenizer
        )
    return path, read_token_meta(path)


def tokenizer_vocab_size(cfg: DataConfig) -> int | None:
    """The vocabulary the data was (or will be) tokenized with; None for a token file without a sidecar."""
    validate_data_config(cfg)
    if cfg.source == "tokens":
        assert cfg.path is not None
        return read_token_meta(cfg.path, token_dtype=cfg.token_dtype, eos_id=cfg.eos_id).vocab_size
    return load_tokenizer(cfg.tokenizer, eos_id=cfg.eos_id).vocab_size


def _sft_cache(cfg: DataConfig) -> tuple[Path, HFTokenizer]:

    assert cfg.path is not None
    tokenizer = load_tokenizer(cfg.tokenizer, eos_id=cfg.eos_id)
    assert isinstance(tokenizer, HFTokenizer)
    template = cfg.chat_template or str(tokenizer.path.parent)
    cache = ensure_sft_tokens(
        cfg.path,
        field=cfg.messages_field,
        cache_dir=cfg.cache_dir,
        tokenizer=tokenizer,
        chat_template=template,
    )
    return cache, tokenizer


def prepare_data(cfg: DataConfig) -> None:
    """Build any cache (stdlib corpus, hf tokenization); idempotent and atomic. The trainer calls it on local rank 0
    before a barrier, then every rank calls build_datasets."""
    validate_data_config(cfg)
    if cfg.source == "chat":
        _sft_cache(cfg)
    else:
        # The max-id scan of `build_datasets`' vocabulary check, done here once for every rank.
        max_token_id(*_token_file(cfg), cfg.cache_dir)


def _num_val(num: int, val_fraction: float) -> int:
    """Held-out samples: at least one when any fraction is asked for. The epsilon keeps float noise
    (200 * 0.07 = 14.000000000000002) from taking an extra sample."""
    return max(1, math.ceil(num * val_fraction - 1e-9)) if val_fraction > 0 else 0


def _chat_datasets(cfg: DataConfig, vocab_size: int) -> tuple[Dataset, Dataset]:

    cache, tokenizer = _sft_cache(cfg)
    if tokenizer.vocab_size > vocab_size:
        raise UserError(
            f"data.tokenizer={cfg.tokenizer!r} has a vocabulary of {tokenizer.vocab_size} tokens but "
            f"model.vocab_size={vocab_size}; use the model's own tokenizer"
        )
    rows = PackedConversations(cache, seq_len=cfg.seq_len, pad_id=tokenizer.eos_id)
    num_rows = len(rows)
    num_val = _num_val(num_rows, cfg.val_fraction)
    if num_rows - num_val < 1:
        raise UserError(
            f"data.val_fraction={cfg.val_fraction} leaves no training rows: {cfg.path} packs into {num_rows} rows "
            f"of data.seq_len={cfg.seq_len}; lower data.val_fraction or use more conversations"
        )
    train, val = rows.subset(0, num_rows - num_val), rows.subset(num_rows - num_val, num_val)
    logger.info("data: %s: %d train / %d val rows of %d tokens", cache, len(train), len(val), cfg.seq_len)
    return train, val


def _check_vocab(cfg: DataConfig, meta: TokenFileMeta, path: Path, vocab_size: int) -> None:
    tokenized_with = (
        f"data.tokenizer={cfg.tokenizer!r}" if cfg.source != "tokens" else f"data.path={str(path)!r}"
    )
    if meta.vocab_size is not None and meta.vocab_size > vocab_size:
        raise UserError(
            f"{tokenized_with} has a vocabulary of {meta.vocab_size} tokens but model.vocab_size={vocab_size}; "
            f"set model.vocab_size to at least {meta.vocab_size} or choose a data.tokenizer that fits the model"
        )
    if meta.eos_id is not None and not 0 <= meta.eos_id < vocab_size:
        raise UserError(f"data.eos_id={meta.eos_id} is outside model.vocab_size={vocab_size}")
    max_id = max_token_id(path, meta, cfg.cache_dir)
    if max_id >= vocab_size:
        fix = (
            "re-tokenize it with the model's tokenizer (launch/prepare_data.py --tokenizer)"
            if cfg.source == "tokens"
            else "choose a data.tokenizer that fits the model"
        )
        raise UserError(
            f"token file {path} holds token id {max_id}, past model.vocab_size={vocab_size} (ids must be < "
            f"model.vocab_size); fix: set model.vocab_size to at least {max_id + 1}, or {fix}"
        )


def build_datasets(cfg: DataConfig, *, vocab_size: int) -> tuple[Dataset, Dataset]:
    """(train, val). Raises ValueError if the tokenizer's vocab exceeds model vocab_size (name model.vocab_size
    and data.tokenizer).

    Builds the cache itself if `prepare_data` has not (atomically, so concurrent ranks are safe, only slower).
    Every token file's largest id is checked against model.vocab_size (scanned once, cached in data.cache_dir).
    """
    validate_data_config(cfg)
    if cfg.source == "chat":
        return _chat_datasets(cfg, vocab_size)
    path, meta = _token_file(cfg)
    _check_vocab(cfg, meta, path, vocab_size)
    if cfg.document_mask and meta.eos_id is None:
        raise UserError(
            f"data.eos_id: {path} has no sidecar naming its document separator; set data.eos_id, or set "
            "data.document_mask=false"
        )
    if meta.num_tokens < cfg.seq_len + 1:
        raise UserError(
            f"data.seq_len: {path} has {meta.num_tokens} tokens, fewer than one sequence of data.seq_len + 1 = "
            f"{cfg.seq_len + 1}; lower data.seq_len or use more data"
        )
    tokens = np.memmap(path, dtype=np.dtype(meta.dtype).newbyteorder("<"), mode="r", shape=(meta.num_tokens,))
    num_windows = (meta.num_tokens - 1) // cfg.seq_len
    num_val = _num_val(num_windows, cfg.val_fraction)
    num_train = num_windows - num_val
    if num_train < 1:
        raise UserError(
            f"data.val_fraction={cfg.val_fraction} leaves no training sequences: {path} holds only {num_windows} "
            f"sequences of data.seq_len={cfg.seq_len}; lower data.val_fraction or data.seq_len, or use more data"
        )
    common: dict[str, Any] = {
        "seq_len": cfg.seq_len,
        "eos_id": meta.eos_id,
        "document_mask": cfg.document_mask,
    }
    train = PackedTokens(tokens, first_window=0, num_windows=num_train, **common)
    val = PackedTokens(tokens, first_window=num_train, num_windows=num_val, **common)
    logger.info(
        "data: %s (%d tokens, %s): %d train / %d val sequences of %d",
        path,
        meta.num_tokens,
        meta.tokenizer,
        num_train,
        num_val,
        cfg.seq_len,
    )
    return train, val
