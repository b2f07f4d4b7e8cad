"""Builds the committed mergekit reference data of tests/test_mergekit.py (run once; see README.md).

* ``a/``, ``b/``: a tiny random Llama pair (4 blocks, width 16, vocabulary 32, float32, no
  tokenizer); B = 0.8·A + 0.6·R (R another random model) plus noise on every tensor, so that slerp
  differs from lerp everywhere.
* ``linear.yml``, ``slerp.yml``: our copies of mergekit's published examples (``examples/linear.yml``
  with two models and weights 0.7 / 0.3, ``examples/gradient-slerp.yml`` over 4 layers), float32.
* ``emitted.yml``: what ``hf-llmc merge a b --set ... --emit-mergekit`` writes for a merge with
  per-group α and a gradient list (the exact command is below, in EMIT).
* ``out/NAME.safetensors``: mergekit 0.1.5's merge of each config (``mergekit-yaml NAME.yml DIR
  --no-write-model-card --no-copy-tokenizer``: the card looks the models up on the Hub, and the
  tiny pair has no tokenizer), in its own virtual environment (``--mergekit-venv``; created by the commands in
  README.md). mergekit is not a dependency of hf-llmc.

Run from the repository root, in hf-llmc's environment:
    python tests/data/mergekit/make_reference.py
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_VENV = Path.home() / ".cache" / "hf_llmc_bench" / "mergekit-venv"
SPEC = ["--set", "attn.0-1=0.25", "--set", "mlp.*=0,0.5,0.3,1", "--set", "norm.3=0.75", "--set", "embed=0.5"]
EMIT = ["hf-llmc", "merge", "a", "b", *SPEC, "--emit-mergekit", "emitted.yml"]

LINEAR = """\
# our copy of mergekit's examples/linear.yml, for two tiny local models (weights summing to 1)
models:
  - model: a
    parameters:
      weight: 0.7
  - model: b
    parameters:
      weight: 0.3
merge_method: linear
dtype: float32
"""

SLERP = """\
# our copy of mergekit's examples/gradient-slerp.yml, for two tiny local models of 4 layers
slices:
  - sources:
      - model: a
        layer_range: [0, 4]
      - model: b
        layer_range: [0, 4]
merge_method: slerp
base_model: a
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float32
"""


def build_pair() -> None:
    from hf_llmc.testing import init_model, tiny_config

    config = tiny_config("llama", num_layers=4, hidden_size=16, num_heads=2, intermediate_size=32, vocab_size=32,
                         max_positions=32, tie_word_embeddings=False)
    a, r = init_model(config, seed=0), init_model(config, seed=1)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for pa, pr in zip(a.parameters(), r.parameters()):
            pa.add_(0.1 * torch.randn(pa.shape, generator=gen))
            pr.mul_(0.6).add_(0.8 * pa).add_(0.1 * torch.randn(pr.shape, generator=gen))
    for name, model in (("a", a), ("b", r)):
        shutil.rmtree(HERE / name, ignore_errors=True)
        model.save_pretrained(HERE / name)
        (HERE / name / "generation_config.json").unlink(missing_ok=True)


def run_mergekit(venv: Path, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [str(venv / "bin" / "mergekit-yaml"), f"{name}.yml", str(Path(tmp) / name), "--no-write-model-card", "--no-copy-tokenizer"]
        print("+", " ".join(["mergekit-yaml", f"{name}.yml", f"OUT/{name}", *cmd[3:]]), flush=True)
        subprocess.run(cmd, cwd=HERE, check=True)
        (HERE / "out").mkdir(exist_ok=True)
        shutil.copyfile(Path(tmp) / name / "model.safetensors", HERE / "out" / f"{name}.safetensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit-venv", default=str(DEFAULT_VENV), help="mergekit 0.1.5's venv (default: %(default)s).")
    args = parser.parse_args()
    build_pair()
    (HERE / "linear.yml").write_text(LINEAR)
    (HERE / "slerp.yml").write_text(SLERP)
    (HERE / "emitted.yml").unlink(missing_ok=True)
    print("+", " ".join(EMIT), flush=True)
    subprocess.run([sys.executable, "-m", "hf_llmc", *EMIT[1:]], cwd=HERE, check=True)
    for name in ("linear", "slerp", "emitted"):
        run_mergekit(Path(args.mergekit_venv).expanduser(), name)


if __name__ == "__main__":
    main()
