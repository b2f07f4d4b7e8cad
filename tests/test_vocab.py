"""Pairs whose vocabularies differ by added tokens and padding rows (hf_llmc.model.vocab).

The pair is built here from one trained base pair: A adds one pad token (``resize_token_embeddings``
to 298 rows); B adds three chat tokens, pads its matrices to a multiple of 8 (304 rows) and trains a
few steps on chat text. Both add different tokens on top of one base vocabulary (297 tokens), so the
union tokenizer is A's plus B's added tokens with new ids: ``<pad>`` 297, B's tokens 298-300, and
B's padding rows 301-303 keep their index (B's padding row 300 falls on ``<|tool|>`` and gives way).

Every number is compared with plain torch: both models loaded with transformers, the union
matrices built here row by row from that layout (not with hf-llmc's map), a fresh model of the
union size, and a plain loop over ``model(input_ids=block, labels=block)``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from hf_llmc import DataError, ModelPair, PairError, lazy_pair, save_merged
from hf_llmc.cli import main
from hf_llmc.testing import synthetic_documents

pytestmark = pytest.mark.usefixtures("one_thread")

CHAT = ["<|im_start|>", "<|im_end|>", "<|tool|>"]
BASE = 297  # tokens of the shared base vocabulary
UNION = 301  # base + <pad> + 3 chat tokens
ROWS = 304  # B's padded rows, the largest
SEQ = 32


@pytest.fixture(scope="module")
def vocab_pair(make_pair, tmp_path_factory) -> dict[str, Path]:
    base = make_pair("llama", num_layers=2, hidden_size=32, vocab_size=BASE, finetune_steps=20, batch_size=4, seq_len=SEQ)
    root = tmp_path_factory.mktemp("vocab-pair")
    tok = AutoTokenizer.from_pretrained(base.a)
    assert len(tok) == BASE
    model = AutoModelForCausalLM.from_pretrained(base.a)
    tok.add_special_tokens({"pad_token": "<pad>"})
    torch.manual_seed(1)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(root / "a")
    tok.save_pretrained(root / "a")
    tok = AutoTokenizer.from_pretrained(base.b)
    model = AutoModelForCausalLM.from_pretrained(base.b)
    tok.add_tokens(CHAT, special_tokens=True)
    torch.manual_seed(2)
    model.resize_token_embeddings(len(tok), pad_to_multiple_of=8)
    text = "".join(f"<|im_start|>{d}<|im_end|><|tool|>" for d in synthetic_documents("b", 16, 5))
    ids = torch.tensor(tok(text)["input_ids"][: 8 * SEQ]).view(8, SEQ)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(4):  # the chat rows are trained, so every row differs
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(root / "b")
    tok.save_pretrained(root / "b")
    return {"a": root / "a", "b": root / "b", "base_a": base.a, "text": base.eval_text, "root": root}


@pytest.fixture(scope="module")
def pair(vocab_pair) -> ModelPair:
    return ModelPair.from_pretrained(vocab_pair["a"], vocab_pair["b"], device="cpu")


@pytest.fixture(scope="module")
def blocks(vocab_pair) -> torch.Tensor:
    """Eight blocks of the evaluation text, tokenized with A's own tokenizer (plain text has no added token)."""
    tok = AutoTokenizer.from_pretrained(vocab_pair["a"])
    ids = tok(vocab_pair["text"].read_text())["input_ids"][: 8 * SEQ]
    return torch.tensor(ids).view(8, SEQ)


# -- plain-torch references ----------------------------------------------------------------------
def _states(vocab_pair):
    return [{k: v.detach().clone() for k, v in AutoModelForCausalLM.from_pretrained(vocab_pair[w]).state_dict().items()}
            for w in ("a", "b")]


def union_rows(a: torch.Tensor, b: torch.Tensor, alpha: float, rule: str = "own") -> torch.Tensor:
    """The union matrix at α from A's [298, ...] and B's [304, ...] tensors, row by row."""
    out = torch.empty((ROWS, *a.shape[1:]))
    out[:BASE] = (1 - alpha) * a[:BASE] + alpha * b[:BASE]
    a_pad, b_chat, b_padding = a[BASE], b[BASE:BASE + 3], b[UNION:ROWS]  # B's row 300 is padding under <|tool|>
    if rule == "own":
        out[BASE] = a_pad
        out[BASE + 1:UNION] = b_chat
        out[UNION:] = b_padding
    else:  # mean-init: the missing side is the mean of its shared rows
        mean_a, mean_b = a[:BASE].mean(0), b[:BASE].mean(0)
        out[BASE] = (1 - alpha) * a_pad + alpha * mean_b
        out[BASE + 1:UNION] = (1 - alpha) * mean_a + alpha * b_chat
        out[UNION:] = (1 - alpha) * mean_a + alpha * b_padding
    return out


