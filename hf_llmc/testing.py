"""Tiny real models for tests, benchmarks and the demo: two small causal LMs fine-tuned from one
shared initialisation, and the pieces to build them.

Everything here runs offline on a CPU in seconds: text comes from code
(:func:`synthetic_documents`), the tokenizer is trained on it
(:func:`train_tokenizer`), and :func:`build_pair` pre-trains one model on mixed text
and fine-tunes two copies on two different domains, so that the full-model linear
interpolation between them shows a loss barrier while they still share a common
ancestor (the setting of the layer-wise LMC paper).

Public API
----------
* :func:`synthetic_documents` — deterministic documents of domain ``"a"`` (recipes),
  ``"b"`` (market and weather reports) or ``"mixed"`` (both).
* :func:`train_tokenizer` — byte-level BPE wrapped as a ``PreTrainedTokenizerFast``.
* :func:`tiny_config` — a small ``transformers`` config for one of :data:`MODEL_TYPES`.
* :func:`init_model` — a randomly initialised (seeded) model from :func:`tiny_config`.
* :func:`build_pair` — train and save the pair; return :class:`DemoPair`.
* :data:`CHAT_TEMPLATE` / :data:`CHAT_TEMPLATE_NO_MARKERS` and :func:`synthetic_conversations` —
  a small chat template (with and without ``{% generation %}`` markers) and chat data for it.
"""

from __future__ import annotations

import copy
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

__all__ = [
    "CHAT_TEMPLATE",
    "CHAT_TEMPLATE_NO_MARKERS",
    "DOMAINS",
    "EOS_TOKEN",
    "MODEL_TYPES",
    "DemoPair",
    "build_pair",
    "init_model",
    "synthetic_conversations",
    "synthetic_documents",
    "synthetic_text",
    "tiny_config",
    "train_tokenizer",
]

#: The single special token (GPT-2 style): bos = eos = unk.
EOS_TOKEN = "<|endoftext|>"

#: Domains understood by :func:`synthetic_documents`.
DOMAINS = ("a", "b", "mixed")

#: Architectures :func:`tiny_config` can build.
MODEL_TYPES = (
    "gpt2",
    "llama",
    "gpt_neox",
    "mistral",
    "qwen2",
    "opt",
    "phi",
    "falcon",
    "gptj",
    "gemma",
)

# ---------------------------------------------------------------------------------------
# Synthetic text
# ---------------------------------------------------------------------------------------

# Domain "a": recipes. Lower-case prose, imperative mood, kitchen vocabulary.
_A_ADJ = ["golden", "creamy", "spicy", "rustic", "tender", "crispy", "smoky", "zesty",
          "hearty", "silky", "fragrant", "sticky"]
_A_DISH = ["lentil soup", "apple tart", "mushroom risotto", "garlic bread", "lemon cake",
           "bean stew", "pumpkin pie", "onion gravy", "ginger cookies", "tomato sauce",
           "potato gratin", "herb omelette"]
_A_ING = ["butter", "flour", "sugar", "garlic", "onions", "carrots", "cream", "honey",
          "lemon juice", "olive oil", "rice", "eggs", "milk", "basil", "mushrooms",
          "potatoes"]
_A_SPICE = ["salt", "pepper", "nutmeg", "cinnamon", "paprika", "cumin", "thyme",
            "oregano"]
_A_TOOL = ["bowl", "saucepan", "skillet", "baking tray", "pot", "casserole dish"]
_A_VERB = ["whisk", "stir", "fold", "chop", "simmer", "knead", "sprinkle", "roast",
           "saute", "blend"]
_A_TEXTURE = ["smooth", "fluffy", "golden brown", "thick", "soft", "bubbling", "glossy"]
_A_GARNISH = ["fresh parsley", "a dollop of cream", "toasted seeds", "grated cheese",
              "a drizzle of honey", "chopped chives"]


