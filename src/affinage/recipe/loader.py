"""Read a YAML recipe into a validated :class:`~affinage.recipe.schema.Recipe`, with file:line errors.

The steps, in order:

1. **Parse** each file with a SafeLoader that remembers the line of every key and list item, per key
   path (``("training", "global_batch_size")``, ``("data", "sources", 0, "path")``). Duplicate keys
   are errors: plain YAML silently keeps the last one.
2. **Compose**: a top-level ``base: other.yaml`` (relative to the file that names it) is loaded
   first, recursively, and the child is deep-merged on top: mappings merge key by key, lists and
   scalars of the child replace the base's. Each key keeps the line of the file that defined it.
3. **Override**: ``--set path.to.key=value`` strings, the value read as YAML (``=1e-4``,
   ``=[q_proj,v_proj]``, ``=true``; list items as ``data.sources.0.weight=2``). Paths are checked
   against the schema before anything is set.
4. **Resolve paths** (see :func:`_resolve_paths`); environment variables are *not* expanded, so
   ``$DSDIR`` stays literal in the resolved recipe and is expanded on the machine that runs it.
5. **Validate** with pydantic and turn every error into ``file:line: key.path: message``.

Every problem the user can fix in the recipe surfaces as a :class:`RecipeError` whose text is the
whole explanation (no traceback needed).

One cohesive thing (over 400 lines): reading recipe YAML, the five steps below; the pydantic
error translation is in ``recipe.problems``.
"""

from __future__ import annotations

import copy
import os
import re
import typing
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from pydantic import ValidationError

from affinage import __version__
from affinage.errors import UserError
from affinage.recipe.problems import KeyPath, Origin, Problem, Where, dotted, show_path, annotation_at, members, model_at, step, translate, unknown_key
from affinage.recipe.schema import Recipe

# YAML 1.1 reads ``1e-4`` as a string; researchers write learning rates that way. Teach both the
# loader and the dumper (so that a string such as ``"1e5"`` is quoted when written back).
_EXP_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


# Limits of what a recipe may be (a recipe is a few hundred lines): past them the file is refused at
# once instead of hanging ("billion laughs": nested aliases expand exponentially) or recursing out.
MAX_RECIPE_BYTES = 1 << 20  # 1 MiB
MAX_DEPTH = 64  # nesting of mappings/lists
MAX_NODES = 100_000  # values after every alias is expanded


