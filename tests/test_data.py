"""Evaluation data: every source kind, the blocking protocol, and bad inputs."""

import json

import pytest
import torch

from hf_llmc import DataConfig, DataError, load_blocks
from hf_llmc.engine.data import tokenize_stream

DOCS = ["the first document is short.", "a second one, somewhat longer than the first document.", "third!"]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_LLMC_CACHE", str(tmp_path / "cache"))


def expected_stream(tok, docs, cap):
    ids = []
    for i, d in enumerate(docs):
        if i:
            ids.append(tok.eos_token_id)
        ids += tok(d)["input_ids"]
    return ids[:cap]


def test_protocol(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    blocks = load_blocks(tok, DataConfig(data=str(path), seq_len=8, max_tokens=10_000))
    stream = expected_stream(tok, DOCS, 10_000)
    n = len(stream) // 8
    assert blocks.ids.shape == (n, 8)
    assert blocks.ids.flatten().tolist() == stream[: n * 8]
    capped = load_blocks(tok, DataConfig(data=str(path), seq_len=4, max_tokens=9))
    assert capped.ids.flatten().tolist() == stream[:8]  # capped at 9, last partial block dropped


@pytest.mark.parametrize("suffix", ["txt", "jsonl", "json", "csv", "parquet"])
def test_source_kinds(tok, tmp_path, suffix):
    import datasets

    path = tmp_path / f"d.{suffix}"
    if suffix == "txt":
        path.write_text("\n".join(DOCS))
        docs = ["\n".join(DOCS)]
    else:
        ds = datasets.Dataset.from_dict({"body": DOCS, "other": [1, 2, 3]})
        {"jsonl": ds.to_json, "json": ds.to_json, "csv": ds.to_csv, "parquet": ds.to_parquet}[suffix](str(path))
        docs = DOCS
    blocks = load_blocks(tok, DataConfig(data=str(path), text_column="body", seq_len=4))
    stream = expected_stream(tok, docs, 10**9)
    assert blocks.ids.flatten().tolist() == stream[: len(stream) // 4 * 4]


def test_dataset_spec_split_choice(tok, tmp_path):
    root = tmp_path / "local_dataset"
    root.mkdir()
    (root / "train.jsonl").write_text(json.dumps({"text": "train text " * 20}) + "\n")
    (root / "validation.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    blocks = load_blocks(tok, DataConfig(dataset=str(root), seq_len=4))
    stream = expected_stream(tok, DOCS, 10**9)
    assert blocks.ids.flatten().tolist() == stream[: len(stream) // 4 * 4]  # validation preferred
    train = load_blocks(tok, DataConfig(dataset=f"{root}::train", seq_len=4))
    assert train.ids.numel() > blocks.ids.numel()


def test_cache_is_used_and_keyed_by_settings(tok, tmp_path):
    path = tmp_path / "d.txt"
    path.write_text(" ".join(DOCS) * 5)
    first = load_blocks(tok, DataConfig(data=str(path), seq_len=8))
    files = list((tmp_path / "cache").rglob("*.pt"))
    assert len(files) == 1
    again = load_blocks(tok, DataConfig(data=str(path), seq_len=8))
    assert torch.equal(first.ids, again.ids) and first.fingerprint == again.fingerprint
    other = load_blocks(tok, DataConfig(data=str(path), seq_len=6))
    assert other.fingerprint != first.fingerprint
    path.write_text(" ".join(DOCS) * 6)
    assert load_blocks(tok, DataConfig(data=str(path), seq_len=8)).fingerprint != first.fingerprint


@pytest.mark.parametrize(
    "setup,cfg,message",
    [
        (None, dict(data="missing.txt"), "no such file"),
        ("", dict(data="d.txt"), "no tokens"),
        (b"\x00\x01\x02binary", dict(data="d.txt"), "binary"),
        ("hi", dict(data="d.txt", seq_len=64), "fewer than one block"),
        ('{"body": "x"}\n', dict(data="d.jsonl"), "no column 'text'"),
        ("hello", dict(data="d.txt", seq_len=0), "at least 2"),
        ("hello", dict(data="d.txt", seq_len=-3), "at least 2"),
        ("hello", dict(data="d.txt", max_tokens=0), "max_tokens=0"),
        ("hello", dict(), "exactly one of"),
    ],
)
def test_bad_data(tok, tmp_path, setup, cfg, message):
    if "data" in cfg:
        cfg["data"] = str(tmp_path / cfg["data"])
        if setup is not None:
            p = tmp_path / cfg["data"]
            p.write_bytes(setup) if isinstance(setup, bytes) else p.write_text(setup)
    with pytest.raises(DataError, match=message):
        load_blocks(tok, DataConfig(**cfg))


def test_seq_len_above_model_positions(tok, tmp_path, tiny_model):
    path = tmp_path / "d.txt"
    path.write_text("hello " * 500)
    config = tiny_model("llama").config
    with pytest.raises(DataError, match=r"above the model's maximum positions \(128\)"):
        load_blocks(tok, DataConfig(data=str(path), seq_len=129), config)
    assert load_blocks(tok, DataConfig(data=str(path)), config).seq_len == 128  # default min(1024, max)


def test_tokenize_stream_eos_between_documents(tok):
    ids = tokenize_stream(tok, ["a b", "", "c"], 100)
    assert ids == tok("a b")["input_ids"] + [tok.eos_token_id] + tok("c")["input_ids"]


# -- BOS, tokenizer identity, cached blocks ------------------------------------------------------------
def _bos_tokenizer(tok):
    """``tok`` made to add a BOS token to every text (as Llama-family tokenizers do)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = tok.backend_tokenizer.__class__.from_str(tok.backend_tokenizer.to_str())
    bos = tok.eos_token
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.eos_token_id)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=bos)


def test_blocks_start_with_bos_when_the_tokenizer_adds_one(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    btok = _bos_tokenizer(tok)
    assert btok("abc")["input_ids"][0] == btok.bos_token_id != tok("abc")["input_ids"][0]
    blocks = load_blocks(btok, DataConfig(data=str(path), seq_len=8))
    # reference: the documents' own tokens (no special tokens), EOS between them, 7 per block after BOS
    text = []
    for i, d in enumerate(DOCS):
        text += ([btok.eos_token_id] if i else []) + tok(d)["input_ids"]
    n = len(text) // 7
    assert blocks.ids.tolist() == [[btok.bos_token_id] + text[i * 7:(i + 1) * 7] for i in range(n)]
    plain = load_blocks(btok, DataConfig(data=str(path), seq_len=8, no_bos=True))  # the tokenizer's default per document
    assert plain.ids.flatten().tolist() == expected_stream(btok, DOCS, 10**9)[: plain.ids.numel()]
    assert plain.fingerprint != blocks.fingerprint
    assert load_blocks(tok, DataConfig(data=str(path), seq_len=8)).ids.flatten().tolist() == \
        expected_stream(tok, DOCS, 10**9)[: blocks.ids.numel() // 8 * 8][: len(expected_stream(tok, DOCS, 10**9)) // 8 * 8]


def test_token_cache_tells_tokenizers_with_one_vocabulary_apart(tok, tmp_path):
    """A lowercasing tokenizer with the same vocabulary gets its own blocks, not the cached ones."""
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast

    backend = tok.backend_tokenizer.__class__.from_str(tok.backend_tokenizer.to_str())
    backend.normalizer = normalizers.Lowercase()
    lower = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=tok.eos_token, unk_token=tok.unk_token)
    assert lower.get_vocab() == tok.get_vocab()
    path = tmp_path / "d.txt"
    path.write_text("ABC DEF Ghi JKL mno " * 20)
    first = load_blocks(tok, DataConfig(data=str(path), seq_len=8))
    second = load_blocks(lower, DataConfig(data=str(path), seq_len=8))
    assert second.ids.flatten().tolist() == lower(path.read_text())["input_ids"][: second.ids.numel()]
    assert first.fingerprint != second.fingerprint and not torch.equal(first.ids, second.ids)


def test_damaged_or_foreign_cache_entries_are_rebuilt(tok, tmp_path):
    from hf_llmc.engine.data import cache_dir

    path = tmp_path / "d.txt"
    path.write_text(" ".join(DOCS) * 5)
    good = load_blocks(tok, DataConfig(data=str(path), seq_len=8))
    (entry,) = cache_dir().glob(f"{good.fingerprint}.pt")
    for bad in (torch.full_like(good.ids, len(tok) + 5), good.ids[:, :4], good.ids.float(), "junk"):
        if isinstance(bad, str):
            entry.write_text(bad)
        else:
            torch.save(bad, entry)
        again = load_blocks(tok, DataConfig(data=str(path), seq_len=8))
        assert torch.equal(again.ids, good.ids)