VOCAB_KEYS = ("model.embed_tokens.weight", "lm_head.weight")


def point_state(sd_a, sd_b, alpha, selected, base="a", rule="own"):
    """θ_base with the keys ``selected`` (a predicate) at α; vocabulary tensors of selected or of a
    union-size model in the union layout."""
    out = {}
    for key in sd_a:
        if key in VOCAB_KEYS and selected(key):
            out[key] = union_rows(sd_a[key], sd_b[key], alpha, rule)
        elif selected(key):
            out[key] = (1 - alpha) * sd_a[key] + alpha * sd_b[key]
        else:
            out[key] = (sd_a if base == "a" else sd_b)[key].clone()
    return out


def plain_losses(folder, state, ids) -> list[float]:
    """Per-block loss of a fresh model holding ``state`` (embedding and head sized from the state)."""
    config = AutoConfig.from_pretrained(folder)
    config.vocab_size = state["model.embed_tokens.weight"].shape[0]
    model = AutoModelForCausalLM.from_config(config).eval()
    if state["lm_head.weight"].shape[0] != config.vocab_size:
        model.lm_head = torch.nn.Linear(config.hidden_size, state["lm_head.weight"].shape[0], bias=False)
    model.load_state_dict(state)
    with torch.no_grad():  # next-token cross-entropy over the head's own rows
        return [float(torch.nn.functional.cross_entropy(model(input_ids=block[None]).logits[0, :-1], block[1:]))
                for block in ids]


def mean(xs):
    return sum(xs) / len(xs)


# -- loading and refusals ----------------------------------------------------------------------------
def test_the_pair_loads_with_the_union_vocabulary(pair, vocab_pair):
    v = pair.vocab
    assert (v.shared, v.union_size, v.rows, v.rows_a, v.rows_b) == (BASE, UNION, ROWS, BASE + 1, ROWS)
    assert v.describe()["added_a"] == ["<pad>"] and v.describe()["added_b"] == CHAT
    assert v.source == "union" and pair.tokenizer.convert_tokens_to_ids(["<pad>", *CHAT]) == [297, 298, 299, 300]
    assert "297 shared tokens; A adds 1 ('<pad>'), B adds 3" in v.summary()
    # the live model holds A's own rows
    assert pair.model.get_input_embeddings().weight.shape[0] == BASE + 1


def test_superset_and_padding_only_pairs_load(vocab_pair, tmp_path):
    base_a = vocab_pair["base_a"]
    one = lazy_pair(base_a, vocab_pair["b"])  # B = A + 3 tokens, padded: B's tokenizer is the superset
    assert one.vocab.source == "b" and one.vocab.added_a == [] and len(one.vocab.added_b) == 3
    other = lazy_pair(vocab_pair["b"], base_a)  # the reverse
    assert other.vocab.source == "a" and len(other.vocab.added_a) == 3 and other.vocab.rows == ROWS
    padded = tmp_path / "padded"  # the same tokenizer, padding rows only
    model = AutoModelForCausalLM.from_pretrained(base_a)
    model.resize_token_embeddings(BASE, pad_to_multiple_of=64)
    model.save_pretrained(padded)
    AutoTokenizer.from_pretrained(base_a).save_pretrained(padded)
    pad_pair = lazy_pair(base_a, padded)
    assert (pad_pair.vocab.shared, pad_pair.vocab.rows, pad_pair.vocab.added_b) == (BASE, 320, [])
    same = lazy_pair(base_a, base_a)
    assert same.vocab is None  # identical vocabularies: nothing changes


