"""Supervised fine-tuning data: chat conversations rendered with the model's own chat template, loss on the
assistant's tokens only, whole conversations packed into rows with document boundaries.

Input: JSON lines (or a .json array, or parquet) whose `data.messages_field` holds a list of
`{"role": "system"|"user"|"assistant"|"tool", "content": str}`. Each conversation is rendered with the Jinja chat
template of the model directory (`tokenizer_config.json`'s `chat_template` or `chat_template.jinja`, the way
transformers' `apply_chat_template` does) and tokenized once with its `tokenizer.json`.

Which tokens are the assistant's: for assistant turn i, the template's rendering of turns [0, i) with the
generation prompt, and of turns [0, i], are both prefixes of the whole conversation's rendering; the characters
between them are the reply (with its end-of-turn marker, so the model learns to stop). A token is trained on when
it starts inside such a span. Templates that rewrite earlier turns (so renderings are not prefixes) are refused
with the conversation named.

Cache: `<cache_dir>/sft-<name>-<key>/` holds tokens.npy, assistant.npy (bool per token) and starts.npy
(conversation offsets), written into a temporary directory and renamed, keyed on the files, the tokenizer, the
template and the field. Packing: conversations are placed whole, in order, into rows of seq_len + 1 tokens (a
conversation that does not fit starts the next row; one longer than a row is cut to a row); the rest of a row is
padding that takes no loss. Positions restart and attention is masked per conversation.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from treadle.models.ops import IGNORE_INDEX
from treadle.train.batch import Batch
from treadle.train.corpus import _key, list_document_files
from treadle.train.errors import UserError
from treadle.train.tokenizer import HFTokenizer

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
_SFT_VERSION = "1"


def load_chat_template(model_dir: str | Path) -> tuple[str, dict[str, str]]:
    """(template source, special-token strings for it) from a Hugging Face model or tokenizer directory."""
    model_dir = Path(model_dir).expanduser()
    if model_dir.is_file():
        model_dir = model_dir.parent
    config_path = model_dir / "tokenizer_config.json"
    config: dict[str, Any] = {}
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
    template = config.get("chat_template")
    if (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not isinstance(template, str):
        raise UserError(
            f"data.chat_template: {model_dir} has no chat template (neither tokenizer_config.json's chat_template "
            "nor chat_template.jinja); point data.chat_template at a model directory that has one"
        )
    special = {}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            special[name] = value
    return template, special


class ChatRenderer:
    """A chat template compiled once, rendered the way transformers does (sandboxed Jinja, trimmed blocks)."""

    def __init__(self, template: str, special_tokens: dict[str, str]) -> None:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
        self.template = env.from_string(template)
        self.special = special_tokens

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = False) -> str:
        return self.template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self.special
        )


def _check_messages(record: Any, field: str, where: str) -> list[dict[str, Any]]:
    if not isinstance(record, dict) or field not in record:
        found = ", ".join(map(repr, list(record)[:10])) if isinstance(record, dict) else type(record).__name__
        raise UserError(f"{where}: no field {field!r} (found: {found}); set data.messages_field to the field "
                         "holding the list of chat messages")  # fmt: skip
    messages = record[field]
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: field {field!r} must be a non-empty list of messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise UserError(f"{where}: {field}[{i}] must be an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise UserError(f"{where}: {field}[{i}].role={message['role']!r} is not one of {ROLES}")
        if not isinstance(message["content"], str):
            raise UserError(f"{where}: {field}[{i}].content must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: field {field!r} has no assistant message, so nothing would be trained on")
    return messages


def iter_conversations(files: list[Path], field: str) -> Iterator[tuple[list[dict[str, Any]], str]]:
    """(messages, where) for every record of JSON-lines, JSON-array or parquet files."""
    for path in files:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if field not in table.column_names:
                raise UserError(f"{path}: no column {field!r} (columns: {table.column_names[:10]}); set "
                                 "data.messages_field")  # fmt: skip
            for i, messages in enumerate(table.column(field).to_pylist()):
                yield _check_messages({field: messages}, field, f"{path} row {i}"), f"{path} row {i}"
            continue
        with open(path, encoding="utf-8") as f:
            if path.suffix == ".json" and f.read(1024).lstrip().startswith("["):
                f.seek(0)
                for i, record in enumerate(json.load(f)):
                    yield _check_messages(record, field, f"{path} item {i}"), f"{path} item {i}"
                continue
            f.seek(0)
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    record = json.loads(line)
                except ValueError as e:
                    raise UserError(f"{where} is not valid JSON ({e})") from None
                yield _check_messages(record, field, where), where


def assistant_spans(renderer: ChatRenderer, messages: list[dict[str, Any]], where: str) -> tuple[str, list[tuple[int, int]]]:  # fmt: skip
    """The rendered conversation and the character spans of its assistant replies."""
    text = renderer.render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = renderer.render(messages[:i], add_generation_prompt=True)
        through = renderer.render(messages[: i + 1])
        if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
            raise UserError(
                f"{where}: the chat template does not render this conversation turn by turn (rendering turns "
                f"0..{i} is not a prefix of the whole conversation), so assistant tokens cannot be located; "
                "use data.chat_template with a template that keeps earlier turns unchanged"
            )
        spans.append((len(before), len(through)))
    return text, spans


def tokenize_conversation(
    tokenizer: HFTokenizer, renderer: ChatRenderer, messages: list[dict[str, Any]], where: str
) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, is-assistant flag per token)."""
    text, spans = assistant_spans(renderer, messages, where)
    ids, starts = tokenizer.encode_with_offsets(text)
    trained = np.zeros(len(ids), dtype=bool)
    for lo, hi in spans:
        trained |= (starts >= lo) & (starts < hi)
    return ids, trained


