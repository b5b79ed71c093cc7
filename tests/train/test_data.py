from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from treadle.models.ops import IGNORE_INDEX
from treadle.train.corpus import read_token_meta, write_token_file
from treadle.train.data import (
    Batch,
    DataConfig,
    PackedTokens,
    StepLoader,
    build_datasets,
    eval_batches,
    pack_windows,
    prepare_data,
    tokenizer_vocab_size,
)
from treadle.train.tokenizer import ByteTokenizer, decode

REPO = Path(__file__).resolve().parents[2]


def write_tokens(path: Path, tokens: np.ndarray, *, vocab_size: int = 1000, eos_id: int = 0) -> Path:
    """A token file with a sidecar, written the way the format describes it (no library writer involved)."""
    tokens.astype("<u2").tofile(path)
    meta = {
        "format": "treadle-tokens-v1",
        "dtype": "uint16",
        "num_tokens": len(tokens),
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "tokenizer": "test",
        "source": "test",
    }
    path.with_suffix(".json").write_text(json.dumps(meta))
    return path


def arange_dataset(num_samples: int, seq_len: int = 4) -> PackedTokens:
    """Sample i's first token is i * seq_len, so rows identify samples."""
    tokens = np.arange(num_samples * seq_len + 1, dtype=np.int64)
    return PackedTokens(tokens, seq_len=seq_len, eos_id=None, document_mask=False)


def rows(batches: list[Batch]) -> list[int]:
    return [int(t) // 4 for b in batches for t in b.tokens[:, 0]]


def loader(
    dataset: PackedTokens, *, dp_rank: int = 0, dp_size: int = 1, micro: int = 2, gbs: int = 8, seed: int = 0
):
    return StepLoader(
        dataset,
        global_batch_size=gbs,
        micro_batch_size=micro,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=seed,
        shuffle=True,
    )


def global_rows(
    dataset: PackedTokens, *, dp_size: int, micro: int, steps: int, state: dict | None = None
) -> list:
    """Per step, the rows of every DP rank concatenated in rank order."""
    loaders = [loader(dataset, dp_rank=r, dp_size=dp_size, micro=micro) for r in range(dp_size)]
    for ld in loaders:
        if state is not None:
            ld.load_state_dict(state)
    return [[row for ld in loaders for row in rows(ld.next_step())] for _ in range(steps)]


# ---- packing ----


def test_pack_windows_restarts_positions_and_masks_labels_per_document() -> None:
    window = torch.tensor([[1, 2, 0, 3, 4, 0, 0, 5, 6]])
    batch = pack_windows(window, eos_id=0, document_mask=True)
    assert batch.tokens.tolist() == [[1, 2, 0, 3, 4, 0, 0, 5]]
    assert batch.doc_ids is not None
    assert batch.doc_ids.tolist() == [[0, 0, 0, 1, 1, 1, 2, 3]]
    assert batch.positions.tolist() == [[0, 1, 2, 0, 1, 2, 0, 0]]
    assert batch.labels.tolist() == [[2, 0, IGNORE_INDEX, 4, 0, IGNORE_INDEX, IGNORE_INDEX, 6]]
    assert all(t.dtype == torch.int64 for t in (batch.tokens, batch.labels, batch.positions, batch.doc_ids))


def test_pack_windows_without_document_mask() -> None:
    batch = pack_windows(torch.tensor([[1, 0, 2, 3, 0]]), eos_id=0, document_mask=False)
    assert batch.doc_ids is None
    assert batch.positions.tolist() == [[0, 1, 2, 3]]
    assert batch.labels.tolist() == [[0, 2, 3, 0]]
    assert batch.num_tokens == 4
    moved = batch.to("cpu")
    assert moved.doc_ids is None and torch.equal(moved.tokens, batch.tokens)


def test_windows_overlap_by_one_token() -> None:
    ds = arange_dataset(5, seq_len=4)
    batch = ds.get_batch([0, 3])
    assert batch.tokens.tolist() == [[0, 1, 2, 3], [12, 13, 14, 15]]
    assert batch.labels.tolist() == [[1, 2, 3, 4], [13, 14, 15, 16]]
    with pytest.raises(IndexError):
        ds.get_batch([5])


# ---- loader ----


def test_loader_is_deterministic_and_seeded() -> None:
    ds = arange_dataset(100)
    first, again, other = loader(ds), loader(ds), loader(ds, seed=1)
    steps = [[rows(ld.next_step()) for _ in range(3)] for ld in (first, again, other)]
    assert steps[0] == steps[1]
    assert steps[0] != steps[2]
    unshuffled = StepLoader(
        ds, global_batch_size=8, micro_batch_size=4, dp_rank=0, dp_size=1, seed=0, shuffle=False
    )
    assert rows(unshuffled.next_step()) == list(range(8))


def test_resume_from_state_dict_is_exact() -> None:
    ds = arange_dataset(30)
    straight = loader(ds)
    expected = [rows(straight.next_step()) for _ in range(6)]
    first = loader(ds)
    got = [rows(first.next_step()) for _ in range(2)]
    state = first.state_dict()
    assert state == {"consumed_samples": 16}
    resumed = loader(ds)
    resumed.load_state_dict(state)
    got += [rows(resumed.next_step()) for _ in range(4)]
    assert got == expected


def test_resharding_keeps_the_global_stream() -> None:
    ds = arange_dataset(50)
    reference = global_rows(ds, dp_size=1, micro=2, steps=8)
    assert global_rows(ds, dp_size=2, micro=2, steps=8) == reference
    assert global_rows(ds, dp_size=2, micro=4, steps=8) == reference
    assert global_rows(ds, dp_size=4, micro=1, steps=8) == reference
    # Resume a dp_size=1 run at dp_size=2 (and a different micro-batch) after 3 steps.
    first = loader(ds)
    for _ in range(3):
        first.next_step()
    assert global_rows(ds, dp_size=2, micro=1, steps=5, state=first.state_dict()) == reference[3:]


def test_resume_with_a_different_global_batch_continues_the_stream() -> None:
    ds = arange_dataset(50)
    stream = [r for step in global_rows(ds, dp_size=1, micro=2, steps=6) for r in step]
    first = loader(ds, gbs=8)
    first.next_step()
    bigger = loader(ds, gbs=16, micro=4)
    bigger.load_state_dict(first.state_dict())
    assert rows(bigger.next_step()) == stream[8:24]


def test_epochs_wrap_with_a_new_permutation() -> None:
    ds = arange_dataset(10)
    ld = loader(ds, gbs=4, micro=4)
    stream = [r for _ in range(5) for r in rows(ld.next_step())]
    assert sorted(stream[:10]) == list(range(10))
    assert sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]
    assert ld.epoch == 2