def _doc_a(rng: random.Random) -> str:
    dish = f"{rng.choice(_A_ADJ)} {rng.choice(_A_DISH)}"
    templates = [
        lambda: f"preheat the oven to {rng.choice(range(160, 240, 10))} degrees and "
                f"grease a {rng.choice(_A_TOOL)}.",
        lambda: f"{rng.choice(_A_VERB)} {rng.randint(1, 6)} cups of "
                f"{rng.choice(_A_ING)} with a pinch of {rng.choice(_A_SPICE)} until "
                f"{rng.choice(_A_TEXTURE)}.",
        lambda: f"add the {rng.choice(_A_ING)} and {rng.choice(_A_VERB)} gently for "
                f"{rng.randint(2, 30)} minutes.",
        lambda: f"season with {rng.choice(_A_SPICE)} and {rng.choice(_A_SPICE)}, then "
                f"{rng.choice(_A_VERB)} the {rng.choice(_A_ING)}.",
        lambda: f"let the mixture rest in a {rng.choice(_A_TOOL)} until it is "
                f"{rng.choice(_A_TEXTURE)}.",
        lambda: f"{rng.choice(_A_VERB)} in the {rng.choice(_A_ING)} and the "
                f"{rng.choice(_A_ING)}, stirring until {rng.choice(_A_TEXTURE)}.",
    ]
    n = rng.randint(3, 6)
    body = " ".join(rng.choice(templates)() for _ in range(n))
    return (f"recipe for {dish}: {body} serve the {dish} warm with "
            f"{rng.choice(_A_GARNISH)}.")


# Domain "b": market and weather reports. Capitalised, numeric, declarative.
_B_COMPANY = ["Acme Corp", "Globex", "Initech", "Umbrella Ltd", "Hooli", "Vandelay Inc",
              "Stark Industries", "Wayne Holdings", "Soylent Co", "Tyrell Systems"]
_B_INDEX = ["NASDAQ", "FTSE 100", "DAX", "Nikkei", "S&P 500", "CAC 40"]
_B_SECTOR = ["Energy", "Banking", "Technology", "Retail", "Mining", "Telecom"]
_B_MOVE_UP = ["rose", "gained", "climbed", "jumped", "advanced"]
_B_MOVE_DOWN = ["fell", "slipped", "dropped", "declined", "tumbled"]
_B_CITY = ["Berlin", "Tokyo", "Chicago", "Madrid", "Oslo", "Cairo", "Lima", "Toronto"]
_B_WEATHER = ["Heavy rain", "Clear skies", "Scattered showers", "Thunderstorms",
              "Dense fog", "Light snow", "Strong winds", "Overcast"]
_B_WIND = ["N", "NE", "E", "SE", "S", "SW", "W", "NW"]
_B_MONTH = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV",
            "DEC"]


def _doc_b(rng: random.Random) -> str:
    def pct() -> str:
        return f"{rng.randint(0, 9)}.{rng.randint(0, 99):02d}%"

    templates = [
        lambda: f"Shares of {rng.choice(_B_COMPANY)} {rng.choice(_B_MOVE_UP)} {pct()} "
                f"to ${rng.randint(10, 990)}.{rng.randint(0, 99):02d}.",
        lambda: f"The {rng.choice(_B_INDEX)} {rng.choice(_B_MOVE_DOWN)} {pct()} as "
                f"{rng.choice(_B_SECTOR)} stocks {rng.choice(_B_MOVE_DOWN)}.",
        lambda: f"{rng.choice(_B_SECTOR)} led the {rng.choice(_B_INDEX)}, which "
                f"{rng.choice(_B_MOVE_UP)} {pct()} on volume of "
                f"{rng.randint(1, 99)}M.",
        lambda: f"WEATHER {rng.choice(_B_CITY)}: {rng.choice(_B_WEATHER)}, high "
                f"{rng.randint(-9, 39)}C, low {rng.randint(-19, 25)}C, wind "
                f"{rng.choice(_B_WIND)} {rng.randint(5, 90)} km/h.",
        lambda: f"Analysts expect {rng.choice(_B_COMPANY)} to report Q{rng.randint(1, 4)} "
                f"revenue of ${rng.randint(1, 99)}.{rng.randint(0, 9)}B.",
        lambda: f"Outlook {rng.choice(_B_CITY)}: {rng.choice(_B_WEATHER)} until "
                f"{rng.randint(1, 12)}PM, {rng.randint(0, 100)}% chance of rain.",
    ]
    n = rng.randint(3, 6)
    head = (f"REPORT {rng.randint(1, 28):02d}-{rng.choice(_B_MONTH)}-"
            f"{rng.randint(2001, 2029)} |")
    body = " ".join(rng.choice(templates)() for _ in range(n))
    return f"{head} {body} END OF REPORT."