class _TooDeep(Exception):
    def __init__(self, mark):
        self.mark = mark


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float, and refuses nesting deeper than MAX_DEPTH."""

    _depth = 0

    def _flow_start(self):
        if self.flow_level >= MAX_DEPTH:  # checked while scanning: deep [[[[ is quadratic to scan otherwise
            raise _TooDeep(self.get_mark())

    def fetch_flow_sequence_start(self):
        self._flow_start()
        super().fetch_flow_sequence_start()

    def fetch_flow_mapping_start(self):
        self._flow_start()
        super().fetch_flow_mapping_start()

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _TooDeep(self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes strings :class:`_Loader` would read as floats."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT, list("-+0123456789"))


# ------------------------------------------------------------------------------------- errors
class RecipeError(UserError):
    """A recipe that cannot be used; ``str()`` is the full, human explanation (one line per problem)."""

    def __init__(self, problems: Sequence[Problem], source: str = "recipe"):
        self.problems = list(problems)
        self.source = source
        super().__init__(self._text())

    def _text(self) -> str:
        if len(self.problems) == 1:
            return str(self.problems[0])
        lines = [f"{self.source}: {len(self.problems)} problems in the recipe:"]
        return "\n".join(lines + [f"  {p}" for p in self.problems])



# ---------------------------------------------------------------------------------- documents
@dataclass
class _Doc:
    """Recipe data being assembled, with the origin of every key path set so far."""

    data: dict
    origins: dict[KeyPath, Origin]
    files: list[Path] = field(default_factory=list)

    def origin(self, path: KeyPath) -> Origin:
        """Origin of ``path``, or of its nearest ancestor that has one (defaults have none)."""
        for end in range(len(path), -1, -1):
            if path[:end] in self.origins:
                return self.origins[path[:end]]
        return Origin()

    def get(self, path: KeyPath) -> Any:
        node: Any = self.data
        for part in path:
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
                node = node[part]
            else:
                return None
        return node

    def replace(self, path: KeyPath, value: Any, origins: Mapping[KeyPath, Origin]) -> None:
        """Set ``path`` (its parent must exist) and forget the origins of what it replaces."""
        self.get(path[:-1])[path[-1]] = value
        self.origins = {p: o for p, o in self.origins.items() if p[: len(path)] != path}
        self.origins.update(origins)

    def overlay(self, child: dict, origins: Mapping[KeyPath, Origin], path: KeyPath = ()) -> None:
        """Deep-merge ``child`` on top: mappings merge recursively, anything else replaces."""
        target = self.get(path)
        for key, value in child.items():
            sub = path + (key,)
            if isinstance(value, dict) and isinstance(target.get(key), dict):
                self.origins[sub] = origins[sub]  # the child's line: the file being edited
                self.overlay(value, origins, sub)
            else:
                self.replace(sub, value, {p: o for p, o in origins.items() if p[: len(sub)] == sub})


# ------------------------------------------------------------------------------------ parsing
def _parse(path: Path) -> tuple[dict, dict[KeyPath, Origin]]:
    """Read one YAML file into a mapping and the line of every key path in it."""
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError([Problem(Origin(path), "", f"the file is {size:,} bytes; a recipe is at most {MAX_RECIPE_BYTES:,} "
                                       "bytes (is this really a recipe? data belongs in data.sources files)")])
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeError) as e:
        raise RecipeError([Problem(Origin(path), "", f"cannot read the file: {e}")]) from None
    loader = _Loader(text)
    try:
        try:
            root = loader.get_single_node()
        except _TooDeep as e:
            raise RecipeError([Problem(Origin(path, e.mark.line + 1), "", f"mappings and lists nested more than {MAX_DEPTH} "
                                       "levels deep: a recipe needs a handful; flatten it")]) from None
        except RecursionError:
            raise RecipeError([Problem(Origin(path, 1), "", "the YAML is nested too deeply to read: flatten it")]) from None
        origins: dict[KeyPath, Origin] = {}
        if root is not None:
            _check_expansion(root, path)
            origins[()] = Origin(path, root.start_mark.line + 1)
            _record_lines(loader, root, (), path, origins)
        data = loader.construct_document(root) if root is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        detail = e.problem or e.context or "cannot parse"
        if e.context and e.problem:  # e.g. the line where an unclosed '[' was opened
            detail += f" ({e.context}" + (f" started at line {e.context_mark.line + 1})" if e.context_mark else ")")
        raise RecipeError([Problem(Origin(path, mark.line + 1 if mark else 1), "", f"YAML syntax error: {detail}")]) from None
    finally:
        loader.dispose()
    if data is None:
        raise RecipeError([Problem(Origin(path, 1), "", "the file is empty: a recipe needs at least name, task, model, data and training")])
    if not isinstance(data, dict):
        raise RecipeError([Problem(origins[()], "", f"the top level must be a mapping of keys (name:, task:, model:, ...), not a {type(data).__name__}")])
    return data, origins


def _check_expansion(root: yaml.Node, file: Path) -> None:
    """Refuse self-referencing aliases and aliases that expand past MAX_NODES values, before expanding anything.

    Counts the expanded tree on the node graph with a memo (linear in the file), so a "billion laughs"
    file is refused in milliseconds; an anchor used inside itself would otherwise recurse forever.
    """
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in active:
            raise RecipeError([Problem(Origin(file, node.start_mark.line + 1), "",
                                       "an alias refers to the mapping or list that contains it (a loop): remove the alias")])
        if isinstance(node, yaml.ScalarNode):
            return 1
        active.add(id(node))
        children = node.value if isinstance(node, yaml.SequenceNode) else [n for pair in node.value for n in pair]
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_NODES:
                raise RecipeError([Problem(Origin(file, node.start_mark.line + 1), "",
                                           f"aliases (*name) here expand to more than {MAX_NODES:,} values: a recipe holds a few "
                                           "hundred; write the values out or use fewer nested aliases")])
        active.discard(id(node))
        sizes[id(node)] = total
        return total

    size(root)


def _record_lines(loader: _Loader, node: yaml.Node, path: KeyPath, file: Path, origins: dict[KeyPath, Origin]) -> None:
    """Record the 1-based line of every mapping key and list item under ``node``; reject duplicate keys."""
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            origins[path + (i,)] = Origin(file, item.start_mark.line + 1)
            _record_lines(loader, item, path + (i,), file, origins)
    elif isinstance(node, yaml.MappingNode):
        merge_tag = "tag:yaml.org,2002:merge"
        for key_node, value_node in node.value:  # `<<: *anchor` keys first: the mapping's own keys win
            if key_node.tag == merge_tag:
                merged = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                for mapping in merged:
                    _record_lines(loader, mapping, path, file, origins)
        first_line: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == merge_tag or not isinstance(key_node, yaml.ScalarNode):
                continue  # non-scalar keys are rejected by the constructor, with their own mark
            key = loader.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise RecipeError([Problem(Origin(file, line), dotted(path + (key,)),
                                           f"duplicate key {key!r} (first set at line {first_line[key]}); remove one of them")])
            first_line[key] = line
            origins[path + (key,)] = Origin(file, line)
            _record_lines(loader, value_node, path + (key,), file, origins)


def _read(path: Path, chain: tuple[Path, ...] = ()) -> _Doc:
    """Load ``path`` and, recursively, the ``base:`` files under it."""
    data, origins = _parse(path)
    if "base" not in data:
        return _Doc(data, origins, [path])
    where = origins[("base",)]
    base = data.pop("base")
    del origins[("base",)]
    if not isinstance(base, str) or not base:
        raise RecipeError([Problem(where, "base", f"must be the path of another recipe file (got {base!r})")])
    base_path = Path(os.path.abspath(path.parent / base))
    if base_path in chain + (path,):
        loop = " -> ".join(show_path(p) for p in chain + (path, base_path))
        raise RecipeError([Problem(where, "base", f"base recipes form a cycle: {loop}")])
    if not base_path.is_file():
        raise RecipeError([Problem(where, "base", f"base recipe {base!r} not found (looked for {show_path(base_path)})")])
    doc = _read(base_path, chain + (path,))
    doc.overlay(data, origins)
    doc.origins[()] = origins[()]
    doc.files.insert(0, path)
    return doc


# ---------------------------------------------------------------------------------- overrides
def _apply_override(doc: _Doc, text: str) -> None:
    """Apply one ``path.to.key=value``; raise a RecipeError located at the ``--set`` if it can't be."""
    here = Origin(override=text)
    key, sep, raw = text.partition("=")
    parts: KeyPath = tuple(int(p) if p.isdigit() else p for p in key.strip().split("."))
    if not sep or not all(str(p) for p in parts):
        raise RecipeError([Problem(here, "", "expected --set path.to.key=value, e.g. --set training.learning_rate=1e-4")])
    loader = _Loader(raw)
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_expansion(node, Path("--set"))
        value = loader.construct_document(node) if node is not None else None
    except RecipeError as e:
        raise RecipeError([Problem(here, key, e.problems[0].message)]) from None
    except _TooDeep:
        raise RecipeError([Problem(here, key, f"the value is nested more than {MAX_DEPTH} levels deep")]) from None
    except yaml.YAMLError as e:
        raise RecipeError([Problem(here, key, f"cannot read the value as YAML ({getattr(e, 'problem', e)})")]) from None
    finally:
        loader.dispose()
    for depth in range(len(parts)):
        parent, part = parts[:depth], parts[depth]
        annotation = annotation_at(Recipe, parent)
        if step(annotation, part) is None:
            if model_at(Recipe, parent) is not None:
                raise RecipeError([Problem(here, dotted(parts[: depth + 1]), unknown_key(Recipe, parts[: depth + 1]))])
            if any(typing.get_origin(m) is list for m in members(annotation)):
                raise RecipeError([Problem(here, dotted(parts), f"{dotted(parent)} is a list: select an item by its index, e.g. {dotted(parent)}.0")])
            raise RecipeError([Problem(here, dotted(parts), f"{dotted(parent)} is a single value, not a section: set {dotted(parent)} itself")])
        node = doc.get(parent)
        if isinstance(node, list):
            if not isinstance(part, int) or not 0 <= part < len(node):
                raise RecipeError([Problem(here, dotted(parts), f"{dotted(parent)} has {len(node)} item(s); index {part} is out of range")])
        elif not isinstance(node, dict):
            raise RecipeError([Problem(here, dotted(parts), f"{dotted(parent)} is {node!r}, not a mapping; set {dotted(parent)} itself instead")])
        elif depth < len(parts) - 1 and node.get(part) is None and model_at(Recipe, parts[: depth + 1]):
            node[part] = {}  # e.g. method.lora.r=8 in a recipe without method:
    doc.replace(parts, value, {parts: here})