# ---- token files, splits, eval ----


def test_token_file_splits_are_disjoint(tmp_path: Path) -> None:
    tokens = np.arange(1, 1002) % 997  # contains 0 = EOS a few times
    path = write_tokens(tmp_path / "t.bin", tokens)
    cfg = DataConfig(source="tokens", path=str(path), seq_len=10, val_fraction=0.05)
    train, val = build_datasets(cfg, vocab_size=1000)
    assert (len(train), len(val)) == (95, 5)
    assert isinstance(train, PackedTokens) and isinstance(val, PackedTokens)
    train_inputs = {(train.first_window + i) * 10 + j for i in range(len(train)) for j in range(10)}
    val_inputs = {(val.first_window + i) * 10 + j for i in range(len(val)) for j in range(10)}
    assert not train_inputs & val_inputs
    assert val.get_batch([0]).tokens[0].tolist() == tokens[950:960].tolist()
    _, tiny_val = build_datasets(
        DataConfig(source="tokens", path=str(path), seq_len=10, val_fraction=1e-6), vocab_size=1000
    )
    assert len(tiny_val) == 1
    _, no_val = build_datasets(
        DataConfig(source="tokens", path=str(path), seq_len=10, val_fraction=0.0), vocab_size=1000
    )
    assert len(no_val) == 0 and list(eval_batches(no_val, 2, 0, 1)) == []


def _counted_rows(batches: list[Batch]) -> list[int]:
    return [
        int(b.tokens[i, 0]) // 4 for b in batches for i in range(len(b.tokens)) if (b.labels[i] != -100).any()
    ]


def test_eval_batches_start_from_the_beginning_and_shard_by_rank() -> None:
    ds = arange_dataset(10)
    per_rank = [list(eval_batches(ds, 2, r, 2, num_batches=3)) for r in range(2)]
    assert [rows(b) for b in per_rank] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert [_counted_rows(b) for b in per_rank] == [[0, 1, 4, 5], [2, 3]]  # 6 samples; 6, 7 are padding
    assert rows(list(eval_batches(ds, 2, 0, 2, num_batches=3))) == rows(per_rank[0])
    assert len(list(eval_batches(ds, 2, 1, 2))) == 3  # the whole split: 10 samples over 2 ranks × 2 rows