def sft_cache_dir(path: str | Path, *, field: str, cache_dir: str | Path, tokenizer: HFTokenizer, template: str) -> tuple[Path, list[Path]]:  # fmt: skip
    root = Path(path).expanduser().resolve()
    files = list_document_files(root)
    stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = _key(_SFT_VERSION, stats, tokenizer.fingerprint(), template, field)
    return Path(cache_dir).expanduser() / f"sft-{root.stem or 'data'}-{key}", files


def ensure_sft_tokens(path: str | Path, *, field: str, cache_dir: str | Path, tokenizer: HFTokenizer,
                      chat_template: str | Path) -> Path:  # fmt: skip
    """Tokenize every conversation once (atomically; concurrent builders are safe) and return the cache dir."""
    template, special = load_chat_template(chat_template)
    out, files = sft_cache_dir(path, field=field, cache_dir=cache_dir, tokenizer=tokenizer, template=template)
    if (out / "starts.npy").is_file():
        return out
    renderer = ChatRenderer(template, special)
    ids_parts, mask_parts, lengths = [], [], []
    for messages, where in iter_conversations(files, field):
        ids, trained = tokenize_conversation(tokenizer, renderer, messages, where)
        if ids.size and ids.max() >= tokenizer.vocab_size:
            raise UserError(f"{where}: token id {ids.max()} outside the tokenizer's vocabulary")
        ids_parts.append(ids)
        mask_parts.append(trained)
        lengths.append(len(ids))
    if not lengths:
        raise UserError(f"data.path={path}: no conversations found")
    tmp = out.with_name(f".{out.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir(parents=True)
    dtype = np.uint32 if tokenizer.vocab_size > 2**16 else np.uint16
    np.save(tmp / "tokens.npy", np.concatenate(ids_parts).astype(dtype))
    np.save(tmp / "assistant.npy", np.concatenate(mask_parts))
    np.save(tmp / "starts.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    try:
        os.replace(tmp, out)
    except OSError:  # another rank or node finished first; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("tokenized %d conversations (%d tokens) into %s", len(lengths), sum(lengths), out)
    return out


def pack_rows(lengths: np.ndarray, row_len: int) -> np.ndarray:
    """[num_rows + 1] offsets into the conversation list: row r holds conversations rows[r]..rows[r+1]."""
    bounds = [0]
    used = 0
    for i, n in enumerate(lengths.tolist()):
        if used and used + n > row_len:
            bounds.append(i)
            used = 0
        used += min(n, row_len)
    bounds.append(len(lengths))
    return np.asarray(bounds, dtype=np.int64)


class PackedConversations:
    """Rows of whole conversations; `get_batch` gives inputs, assistant-only labels, positions and doc ids."""

    def __init__(self, cache: Path, *, seq_len: int, pad_id: int) -> None:
        self.tokens = np.load(cache / "tokens.npy", mmap_mode="r")
        self.trained = np.load(cache / "assistant.npy", mmap_mode="r")
        self.starts = np.load(cache / "starts.npy")
        self.seq_len, self.pad_id = seq_len, pad_id
        self.rows = pack_rows(np.diff(self.starts), seq_len + 1)

    def subset(self, first_row: int, num_rows: int) -> PackedConversations:
        """Rows [first_row, first_row + num_rows), sharing this set's arrays (train/validation splits)."""
        view = copy.copy(self)
        view.rows = self.rows[first_row : first_row + num_rows + 1]
        return view

    def __len__(self) -> int:
        return len(self.rows) - 1

    def row(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, trained, doc id) of one row, S + 1 long, padding after the last conversation."""
        row_len = self.seq_len + 1
        ids = np.full(row_len, self.pad_id, dtype=np.int64)
        trained = np.zeros(row_len, dtype=bool)
        docs = np.zeros(row_len, dtype=np.int64)
        used = 0
        first, last = int(self.rows[index]), int(self.rows[index + 1])
        for doc, conv in enumerate(range(first, last)):
            lo = int(self.starts[conv])
            n = min(int(self.starts[conv + 1]) - lo, row_len - used)
            ids[used : used + n] = self.tokens[lo : lo + n]
            trained[used : used + n] = self.trained[lo : lo + n]
            docs[used : used + n] = doc
            used += n
        docs[used:] = last - first  # the padding is a document of its own
        return ids, trained, docs

    def get_batch(self, indices: Any) -> Batch:
        ids_BS1, trained_BS1, docs_BS1 = (
            torch.from_numpy(np.stack(parts))
            for parts in zip(*(self.row(int(i)) for i in indices), strict=True)
        )
        # The label at t is token t+1: trained only when it is the assistant's and in the same conversation.
        same_doc_BS = docs_BS1[:, 1:] == docs_BS1[:, :-1]
        labels_BS = torch.where(trained_BS1[:, 1:] & same_doc_BS, ids_BS1[:, 1:], IGNORE_INDEX)
        docs_BS = docs_BS1[:, :-1].contiguous()
        seq_BS = torch.arange(self.seq_len).expand_as(docs_BS)
        starts_BS = torch.ones_like(docs_BS, dtype=torch.bool)
        starts_BS[:, 1:] = ~same_doc_BS[:, :-1]
        positions_BS = seq_BS - torch.where(starts_BS, seq_BS, 0).cummax(1).values
        return Batch(ids_BS1[:, :-1].contiguous(), labels_BS, positions_BS, docs_BS)
