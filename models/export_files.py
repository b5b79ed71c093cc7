"""What an export directory (merged Hugging Face weights, a PEFT adapter) carries for the tools that read it.

- File modes: `safetensors` writes its files 0600 (owner only), so an export handed to another user or a
  serving container could not be read; they get the mode an ordinary file gets under the process umask
  (0644 under the usual 022), like the JSON files next to them.
- The adapter's base: PEFT resolves `base_model_name_or_path` against the reader's working directory, so a
  relative `model.pretrained` is recorded as an absolute path.
- Special tokens: generation stops at `eos_token_id`, which transformers reads from config.json and
  generation_config.json; both are carried from the base model's directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["absolute_base", "save_safetensors", "special_token_ids", "write_generation_config"]

SPECIAL_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, _file_mode())


def absolute_base(base_model: str | None) -> str | None:
    return None if base_model is None else str(Path(base_model).expanduser().resolve())


def special_token_ids(model_dir: str | Path | None) -> dict[str, Any]:
    """bos/eos/pad token ids of the base's config.json (those it sets), or {} without a base."""
    if model_dir is None:
        return {}
    path = Path(model_dir).expanduser() / "config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return {k: config[k] for k in SPECIAL_TOKEN_KEYS if config.get(k) is not None}


def write_generation_config(out_dir: Path, token_ids: dict[str, Any]) -> None:
    """A generation_config.json with the special tokens, where the base had none to copy."""
    path = out_dir / "generation_config.json"
    if token_ids and not path.exists():
        path.write_text(json.dumps({**token_ids, "_from_model_config": True}, indent=2) + "\n")