def test_eval_batches_evaluate_the_same_samples_on_every_layout() -> None:
    """The held-out loss must not depend on the number of processes: the counted samples are the first
    num_batches × micro_batch_size of the split whatever dp_size, each once; every rank yields as many batches."""
    ds = arange_dataset(10)
    for num_batches, expected in (
        (3, list(range(6))),
        (None, list(range(10))),
        (7, [*range(10), 0, 1, 2, 3]),
    ):
        for dp_size in (1, 2, 3, 4):
            per_rank = [list(eval_batches(ds, 2, r, dp_size, num_batches)) for r in range(dp_size)]
            assert len({len(b) for b in per_rank}) == 1
            assert sorted(r for b in per_rank for r in _counted_rows(b)) == sorted(expected), (
                num_batches,
                dp_size,
            )


def test_token_file_without_sidecar(tmp_path: Path) -> None:
    path = tmp_path / "raw.bin"
    np.array([5, 6, 7, 99, 8, 9, 10, 99, 11], dtype="<u4").tofile(path)
    cfg = DataConfig(
        source="tokens", path=str(path), token_dtype="uint32", eos_id=99, seq_len=4, val_fraction=0
    )
    (train, _) = build_datasets(cfg, vocab_size=128)
    batch = train.get_batch([0])
    assert batch.positions.tolist() == [[0, 1, 2, 3]]
    assert batch.labels.tolist() == [[6, 7, 99, IGNORE_INDEX]]
    assert train.get_batch([1]).positions.tolist() == [[0, 1, 2, 3]]


def test_token_ids_past_the_vocabulary_are_refused_at_load(tmp_path: Path, monkeypatch) -> None:
    """A file whose ids reach model.vocab_size fails at load naming the file, the id and the key (not with an
    IndexError in the embedding at step 1); the max id is scanned once and cached in data.cache_dir."""
    path = tmp_path / "raw.bin"
    np.array([5, 6, 300, 99, 8, 9, 10, 99, 11], dtype="<u2").tofile(path)
    cfg = DataConfig(
        source="tokens",
        path=str(path),
        token_dtype="uint16",
        eos_id=99,
        seq_len=4,
        val_fraction=0,
        cache_dir=str(tmp_path / "cache"),
    )
    with pytest.raises(
        ValueError, match=r"raw\.bin holds token id 300, past model\.vocab_size=256.*at least 301"
    ):
        build_datasets(cfg, vocab_size=256)
    monkeypatch.setattr(np, "memmap", None)  # a second scan would fail with a TypeError
    with pytest.raises(ValueError, match="token id 300"):
        build_datasets(cfg, vocab_size=256)
    monkeypatch.undo()
    build_datasets(cfg, vocab_size=301)


# ---- bad input ----


def test_bad_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data\.source='nope' is not one of stdlib, tokens, hf"):
        build_datasets(DataConfig(source="nope"), vocab_size=258)
    with pytest.raises(ValueError, match=r"data\.path is required for data\.source=tokens"):
        build_datasets(DataConfig(source="tokens"), vocab_size=258)
    with pytest.raises(ValueError, match=r"data\.path is required for data\.source=hf"):
        prepare_data(DataConfig(source="hf"))
    with pytest.raises(ValueError, match=r"data\.path: .*missing\.bin does not exist"):
        build_datasets(DataConfig(source="tokens", path=str(tmp_path / "missing.bin")), vocab_size=258)
    with pytest.raises(ValueError, match=r"data\.path: .*nowhere does not exist"):
        prepare_data(DataConfig(source="hf", path=str(tmp_path / "nowhere"), cache_dir=str(tmp_path)))
    with pytest.raises(ValueError, match=r"data\.val_fraction"):
        build_datasets(DataConfig(val_fraction=1.0), vocab_size=258)


def test_data_path_without_a_source_that_reads_it_is_refused(tmp_path: Path) -> None:
    """`data.path=...` alone would silently train on the embedded corpus (data.source defaults to stdlib)."""
    with pytest.raises(ValueError, match=r"data\.path=.*data\.source=stdlib .* fix: add data=tokens"):
        prepare_data(DataConfig(path=str(tmp_path / "corpus.bin")))