def _edit_tokenizer(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tok = json.loads((dst / "tokenizer.json").read_text())
    edit(tok)
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    return dst


def test_other_tokenizer_differences_are_refused(vocab_pair, tmp_path):
    a = vocab_pair["a"]
    merges = _edit_tokenizer(vocab_pair["b"], tmp_path / "merges", lambda t: t["model"]["merges"].pop())
    with pytest.raises(PairError, match=r"different tokenizer vocabularies .*: the tokenizer model \(base vocabulary or merges\) differs; the merges differ"):
        lazy_pair(a, merges)
    lower = _edit_tokenizer(vocab_pair["b"], tmp_path / "lower", lambda t: t.update(normalizer={"type": "Lowercase"}))
    with pytest.raises(PairError, match=r"the normalizer differs"):
        lazy_pair(a, lower)
    # a shared token with another id: B2 adds <|im_start|> first, then A's <pad>
    tok = AutoTokenizer.from_pretrained(vocab_pair["base_a"])
    tok.add_tokens(["<|im_start|>", "<pad>"], special_tokens=True)
    moved = tmp_path / "moved"
    model = AutoModelForCausalLM.from_pretrained(vocab_pair["base_a"])
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(moved)
    tok.save_pretrained(moved)
    with pytest.raises(PairError, match=r"the shared token '<pad>' has id 297 in A, 298 in B"):
        lazy_pair(a, moved)


def test_text_with_a_token_one_model_lacks_is_an_error(pair, vocab_pair, tmp_path):
    chat = tmp_path / "chat.txt"
    chat.write_text("<|im_start|> hello " + vocab_pair["text"].read_text()[:2000])
    with pytest.raises(DataError, match=r"contains token '<\|im_start\|>' \(id 298\), which model A lacks"):
        pair.blocks(chat)
    with pytest.raises(DataError, match=r"'<pad>' \(id 297\), which model B lacks"):
        pair.blocks(torch.tensor([[5, 297, 6, 7]]))


def test_the_union_tokenizer_cuts_plain_text_as_each_model(pair, vocab_pair, blocks):
    from hf_llmc import DataConfig

    got = pair.blocks(DataConfig(data=str(vocab_pair["text"]), seq_len=SEQ, max_tokens=8 * SEQ)).ids
    assert torch.equal(got, blocks)


# -- numbers ------------------------------------------------------------------------------------------
def test_barrier_of_attention_equals_plain_torch(pair, vocab_pair, blocks):
    sd_a, sd_b = _states(vocab_pair)
    result = pair.barrier(blocks, layers="attn.0-1", alphas=[0, 0.5, 1])
    attn = lambda k: ".self_attn." in k  # noqa: E731
    want = [mean(plain_losses(vocab_pair["a"], point_state(sd_a, sd_b, t, attn), blocks)) for t in (0, 0.5, 1)]
    assert result.loss == pytest.approx(want, rel=2e-5)
    assert result.loss_b == pytest.approx(mean(plain_losses(vocab_pair["b"], sd_b, blocks)), rel=2e-5)
    assert result.to_dict()["vocabulary"]["rows"] == ROWS


@pytest.mark.parametrize("rule", ["own", "mean-init"])
def test_full_path_and_embedding_path_equal_plain_torch(vocab_pair, blocks, rule):
    pair = ModelPair.from_pretrained(vocab_pair["a"], vocab_pair["b"], device="cpu", added_rows=rule)
    sd_a, sd_b = _states(vocab_pair)
    full = pair.barrier(blocks, alphas=[0, 0.5, 1])
    mid = mean(plain_losses(vocab_pair["a"], point_state(sd_a, sd_b, 0.5, lambda k: True, rule=rule), blocks))
    assert full.loss[1] == pytest.approx(mid, rel=2e-5)
    assert full.loss[0] == pytest.approx(mean(plain_losses(vocab_pair["a"], sd_a, blocks)), rel=2e-5)
    into_b = pair.barrier(blocks, layers="embed", alphas=[0.25], base="b")
    want = mean(plain_losses(vocab_pair["b"], point_state(sd_a, sd_b, 0.25, lambda k: k == VOCAB_KEYS[0], "b", rule), blocks))
    assert into_b.loss[into_b.alphas.index(0.25)] == pytest.approx(want, rel=2e-5)
    # the live model holds B's own rows after a path into B, and A's again, bitwise
    assert torch.equal(pair.model.get_input_embeddings().weight, sd_b[VOCAB_KEYS[0]])
    pair.interp.set_base("a")
    assert torch.equal(pair.model.get_input_embeddings().weight, sd_a[VOCAB_KEYS[0]])


def test_scan_of_sublayers_equals_plain_torch(pair, vocab_pair, blocks, tmp_path):
    from hf_llmc import ScanConfig, run_scan

    rows = run_scan(pair, pair.blocks(blocks), ScanConfig(granularity="sublayer"), tmp_path / "scan", progress=False)
    sd_a, sd_b = _states(vocab_pair)
    by_group = {r["group"]: r for r in rows if r.get("alpha") == 0.5}
    for group, key in (("embed", VOCAB_KEYS[0]), ("head", VOCAB_KEYS[1]), ("mlp.1", "model.layers.1.mlp.")):
        want = mean(plain_losses(vocab_pair["a"], point_state(sd_a, sd_b, 0.5, lambda k, key=key: k.startswith(key)), blocks))
        assert by_group[group]["loss"] == pytest.approx(want, rel=2e-5), group
    manifest = json.loads((tmp_path / "scan" / "scan.json").read_text())
    assert manifest["vocabulary"]["added_b"] == CHAT


# -- merges ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule,base", [("own", "a"), ("mean-init", "a"), ("own", "b")])
def test_merge_writes_the_union_vocabulary(vocab_pair, tmp_path, rule, base):
    out = tmp_path / f"merged-{rule}"
    spec = {"layers": "block.*,embed,final_norm", "alpha": 0.5, "base": base}
    save_merged(lazy_pair(vocab_pair["a"], vocab_pair["b"], added_rows=rule), spec, out, card=False)
    sd_a, sd_b = (load_file(vocab_pair[w] / "model.safetensors") for w in ("a", "b"))
    got = load_file(out / "model.safetensors")
    emb, head = VOCAB_KEYS
    assert got[emb].shape[0] == ROWS and got[head].shape[0] == ROWS
    want = union_rows(sd_a[emb], sd_b[emb], 0.5, rule)
    torch.testing.assert_close(got[emb][:BASE], want[:BASE], rtol=0, atol=1e-7)  # shared rows: the interpolation
    if rule == "own":  # one-side rows: exactly that side's
        assert torch.equal(got[emb][BASE:], want[BASE:])
    else:
        torch.testing.assert_close(got[emb][BASE:], want[BASE:], rtol=0, atol=1e-6)
    # the unselected head is the base's in the union layout: its rows, and the other's for the rows it lacks
    torch.testing.assert_close(got[head], union_rows(sd_a[head], sd_b[head], 0.0 if base == "a" else 1.0, rule), rtol=0, atol=0)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == ROWS
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == UNION and tok.convert_tokens_to_ids(["<pad>", *CHAT]) == [297, 298, 299, 300]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tok("<|im_start|>Dear", return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert generated.shape[1] == ids["input_ids"].shape[1] + 4


def test_cli_barrier_merge_and_layers(vocab_pair, tmp_path, capsys):
    a, b = str(vocab_pair["a"]), str(vocab_pair["b"])
    report = tmp_path / "barrier.json"
    assert main(["barrier", a, b, "--data", str(vocab_pair["text"]), "--seq-len", str(SEQ), "--max-tokens", "256",
                 "--layers", "attn.0-1", "--json-out", str(report)]) == 0
    out = capsys.readouterr().out
    assert "vocabulary: 297 shared tokens; A adds 1 ('<pad>'), B adds 3" in out
    assert json.loads(report.read_text())["vocabulary"]["shared_tokens"] == BASE
    assert main(["merge", a, b, "--layers", "block.*,embed,final_norm,head", "--alpha", "0.5", "--added-rows", "mean-init",
                 "--out", str(tmp_path / "merged")]) == 0
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "--added-rows mean-init" in card and "- Vocabulary: the union of A's and B's" in card
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged").config.vocab_size == ROWS
    capsys.readouterr()
    assert main(["layers", a, b, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["vocabulary"]["added_b"] == CHAT


# -- chat data ------------------------------------------------------------------------------------------
def test_chat_data_on_the_pair(vocab_pair, tmp_path):
    """Chat rows are padded with the union's pad token (A's ``<pad>``, which B lacks): the padding
    takes a shared id, and the numbers are those of each model on its conversations' scored tokens."""
    from hf_llmc import DataConfig
    from hf_llmc.testing import CHAT_TEMPLATE, synthetic_conversations

    a = tmp_path / "a-chat"
    shutil.copytree(vocab_pair["a"], a)
    tok = AutoTokenizer.from_pretrained(a)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(a)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in synthetic_conversations(6, 0)))
    pair = ModelPair.from_pretrained(a, vocab_pair["b"], device="cpu")
    assert pair.tokenizer.pad_token == "<pad>"
    chat = pair.blocks(DataConfig(data=str(data), chat=True, seq_len=128))
    assert chat.lengths is not None and int(chat.lengths.min()) < chat.seq_len  # some rows are padded
    assert pair.vocab.lacking(chat.ids) is None  # padding holds a shared id
    result = pair.barrier(chat, layers="attn.0-1", alphas=[0, 0.5, 1])
    for which, loss in (("a", result.loss_a), ("b", result.loss_b)):
        model = AutoModelForCausalLM.from_pretrained(vocab_pair[which]).eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for ids, scored, n in zip(chat.ids, chat.scored, chat.lengths):
                logits = model(input_ids=ids[None, :n]).logits[0, :-1]
                ce = torch.nn.functional.cross_entropy(logits, ids[1:n], reduction="none")
                total += float(ce[scored[1:n]].sum())
                count += int(scored[1:n].sum())
        assert loss == pytest.approx(total / count, rel=2e-5), which
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi <|im_start|>"},
                                            {"role": "assistant", "content": "ok"}]}) + "\n")
    with pytest.raises(DataError, match=r"'<\|im_start\|>' \(id 298\), which model A lacks"):
        pair.blocks(DataConfig(data=str(bad), chat=True, seq_len=128))


