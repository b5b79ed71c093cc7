"""Tiny random Hugging Face models saved to a directory, made with `transformers` (no download)."""

from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("llama", "qwen2", "qwen3", "mistral")


def make_hf_model(
    arch: str, out: Path, *, tie: bool = False, sharded: bool = False, seed: int = 0, vocab_size: int = 160
) -> Path:
    import transformers

    common = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        rms_norm_eps=1e-6,
    )
    if arch == "llama":
        config = transformers.LlamaConfig(
            **common,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
        cls = transformers.LlamaForCausalLM
    elif arch == "qwen2":
        config, cls = transformers.Qwen2Config(**common, rope_theta=1e6), transformers.Qwen2ForCausalLM
    elif arch == "qwen3":
        # head_dim 24 != hidden/heads = 16, as in real Qwen3 models.
        config, cls = transformers.Qwen3Config(**common, head_dim=24), transformers.Qwen3ForCausalLM
    else:
        config, cls = transformers.MistralConfig(**common, sliding_window=None), transformers.MistralForCausalLM
    torch.manual_seed(seed)
    model = cls(config).float()
    with torch.no_grad():  # random biases and norm weights, so that a loader that skips them fails
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.normal_(1.0 if "norm" in name else 0.0, 0.1)
    model.save_pretrained(out, max_shard_size="60KB" if sharded else "5GB", safe_serialization=True)
    return out


CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer(out: Path, *, vocab_size: int = 320) -> int:
    """A byte-level BPE tokenizer.json with ChatML special tokens and a chat template; returns its vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = ["the user asks a question and the assistant answers it politely", "hello world, how are you?"] * 20
    tok.train_from_iterator(text, trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"chat_template": CHATML, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    (out / "tokenizer_config.json").write_text(__import__("json").dumps(config))
    return tok.get_vocab_size()


def write_chats(path: Path, num: int = 40) -> Path:
    import json

    with open(path, "w") as f:
        for i in range(num):
            messages = [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": f"hello {i}, how are you?"},
                {"role": "assistant", "content": f"the answer is {i}"},
            ]
            if i % 3 == 0:
                messages += [
                    {"role": "user", "content": "and a question?"},
                    {"role": "assistant", "content": "world"},
                ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path
