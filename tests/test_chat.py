"""Chat data (``--chat``): one right-padded row per conversation, the loss over assistant tokens only,
the conversation as the paired unit (ratio estimator).

Every number is compared with a plain-torch computation that uses none of hf-llmc's code: the chat
template is applied by ``transformers`` (``apply_chat_template(return_assistant_tokens_mask=True)``),
labels outside the assistant turns are set to -100, and each conversation runs alone through a
fresh model (``model(input_ids=..., labels=...)``).
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from helpers import interpolated_state, state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_llmc import DataConfig, ModelPair
from hf_llmc.cli import main
from hf_llmc.config.errors import DataError
from hf_llmc.engine.data import load_blocks
from hf_llmc.testing import CHAT_TEMPLATE, CHAT_TEMPLATE_NO_MARKERS, synthetic_conversations

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ_LEN = 96


def write_jsonl(path, conversations, column="messages"):
    with open(path, "w", encoding="utf-8") as f:
        for conv in conversations:
            f.write(json.dumps({column: conv}) + "\n")
    return path


def with_template(src, dst, template):
    """A copy of a model folder whose tokenizer carries ``template``."""
    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(src)
    tok.chat_template = template
    tok.save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def chat(gpt2_pair, tmp_path_factory):
    """The trained GPT-2 pair with a chat template ({% generation %} markers; A also without markers),
    and 24 conversations (every 10th longer than SEQ_LEN; one more without an assistant turn)."""
    root = tmp_path_factory.mktemp("chat")
    conversations = synthetic_conversations(24, 1, long_every=10) + [[{"role": "user", "content": "hello?"}]]
    return {
        "a": with_template(gpt2_pair.a, root / "a", CHAT_TEMPLATE),
        "b": with_template(gpt2_pair.b, root / "b", CHAT_TEMPLATE),
        "a_fallback": with_template(gpt2_pair.a, root / "a_fallback", CHAT_TEMPLATE_NO_MARKERS),
        "plain_a": gpt2_pair.a,
        "data": write_jsonl(root / "chat.jsonl", conversations),
        "conversations": conversations,
    }


# -- plain-torch reference -------------------------------------------------------------------------
def reference_rows(folder, conversations, seq_len=SEQ_LEN, loss_on="assistant"):
    """(ids, labels) per conversation with a scored token: the template applied by transformers,
    truncated to ``seq_len``, labels -100 outside the assistant turns."""
    tok = AutoTokenizer.from_pretrained(folder)
    rows = []
    for conv in conversations:
        enc = tok.apply_chat_template(conv, return_dict=True, return_assistant_tokens_mask=True)
        ids = torch.tensor(enc["input_ids"][:seq_len])
        keep = torch.tensor(enc["assistant_masks"][:seq_len]).bool() if loss_on == "assistant" else torch.ones_like(ids).bool()
        labels = torch.where(keep, ids, torch.full_like(ids, -100))
        if (labels[1:] != -100).any():
            rows.append((ids, labels))
    return rows


def reference_losses(folder, state, rows):
    """(summed nats, scored tokens) per conversation, each conversation alone through a fresh model."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if state is not None:
        model.load_state_dict(state)
    out = []
    with torch.no_grad():
        for ids, labels in rows:
            n = int((labels[1:] != -100).sum())
            loss = model(input_ids=ids[None], labels=labels[None]).loss
            out.append((float(loss) * n, n))
    return out


def ratio(losses):
    return sum(x for x, _ in losses) / sum(n for _, n in losses)


