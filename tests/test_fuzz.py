"""Property tests (hypothesis): the layer grammar and recipe loading fail only with their own
validation errors, whatever the input, and the grammar round-trips; every path a recipe produces
stays inside its output folder; every malformed safetensors header is refused with one line (at
least whatever the safetensors library refuses), and nothing is merged from it."""

from __future__ import annotations

import json
import os
import string
import struct
import tempfile
import types
import typing

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings, strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from hf_llmc import DataConfig, LoadConfig, parse_spec
from hf_llmc.cli.recipes import STEP_KINDS, _classes, load_recipe, parse_recipe, schema_fields
from hf_llmc.config.errors import RecipeError
from hf_llmc.config.spec import BLOCK_KINDS, GLOBAL_KINDS, KINDS, SpecItem, format_spec

# Nothing is written into the repository: no example database, hypothesis' caches in the temp folder.
set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "hf_llmc-hypothesis"))
FUZZ = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

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
TRICKY = ["attn.0", "attn.0-3=0.5", "0.1:0.9", "{pair}/x", "{pair.x}", "{pair[0]}", "{0}", "{step!z}", "{", "../up",
          "/abs", "", "a", "b", "lerp", "window", "random", "2", "0,0.5", "float16", "re:(", "1e400", "nan", "x/y"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-10**6, max_value=10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(TRICKY))
structures = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)),
    max_leaves=12,
)