# ------------------------------------------------------------------------------- path resolution
def _resolve_paths(doc: _Doc) -> None:
    """Make relative file paths absolute, relative to the file (or ``--set``) that wrote them.

    Rule: ``data.sources[*].path`` always; ``model.chat_template`` when it ends in ``.jinja``
    (otherwise it names a built-in template); ``model.name_or_path`` and ``model.tokenizer`` only
    when they start with ``./`` or ``../`` (otherwise they may be Hugging Face ids like
    ``org/name``) — or when they name an existing folder relative to where they were written (then
    the run records the folder, not a path that means something else from another directory). A path written in a recipe file is relative to that file's folder (a base file's
    folder for keys it defined); one given with ``--set`` or in a dict is relative to the CWD.
    Absolute paths and paths starting with ``$`` or ``~`` are left as written: environment
    variables are expanded where the recipe runs, not here. Paths need not exist yet.
    """
    local = ("./", "../")
    candidates: list[tuple[KeyPath, bool]] = [
        (("model", "chat_template"), str(doc.get(("model", "chat_template"))).endswith(".jinja")),
        (("model", "name_or_path"), str(doc.get(("model", "name_or_path"))).startswith(local)),
        (("model", "tokenizer"), str(doc.get(("model", "tokenizer"))).startswith(local)),
        (("distributed", "config"), doc.get(("distributed", "config")) is not None),  # own DeepSpeed/accelerate file
    ]
    sources = doc.get(("data", "sources"))
    if isinstance(sources, list):
        candidates += [(("data", "sources", i, "path"), True) for i, s in enumerate(sources) if isinstance(s, dict)]
    ev = doc.get(("eval",))
    if isinstance(ev, dict):  # evaluation files: relative to the recipe when written ./ or ../
        for kind, keys in (("perplexity", ("path",)), ("mcq", ("path", "fewshot_path"))):
            for i, s in enumerate(ev.get(kind) or []):
                if isinstance(s, dict):
                    candidates += [(("eval", kind, i, k), str(s[k]).startswith(local)) for k in keys if s.get(k)]
        for sub, key in (("generation", "path"), ("lm_eval", "include_path")):
            if isinstance(ev.get(sub), dict) and ev[sub].get(key):
                candidates.append((("eval", sub, key), str(ev[sub][key]).startswith(local)))
    for key in (("model", "name_or_path"), ("model", "tokenizer")):  # a local folder written without ./
        value = doc.get(key)
        if isinstance(value, str) and value and not value.startswith(local) and value[0] not in "$~" \
                and not os.path.isabs(value) and (doc.origin(key).folder / value).is_dir():
            candidates.append((key, True))  # recorded absolute, so eval and provenance work from any folder
    for path, applies in candidates:
        value = doc.get(path)
        if applies and isinstance(value, str) and value and not os.path.isabs(value) and value[0] not in "$~":
            doc.get(path[:-1])[path[-1]] = os.path.normpath(doc.origin(path).folder / value)


