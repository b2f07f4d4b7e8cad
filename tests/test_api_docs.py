"""The documented Python API is typed and documented: every name in ``hf_llmc.__all__`` and every
public function, method and class of the modules that define them has a complete signature
(parameters and return annotated, resolvable with ``typing.get_type_hints``) and a docstring in the
style of huggingface_hub: a one-line summary, then ``Args:`` (each parameter), ``Returns:`` (unless
it returns None) and ``Raises:`` (each hf_llmc error the function raises itself)."""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import inspect
import re
import textwrap
import typing
from collections.abc import Callable, Iterator
from types import ModuleType

import pytest

import hf_llmc
from hf_llmc.config import errors as errors_module

#: The modules whose public functions, methods and classes are checked.
MODULES = [
    "hf_llmc.api",
    "hf_llmc.config.data",
    "hf_llmc.config.load",
    "hf_llmc.config.scan",
    "hf_llmc.config.merge",
    "hf_llmc.config.mergekit",
    "hf_llmc.config.spec",
    "hf_llmc.config.alphas",
    "hf_llmc.config.errors",
    "hf_llmc.config.fields",
    "hf_llmc.config.security",
    "hf_llmc.config.files",
    "hf_llmc.model.selection",
    "hf_llmc.engine.data",
    "hf_llmc.engine.evaluation",
    "hf_llmc.engine.io",
    "hf_llmc.analyses.barrier",
    "hf_llmc.analyses.scan",
    "hf_llmc.analyses.multiset",
    "hf_llmc.analyses.sequential",
    "hf_llmc.analyses.robustness",
    "hf_llmc.analyses.distances",
    "hf_llmc.analyses.autoselect",
    "hf_llmc.analyses.search",
    "hf_llmc.config.search",
    "hf_llmc.outputs.search",
    "hf_llmc.outputs.merge.save",
    "hf_llmc.outputs.merge.mergekit",
    "hf_llmc.outputs.hub",
    "hf_llmc.outputs.report",
]
#: Names of ``hf_llmc.__all__`` defined outside :data:`MODULES`, not checked yet (with the reason).
NOT_CHECKED = {"lazy_pair": "defined in hf_llmc/model/pair.py, outside this check's modules"}
SECTION = re.compile(r"^(Args|Arguments|Returns|Yields|Raises|Attributes|Example|Examples|Note|Notes):\s*$")
ENTRY = re.compile(r"^\s+(\*{0,2}[A-Za-z_][A-Za-z0-9_]*)\s*(?:\([^)]*\))?:")


# -- collection -------------------------------------------------------------------------------------
def owned(module: ModuleType, obj: object) -> bool:
    return getattr(obj, "__module__", None) == module.__name__


def members(module: ModuleType) -> Iterator[tuple[str, object, ModuleType]]:
    """``(qualified name, object, module)`` of every public function, method, property and class
    defined in ``module`` (methods and properties: those defined in the class itself)."""
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or not owned(module, obj):
            continue
        if inspect.isfunction(obj):
            yield f"{module.__name__}.{name}", obj, module
        elif inspect.isclass(obj):
            yield f"{module.__name__}.{name}", obj, module
            for attr, value in vars(obj).items():
                if attr.startswith("_"):
                    continue
                if isinstance(value, (staticmethod, classmethod, property)) or inspect.isfunction(value):
                    yield f"{module.__name__}.{name}.{attr}", value, module


def all_members() -> list[tuple[str, object, ModuleType]]:
    seen: dict[str, tuple[str, object, ModuleType]] = {}
    for module_name in MODULES:
        for item in members(importlib.import_module(module_name)):
            seen.setdefault(item[0], item)
    for name in hf_llmc.__all__:
        obj = getattr(hf_llmc, name)
        if name in NOT_CHECKED or not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        module = importlib.import_module(obj.__module__)
        assert module.__name__ in MODULES, f"{name}: defined in {module.__name__}, which is not checked"
        seen.setdefault(f"{module.__name__}.{obj.__name__}", (f"{module.__name__}.{obj.__name__}", obj, module))
    return sorted(seen.values(), key=lambda item: item[0])


