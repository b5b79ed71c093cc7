"""A tiny Hugging Face-format model directory for laptops, demos and tests: a random Llama, a byte-level BPE
tokenizer with ChatML special tokens and chat template, and a small chat dataset. Nothing is downloaded.

    python launch/make_debug_model.py runs/debug_hf     # then: python launch/train.py +config=finetune/debug_lora
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from treadle.models.hf import export_hf
from treadle.models.llama import Llama, ModelConfig

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def chat_examples(num: int) -> list[list[dict[str, str]]]:
    """Arithmetic questions and answers, some of two turns: learnable, so a fine-tuning loss visibly falls."""
    conversations = []
    for i in range(num):
        a, b = i % 17, (i * 7) % 13
        messages = [
            {"role": "system", "content": "You answer with the result only."},
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"{a + b}"},
        ]
        if i % 3 == 0:
            messages += [
                {"role": "user", "content": f"And {a} times {b}?"},
                {"role": "assistant", "content": f"{a * b}"},
            ]
        conversations.append(messages)
    return conversations


def train_tokenizer(texts: list[str], *, vocab_size: int = 320) -> Any:
    """A byte-level BPE (`tokenizers.Tokenizer`) trained on `texts`, with the ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def save_tokenizer(tokenizer: Any, out: Path) -> None:
    """tokenizer.json + tokenizer_config.json (with the chat template) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    config = {"chat_template": CHATML, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")


def write_tokenizer(out: Path, texts: list[str], *, vocab_size: int = 320) -> int:
    """Train a tokenizer on `texts` and save it into `out`; returns its vocabulary size."""
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    save_tokenizer(tokenizer, out)
    return tokenizer.get_vocab_size()


def write_chats(path: Path, conversations: list[list[dict[str, str]]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for messages in conversations:
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def write_debug_model(root: str | Path, *, num_conversations: int = 400, seed: int = 0) -> Path:
    """`root`/model (a random ~0.4M-parameter Llama in Hugging Face format, with its tokenizer) and
    `root`/chats.jsonl; returns `root`."""
    root = Path(root)
    conversations = chat_examples(num_conversations)
    texts = [m["content"] for c in conversations for m in c]
    tokenizer = train_tokenizer(texts)
    cfg = ModelConfig(dim=96, num_layers=3, num_heads=4, num_kv_heads=2, vocab_size=tokenizer.get_vocab_size(),
                      ffn_dim=256, rope_theta=10000.0, max_seq_len=1024)  # fmt: skip
    with torch.device("meta"):
        model = Llama(cfg)
    model.to_empty(device="cpu")
    model.init_weights(seed)
    # export_hf replaces its directory, so the tokenizer files go in after it.
    export_hf(model, cfg, root / "model", dtype=torch.float32)
    save_tokenizer(tokenizer, root / "model")
    write_chats(root / "chats.jsonl", conversations)
    return root
