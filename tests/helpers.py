"""Helpers the tests share: tiny real checkpoints built in the test session and the straightforward
reference computations hf-llmc's numbers are compared against.

References are deliberately naive and use none of hf-llmc's code (not even its parameter names):
both models fully loaded (or their safetensors read with ``safetensors``), the interpolated state
dict built with plain torch, a fresh model loaded with ``load_state_dict``, and a plain loop over
``model(input_ids=block, labels=block)``.

The "scale" pairs (:func:`build_full_pair`) share a word-level tokenizer whose token ids are the
numbers in the evaluation text (``w17`` -> id 17), so the CLI's data pipeline yields exactly the
blocks the tests compare against.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from hf_llmc.testing import init_model, synthetic_text, tiny_config


# -- numbers ---------------------------------------------------------------------------------------
def close(x: float, y: float, rel: float = 2e-5, abs_tol: float = 1e-7) -> bool:
    """``x`` and ``y`` agree to ``rel`` (relative), or to ``abs_tol`` near zero."""
    return math.isclose(x, y, rel_tol=rel, abs_tol=abs_tol)


def rel(a: float, b: float) -> float:
    """The relative difference of ``a`` from ``b``."""
    return abs(a - b) / max(abs(b), 1e-12)


# -- plain-torch references -----------------------------------------------------------------------
def state_dict(folder) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def slerp_ref(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    va, vb = a.double().flatten(), b.double().flatten()
    cos = float(va @ vb / (va.norm() * vb.norm()))
    if abs(cos) > 0.9995:
        return ((1 - t) * a.double() + t * b.double()).to(a.dtype)
    omega = math.acos(max(-1.0, min(1.0, cos)))
    out = (math.sin((1 - t) * omega) * va + math.sin(t * omega) * vb) / math.sin(omega)
    return out.view(a.shape).to(a.dtype)


def interpolated_state(sd_a, sd_b, names, alpha, base="a", method="lerp", tied=()):
    """θ_base with the tensors ``names`` (None = all) replaced by their α mix."""
    selected = set(sd_a) if names is None else set(names)
    for alias, canon in tied:  # one tensor under two names
        if alias in selected or canon in selected:
            selected |= {alias, canon}
    out = {}
    for key in sd_a:
        if key in selected:
            if method == "lerp":
                out[key] = (1 - alpha) * sd_a[key] + alpha * sd_b[key]
            else:
                out[key] = slerp_ref(sd_a[key], sd_b[key], alpha)
        else:
            out[key] = (sd_a if base == "a" else sd_b)[key].clone()
    return out


def plain_eval(folder, state, blocks: torch.Tensor, per_block: bool = False):
    """(mean loss, top-1 accuracy) of a fresh model holding ``state``, block by block
    (with ``per_block``: the list of block losses instead of their mean)."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.load_state_dict(state)
    losses, hits, count = [], 0, 0
    with torch.no_grad():
        for block in blocks:
            out = model(input_ids=block[None], labels=block[None])
            losses.append(out.loss.item())
            pred = out.logits[0, :-1].argmax(-1)
            hits += int((pred == block[1:]).sum())
            count += block.numel() - 1
    return (losses if per_block else sum(losses) / len(losses)), hits / count


def stored_state(folder) -> dict[str, torch.Tensor]:
    """Every stored tensor of a folder (plain safetensors reads, no hf_llmc code)."""
    folder = Path(folder)
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as fh:
            for key in fh.keys():
                out[key] = fh.get_tensor(key)
    return out


def plain_loss(model, ids: torch.Tensor) -> float:
    """Mean next-token loss, one block at a time with transformers' own loss."""
    model.eval()
    with torch.no_grad():
        losses = [float(model(input_ids=ids[i : i + 1], labels=ids[i : i + 1]).loss) for i in range(ids.shape[0])]
    return sum(losses) / len(losses)