# --------------------------------------------------------------------------------- validation
_EXAMPLES = {
    "name": "name: qwen05b-fr-sft",
    "task": "task: sft",
    "model": "model: {name_or_path: Qwen/Qwen2.5-0.5B-Instruct}",
    "model.name_or_path": "name_or_path: Qwen/Qwen2.5-0.5B-Instruct",
    "data": "data: {sources: [{path: data/train.jsonl, format: chat}]}",
    "data.sources": "sources: [{path: data/train.jsonl, format: chat}]",
    "data.sources.*.path": "path: data/train.jsonl",
    "training": "training: {global_batch_size: 32, micro_batch_size: 4, duration: 200 steps}",
    "training.global_batch_size": "global_batch_size: 32",
    "training.duration": "duration: 200 steps",
}



def _validate(doc: _Doc, source: str) -> Recipe:
    try:
        return Recipe.model_validate(doc.data)
    except ValidationError as e:
        raise RecipeError(translate(e, Recipe, Where(doc.origins), _EXAMPLES), source) from None


# ------------------------------------------------------------------------------------ public API
@dataclass
class LoadedRecipe:
    """A validated recipe and where it came from: the files read (recipe first, then its bases)."""

    recipe: Recipe
    files: list[Path]
    overrides: list[str]


def _finish(doc: _Doc, overrides: Sequence[str], world_size: Optional[int], source: str) -> LoadedRecipe:
    """Steps shared by files and dicts: overrides, path resolution, validation, world-size check."""
    if world_size is not None and world_size < 1:
        raise ValueError(f"world_size must be >= 1 (got {world_size})")
    problems = []
    for text in overrides:
        try:
            _apply_override(doc, text)
        except RecipeError as e:
            problems += e.problems
    if problems:
        raise RecipeError(problems, source)
    _resolve_paths(doc)
    recipe = _validate(doc, source)
    if world_size is not None:
        try:
            recipe.training.gradient_accumulation(world_size)
        except ValueError as e:
            key = ("training", "global_batch_size")
            raise RecipeError([Problem(doc.origin(key), dotted(key), str(e))], source) from None
    return LoadedRecipe(recipe, doc.files, list(overrides))


