"""Chat SFT data: the template renders as transformers renders it, the loss covers exactly the assistant's
replies, conversations pack whole with document boundaries, and bad records name the file and the field."""

from __future__ import annotations

import json

import pytest
import torch

from treadle.models.debug import CHATML, chat_examples, write_chats, write_tokenizer
from treadle.models.ops import IGNORE_INDEX
from treadle.train.data import DataConfig, build_datasets
from treadle.train.sft import ChatRenderer, load_chat_template
from treadle.train.tokenizer import load_tokenizer

pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    conversations = chat_examples(30)
    vocab = write_tokenizer(root / "model", [m["content"] for c in conversations for m in c])
    write_chats(root / "chats.jsonl", conversations)
    return root, conversations, vocab


def datasets(root, vocab, seq_len=128, **kw):
    cfg = DataConfig(source="chat", path=str(root / "chats.jsonl"), tokenizer=str(root / "model"),
                     seq_len=seq_len, cache_dir=str(root / "cache"), val_fraction=0.1, **kw)  # fmt: skip
    return build_datasets(cfg, vocab_size=vocab)


def test_rendering_matches_transformers_apply_chat_template(chat_data):
    transformers = pytest.importorskip("transformers")
    root, conversations, _ = chat_data
    reference = transformers.PreTrainedTokenizerFast(tokenizer_file=str(root / "model" / "tokenizer.json"))
    reference.chat_template = CHATML
    template, special = load_chat_template(root / "model")
    renderer = ChatRenderer(template, special)
    for messages in conversations[:4]:
        for prompt in (False, True):
            expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
            assert renderer.render(messages, add_generation_prompt=prompt) == expected


def test_loss_covers_exactly_the_assistant_replies(chat_data):
    root, conversations, vocab = chat_data
    train, val = datasets(root, vocab, seq_len=512)
    tokenizer = load_tokenizer(str(root / "model"))
    trained_text, expected_text = [], []
    for dataset in (train, val):
        batch = dataset.get_batch(range(len(dataset)))
        for row in range(batch.tokens.shape[0]):
            labels = batch.labels[row]
            trained_text.append(tokenizer.decode(labels[labels != IGNORE_INDEX].tolist()))
    for messages in conversations:
        expected_text += [m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant"]
    # Each row ends with its last conversation's final newline as a label only when the row has room for it.
    assert "".join(trained_text).replace("\n", "") == "".join(expected_text).replace("\n", "")


def test_conversations_pack_whole_with_document_boundaries(chat_data):
    root, conversations, vocab = chat_data
    train, _ = datasets(root, vocab, seq_len=128)
    batch = train.get_batch([0, 1])
    tokenizer = load_tokenizer(str(root / "model"))
    im_start = tokenizer._tok.token_to_id("<|im_start|>")
    for row in range(2):
        docs, positions, tokens = batch.doc_ids[row], batch.positions[row], batch.tokens[row]
        starts = torch.nonzero(torch.diff(docs, prepend=docs[:1] - 1)).flatten()
        assert len(starts) >= 2  # several conversations share a row
        assert (positions[starts] == 0).all()
        for s in starts.tolist()[
            :-1
        ]:  # every conversation starts at its first token (the last may be padding)
            assert tokens[s] == im_start
        # No label reaches across a document boundary.
        crossing = torch.nonzero(docs[1:] != docs[:-1]).flatten()
        assert (batch.labels[row][crossing] == IGNORE_INDEX).all()


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"conversation": []}, r"chats\.jsonl:1: no field 'messages' \(found: 'conversation'\)"),
        ({"messages": [{"role": "robot", "content": "x"}]}, r"chats\.jsonl:1: messages\[0\]\.role='robot'"),
        (
            {"messages": [{"role": "user", "content": "hi"}]},
            r"chats\.jsonl:1: field 'messages' has no assistant",
        ),
    ],
)
def test_bad_records_name_the_file_line_and_field(chat_data, tmp_path, record, message):
    root, _, vocab = chat_data
    (tmp_path / "chats.jsonl").write_text(json.dumps(record) + "\n")
    cfg = DataConfig(source="chat", path=str(tmp_path / "chats.jsonl"), tokenizer=str(root / "model"),
                     cache_dir=str(tmp_path / "cache"))  # fmt: skip
    with pytest.raises(ValueError, match=message):
        build_datasets(cfg, vocab_size=vocab)


def test_chat_source_refuses_the_byte_tokenizer():
    from treadle.train.data import validate_data_config

    with pytest.raises(ValueError, match="data.source=chat needs the model's Hugging Face tokenizer"):
        validate_data_config(DataConfig(source="chat", path="x.jsonl"))