MEMBERS = all_members()
IDS = [name for name, _, _ in MEMBERS]


# -- helpers ----------------------------------------------------------------------------------------
@functools.cache
def type_checking_names(module: ModuleType) -> dict[str, object]:
    """The names a module imports under ``if TYPE_CHECKING:`` (annotations may use them)."""
    tree = ast.parse(inspect.getsource(module))
    namespace: dict[str, object] = {"__name__": module.__name__, "__package__": module.__package__}
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            exec(compile(ast.Module(body=node.body, type_ignores=[]), module.__name__, "exec"), namespace)
    return {k: v for k, v in namespace.items() if not k.startswith("__")}  # read-only: shared by the cache


def function_of(obj: object) -> Callable:
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    return inspect.unwrap(obj)


def sections(doc: str) -> dict[str, list[str]]:
    """Section name -> its lines (``Args:``, ``Returns:``, ...) of a cleaned docstring."""
    out: dict[str, list[str]] = {}
    current = None
    for line in doc.splitlines():
        match = SECTION.match(line)
        if match:
            current = {"Arguments": "Args", "Yields": "Returns"}.get(match.group(1), match.group(1))
            out[current] = []
        elif current is not None:
            if line and not line[0].isspace():
                current = None
            else:
                out[current].append(line)
    return out


def entries(lines: list[str]) -> list[str]:
    """The names documented in a section (``name:`` / ``name (type):`` at the first indentation)."""
    indents = [len(line) - len(line.lstrip()) for line in lines if line.strip()]
    first = min(indents, default=0)
    return [m.group(1).lstrip("*") for line in lines
            if (m := ENTRY.match(line)) and len(line) - len(line.lstrip()) == first]


def own_doc(obj: object) -> str:
    """The object's own docstring (``inspect.getdoc`` would inherit a parent class's)."""
    raw = obj.__doc__ if not isinstance(obj, property) else obj.fget.__doc__
    return inspect.cleandoc(raw) if raw else ""


