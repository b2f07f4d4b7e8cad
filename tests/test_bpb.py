"""Bits per byte: bytes per token (byte-level BPE and byte-fallback tokenizers, multi-byte
characters) and bpb of endpoints, points and barriers against a plain computation."""

import json
import math

import pytest
import torch
from helpers import interpolated_state, state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_llmc import DataConfig, ModelPair, load_blocks
from hf_llmc.engine.data import token_bytes
from hf_llmc.testing import synthetic_documents, train_tokenizer

TEXT = "héllo wörld 🙂 東京 straße\n  naïve café: 12,345.67 ÉCOLE\tdef f(x): return x ** 2\n"


def _byte_fallback_tokenizer():
    """A Llama/sentencepiece-style BPE with byte_fallback (▁ for spaces, <0xNN> byte tokens)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"]
                                  + [f"<0x{i:02X}>" for i in range(256)],
                                  initial_alphabet=list("abcdefghijklmnopqrstuvwxyz▁"))
    tok.train_from_iterator(synthetic_documents("mixed", 60, 0), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _byte_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character standing for each byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _true_bytes_byte_level(tok, ids):
    """Bytes of each token of a byte-level BPE, from its own characters; special tokens have none."""
    table = _byte_table()
    special = set(tok.all_special_ids)
    return [
        0 if i in special else len(bytes(table[c] for c in tok.convert_ids_to_tokens(i))) for i in ids]


def test_byte_level_tokens_cover_their_own_bytes():
    tok = train_tokenizer(synthetic_documents("mixed", 60, 0), 300)
    enc = tok(TEXT, return_offsets_mapping=True, add_special_tokens=False)
    got = token_bytes(TEXT, enc["offset_mapping"])
    assert sum(got) == len(TEXT.encode())
    assert got == _true_bytes_byte_level(tok, enc["input_ids"])  # multi-byte characters split into byte tokens


def test_byte_fallback_tokens_are_one_byte_each():
    tok = _byte_fallback_tokenizer()
    enc = tok(TEXT, return_offsets_mapping=True, add_special_tokens=False)
    got = token_bytes(TEXT, enc["offset_mapping"])
    pieces = tok.convert_ids_to_tokens(enc["input_ids"])
    assert sum(got) == len(TEXT.encode())
    fallback = [n for p, n in zip(pieces, got) if p.startswith("<0x")]
    assert len(fallback) >= sum(len(c.encode()) for c in TEXT if ord(c) > 127) and set(fallback) == {1}
    for piece, n in zip(pieces, got):  # plain pieces: their text ("▁" = a space), the text's leading ▁ excepted
        if not piece.startswith("<0x") and piece != "▁":
            assert n == len(piece.replace("▁", " ").encode())


def test_blocks_carry_byte_counts_bos_and_eos_cover_none(tmp_path):
    tok = _byte_fallback_tokenizer()
    docs = [TEXT * 3, "plain ascii text " * 8]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    blocks = load_blocks(tok, DataConfig(data=str(path), seq_len=16))  # BOS blocks (the tokenizer adds <s>)
    assert blocks.bytes.shape == blocks.ids.shape
    assert (blocks.bytes[:, 0] == 0).all() and (blocks.ids[:, 0] == tok.bos_token_id).all()
    assert (blocks.bytes[blocks.ids == tok.eos_token_id] == 0).all()
    total = sum(len(d.encode()) for d in docs)
    assert int(blocks.bytes.sum()) <= total
    again = load_blocks(tok, DataConfig(data=str(path), seq_len=16))  # from the cache
    assert torch.equal(again.bytes, blocks.bytes)
    whole = load_blocks(tok, DataConfig(data=str(path), seq_len=16, max_tokens=10**6), use_cache=False)
    stream = tok(docs[0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] + \
        tok(docs[1], add_special_tokens=False)["input_ids"]
    assert whole.ids[:, 1:].flatten().tolist() == stream[: whole.ids[:, 1:].numel()]


@pytest.fixture(scope="module")
def bpb_pair(gpt2_pair, tmp_path_factory):
    path = tmp_path_factory.mktemp("bpb") / "eval.txt"
    path.write_text("\n".join(part + TEXT for part in gpt2_pair.eval_text.read_text()[:2000].split("\n\n")))
    pair = ModelPair.from_pretrained(gpt2_pair.a, gpt2_pair.b, device="cpu")
    return gpt2_pair, pair, DataConfig(data=str(path), seq_len=32, max_tokens=32 * 12)


def _plain_bpb(folder, state, ids, tok):
    """Summed nats over the predicted tokens / (ln 2 · their bytes, from each token's own characters)."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.load_state_dict(state)
    nats, nbytes = 0.0, 0
    with torch.no_grad():
        for block in ids:
            out = model(input_ids=block[None], labels=block[None])
            nats += out.loss.item() * (block.numel() - 1)
            nbytes += sum(_true_bytes_byte_level(tok, block[1:].tolist()))
    return nats / (math.log(2) * nbytes)


def test_bits_per_byte_equals_plain_computation(bpb_pair):
    demo, pair, data = bpb_pair
    tok = AutoTokenizer.from_pretrained(demo.a)
    ids = pair.blocks(data).ids
    assert any(ord(c) > 127 for c in tok.decode(ids.flatten()))  # multi-byte characters are scored
    sd_a, sd_b = state_dict(demo.a), state_dict(demo.b)
    result = pair.barrier(data, layers="block.1", alphas=[0, 0.5, 1])
    want_a = _plain_bpb(demo.a, sd_a, ids, tok)
    want_b = _plain_bpb(demo.a, sd_b, ids, tok)
    names = [p for g in pair.groups("block.1") for p in g.parameters]
    want_mid = _plain_bpb(demo.a, interpolated_state(sd_a, sd_b, names, 0.5), ids, tok)
    assert math.isclose(result.bits_per_byte_a, want_a, rel_tol=2e-5)
    assert math.isclose(result.bits_per_byte_b, want_b, rel_tol=2e-5)
    assert math.isclose(result.bits_per_byte[1], want_mid, rel_tol=2e-5)
    assert math.isclose(result.bpb_barrier_mid, want_mid - (want_a + want_b) / 2, rel_tol=1e-4, abs_tol=1e-6)
    out = result.to_dict()
    assert out["bits_per_byte_a"] == result.bits_per_byte_a and "bpb_barrier_max" in out


def test_barrier_cli_in_bits_per_byte(bpb_pair, capsys):
    from hf_llmc import cli

    demo, pair, data = bpb_pair
    result = pair.barrier(data, layers="block.0", alphas=[0, 0.5, 1])
    assert cli.main(["barrier", str(demo.a), str(demo.b), "--data", data.data, "--seq-len", "32", "--max-tokens",
                     str(32 * 12), "--layers", "block.0", "--alphas", "0,0.5,1", "--metric", "bpb"]) == 0
    printed = capsys.readouterr().out
    assert f"barrier_mid = {result.bpb_barrier_mid:+.4f}" in printed and "bits/byte" in printed
