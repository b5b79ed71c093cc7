"""Fine-tuning end to end on 2 gloo ranks: a transformers-made model loads into FSDP shards, 5 LoRA steps on chat
data (also under tensor parallelism, against one process), then the PEFT adapter (through `peft`) and the merged HF export (through `transformers`) give the logits of
our sharded model; adapter checkpoints resume exactly, at another world size, and hold only the adapters.

Tolerance: fp32; logits within 1e-5 absolute (observed ~3e-7); resumed losses within 1e-5 relative."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _spawn import run_distributed
from hf_fixtures import make_hf_model
from lm_helpers import lm_logits

from treadle.models.debug import chat_examples, write_chats, write_tokenizer
from treadle.models.hf import export_hf, export_peft
from treadle.train.build import build_trainer
from treadle.train.config import load_config, validate

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
STEPS = 5


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ft")
    conversations = chat_examples(60)
    vocab = write_tokenizer(root / "tok", [m["content"] for c in conversations for m in c])
    # The model's vocabulary is padded to a multiple of 4, as tensor parallelism shards it.
    make_hf_model("llama", root / "model", vocab_size=-(-vocab // 4) * 4, sharded=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(root / "tok" / name, root / "model" / name)
    write_chats(root / "chats.jsonl", conversations)
    return root


def overrides(root: Path, run: str, *extra: str) -> list[str]:
    return [
        "model=hf", f"model.pretrained={root / 'model'}", "peft=lora", "peft.rank=4", "peft.alpha=8",
        "data=chat", f"data.path={root / 'chats.jsonl'}", "data.seq_len=128", f"data.cache_dir={root / 'cache'}",
        "data.val_fraction=0.1", "trainer.micro_batch_size=2", "trainer.global_batch_size=4",
        f"trainer.max_steps={STEPS}", "trainer.eval_batches=1", "optim.lr=1e-2", "optim.schedule.warmup_steps=1",
        "logging.every=1", "logging.progress_bar=false", "logging.wandb.mode=disabled",
        f"run.dir={root / run}", f"checkpoint.dir={root / run / 'ckpt'}", *extra,
    ]  # fmt: skip


def _finetune_and_export(rank: int, world_size: int, args: list[str], out: str) -> dict:
    cfg = load_config(args)
    dims = validate(cfg, world_size)
    trainer = build_trainer(cfg, dims, torch.device("cpu"))
    losses = trainer.fit()
    tokens = torch.arange(40).reshape(2, 20) % cfg.model.vocab_size
    trainer.model_parts[0].eval()
    with torch.no_grad():
        logits = lm_logits(trainer.model_parts[0], tokens)
    export_peft(
        trainer.model_parts[0], cfg.model, cfg.peft, Path(out) / "adapter", base_model=cfg.model.pretrained
    )
    export_hf(trainer.model_parts[0], cfg.model, Path(out) / "merged", dtype=torch.float32)
    return {"losses": losses, "tokens": tokens, "logits": logits}


def _train(rank: int, world_size: int, args: list[str]) -> list[float]:
    cfg = load_config(args)
    return build_trainer(cfg, validate(cfg, world_size), torch.device("cpu")).fit()


def test_lora_under_fsdp_exports_what_peft_and_transformers_reproduce(assets, tmp_path):
    result = run_distributed(_finetune_and_export, 2, overrides(assets, "fsdp2"), str(tmp_path))[0]
    losses = result["losses"]
    assert len(losses) == STEPS and losses[-1] < losses[0]
    tokens = result["tokens"]
    base = transformers.AutoModelForCausalLM.from_pretrained(assets / "model", dtype=torch.float32)
    with torch.no_grad():
        peft_logits = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(tokens).logits
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
        merged_logits = merged(tokens).logits
    torch.testing.assert_close(peft_logits, result["logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(merged_logits, result["logits"], atol=1e-5, rtol=0)


def test_lora_under_tensor_parallelism_matches_one_process(assets):
    """tp=2 with sequence parallelism: base and adapters sharded by the LoRA column/row-wise styles, the frozen
    base (norms, embedding included) staying frozen."""
    reference = run_distributed(_train, 1, overrides(assets, "tp_ref", "checkpoint.every=0"))[0]
    sharded = run_distributed(_train, 2, overrides(assets, "tp2", "checkpoint.every=0", "parallel.tp=2"))[0]
    torch.testing.assert_close(torch.tensor(sharded), torch.tensor(reference), rtol=1e-5, atol=0)


def test_adapter_checkpoints_hold_only_adapters_and_resume_exactly(assets):
    full = run_distributed(
        _train, 2, overrides(assets, "full", "checkpoint.every=3", "checkpoint.save_final=false")
    )[0]
    step3 = assets / "full" / "ckpt" / "step_00000003"
    marker = json.loads((step3 / "treadle.json").read_text())
    assert marker["base_model"] == str(assets / "model") and marker["peft"] == "lora"
    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(str(step3)).read_metadata().state_dict_metadata
    model_keys = [k for k in saved if k.startswith("engine.model.")]
    assert model_keys and all(".lora_" in k for k in model_keys)
    # Resume the 2-rank checkpoint on 1 rank: DCP reshards the adapters, the base is re-read from model.pretrained.
    resumed = run_distributed(
        _train, 1, overrides(assets, "resumed", "checkpoint.every=0", f"checkpoint.resume={step3}")
    )[0]
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(full[3:]), rtol=1e-5, atol=0)


def test_resuming_adapters_on_another_base_is_refused(assets, tmp_path):
    run_distributed(_train, 1, overrides(assets, "other", "trainer.max_steps=2", "checkpoint.every=2"))
    other = tmp_path / "other_base"
    shutil.copytree(assets / "model", other)
    # resume=auto compares the run dir's config.yaml first (train/run_dir.py); an explicit step dir is
    # checked against the base the checkpoint's marker names.
    with pytest.raises(Exception, match=r"holds checkpoints of another config .*model\.pretrained"):
        run_distributed(_train, 1, overrides(assets, "other", f"model.pretrained={other}"))
    step = assets / "other" / "ckpt" / "step_00000002"
    with pytest.raises(Exception, match="holds adapters for base model"):
        run_distributed(
            _train, 1, overrides(assets, "other", f"model.pretrained={other}", f"checkpoint.resume={step}")
        )