def raised_errors(fn: Callable) -> set[str]:
    """hf_llmc error classes named in the function's own ``raise`` statements."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            name = exc.id if isinstance(exc, ast.Name) else exc.attr if isinstance(exc, ast.Attribute) else None
            cls = getattr(errors_module, name, None) if name else None
            if inspect.isclass(cls) and issubclass(cls, errors_module.HfLlmcError):
                names.add(name)
    return names


def check_summary(doc: str) -> list[str]:
    if not doc:
        return ["no docstring"]
    lines = doc.splitlines()
    if len(lines) > 1 and lines[1].strip():
        return ["the summary is not one line followed by a blank line"]
    return []


def check_signature(fn: Callable, module: ModuleType, *, skip_first: bool, doc: str,
                    params_doc: str | None = None) -> list[str]:
    """Annotations of ``fn`` and the sections of ``doc`` (``params_doc``: where ``Args:`` is)."""
    problems = []
    hints = typing.get_type_hints(fn, globalns=vars(module), localns=type_checking_names(module))
    params = list(inspect.signature(fn).parameters.values())[1 if skip_first else 0:]
    named = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    problems += [f"parameter {p.name!r} is not annotated" for p in named if p.name not in hints]
    is_init = fn.__name__ == "__init__"
    if "return" not in hints and not is_init:
        problems.append("the return is not annotated")
    found = sections(params_doc if params_doc is not None else doc)
    if named:
        documented = entries(found.get("Args", []))
        if "Args" not in found:
            problems.append("no Args: section")
        else:
            problems += [f"parameter {p.name!r} is missing from Args:" for p in named if p.name not in documented]
            allowed = {p.name for p in params}
            problems += [f"Args: names {n!r}, which is no parameter" for n in documented if n not in allowed]
    if not is_init and hints.get("return", type(None)) is not type(None) and "Returns" not in found:
        problems.append("no Returns: section")
    raised = raised_errors(fn)
    if raised:
        listed = entries(sections(doc).get("Raises", []))
        if "Raises" not in sections(doc):
            problems.append(f"no Raises: section (raises {', '.join(sorted(raised))})")
        else:
            problems += [f"raises {name} but Raises: does not name it" for name in sorted(raised) if name not in listed]
    return problems


def field_help(cls: type) -> list[str]:
    """Every dataclass field documented: a ``setting(..., help)`` or an ``Attributes:`` entry."""
    attributes = entries(sections(own_doc(cls)).get("Attributes", []))
    return [f"field {f.name!r} has neither help nor an Attributes: entry" for f in dataclasses.fields(cls)
            if not f.metadata.get("help") and f.name not in attributes]


def problems_of(obj: object, module: ModuleType) -> list[str]:
    if isinstance(obj, property):
        out = check_summary(own_doc(obj))
        hints = typing.get_type_hints(obj.fget, globalns=vars(module), localns=type_checking_names(module))
        return out + ([] if "return" in hints else ["the property's type (return) is not annotated"])
    if inspect.isclass(obj):
        doc = own_doc(obj)
        out = check_summary(doc)
        if dataclasses.is_dataclass(obj):
            return out + field_help(obj)
        init = vars(obj).get("__init__")
        if inspect.isfunction(init) and init.__qualname__ == f"{obj.__qualname__}.__init__":  # constructor: class Args:
            out += check_signature(init, module, skip_first=True, doc=own_doc(init) or doc, params_doc=doc)
        return out
    fn = function_of(obj)
    doc = own_doc(fn)
    skip_first = "." in fn.__qualname__ and "<locals>" not in fn.__qualname__ and not isinstance(obj, staticmethod)
    return check_summary(doc) + check_signature(fn, module, skip_first=skip_first, doc=doc)


# -- tests ------------------------------------------------------------------------------------------
def test_all_names_resolve():
    missing = [name for name in hf_llmc.__all__ if not hasattr(hf_llmc, name)]
    assert missing == []
    assert sorted(set(hf_llmc.__all__)) == sorted(hf_llmc.__all__), "duplicate names in __all__"


def test_every_checked_module_has_members():
    counted = {module.__name__ for _, _, module in MEMBERS}
    assert counted == set(MODULES)


@pytest.mark.parametrize("name,obj,module", MEMBERS, ids=IDS)
def test_typed_and_documented(name, obj, module):
    problems = problems_of(obj, module)
    assert not problems, f"{name}: " + "; ".join(problems)


def test_checker_finds_gaps():
    """The check itself notices a missing annotation, section or raised error."""
    from hf_llmc.config.errors import SpecError

    def good(x: int, y: str = "") -> int:
        """Add.

        Args:
            x: a number.
            y: a text.

        Returns:
            The number.

        Raises:
            SpecError: never really.
        """
        if x < 0:
            raise SpecError("x")
        return x

    def untyped(x, y: str = "") -> int:
        """Add.

        Args:
            x: a number.
            y: a text.

        Returns:
            The number.
        """
        return x

    def no_raises(x: int) -> int:
        """Add.

        Args:
            x: a number.

        Returns:
            The number.
        """
        if x < 0:
            raise SpecError("x")
        return x

    def no_returns(x: int) -> int:
        """Add.

        Args:
            x: a number.
        """
        return x

    def no_args(x: int) -> None:
        """Add."""

    module = importlib.import_module(__name__)
    assert problems_of(good, module) == []
    assert problems_of(untyped, module) == ["parameter 'x' is not annotated"]
    assert problems_of(no_raises, module) == ["no Raises: section (raises SpecError)"]
    assert problems_of(no_returns, module) == ["no Returns: section"]
    assert problems_of(no_args, module) == ["no Args: section"]
    assert SpecError  # used by the functions above