def test_bad_token_file_errors(tmp_path: Path) -> None:
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x00\x02")
    with pytest.raises(ValueError, match=r"3 bytes, not a multiple of 2 \(uint16\).*data\.token_dtype"):
        build_datasets(
            DataConfig(source="tokens", path=str(odd), token_dtype="uint16", eos_id=0), vocab_size=9
        )
    with pytest.raises(ValueError, match=r"data\.token_dtype: .*has no sidecar"):
        build_datasets(DataConfig(source="tokens", path=str(odd)), vocab_size=9)

    path = write_tokens(tmp_path / "t.bin", np.arange(100))
    meta = json.loads(path.with_suffix(".json").read_text())
    path.with_suffix(".json").write_text(json.dumps({**meta, "num_tokens": 120}))
    with pytest.raises(ValueError, match=r"says num_tokens=120 .* but .*t\.bin is 200 bytes.*regenerate"):
        build_datasets(DataConfig(source="tokens", path=str(path)), vocab_size=1000)

    short = write_tokens(tmp_path / "short.bin", np.arange(10))
    with pytest.raises(ValueError, match=r"data\.seq_len: .*has 10 tokens, fewer than one sequence"):
        build_datasets(DataConfig(source="tokens", path=str(short), seq_len=16), vocab_size=1000)
    with pytest.raises(
        ValueError, match=r"vocabulary of 1000 tokens but model\.vocab_size=500.*data\.tokenizer"
    ):
        build_datasets(DataConfig(source="tokens", path=str(short), seq_len=4), vocab_size=500)

    raw = tmp_path / "raw.bin"
    np.arange(100, dtype="<u2").tofile(raw)
    with pytest.raises(ValueError, match=r"set data\.eos_id, or set data\.document_mask=false"):
        build_datasets(DataConfig(source="tokens", path=str(raw), token_dtype="uint16"), vocab_size=1000)


def test_bad_jsonl_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": oops}\n')
    cfg = DataConfig(source="hf", path=str(bad), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"bad\.jsonl:3 is not valid JSON"):
        prepare_data(cfg)
    bad.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(
        ValueError, match=r"bad\.jsonl:2: no field 'text' \(fields: 'body'\); set data\.text_field"
    ):
        prepare_data(cfg)
    assert not list((tmp_path / "cache").glob("*")), "a failed build must leave nothing behind"


# ---- sources ----


def test_prepare_data_cli_round_trip(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.jsonl").write_text(json.dumps({"body": "héllo"}) + "\n" + json.dumps({"body": "wörld"}) + "\n")
    (docs / "b.txt").write_text("plain text\n")
    (docs / ".hidden.txt").write_text("skipped")
    spec = importlib.util.spec_from_file_location("prepare_data_cli", REPO / "launch" / "prepare_data.py")
    assert spec is not None and spec.loader is not None
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    cli.main([str(docs), "--text-field", "body", "--out", str(tmp_path / "out")])

    meta = read_token_meta(tmp_path / "out.bin")
    assert (meta.dtype, meta.vocab_size, meta.eos_id, meta.tokenizer) == ("uint16", 258, 256, "byte")
    tokens = np.fromfile(tmp_path / "out.bin", dtype="<u2")
    assert decode(tokens) == "héllo<|eos|>wörld<|eos|>plain text\n<|eos|>"
    cfg = DataConfig(source="tokens", path=str(tmp_path / "out.bin"), seq_len=4, val_fraction=0)
    train, _ = build_datasets(cfg, vocab_size=258)
    assert len(train) == (meta.num_tokens - 1) // 4

    with pytest.raises(SystemExit):
        cli.main([str(docs), "--out", str(tmp_path / "out2")])  # no 'text' field in a.jsonl


def test_stdlib_corpus(stdlib_cache: Path) -> None:
    cfg = DataConfig(cache_dir=str(stdlib_cache), seq_len=128)
    (built,) = stdlib_cache.glob("stdlib-*.bin")
    meta = read_token_meta(built)
    assert (meta.vocab_size, meta.eos_id, meta.dtype) == (258, 256, "uint16")
    assert meta.num_tokens > 1_000_000
    assert json.loads(built.with_suffix(".json").read_text())["bos_id"] == 257
    mtime = built.stat().st_mtime_ns
    train, val = build_datasets(cfg, vocab_size=258)
    assert built.stat().st_mtime_ns == mtime, "the cached corpus must be reused"
    assert not list(stdlib_cache.glob(".*.tmp"))
    assert len(val) == math.ceil(0.005 * (len(train) + len(val)))
    assert tokenizer_vocab_size(cfg) == 258
    text = ByteTokenizer().decode(train.window(0))
    assert text.isprintable() or "\n" in text
    with pytest.raises(
        ValueError, match=r"data\.tokenizer='byte' has a vocabulary of 258 tokens but model\.vocab_size=200"
    ):
        build_datasets(cfg, vocab_size=200)


@pytest.fixture(scope="session")
def stdlib_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("stdlib-cache")
    prepare_data(DataConfig(cache_dir=str(cache)))
    return cache


def make_hf_tokenizer(path: Path) -> Path:
    tokenizers = pytest.importorskip(
        "tokenizers", reason="the hf source needs the optional `tokenizers` package"
    )
    words = ["[UNK]", "</s>", "the", "cat", "sat", "on", "mat", "a", "dog", "ran"]
    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]")
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


