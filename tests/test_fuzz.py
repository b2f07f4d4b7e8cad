"""Property tests (hypothesis): the layer grammar and recipe loading fail only with their own
validation errors, whatever the input, and the grammar round-trips."""

from __future__ import annotations

import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_llmc.architecture import BLOCK_KINDS, KINDS
from hf_llmc.recipes import RecipeError, load_recipe, parse_recipe
from hf_llmc.selection import GLOBAL_KINDS, SpecItem, format_spec, parse_spec

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.function_scoped_fixture])

# -- layer grammar ----------------------------------------------------------------------------------
GRAMMAR_CHARS = st.sampled_from(list("0123456789-.,*: re") + ["attn", "mlp", "block", "norm", "embed", "head",
                                                                "final_norm", "re:", "(", "[", "\\", "٣", "\x00"])
grammar_like = st.lists(GRAMMAR_CHARS, max_size=12).map("".join)


@FUZZ
@given(st.one_of(st.text(max_size=40), grammar_like))
def test_parse_spec_raises_only_value_error(text):
    try:
        items = parse_spec(text)
    except ValueError:
        return
    assert items and all(isinstance(i, SpecItem) for i in items)


@FUZZ
@given(st.one_of(st.none(), st.integers(), st.lists(st.text(max_size=3), max_size=2), st.binary(max_size=4)))
def test_parse_spec_non_string_is_value_error(value):
    with pytest.raises(ValueError):
        parse_spec(value)


index = st.integers(min_value=-64, max_value=64)


@st.composite
def block_item(draw) -> SpecItem:
    kind = draw(st.sampled_from(("block", *BLOCK_KINDS)))
    shape = draw(st.sampled_from(("all", "one", "range")))
    if shape == "all":
        return SpecItem(kind)
    start = draw(index)
    end = start if shape == "one" else draw(index)
    return SpecItem(kind, start, end)


regex = st.text(alphabet=string.ascii_letters + string.digits + "._*+?|()[]^$\\ -", min_size=1, max_size=20).filter(
    lambda p: p == p.strip() and _compiles(p))


def _compiles(pattern: str) -> bool:
    import re

    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError):
        return False
    return True


valid_items = st.one_of(
    st.lists(st.one_of(block_item(), st.sampled_from(GLOBAL_KINDS).map(SpecItem)), min_size=1, max_size=6),
    regex.map(lambda p: [SpecItem("re", pattern=p)]),
)


@FUZZ
@given(valid_items)
def test_parse_format_round_trip(items):
    text = format_spec(items)
    assert parse_spec(text) == items
    assert format_spec(parse_spec(text)) == text


def test_grammar_kinds_are_the_architecture_kinds():
    assert set(KINDS) == {"block", *BLOCK_KINDS, *GLOBAL_KINDS}


# -- recipes ------------------------------------------------------------------------------------------
KEYS = ["description", "out", "batch_size", "pairs", "load", "data", "steps", "a", "b", "model", "revision", "name",
        "barrier", "scan", "merge", "push", "layers", "alpha", "alphas", "sets", "base", "method", "window", "mode",
        "order", "granularity", "seq_len", "max_tokens", "text_column", "dataset", "auto", "scan_dir", "folder",
        "push_to_hub", "dtype", "eval", "overwrite", "resume", "trust_remote_code", "allow_pickle", "device",
        "max_shard_size", "allow_extrapolation", "auto_layers", "max_barrier", "provenance", "x"]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10**6, max_value=10**6), st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(["attn.0", "attn.0-3=0.5", "0.1:0.9", "{pair}/x", "{pair.x}", "{0}", "../up", "/abs", "a", "b",
                     "lerp", "slerp", "window", "random", "2", "0,0.5", "float16", "x/y", "{step}"]),
)
structures = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.sampled_from(KEYS), children, max_size=5)),
    max_leaves=20,
)
pair_entry = st.fixed_dictionaries({"a": st.fixed_dictionaries({"model": st.sampled_from(["org/a", "./a"])}),
                                    "b": st.one_of(st.fixed_dictionaries({"model": st.text(max_size=5)}), structures)})
step_entry = st.dictionaries(st.sampled_from(["barrier", "scan", "merge", "push", "sacn"]),
                             st.one_of(st.dictionaries(st.sampled_from(KEYS), structures, max_size=4), structures),
                             min_size=1, max_size=2)
recipe_like = st.fixed_dictionaries(
    {"pairs": st.one_of(st.lists(pair_entry, min_size=1, max_size=2), structures),
     "steps": st.one_of(st.lists(step_entry, min_size=1, max_size=3), structures)},
    optional={"data": st.one_of(st.fixed_dictionaries({"data": st.just("eval.txt")},
                                                      optional={"seq_len": scalars, "max_tokens": scalars}), structures),
              "load": structures, "out": scalars, "batch_size": scalars, "description": scalars},
)


@FUZZ
@given(st.one_of(structures, recipe_like))
def test_parse_recipe_raises_only_recipe_error(payload):
    try:
        parse_recipe(payload, "fuzz.yaml")
    except RecipeError:
        pass


YAML_CHARS = st.sampled_from(list("abc:-{}[],'\"#&*!|>%@` \n\t0123456789.") + ["pairs", "steps", "merge", "model", "\x00",
                                                                               "é", "\ufeff", "!!python/object:os.system"])


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "recipe.yaml"


@FUZZ
@given(content=st.one_of(st.lists(YAML_CHARS, max_size=40).map("".join),
                         st.builds(lambda d: yaml.safe_dump(d), st.one_of(structures, recipe_like)),
                         st.binary(max_size=40)))
def test_load_recipe_raises_only_recipe_error(recipe_file, content):
    path = recipe_file
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    try:
        load_recipe(path)
    except RecipeError:
        pass