def synthetic_documents(domain: str, n_docs: int, seed: int) -> list[str]:
    """Return ``n_docs`` deterministic synthetic documents of ``domain``.

    ``"a"`` are recipes (lower-case imperative kitchen prose), ``"b"`` are market and
    weather reports (capitalised, numeric), ``"mixed"`` draws each document from ``"a"``
    or ``"b"`` with probability 1/2. The result depends only on the arguments
    (``random.Random(seed)``; no global state, no downloads).
    """
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    if n_docs < 0:
        raise ValueError("n_docs must be >= 0")
    rng = random.Random(f"hf-llmc-demo/{domain}/{seed}")
    docs: list[str] = []
    for _ in range(n_docs):
        if domain == "a" or (domain == "mixed" and rng.random() < 0.5):
            docs.append(_doc_a(rng))
        else:
            docs.append(_doc_b(rng))
    return docs


def synthetic_text(domain: str, n_docs: int, seed: int) -> str:
    """:func:`synthetic_documents` joined by blank lines (the layout of ``eval.txt``)."""
    return "\n\n".join(synthetic_documents(domain, n_docs, seed)) + "\n"


# ---------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE (GPT-2 style) on ``texts``.

    Returns a ``transformers.PreTrainedTokenizerFast`` whose bos, eos and unk token is
    ``<|endoftext|>`` (id 0), so ``save_pretrained`` / ``AutoTokenizer.from_pretrained``
    round-trip. ``vocab_size`` counts the 256 byte symbols and the special token, so it
    must be at least 257; the trained vocabulary can be smaller when the text has few
    merges to offer (use ``len(tokenizer)``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(f"vocab_size must be >= {len(alphabet) + 1} for byte-level BPE")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        model_max_length=1_000_000,
    )


# ---------------------------------------------------------------------------------------
# Configs and models
# ---------------------------------------------------------------------------------------


def _round_up(x: int, m: int) -> int:
    return int(math.ceil(x / m) * m)