def _typed(tp) -> st.SearchStrategy:
    """Mostly well-typed values for a settings field (so validation gets past the type checks)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(_typed(a) for a in typing.get_args(tp)))
    if tp is type(None):
        return st.none()
    if origin is list or tp is list:
        return st.lists(st.sampled_from(TRICKY), max_size=3)
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(min_value=-3, max_value=5000)
    if tp is float:
        return st.floats(allow_nan=True, allow_infinity=True)
    if tp is str:
        return st.one_of(st.sampled_from(TRICKY), st.text(max_size=10))
    return structures


def _body(classes: list[type]) -> st.SearchStrategy:
    fields = schema_fields(classes)
    hints = {key: typing.get_type_hints(cls)[f.name] for key, (cls, f) in fields.items()}
    choices = {key: f.metadata.get("choices") for key, (cls, f) in fields.items()}

    def value(key: str) -> st.SearchStrategy:
        good = st.sampled_from(choices[key]) if choices[key] else _typed(hints[key])
        return st.one_of(good, good, good, structures)  # mostly well-typed, sometimes anything

    return st.lists(st.sampled_from(sorted(fields)), max_size=4, unique=True).flatmap(
        lambda keys: st.fixed_dictionaries({k: value(k) for k in keys}))


step_entry = st.one_of(*(_body(_classes(kind)).map(lambda body, kind=kind: {kind: body}) for kind in STEP_KINDS),
                       st.dictionaries(st.sampled_from(["sacn", *STEP_KINDS]), structures, min_size=1, max_size=2))
model_ref = st.one_of(st.fixed_dictionaries({"model": st.sampled_from(["org/a", "./a"])},
                                            optional={"revision": st.sampled_from(["main", "step1"])}), structures)
recipe_like = st.fixed_dictionaries(
    {"pairs": st.one_of(st.lists(st.fixed_dictionaries({"a": model_ref, "b": model_ref},
                                                       optional={"name": _typed(str | None)}), min_size=1, max_size=2),
                        structures),
     "steps": st.one_of(st.lists(step_entry, min_size=1, max_size=3), structures)},
    optional={"data": st.one_of(_body([DataConfig]), structures), "load": st.one_of(_body([LoadConfig]), structures),
              "out": scalars, "batch_size": scalars, "description": scalars, "provenance": structures,
              "unknown": scalars},
)
PAIR = [{"a": {"model": "org/a"}, "b": {"model": "org/b"}}]


@FUZZ
@given(st.one_of(recipe_like, structures))
@example({"pairs": PAIR, "steps": [{"merge": {"layers": "attn.0", "out": "{pair.x}"}}]})
@example({"pairs": PAIR, "steps": [{"push": {"folder": "{pair[0]}", "push_to_hub": "me/x"}}]})
@example({"pairs": PAIR, "data": {"data": "e.txt"}, "steps": [{"merge": {"auto": True, "scan_dir": "{0}"}}]})
def test_parse_recipe_raises_only_recipe_error(payload):
    try:
        recipe = parse_recipe(payload, "fuzz.yaml")
    except RecipeError:
        return
    assert recipe.steps and recipe.pairs


YAML_CHARS = st.sampled_from(list("abc:-{}[],'\"#&*!|>%@` \n\t0123456789.") + ["pairs", "steps", "merge", "model", "\x00",
                                                                                "é", "\ufeff", "!!python/object:os.system"])


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "recipe.yaml"


@FUZZ
@given(content=st.one_of(st.lists(YAML_CHARS, max_size=40).map("".join),
                         st.builds(lambda d: yaml.safe_dump(d), st.one_of(recipe_like, structures)),
                         st.binary(max_size=40)))
@example(content=b"\xff\xfepairs: []")
@example(content="!!python/object/apply:os.system ['echo pwned']")
def test_load_recipe_raises_only_recipe_error(recipe_file, content):
    recipe_file.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    try:
        load_recipe(recipe_file)
    except RecipeError:
        pass


# -- recipe paths -------------------------------------------------------------------------------------
PATH_PARTS = st.sampled_from(["{pair}", "{step}", "..", ".", "/", "~", "x", "a/b", "\\", "\x00", "/tmp", "C:", "link"])
path_text = st.lists(PATH_PARTS, min_size=1, max_size=5).map("".join)


@pytest.fixture(scope="module")
def recipe_root(tmp_path_factory):
    """An output root holding a symbolic link that leads out of it."""
    base = tmp_path_factory.mktemp("recipe-paths")
    (base / "outside").mkdir()
    (base / "root").mkdir()
    (base / "root" / "link").symlink_to(base / "outside")
    return base


@FUZZ
@given(pair_name=st.one_of(st.none(), path_text), step_name=st.one_of(st.none(), path_text),
       out=st.one_of(st.none(), path_text), folder=path_text, scan_dir=path_text)
@example(pair_name="/tmp/victim", step_name=None, out="{pair}", folder="x", scan_dir="x")
@example(pair_name="link", step_name=None, out="{pair}/m", folder="x", scan_dir="x")
def test_recipe_paths_never_leave_the_output_folder(recipe_root, pair_name, step_name, out, folder, scan_dir):
    from hf_llmc.cli.recipes import check_outputs
    from hf_llmc.config.errors import UsageError

    root = recipe_root / "root"
    merge = {"auto": True, "scan_dir": scan_dir, **({"out": out} if out is not None else {}),
             **({"name": step_name} if step_name is not None else {})}
    payload = {"pairs": [{"a": {"model": "org/a"}, "b": {"model": "org/b"}, **({"name": pair_name} if pair_name else {})}],
               "data": {"data": "e.txt"}, "steps": [{"merge": merge}, {"push": {"folder": folder, "push_to_hub": "me/x"}}]}
    try:
        planned = check_outputs(parse_recipe(payload, "fuzz.yaml"), root)
    except UsageError:
        return
    real_root = os.path.realpath(root)
    for item in planned:
        for path in (item.output, item.scan_dir):
            if path is not None:
                real = os.path.realpath(path)
                assert real == real_root or real.startswith(real_root + os.sep), (item.field, path)


# -- safetensors headers ------------------------------------------------------------------------------
SIZES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U8": 1}
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=False),
              st.text(max_size=6)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=6,
)


@st.composite
def safetensors_bytes(draw) -> bytes:
    """A safetensors file: a valid layout, then (usually) one mutation of its header or size."""
    names = draw(st.lists(st.text(min_size=1, max_size=6).filter(lambda n: n != "__metadata__"), max_size=4, unique=True))
    header: dict = {}
    offset = 0
    for name in names:
        dtype = draw(st.sampled_from(sorted(SIZES)))
        shape = draw(st.lists(st.integers(min_value=0, max_value=3), max_size=3))
        n = SIZES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    if draw(st.booleans()):
        header["__metadata__"] = {"format": "pt"}
    data = draw(st.binary(min_size=offset, max_size=offset))
    mutation = draw(st.sampled_from(["none", "field", "drop", "shift", "alias", "root", "metadata", "repeat",
                                     "length", "cut", "extra", "garbage"]))
    tensors = [k for k in header if k != "__metadata__"]
    raw_header = None
    length = None
    if mutation == "field" and tensors:
        header[draw(st.sampled_from(tensors))][draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(json_values)
    elif mutation == "drop" and tensors:
        del header[draw(st.sampled_from(tensors))][draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
    elif mutation == "shift" and tensors:
        entry = header[draw(st.sampled_from(tensors))]
        i = draw(st.sampled_from([0, 1]))
        entry["data_offsets"][i] += draw(st.integers(min_value=-16, max_value=16))
    elif mutation == "alias" and len(tensors) > 1:
        a, b = draw(st.lists(st.sampled_from(tensors), min_size=2, max_size=2, unique=True))
        header[a] = {**header[b]}
    elif mutation == "root":
        raw_header = json.dumps(draw(json_values)).encode()
    elif mutation == "metadata":
        header["__metadata__"] = draw(json_values)
    elif mutation == "repeat" and tensors:
        text = json.dumps(header)
        first = json.dumps({tensors[0]: header[tensors[0]]})[1:-1]
        raw_header = ("{" + first + ", " + text[1:]).encode()
    elif mutation == "length":
        length = draw(st.one_of(st.integers(min_value=0, max_value=2**64 - 1), st.sampled_from([2**40, 100_000_001])))
    elif mutation == "garbage":
        raw_header = draw(st.binary(max_size=24))
    raw_header = raw_header if raw_header is not None else json.dumps(header).encode()
    blob = struct.pack("<Q", len(raw_header) if length is None else length) + raw_header + data
    if mutation == "cut":
        blob = blob[: draw(st.integers(min_value=0, max_value=len(blob)))]
    elif mutation == "extra":
        blob += draw(st.binary(min_size=1, max_size=9))
    return blob


@pytest.fixture(scope="module")
def st_files(tmp_path_factory, save_tiny_model):
    """A model A and a folder whose model.safetensors each example replaces (B)."""
    root = tmp_path_factory.mktemp("safetensors-fuzz")
    a = save_tiny_model("gpt2", root / "a")
    b = root / "b"
    b.mkdir()
    (b / "config.json").write_bytes((a / "config.json").read_bytes())
    return {"root": root, "a": a, "b": b}


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(blob=safetensors_bytes())
@example(blob=struct.pack("<Q", 2**40) + b"{}")
@example(blob=struct.pack("<Q", 2) + b"[]")
def test_malformed_safetensors_headers_are_refused_in_one_line(st_files, blob):
    import torch
    from safetensors import safe_open

    from hf_llmc import lazy_pair, save_merged
    from hf_llmc.config.errors import CheckpointError
    from hf_llmc.model.checkpoint.safetensors import SafetensorsFile

    path = st_files["b"] / "model.safetensors"
    path.write_bytes(blob)
    try:
        with safe_open(path, "pt") as f:
            library = {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # noqa: BLE001 - the library refuses: so must hf-llmc
        library = None
    try:
        ours = SafetensorsFile(path)
    except CheckpointError as err:
        message = str(err)
        assert "\n" not in message and message.startswith(f"{path}: "), message
        out = st_files["root"] / "merged"
        with pytest.raises(CheckpointError):  # a merge from it is refused before anything is written
            save_merged(lazy_pair(st_files["a"], st_files["b"]), "attn.0=0.5", out)
        assert not out.exists() and not [p for p in st_files["root"].iterdir() if "hf-llmc-tmp" in p.name]
        return
    assert library is not None, "hf-llmc accepted a header the safetensors library refuses"
    assert set(ours.keys()) == set(library)
    for key, tensor in library.items():
        mine = ours.get(key)
        assert mine.dtype == tensor.dtype and tuple(mine.shape) == tuple(tensor.shape)
        assert torch.equal(mine.reshape(-1).view(torch.uint8), tensor.reshape(-1).contiguous().view(torch.uint8))