# -- masks -----------------------------------------------------------------------------------------
def test_rows_follow_the_template_and_its_assistant_mask(chat):
    pair = ModelPair.from_pretrained(chat["a"], chat["b"])
    blocks = pair.blocks(DataConfig(data=str(chat["data"]), chat=True, seq_len=SEQ_LEN))
    rows = reference_rows(chat["a"], chat["conversations"])
    assert blocks.num_blocks == len(rows) == 24  # the conversation without an assistant turn is dropped
    tok = AutoTokenizer.from_pretrained(chat["a"])
    full = [tok.apply_chat_template(c)["input_ids"] for c in chat["conversations"]]
    assert blocks.chat["truncated"] == sum(len(ids) > SEQ_LEN for ids in full) >= 2
    assert blocks.chat["dropped"] == 1 and blocks.chat["assistant_tokens_by"] == "generation-markers"
    for r, (ids, labels) in enumerate(rows):
        n = int(blocks.lengths[r])
        assert torch.equal(blocks.ids[r, :n], ids)
        assert torch.equal(blocks.scored[r, 1:n], labels[1:] != -100)
        assert not blocks.scored[r, n:].any() and not blocks.scored[r, 0]
    # the scored text of a short conversation is its assistant turns with their end markers
    short = next(i for i, ids in enumerate(full) if len(ids) <= SEQ_LEN)
    answers = "".join(m["content"] + "</s>\n" for m in chat["conversations"][short] if m["role"] == "assistant")
    assert tok.decode(blocks.ids[short][blocks.scored[short]]) == answers
    # the fallback (no {% generation %} markers) finds the same tokens by rendering prefixes
    fallback = ModelPair.from_pretrained(chat["a_fallback"], chat["b"])
    fb = fallback.blocks(DataConfig(data=str(chat["data"]), chat=True, seq_len=SEQ_LEN))
    assert fb.chat["assistant_tokens_by"] == "prefix-rendering"
    assert torch.equal(fb.ids, blocks.ids) and torch.equal(fb.scored, blocks.scored)


def test_template_that_does_not_render_prefix_by_prefix_is_refused(chat, tmp_path):
    tok = AutoTokenizer.from_pretrained(chat["a"])
    tok.chat_template = "{{ messages | length }}" + CHAT_TEMPLATE_NO_MARKERS
    with pytest.raises(DataError, match="prefix by prefix"):
        load_blocks(tok, DataConfig(data=str(chat["data"]), chat=True, seq_len=SEQ_LEN), use_cache=False)