def tiny_config(
    model_type: str,
    *,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    vocab_size: int = 300,
    max_positions: int = 256,
    tie_word_embeddings: bool | None = None,
    bos_token_id: int = 0,
    eos_token_id: int = 0,
):
    """A small ``transformers`` config of ``model_type`` (one of :data:`MODEL_TYPES`).

    Sizes use the common names; they are mapped to each architecture's own field names
    (e.g. GPT-2 ``n_layer``/``n_embd``, OPT ``ffn_dim``, GPT-J ``rotary_dim``). Dropout
    is zero everywhere. ``intermediate_size`` defaults to ``4 * hidden_size`` (gated
    MLPs — llama, mistral, qwen2, gemma — to ``8/3 * hidden_size`` rounded up to 8).
    ``tie_word_embeddings=None`` keeps the architecture's default (tied for gpt2, opt,
    gemma, falcon). Falcon is the parallel-attention (Falcon-7B style) variant; phi and
    gpt_neox use partial rotary embeddings.
    """
    import transformers as tf

    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}; expected one of {MODEL_TYPES}")
    if hidden_size % num_heads:
        raise ValueError("hidden_size must be divisible by num_heads")
    head_dim = hidden_size // num_heads
    gated = model_type in ("llama", "mistral", "qwen2", "gemma")
    if intermediate_size is None:
        intermediate_size = _round_up(8 * hidden_size // 3, 8) if gated else 4 * hidden_size
    common: dict[str, Any] = {"vocab_size": vocab_size, "bos_token_id": bos_token_id,
                              "eos_token_id": eos_token_id}
    if tie_word_embeddings is not None:
        common["tie_word_embeddings"] = tie_word_embeddings

    def rope(partial: float | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"rope_type": "default", "rope_theta": 10000.0}
        if partial is not None:
            params["partial_rotary_factor"] = partial
        return params

    llama_like = {
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_heads,
        "max_position_embeddings": max_positions,
        "attention_dropout": 0.0,
        "rope_parameters": rope(),
    }
    if model_type == "gpt2":
        cfg = tf.GPT2Config(
            n_layer=num_layers, n_embd=hidden_size, n_head=num_heads,
            n_inner=intermediate_size, n_positions=max_positions,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    elif model_type == "llama":
        cfg = tf.LlamaConfig(**llama_like, **common)
    elif model_type == "mistral":
        cfg = tf.MistralConfig(**llama_like, sliding_window=None, **common)
    elif model_type == "qwen2":
        cfg = tf.Qwen2Config(**llama_like, use_sliding_window=False, **common)
    elif model_type == "gemma":
        cfg = tf.GemmaConfig(**llama_like, head_dim=head_dim, **common)
    elif model_type == "gpt_neox":
        cfg = tf.GPTNeoXConfig(
            hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=num_layers, num_attention_heads=num_heads,
            max_position_embeddings=max_positions, rope_parameters=rope(0.25),
            use_parallel_residual=True, attention_dropout=0.0, hidden_dropout=0.0,
            **common)
    elif model_type == "opt":
        cfg = tf.OPTConfig(
            hidden_size=hidden_size, word_embed_proj_dim=hidden_size,
            ffn_dim=intermediate_size, num_hidden_layers=num_layers,
            num_attention_heads=num_heads, max_position_embeddings=max_positions,
            dropout=0.0, attention_dropout=0.0, layerdrop=0.0, pad_token_id=None,
            **common)
    elif model_type == "phi":
        cfg = tf.PhiConfig(
            hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=num_layers, num_attention_heads=num_heads,
            num_key_value_heads=num_heads, max_position_embeddings=max_positions,
            rope_parameters=rope(0.5), resid_pdrop=0.0, embd_pdrop=0.0,
            attention_dropout=0.0, **common)
    elif model_type == "falcon":
        cfg = tf.FalconConfig(
            hidden_size=hidden_size, ffn_hidden_size=intermediate_size,
            num_hidden_layers=num_layers, num_attention_heads=num_heads,
            new_decoder_architecture=False, parallel_attn=True, multi_query=True,
            alibi=False, bias=False, max_position_embeddings=max_positions,
            rope_parameters=rope(), hidden_dropout=0.0, attention_dropout=0.0,
            **common)
    elif model_type == "gptj":
        rotary_dim = max(2, (head_dim // 2) // 2 * 2)
        cfg = tf.GPTJConfig(
            n_layer=num_layers, n_embd=hidden_size, n_head=num_heads,
            n_inner=intermediate_size, n_positions=max_positions, rotary_dim=rotary_dim,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    else:  # pragma: no cover - guarded above
        raise AssertionError(model_type)
    return cfg


def init_model(config, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised ``AutoModelForCausalLM`` from ``config``, seeded.

    ``config`` may also be a model type string, in which case :func:`tiny_config` with
    its defaults builds it. The global torch RNG is restored afterwards.
    """
    from transformers import AutoModelForCausalLM

    if isinstance(config, str):
        config = tiny_config(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.to(dtype).eval()


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoPair:
    """Paths of a built demo pair.

    ``a`` and ``b`` are ``save_pretrained`` directories (model + tokenizer),
    ``eval_text`` a plain text file of mixed-domain documents separated by blank lines,
    ``tokenizer_vocab_size`` is ``len(tokenizer)`` (= the models' ``vocab_size``).
    """

    a: Path
    b: Path
    eval_text: Path
    tokenizer_vocab_size: int


def _blocks(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    ids = tokenizer("\n\n".join(texts) + "\n")["input_ids"]
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError("not enough text for one block")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def _docs_for_tokens(domain: str, n_tokens: int, seed: int) -> list[str]:
    """Enough documents of ``domain`` for at least ~``n_tokens`` tokens.

    The byte-level tokenizers trained here (vocab >= 257) produce at least one token
    per two characters on this text, so ``2 * n_tokens`` characters suffice.
    """
    docs: list[str] = []
    chunk = 0
    chars = 0
    while chars < 2 * n_tokens:
        batch = synthetic_documents(domain, 32, seed * 1_000_003 + chunk)
        chunk += 1
        docs.extend(batch)
        chars += sum(len(d) for d in batch)
    return docs


def _lr_factor(step: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then constant."""
    return min(1.0, (step + 1) / warmup)


def _train(model, blocks: torch.Tensor, *, steps: int, batch_size: int, lr: float,
           seed: int) -> list[float]:
    """Plain AdamW loop on random batches of ``blocks``; returns the per-step losses."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95),
                            weight_decay=0.0)
    warmup = max(1, min(10, steps // 10))
    if getattr(model, "loss_type", None) is None:
        # transformers 5 derives the loss from the class name; GPT2LMHeadModel has no
        # match and would log a warning on the first call with labels.
        model.loss_type = "ForCausalLM"
    model.train()
    losses: list[float] = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * _lr_factor(step, warmup)
        idx = torch.randint(blocks.shape[0], (batch_size,), generator=gen)
        x = blocks[idx]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def _train_pair(config, out: Path, blocks_mixed: torch.Tensor,
                finetune_data: dict[str, torch.Tensor], tokenizer, *, pretrain_steps: int,
                finetune_steps: int, batch_size: int, lr: float, seed: int,
                dtype: torch.dtype) -> dict[str, list[float]]:
    """Pre-train the shared initialisation, fine-tune and save A and B; return losses.

    The two fine-tunes run at once, one Python thread each (torch releases the GIL in its
    kernels, so two cores do both in the time of one). Neither touches the global random
    state (no dropout; batches come from per-run generators) and each runs its kernels on its
    own thread, so the weights are the same as from one fine-tune after the other.
    """
    from concurrent.futures import ThreadPoolExecutor

    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        results: dict[str, list[float]] = {
            "pretrain": _train(base, blocks_mixed, steps=pretrain_steps, batch_size=batch_size, lr=lr, seed=seed)}
    models = {name: copy.deepcopy(base) for name in ("a", "b")}
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = {name: pool.submit(_train, models[name], finetune_data[name], steps=finetune_steps,
                                  batch_size=batch_size, lr=lr, seed=seed + offset)
                for offset, name in enumerate(models, start=1)}
        results.update({name: run.result() for name, run in runs.items()})
    for name, model in models.items():
        model.to(dtype).save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
    return results


def build_pair(
    out_dir: str | Path,
    *,
    model_type: str = "gpt2",
    num_layers: int = 4,
    hidden_size: int = 128,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    vocab_size: int = 512,
    max_positions: int = 256,
    pretrain_steps: int,
    finetune_steps: int,
    seq_len: int = 64,
    batch_size: int = 8,
    lr: float = 3e-3,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tie_word_embeddings: bool | None = None,
    replay: float = 0.25,
    eval_blocks: int = 16,
    num_threads: int | None = 1,
) -> DemoPair:
    """Train and save a pair of models fine-tuned from one shared initialisation.

    1. One byte-level BPE tokenizer (``vocab_size``) is trained on mixed text.
    2. A ``model_type`` model (:func:`tiny_config` sizes) is initialised from ``seed``
       and pre-trained for ``pretrain_steps`` AdamW steps on mixed text.
    3. Two copies are fine-tuned for ``finetune_steps`` each: A on domain ``"a"``
       (recipes), B on domain ``"b"`` (reports). ``replay`` adds that fraction (relative
       to the own domain's blocks) of the other domain's blocks to each fine-tuning set,
       so both endpoints stay usable on mixed text; with a short pre-training the two
       fine-tunes then leave the shared basin and the full-model midpoint shows a loss
       barrier on mixed text (a long pre-training removes it, as in the LMC
       literature).
    4. A and B (cast to ``dtype``) are saved with ``save_pretrained`` (safetensors) and
       the tokenizer into ``out_dir/"a"`` and ``out_dir/"b"``; mixed-domain evaluation
       text from a different seed, at least ``eval_blocks`` blocks of 64 tokens, goes to
       ``out_dir/"eval.txt"``; training settings and losses to ``out_dir/"demo.json"``.

    Training runs in float32 on CPU with ``num_threads`` torch threads (restored
    afterwards; ``None`` keeps the caller's setting); the two fine-tunes run at once, each on
    its own Python thread with that many torch threads. One thread is the default because
    these models are too small to gain from intra-op parallelism (two fine-tunes on two
    cores are), and it makes the saved weights independent of the core count: the
    output is then byte-for-byte deterministic given the arguments.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if seq_len > max_positions:
        raise ValueError("seq_len must be <= max_positions")
    if not 0.0 <= replay <= 1.0:
        raise ValueError("replay must be in [0, 1]")

    # One tokenizer for both models, trained on a fixed amount of mixed text.
    tokenizer = train_tokenizer(synthetic_documents("mixed", 400, seed), vocab_size)
    n_vocab = len(tokenizer)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)

    # Training text: about one fresh block per training sequence (at least 16 blocks).
    min_tokens = 16 * seq_len
    pt_tokens = max(pretrain_steps * batch_size * seq_len, min_tokens)
    ft_tokens = max(finetune_steps * batch_size * seq_len, min_tokens)
    blocks_mixed = _blocks(tokenizer, _docs_for_tokens("mixed", pt_tokens, seed), seq_len)
    blocks_a = _blocks(tokenizer, _docs_for_tokens("a", ft_tokens, seed + 1), seq_len)
    blocks_b = _blocks(tokenizer, _docs_for_tokens("b", ft_tokens, seed + 2), seq_len)

    def with_replay(own: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        k = min(int(round(replay * own.shape[0])), other.shape[0])
        return torch.cat([own, other[:k]]) if k else own

    finetune_data = {"a": with_replay(blocks_a, blocks_b), "b": with_replay(blocks_b, blocks_a)}

    config = tiny_config(
        model_type, num_layers=num_layers, hidden_size=hidden_size, num_heads=num_heads,
        intermediate_size=intermediate_size, vocab_size=n_vocab,
        max_positions=max_positions, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=eos_id, eos_token_id=eos_id)

    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        results = _train_pair(config, out, blocks_mixed, finetune_data, tokenizer,
                              pretrain_steps=pretrain_steps, finetune_steps=finetune_steps,
                              batch_size=batch_size, lr=lr, seed=seed, dtype=dtype)
    finally:
        torch.set_num_threads(previous_threads)

    # Evaluation text: mixed domain, a seed no training set uses.
    eval_seed = seed + 7_777_777
    need = eval_blocks * 64 + 1
    kept: list[str] = []
    n_tokens = 0
    # synthetic_documents is prefix-stable: the first k documents do not depend on n. Documents
    # are counted one by one (joined text tokenizes to about the sum), then the whole is checked.
    for doc in synthetic_documents("mixed", max(64, 4 * eval_blocks), eval_seed):
        kept.append(doc)
        n_tokens += len(tokenizer(doc + "\n\n")["input_ids"])
        if n_tokens >= need and len(tokenizer("\n\n".join(kept) + "\n")["input_ids"]) >= need:
            break
    if len(tokenizer("\n\n".join(kept) + "\n")["input_ids"]) < need:  # pragma: no cover - ~100 tokens a document
        raise RuntimeError("could not generate enough evaluation text")
    text = "\n\n".join(kept) + "\n"
    eval_path = out / "eval.txt"
    eval_path.write_text(text, encoding="utf-8")

    meta = {
        "model_type": model_type, "num_layers": num_layers, "hidden_size": hidden_size,
        "num_heads": num_heads, "intermediate_size": intermediate_size,
        "vocab_size": n_vocab, "max_positions": max_positions,
        "pretrain_steps": pretrain_steps, "finetune_steps": finetune_steps,
        "seq_len": seq_len, "batch_size": batch_size, "lr": lr, "seed": seed,
        "replay": replay, "tie_word_embeddings": tie_word_embeddings,
        "dtype": str(dtype).replace("torch.", ""),
        "final_loss": {k: (v[-1] if v else None) for k, v in results.items()},
    }
    (out / "demo.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return DemoPair(a=out / "a", b=out / "b", eval_text=eval_path,
                    tokenizer_vocab_size=n_vocab)


# ---------------------------------------------------------------------------------------
# Chat data
# ---------------------------------------------------------------------------------------

#: A small chat template whose assistant turns are marked with ``{% generation %}`` (what
#: ``apply_chat_template(return_assistant_tokens_mask=True)`` needs); turn markers are plain text.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<bot>{% generation %}{{ m['content'] }}</s>\n{% endgeneration %}"
    "{% else %}<{{ m['role'][:3] }}>{{ m['content'] }}</s>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<bot>{% endif %}"
)

#: The same template without markers: hf-llmc then locates assistant turns by rendering prefixes.
CHAT_TEMPLATE_NO_MARKERS = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")


def synthetic_conversations(n: int, seed: int, *, long_every: int = 0) -> list[list[dict[str, str]]]:
    """``n`` deterministic conversations (lists of ``{role, content}``) about the two domains.

    Each has an optional system message and one or two user / assistant exchanges: the user asks
    for a recipe or a report, the assistant answers with the first 3 to 14 words of a document of
    that domain (mostly 40 to 120 tokens with the tokenizer of :func:`build_pair`). With
    ``long_every = k``, every k-th conversation has six exchanges (longer than 128 tokens).

    Args:
        n: the number of conversations.
        seed: the random seed.
        long_every: make every k-th conversation long (0: none).

    Returns:
        The conversations.
    """
    rng = random.Random(f"hf-llmc-chat/{seed}")
    out = []
    for i in range(n):
        messages = [{"role": "system", "content": "be brief."}] if rng.random() < 0.3 else []
        turns = 6 if long_every and i % long_every == long_every - 1 else rng.randint(1, 2)
        for _ in range(turns):
            domain = rng.choice(["a", "b"])
            question = "a recipe?" if domain == "a" else "Report?"
            doc = synthetic_documents(domain, 1, rng.randrange(10**9))[0]
            answer = " ".join(doc.split()[: rng.randint(3, 14)])
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        out.append(messages)
    return out


#: The turn markers a chat fine-tune adds to its vocabulary (:func:`build_chat_pair`).
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>", "<|assistant|>"]

#: B's chat template in :func:`build_chat_pair`: its added tokens mark the turns.
CHAT_TEMPLATE_IM = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class ChatPair:
    """Paths of a chat pair built by :func:`build_chat_pair`: ``a`` and ``b`` are
    ``save_pretrained`` folders, ``conversations`` a JSONL file with a ``messages`` column."""

    a: Path
    b: Path
    conversations: Path


def build_chat_pair(pair: DemoPair, out_dir: str | Path, *, conversations: int = 96, steps: int = 30,
                    seq_len: int = 64, batch_size: int = 8, lr: float = 1e-3, seed: int = 0) -> ChatPair:
    """Two chat fine-tunes of a built pair whose vocabularies differ by added tokens.

    A is ``pair.a`` with a pad token added (one new embedding row) and :data:`CHAT_TEMPLATE`
    (plain-text turn markers). B is ``pair.b`` with the three :data:`CHAT_TOKENS` added, its
    embedding padded to a multiple of 8, and :data:`CHAT_TEMPLATE_IM`. Each trains ``steps`` steps
    on its own conversations rendered with its own template (so B's new rows are trained). Held-out
    conversations go to ``conversations.jsonl``.

    Args:
        pair: the pair to start from (:func:`build_pair`).
        out_dir: where ``a``, ``b`` and ``conversations.jsonl`` go.
        conversations: held-out conversations written for evaluation.
        steps, seq_len, batch_size, lr, seed: the chat training of each side.

    Returns:
        The paths.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sides = {  # source, template, added tokens, embedding rows padded to a multiple of, seed offset
        "a": (pair.a, CHAT_TEMPLATE, lambda tok: tok.add_special_tokens({"pad_token": "<pad>"}), None, 3),
        "b": (pair.b, CHAT_TEMPLATE_IM, lambda tok: tok.add_tokens(CHAT_TOKENS, special_tokens=True), 8, 1),
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, (source, template, add_tokens, multiple, offset) in sides.items():
            tok = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source)
            add_tokens(tok)
            tok.chat_template = template
            model.resize_token_embeddings(len(tok), pad_to_multiple_of=multiple)
            ids: list[int] = []
            for conv in synthetic_conversations(4 * batch_size * max(1, steps // 8), seed + offset):
                ids.extend(tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"])
            n = len(ids) // seq_len
            blocks = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
            _train(model, blocks, steps=steps, batch_size=batch_size, lr=lr, seed=seed + offset)
            model.save_pretrained(out / name)
            tok.save_pretrained(out / name)

    path = out / "conversations.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for conv in synthetic_conversations(conversations, seed + 2):
            f.write(json.dumps({"messages": conv}) + "\n")
    return ChatPair(a=out / "a", b=out / "b", conversations=path)