class Reference:
    """Plain-torch evaluation of path points from the two saved checkpoints."""

    def __init__(self, folder_a: Path, folder_b: Path, ids: torch.Tensor):
        self.sd = {"a": load_file(Path(folder_a) / "model.safetensors"),
                   "b": load_file(Path(folder_b) / "model.safetensors")}
        self.config = AutoConfig.from_pretrained(folder_a)
        self.ids = ids
        # Tied parameters (GPT-2's lm_head is wte) are one stored tensor.
        model = AutoModelForCausalLM.from_config(self.config)
        first: dict[int, str] = {}
        self.alias: dict[str, str] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            canon = first.setdefault(id(param), name)
            self.alias[name] = canon if canon in self.sd["a"] else name
        self.tied = {n for n, c in self.alias.items() if n != c}

    def state(self, names, alpha: float, base: str) -> dict[str, torch.Tensor]:
        sd = {k: v.clone() for k, v in self.sd[base].items()}
        for name in names:
            key = self.alias.get(name, name)
            a, b = self.sd["a"][key].float(), self.sd["b"][key].float()
            sd[key] = ((1 - alpha) * a + alpha * b).to(sd[key].dtype)
        return sd

    @torch.no_grad()
    def block_losses(self, sd: dict[str, torch.Tensor]) -> torch.Tensor:
        model = AutoModelForCausalLM.from_config(self.config)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        assert set(missing) <= self.tied and not unexpected
        model.eval()
        return torch.tensor([float(model(input_ids=b[None], labels=b[None]).loss) for b in self.ids],
                            dtype=torch.float64)

    def point(self, names, alpha: float, base: str) -> torch.Tensor:
        return self.block_losses(self.state(names, alpha, base))

    def endpoints(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not hasattr(self, "_ends"):
            self._ends = (self.block_losses(self.sd["a"]), self.block_losses(self.sd["b"]))
        return self._ends


# -- tiny checkpoints -------------------------------------------------------------------------------
def build_pair_dirs(root: Path, model, tokenizer, license: str | None = "mit") -> dict:
    """A and B from one random initialisation (``model``), B = A + noise (a visible change); the
    tokenizer; evaluation text. A carries a model card with a license."""
    paths = {"root": root, "a": root / "model-a", "b": root / "model-b", "eval": root / "eval.txt"}
    model.save_pretrained(paths["a"])
    tokenizer.save_pretrained(paths["a"])
    if license:
        (paths["a"] / "README.md").write_text(f"---\nlicense: {license}\n---\n\n# model A\n")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * (p.std() if p.numel() > 1 and p.std() > 0 else 0.02) * 0.8)
    model.save_pretrained(paths["b"])
    tokenizer.save_pretrained(paths["b"])
    paths["eval"].write_text(synthetic_text("mixed", 10, 99))
    return paths


VOCAB = 300


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"[UNK]": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w0", unk_token="[UNK]")


def eval_ids(n_blocks: int = 6, seq_len: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB - 1, (n_blocks, seq_len), generator=torch.Generator().manual_seed(seed))


def write_eval_text(path: Path, ids: torch.Tensor) -> Path:
    path.write_text(" ".join(f"w{int(t)}" for t in ids.flatten()))
    return path


def build_full_pair(root: Path, model_type: str = "llama", *, noise: float = 0.3, dtype=torch.float32, **sizes):
    """A (seeded init) and B = A + Gaussian noise, both saved with a tokenizer; returns (a, b)."""
    root = Path(root)
    cfg = tiny_config(model_type, vocab_size=VOCAB, **({"num_layers": 2, "hidden_size": 64} | sizes))
    model = init_model(cfg, seed=0)
    tok = word_tokenizer()
    model.to(dtype).save_pretrained(root / "a")
    tok.save_pretrained(root / "a")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            scale = p.float().std().item() if p.numel() > 1 else 0.0
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * (noise * scale + noise * 0.1))
    model.to(dtype).save_pretrained(root / "b")
    tok.save_pretrained(root / "b")
    return root / "a", root / "b"


BARRIER_NUMBERS = ("loss_a", "loss_b", "accuracy_a", "accuracy_b", "barrier_max", "barrier_mid", "barrier_mid_se",
                   "error_barrier_max", "error_barrier_mid")


def assert_same_result(got: dict, want: dict, rel: float = 2e-5) -> None:
    """Every number of two barrier results (``to_dict()`` or JSON) agrees to ``rel``."""
    assert got["alphas"] == want["alphas"]
    for key in ("loss", "accuracy"):
        for x, y in zip(got[key], want[key]):
            assert close(x, y, rel), (key, got[key], want[key])
    for key in BARRIER_NUMBERS:
        assert close(got[key], want[key], rel), (key, got[key], want[key])