def load_recipe_with_sources(
    path: Union[str, os.PathLike], overrides: Sequence[str] = (), world_size: Optional[int] = None
) -> LoadedRecipe:
    """Load, compose, override and validate a recipe file; also say which files and overrides made it.

    ``world_size`` (number of training processes), when given, also checks that the global batch
    splits evenly into micro-batches over that many processes.
    """
    file = Path(os.path.abspath(path))
    if not file.is_file():
        what = "is a folder, not a recipe file" if file.is_dir() else "not found"
        raise RecipeError([Problem(Origin(file), "", f"recipe file {what}")])
    return _finish(_read(file), overrides, world_size, show_path(file))


def load_recipe(
    path: Union[str, os.PathLike], overrides: Sequence[str] = (), world_size: Optional[int] = None
) -> Recipe:
    """Load a recipe file; see :func:`load_recipe_with_sources`."""
    return load_recipe_with_sources(path, overrides, world_size).recipe


def load_recipe_dict(
    data: Mapping[str, Any], overrides: Sequence[str] = (), world_size: Optional[int] = None
) -> Recipe:
    """Validate a recipe given as a dict (notebooks, tests) with the same rules and messages.

    Relative paths are relative to the CWD; errors are located at ``<recipe dict>``. ``base:`` is
    only read from files: compose in code with ``{**base, **changes}`` instead.
    """
    if "base" in data:
        raise RecipeError([Problem(Origin(), "base", "is only read from recipe files; use load_recipe(path)")])
    doc = _Doc(copy.deepcopy(dict(data)), {(): Origin()}, [])
    return _finish(doc, overrides, world_size, "<recipe dict>").recipe


def _comment_safe(text: str) -> str:
    """One YAML comment line whatever the text holds (a newline in a --set value would end the comment)."""
    return "".join(ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch) == "Cc" else ch for ch in text)


def dump_resolved(recipe: Union[Recipe, LoadedRecipe]) -> str:
    """The fully resolved recipe as YAML, loadable as a recipe: bases merged, overrides and defaults applied.

    Written next to each run so that the exact settings are kept even if the recipe files change.
    """
    header = [f"# Resolved by affinage {__version__}: base files merged, --set overrides and defaults applied."]
    if isinstance(recipe, LoadedRecipe):
        header.append("# From: " + " <- ".join(_comment_safe(str(f)) for f in recipe.files))
        header += [f"# --set {_comment_safe(text)}" for text in recipe.overrides]
        recipe = recipe.recipe
    data = recipe.model_dump(mode="json")
    data["training"]["duration"] = str(recipe.training.duration)
    body = yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False)
    return "\n".join(header) + "\n" + body


def write_resolved(recipe: Union[Recipe, LoadedRecipe], path: Union[str, os.PathLike]) -> Path:
    """Write :func:`dump_resolved` to ``path`` (folders created); returns the path."""
    from affinage.run import atomic_write_text

    path = Path(path)
    atomic_write_text(path, dump_resolved(recipe))
    return path