def test_merge_evaluation_is_that_of_the_written_folder(pair, vocab_pair, blocks, tmp_path):
    """embed / head unselected: the written model still holds every union row (B's chat rows too), so
    the card's merged loss is measured on exactly those weights, not on the path point."""
    result = save_merged(pair, "attn.0-1=0.5", tmp_path / "merged", data=blocks, card=False)
    written = plain_losses(tmp_path / "merged", AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict(), blocks)
    assert result.evaluation["merged"]["loss"] == pytest.approx(mean(written), rel=2e-5)
    assert pair.model.get_input_embeddings().weight.shape[0] == BASE + 1  # the live model is A again
    live = pair.merge("attn.0-1=0.5")  # the live merge holds the same union rows
    assert live.config.vocab_size == ROWS and live.get_output_embeddings().weight.shape[0] == ROWS
    pair.interp.set_base("a")
    assert pair.model.config.vocab_size == BASE + 1


def test_tied_embeddings(merge_pair_dirs, tmp_path):
    """GPT-2 ties its head to the embedding: one tensor, in the union layout on both paths."""
    b = tmp_path / "b-chat"
    tok = AutoTokenizer.from_pretrained(merge_pair_dirs["b"])
    model = AutoModelForCausalLM.from_pretrained(merge_pair_dirs["b"])
    size = len(tok)
    tok.add_tokens(CHAT[:2], special_tokens=True)
    model.resize_token_embeddings(len(tok), pad_to_multiple_of=8)
    model.save_pretrained(b)
    tok.save_pretrained(b)
    rows = model.get_input_embeddings().weight.shape[0]
    pair = ModelPair.from_pretrained(merge_pair_dirs["a"], b, device="cpu")
    assert pair.vocab.source == "b" and pair.vocab.rows == rows and list(pair.vocab.params) == ["transformer.wte.weight"]
    ids = AutoTokenizer.from_pretrained(merge_pair_dirs["a"])(merge_pair_dirs["eval"].read_text())["input_ids"][:4 * SEQ]
    ids = torch.tensor(ids).view(4, SEQ)
    sd_a, sd_b = (AutoModelForCausalLM.from_pretrained(f).state_dict() for f in (merge_pair_dirs["a"], b))
    result = pair.barrier(ids, layers="embed", alphas=[0.5])
    wte = torch.cat([0.5 * sd_a["transformer.wte.weight"] + 0.5 * sd_b["transformer.wte.weight"][:size],
                     sd_b["transformer.wte.weight"][size:]])  # B's added and padding rows, as they are
    wpe = 0.5 * sd_a["transformer.wpe.weight"] + 0.5 * sd_b["transformer.wpe.weight"]  # embed: token and position embeddings
    state = {k: v for k, v in sd_a.items() if k != "lm_head.weight"} | {"transformer.wte.weight": wte, "transformer.wpe.weight": wpe}
    config = AutoConfig.from_pretrained(merge_pair_dirs["a"])
    config.vocab_size = rows
    plain = AutoModelForCausalLM.from_config(config).eval()
    missing, unexpected = plain.load_state_dict(state, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected and plain.lm_head.weight is plain.transformer.wte.weight
    with torch.no_grad():
        want = mean([float(torch.nn.functional.cross_entropy(plain(input_ids=x[None]).logits[0, :-1], x[1:])) for x in ids])
    assert result.loss[result.alphas.index(0.5)] == pytest.approx(want, rel=2e-5)
    save_merged(pair, "embed=0.5", tmp_path / "merged", card=False)
    got = load_file(tmp_path / "merged" / "model.safetensors")
    assert "lm_head.weight" not in got and torch.equal(got["transformer.wte.weight"], wte)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.lm_head.weight.shape[0] == rows and len(AutoTokenizer.from_pretrained(tmp_path / "merged")) == size + 2
