"""Write a tiny random Hugging Face-format Llama, its tokenizer and a chat dataset (see `treadle.models.debug`).

python launch/make_debug_model.py runs/debug_hf
python launch/train.py +config=finetune/debug_lora
"""

from __future__ import annotations

import sys

from treadle.models.debug import write_debug_model

if __name__ == "__main__":
    root = write_debug_model(sys.argv[1] if len(sys.argv) > 1 else "runs/debug_hf")
    print(f"wrote {root}/model and {root}/chats.jsonl")