def test_hf_jsonl_source(tmp_path: Path) -> None:
    tok_path = make_hf_tokenizer(tmp_path / "tokenizer.json")
    data = tmp_path / "data"
    data.mkdir()
    (data / "1.jsonl").write_text(
        "\n".join(json.dumps({"text": t}) for t in ["the cat sat", "on a mat"]) + "\n"
    )
    (data / "2.json").write_text(json.dumps({"text": "a dog ran", "id": 3}) + "\n")
    cache = tmp_path / "cache"
    cfg = DataConfig(
        source="hf", path=str(data), tokenizer=str(tok_path), seq_len=3, val_fraction=0, cache_dir=str(cache)
    )
    assert tokenizer_vocab_size(cfg) == 10
    prepare_data(cfg)
    train, _ = build_datasets(cfg, vocab_size=16)
    (built,) = cache.glob("hf-data-*.bin")
    assert np.fromfile(built, dtype="<u2").tolist() == [2, 3, 4, 1, 5, 7, 6, 1, 7, 8, 9, 1]
    assert read_token_meta(built).eos_id == 1
    batch = train.get_batch([1])
    assert batch.tokens.tolist() == [[1, 5, 7]]
    assert batch.labels.tolist() == [[IGNORE_INDEX, 7, 6]]
    assert batch.positions.tolist() == [[0, 0, 1]]  # a window starts mid-document at 0

    with pytest.raises(ValueError, match=r"vocabulary of 10 tokens but model\.vocab_size=8"):
        build_datasets(cfg, vocab_size=8)
    (data / "2.json").write_text(json.dumps({"text": "a cat"}) + "\n")
    build_datasets(cfg, vocab_size=16)
    assert len(list(cache.glob("hf-data-*.bin"))) == 2, "changed inputs must rebuild the cache"


def test_hf_tokenizer_without_eos(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip(
        "tokenizers", reason="the hf source needs the optional `tokenizers` package"
    )
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "x": 1}, unk_token="[UNK]"))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    cfg = DataConfig(
        source="hf", path=str(tmp_path / "d.jsonl"), tokenizer=str(tmp_path), cache_dir=str(tmp_path)
    )
    with pytest.raises(ValueError, match=r"found no end-of-text token .* set data\.eos_id"):
        prepare_data(cfg)
    cfg.eos_id = 0
    prepare_data(cfg)
    with pytest.raises(ValueError, match=r"data\.tokenizer: .*does not exist"):
        prepare_data(
            DataConfig(source="hf", path=str(tmp_path / "d.jsonl"), tokenizer=str(tmp_path / "none.json"))
        )


def test_hf_parquet_source(tmp_path: Path) -> None:
    tok_path = make_hf_tokenizer(tmp_path / "tokenizer.json")
    pa = pytest.importorskip("pyarrow", reason="parquet input needs the optional `pyarrow` package")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["the cat", None, "a dog"]}), tmp_path / "d.parquet")
    cfg = DataConfig(
        source="hf",
        path=str(tmp_path / "d.parquet"),
        tokenizer=str(tok_path),
        cache_dir=str(tmp_path),
        seq_len=2,
    )
    with pytest.raises(
        ValueError, match=r"d\.parquet: no column 'text' \(columns: 'content'\); set data\.text_field"
    ):
        prepare_data(cfg)
    cfg.text_field = "content"
    prepare_data(cfg)
    (built,) = tmp_path.glob("hf-d-*.bin")
    assert np.fromfile(built, dtype="<u2").tolist() == [2, 3, 1, 7, 8, 1]


def test_write_token_file_picks_uint32_for_large_vocabularies(tmp_path: Path) -> None:
    class Big(ByteTokenizer):
        vocab_size = 70_000
        eos_id = 69_999

    meta = write_token_file(tmp_path / "big.bin", ["ab", "", "c"], Big(), source="test")
    assert meta.dtype == "uint32" and meta.num_tokens == 5
    assert np.fromfile(tmp_path / "big.bin", dtype="<u4").tolist() == [97, 98, 69_999, 99, 69_999]