def test_bad_chat_inputs_are_one_line_errors(chat, tmp_path, capsys):
    tok = AutoTokenizer.from_pretrained(chat["a"])
    bad = write_jsonl(tmp_path / "bad.jsonl", [[{"role": "user", "content": 3}]])
    with pytest.raises(DataError, match="row 0 is not a non-empty list"):
        load_blocks(tok, DataConfig(data=str(bad), chat=True), use_cache=False)
    with pytest.raises(DataError, match=r"no column 'conv' \(columns: messages\); set messages_column=NAME"):
        load_blocks(tok, DataConfig(data=str(chat["data"]), chat=True, messages_column="conv"), use_cache=False)
    with pytest.raises(DataError, match="loss_on='assistant': needs chat=True"):
        DataConfig(data="x.txt", loss_on="assistant").validate()
    # a pair without a chat template, with --chat
    code = main(["barrier", str(chat["plain_a"]), str(chat["b"]), "--data", str(chat["data"]), "--chat"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--chat: model A's tokenizer has no chat template" in err[0]
    # bits per byte need byte counts, which chat data do not have: every command says so before evaluating
    common = [str(chat["a"]), str(chat["b"]), "--data", str(chat["data"]), "--chat", "--metric", "bpb"]
    for argv in (["barrier"], ["barrier", "--decide", "0"], ["scan", "--out", str(tmp_path / "scan")],
                 ["merge", "--auto", "--out", str(tmp_path / "merged")]):
        code = main(argv[:1] + common + argv[1:])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, (argv, err)
        assert "--metric bpb: the evaluation data has no byte counts (chat data" in err[0], err
    assert not (tmp_path / "scan").exists() and not (tmp_path / "merged").exists()


# -- numbers ---------------------------------------------------------------------------------------
def test_per_conversation_losses_equal_plain_torch(chat):
    pair = ModelPair.from_pretrained(chat["a"], chat["b"])
    rows = reference_rows(chat["a"], chat["conversations"])
    for loss_on in ("assistant", "all"):
        blocks = pair.blocks(DataConfig(data=str(chat["data"]), chat=True, seq_len=SEQ_LEN, loss_on=loss_on))
        stats = pair.endpoint("b", pair.evaluator(blocks, batch_size=5), blocks)
        ref = reference_losses(chat["b"], None, reference_rows(chat["a"], chat["conversations"], loss_on=loss_on))
        assert stats.block_tokens.tolist() == [n for _, n in ref]
        for got, (want, _) in zip(stats.loss_sum.tolist(), ref):
            assert math.isclose(got, want, rel_tol=1e-5), (loss_on, got, want)
        assert math.isclose(stats.loss, ratio(ref), rel_tol=1e-6)
    assert sum(n for _, n in reference_losses(chat["b"], None, rows)) < blocks.tokens  # assistant < all


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gpt_neox"])
def test_padding_and_prefix_reuse_equal_one_conversation_per_forward(model_type, save_tiny_model, tmp_path):
    folder = save_tiny_model(model_type, tmp_path / model_type)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    conversations = synthetic_conversations(7, 2)
    data = write_jsonl(tmp_path / "chat.jsonl", conversations)
    other = tmp_path / "b"
    shutil.copytree(folder, other)
    pair = ModelPair.from_pretrained(folder, other)
    blocks = pair.blocks(DataConfig(data=str(data), chat=True, seq_len=128))
    assert len(set(blocks.lengths.tolist())) > 3  # rows of different lengths share a padded batch
    ref = reference_losses(folder, None, reference_rows(folder, conversations, seq_len=128))
    group = pair.groups("block.1")[0]
    for batch_size in (1, 3, 7):
        ev = pair.evaluator(blocks, batch_size=batch_size)
        stats = ev.run(state="a")
        # the per-conversation mean losses of padded batches equal one conversation per forward
        assert torch.allclose(stats.loss_sum / stats.block_tokens,
                              torch.tensor([x / n for x, n in ref], dtype=torch.float64), atol=1e-5, rtol=0)
        # prefix reuse (hidden states before block 1 cached per padded batch) changes nothing
        with_prefix = pair.point(ev, group, 0.5, prefix=True)
        full = pair.point(ev, group, 0.5, prefix=False)
        assert torch.allclose(with_prefix.loss_sum, full.loss_sum, atol=1e-5 * SEQ_LEN, rtol=0)


def _se_ratio(d, w):
    """Standard error of the ratio estimator Σd / Σw (linearised)."""
    n = len(d)
    r = sum(d) / sum(w)
    wbar = sum(w) / n
    return math.sqrt(sum((x - r * y) ** 2 for x, y in zip(d, w)) / (n * (n - 1))) / wbar


def test_barrier_cli_on_chat_data_equals_plain_torch(chat, tmp_path, capsys):
    out = tmp_path / "barrier.json"
    assert main(["barrier", str(chat["a"]), str(chat["b"]), "--data", str(chat["data"]), "--chat",
                 "--seq-len", str(SEQ_LEN), "--alphas", "0,0.5,1", "--json-out", str(out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    rows = reference_rows(chat["a"], chat["conversations"])
    sd_a, sd_b = state_dict(chat["a"]), state_dict(chat["b"])
    la = reference_losses(chat["a"], None, rows)
    lb = reference_losses(chat["a"], sd_b, rows)
    mid = reference_losses(chat["a"], interpolated_state(sd_a, sd_b, None, 0.5), rows)
    assert math.isclose(res["loss_a"], ratio(la), rel_tol=1e-5)
    assert math.isclose(res["loss_b"], ratio(lb), rel_tol=1e-5)
    barrier = ratio(mid) - 0.5 * (ratio(la) + ratio(lb))
    assert barrier > 0.05 and math.isclose(res["barrier_mid"], barrier, rel_tol=1e-4)
    assert res["tokens"] == sum(n for _, n in la)
    d = [m - 0.5 * (a + b) for (m, _), (a, _), (b, _) in zip(mid, la, lb)]
    assert res["se_method"] == "iid"
    assert math.isclose(res["barrier_mid_se"], _se_ratio(d, [n for _, n in la]), rel_tol=1e-4)
    assert res["data"]["chat"]["conversations"] == len(rows)
    assert f"chat data: {len(rows)} conversations; {res['data']['chat']['truncated']} truncated to --seq-len {SEQ_LEN}" in printed


def test_scan_cli_on_chat_data_equals_plain_torch(chat, tmp_path, capsys):
    out = tmp_path / "scan"
    assert main(["scan", str(chat["a"]), str(chat["b"]), "--data", str(chat["data"]), "--chat",
                 "--seq-len", str(SEQ_LEN), "--granularity", "sublayer", "--out", str(out)]) == 0
    assert "chat data:" in capsys.readouterr().out
    results = {(r["group"], r["alpha"]): r for r in map(json.loads, open(out / "results.jsonl"))}
    rows = reference_rows(chat["a"], chat["conversations"])
    sd_a, sd_b = state_dict(chat["a"]), state_dict(chat["b"])
    la = reference_losses(chat["a"], None, rows)
    lb = reference_losses(chat["a"], sd_b, rows)
    names = [k for k in sd_a if k.startswith("transformer.h.2.mlp.")]
    mid = reference_losses(chat["a"], interpolated_state(sd_a, sd_b, names, 0.5), rows)
    row = results[("mlp.2", 0.5)]
    assert math.isclose(row["loss"], ratio(mid), rel_tol=1e-5)
    assert math.isclose(row["barrier"], ratio(mid) - 0.5 * (ratio(la) + ratio(lb)), rel_tol=1e-4, abs_tol=1e-6)
    d = [m - 0.5 * (a + b) for (m, _), (a, _), (b, _) in zip(mid, la, lb)]
    assert math.isclose(row["barrier_se"], _se_ratio(d, [n for _, n in la]), rel_tol=1e-4)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["chat"]["conversations"] == len(rows)
    assert "chat, 24 conversations" in (out / "report.md").read_text()


def test_sequential_decide_on_chat_data(chat, tmp_path, capsys):
    """--decide treats each conversation as a unit; at the ceiling the estimate is the full-budget barrier."""
    full, seq = tmp_path / "full.json", tmp_path / "seq.json"
    common = ["barrier", str(chat["a"]), str(chat["b"]), "--data", str(chat["data"]), "--chat",
              "--seq-len", str(SEQ_LEN), "--alphas", "0,0.5,1", "--batch-size", "4"]
    assert main(common + ["--json-out", str(full)]) == 0
    assert main(common + ["--decide", "0", "--sequential-rule", "fast", "--json-out", str(seq)]) == 0
    capsys.readouterr()
    f, s = json.loads(full.read_text()), json.loads(seq.read_text())
    assert s["tokens_ceiling"] == f["tokens"]
    assert s["decision"] == "above" and s["barrier_mid_interval"][0] > 0 < f["barrier_mid"]
    if s["blocks_used"] == 24:
        assert math.isclose(s["barrier_mid"], f["barrier_mid"], rel_tol=1e-6)


def test_chat_sources_dataset_parquet_and_cache(chat, tmp_path, hf_llmc_cache):
    import datasets

    tok = AutoTokenizer.from_pretrained(chat["a"])
    cfg = DataConfig(data=str(chat["data"]), chat=True, seq_len=SEQ_LEN)
    ref = load_blocks(tok, cfg, use_cache=False)
    # --dataset NAME --chat (a local dataset folder: the validation split is preferred)
    root = tmp_path / "ds"
    root.mkdir()
    shutil.copy(chat["data"], root / "validation.jsonl")
    write_jsonl(root / "train.jsonl", synthetic_conversations(3, 9))
    hub = load_blocks(tok, DataConfig(dataset=str(root), chat=True, seq_len=SEQ_LEN), use_cache=False)
    assert torch.equal(hub.ids, ref.ids) and torch.equal(hub.scored, ref.scored)
    # a parquet table with another column name
    path = tmp_path / "chat.parquet"
    datasets.Dataset.from_list([{"conv": c} for c in chat["conversations"]]).to_parquet(str(path))
    table = load_blocks(tok, DataConfig(data=str(path), chat=True, seq_len=SEQ_LEN, messages_column="conv"), use_cache=False)
    assert torch.equal(table.ids, ref.ids) and torch.equal(table.scored, ref.scored)
    # plain text is not chat data
    text = tmp_path / "t.txt"
    text.write_text("hello")
    with pytest.raises(DataError, match="chat data must be a table"):
        load_blocks(tok, DataConfig(data=str(text), chat=True), use_cache=False)
    # the cache: a second load reads it; loss_on is part of the key
    first = load_blocks(tok, cfg)
    again = load_blocks(tok, cfg)
    assert again.fingerprint == first.fingerprint and torch.equal(again.scored, ref.scored)
    assert again.chat == first.chat
    every = load_blocks(tok, DataConfig(data=str(chat["data"]), chat=True, seq_len=SEQ_LEN, loss_on="all"))
    assert every.fingerprint != first.fingerprint and every.tokens > first.tokens
    assert (hf_llmc_cache / "tokens" / f"{first.fingerprint}.pt").is_file()


def test_sequential_scan_on_chat_data(chat, tmp_path, capsys):
    """scan --decide on conversations (prefix reuse with recorded endpoint states): every point decides
    or runs out of conversations, and a point that used every conversation has the full-budget barrier."""
    common = ["scan", str(chat["a"]), str(chat["b"]), "--data", str(chat["data"]), "--chat", "--seq-len", str(SEQ_LEN),
              "--alphas", "0.5"]
    assert main(common + ["--out", str(tmp_path / "full")]) == 0
    assert main(common + ["--decide", "0.02", "--sequential-rule", "fast", "--batch-size", "4",
                          "--out", str(tmp_path / "seq")]) == 0
    capsys.readouterr()
    full = {r["group"]: r for r in map(json.loads, open(tmp_path / "full/results.jsonl")) if r["kind"] != "endpoint"}
    seq = {r["group"]: r for r in map(json.loads, open(tmp_path / "seq/results.jsonl")) if r["kind"] != "endpoint"}
    assert full.keys() == seq.keys() and len(seq) == 4  # full + 3 blocks
    total = json.loads((tmp_path / "full/scan.json").read_text())["data"]["tokens"]
    for group, row in seq.items():
        assert row["tokens_ceiling"] == total and row["decision"] in ("above", "below", "undecided")
        if row["blocks_used"] == 24:
            assert math.isclose(row["barrier"], full[group]["barrier"], rel_tol=1e-6, abs_tol=1e-9)
        elif row["decision"] != "undecided":  # a decision agrees with the full-budget interval's side
            assert (row["decision"] == "above") == (full[group]["barrier"] > 0.02)


def test_merge_cli_evaluates_on_chat_data(chat, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", str(chat["a"]), str(chat["b"]), "--layers", "block.1", "--alpha", "0.5", "--eval-data",
                 str(chat["data"]), "--chat", "--seq-len", str(SEQ_LEN), "--out", str(out)]) == 0
    capsys.readouterr()
    rows = reference_rows(chat["a"], chat["conversations"])
    merged = reference_losses(out, None, rows)  # the written merge, loaded by transformers
    card = (out / "README.md").read_text()
    tokens = sum(n for _, n in merged)
    assert f"Mean next-token loss on {tokens:,} assistant tokens of 24 conversations" in card
    assert f"| **this merge** | {ratio(merged):.4f} |" in card
    assert "--chat" in card  # the command that reproduces it


def test_named_chat_sets(chat, tmp_path, capsys):
    """--chat applies to every named evaluation set; each set reports its own conversations."""
    small = write_jsonl(tmp_path / "small.jsonl", synthetic_conversations(5, 4))
    assert main(["barrier", str(chat["a"]), str(chat["b"]), "--data", f"long={chat['data']}", "--data", f"small={small}",
                 "--chat", "--seq-len", str(SEQ_LEN), "--alphas", "0,0.5,1", "--layers", "block.2"]) == 0
    printed = capsys.readouterr().out
    assert "long: chat data: 24 conversations" in printed and "small: chat data: 5 conversations" in printed
