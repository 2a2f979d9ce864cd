"""Read a directory of policy and directory files into a compiled set.

Files ending ``.yaml``, ``.yml``, ``.json`` or ``.toml`` below the root are
read (recursively, in sorted order); other files are ignored, and so is
every path with a part starting with ``.``, which keeps editor droppings and
Kubernetes ConfigMap internals (``..data``, ``..2026_...``) from being read
twice. Files below a directory named ``tests`` (``TEST_DIRECTORY``) are
policy tests, run by ``kynara-sidecar test``, never policies. Each file is
decoded by its extension, validated with msgspec typed decoders, and
compiled. A key given twice in one mapping is refused, naming the file,
the key and both lines (``kynara_sidecar._unique_keys``; TOML's decoder
refuses it already): YAML and JSON would keep the last silently, so a rule
with two ``effect:`` keys would compile to something its author did not
read. Bundles and stored policy sources are decoded here too, so they are
held to the same. The first bad file raises ``PolicyError`` naming the
file, the location in it and what was expected; nothing is returned then, so
the caller keeps its previous set. Reading is the only I/O here.

NOTE: one error at a time, not all of them: a policy author fixes and
reloads, and every message stays a single precise "file:location: expected
..., got ...".
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Literal

import msgspec
import yaml

from kynara_sidecar._unique_keys import DuplicateKeyError, check_json_keys, load_yaml
from kynara_sidecar.decision import Effect
from kynara_sidecar.errors import PolicyError
from kynara_sidecar.policy.compiler import (
    Directory,
    PolicySet,
    compile_directory,
    compile_policy_set,
)
from kynara_sidecar.policy.model import (
    FORMAT_VERSION,
    DirectoryDocument,
    DocumentHeader,
    DocumentKind,
    LimitDocument,
    LimitScope,
    Mode,
    PolicyDocument,
    PrincipalKind,
    RoleDocument,
    SourceDocument,
)

__all__ = [
    "check_expansion",
    "convert_document",
    "SUFFIXES",
    "TEST_DIRECTORY",
    "NO_DIRECTORY",
    "LoadedPolicies",
    "compile_documents",
    "decode_document",
    "load_policies",
    "read_documents",
    "read_policy_documents",
]


def _decode_yaml(content: bytes) -> Any:
    try:
        return load_yaml(content)
    except DuplicateKeyError:
        raise
    # What msgspec.yaml.decode, which read these before, took for bad YAML.
    except (yaml.YAMLError, ValueError, LookupError, AttributeError) as err:
        raise msgspec.DecodeError(str(err)) from err


def _decode_json(content: bytes) -> Any:
    raw = msgspec.json.decode(content)
    check_json_keys(content, raw)
    return raw


_DECODERS: dict[str, Callable[[bytes], Any]] = {
    ".yaml": _decode_yaml,
    ".yml": _decode_yaml,
    ".json": _decode_json,
    ".toml": msgspec.toml.decode,
}
SUFFIXES = frozenset(_DECODERS)
# Files below a directory of this name are policy tests, not policies.
TEST_DIRECTORY = "tests"
# A policy file of 100,000 rules holds about a million values; past ten
# million a file is an alias bomb, not a policy, and would stall compiling.
MAX_DOCUMENT_VALUES = 10_000_000

_DOCUMENT_TYPES = {
    DocumentKind.POLICY: PolicyDocument,
    DocumentKind.DIRECTORY: DirectoryDocument,
}

# Field name -> the values msgspec's "Invalid enum value" meant.
_CHOICES = {
    "effect": tuple(Effect),
    "mode": tuple(Mode),
    "kind": tuple(PrincipalKind),
}

_AT = re.compile(r"^(.*?)(?: - at `([^`]*)`)?$", re.DOTALL)
_Rewrite = Callable[[re.Match[str], str, Mapping[str, tuple]], str]
_REWRITES: tuple[tuple[re.Pattern[str], _Rewrite], ...] = (
    (
        re.compile(r"Invalid enum value (.*)"),
        lambda match, where, choices: _expected_choice(match.group(1), where, choices),
    ),
    (
        re.compile(r"Object contains unknown field `(.*)`"),
        lambda match, *_: (
            f"expected only known fields, got unknown field {match.group(1)!r}"
        ),
    ),
    (
        re.compile(r"Object missing required field `(.*)`"),
        lambda match, *_: f"expected field {match.group(1)!r}, got nothing",
    ),
    (
        re.compile(r"Expected `(\w+)` of length >= 1"),
        lambda match, *_: f"expected a non-empty {match.group(1)}, got an empty one",
    ),
    (
        re.compile(r"Expected (.*)"),
        lambda match, *_: "expected " + match.group(1).replace("`", ""),
    ),
)


# The directory of a set compiled without one (``compile_documents(...,
# directory="optional"|"ignored")``): no principal, revision "" (a bundle's
# manifest then states ``directory_revision: ""``). A daemon never serves it:
# with ``directory.store`` set it composes the set with the signed directory.
NO_DIRECTORY = Directory(revision="", principals=MappingProxyType({}))


class LoadedPolicies(msgspec.Struct, frozen=True):
    """A compiled policy set and the directory that shipped with it."""

    policy_set: PolicySet
    directory: Directory


def load_policies(root: pathlib.Path) -> LoadedPolicies:
    """Read, validate and compile every policy and directory file under root.

    Args:
        root: A directory holding policy files and exactly one directory
            file, possibly in subdirectories.

    Returns:
        The compiled policy set and directory.

    Raises:
        PolicyError: For the first bad file (path, location, expected and
            got), a missing or empty root, or not exactly one directory file.
    """
    return compile_documents(read_documents(root), root=str(root))


def read_documents(root: pathlib.Path) -> list[SourceDocument]:
    """Read and decode every policy and directory file under root.

    ``load_policies`` without the compiling: the daemon keeps these sources
    (name and bytes) with the audit log, next to the set compiled from them.

    Returns:
        The decoded documents, in path order.

    Raises:
        PolicyError: For the first bad file, or a missing root.
    """
    return [
        decode_document(str(path), _read(path), name=path.relative_to(root).as_posix())
        for path in _policy_paths(root)
    ]


def read_policy_documents(
    root: pathlib.Path,
) -> tuple[list[SourceDocument], list[str]]:
    """Read every policy file under root, leaving its directory files aside.

    For a daemon whose directory comes from elsewhere (a collector's signed
    directory): a directory file in the policies is then not its directory,
    so it is neither validated nor compiled, and a typo in it or its absence
    holds nothing back. Each file is still parsed (YAML, JSON or TOML) to
    learn its ``kind``, so one that does not parse at all is refused as
    ``read_documents`` refuses it.

    Returns:
        The decoded policy documents in path order, and the paths of the
        directory files left aside.

    Raises:
        PolicyError: For the first bad policy file, or a missing root.
    """
    documents: list[SourceDocument] = []
    skipped: list[str] = []
    for path in _policy_paths(root):
        content = _read(path)
        raw = _parse(str(path), content)
        if isinstance(raw, dict) and raw.get("kind") == DocumentKind.DIRECTORY.value:
            skipped.append(str(path))
            continue
        name = path.relative_to(root).as_posix()
        documents.append(_validated(str(path), content, raw, name))
    return documents, skipped


def _policy_paths(root: pathlib.Path) -> list[pathlib.Path]:
    if not root.is_dir():
        raise PolicyError(
            "expected a directory of policy files, got nothing there", path=str(root)
        )
    return sorted(
        path
        for path in root.rglob("*")
        if path.suffix in SUFFIXES
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
        and TEST_DIRECTORY not in path.relative_to(root).parts[:-1]
    )


def decode_document(path: str, content: bytes, *, name: str = "") -> SourceDocument:
    """Decode and validate one file by its extension.

    Args:
        path: The file's path; its extension picks the decoder and it is
            cited in errors.
        content: The file's bytes.
        name: The path below the policy root (defaults to ``path``).

    Returns:
        The validated document with its source.

    Raises:
        PolicyError: Unknown extension, a syntax error, a key given twice
            in one mapping, a wrong ``format_version`` or ``kind``, or a
            field that does not validate.
    """
    return _validated(path, content, _parse(path, content), name)


def _parse(path: str, content: bytes) -> Any:
    """The file's decoded value, before any validation."""
    suffix = pathlib.PurePath(path).suffix
    if suffix not in _DECODERS:
        raise PolicyError(
            f"expected a file ending {', '.join(sorted(SUFFIXES))}, got {suffix!r}",
            path=path,
        )
    try:
        raw = _DECODERS[suffix](content)
    except DuplicateKeyError as err:
        # The config's phrasing: "line 4: key 'effect' given again (first on
        # line 3); expected each key once in a mapping".
        raise PolicyError(str(err), path=path) from err
    except msgspec.DecodeError as err:
        raise PolicyError(
            f"expected valid {suffix[1:].upper()}, got: {err}", path=path
        ) from err
    except RecursionError:
        raise PolicyError(
            f"expected {suffix[1:].upper()} nested less deeply than the decoder's "
            "recursion limit",
            path=path,
        ) from None
    return raw


def _validated(path: str, content: bytes, raw: Any, name: str) -> SourceDocument:
    check_expansion(raw, path)
    document_type = _document_type(raw, path)
    _check_roles(raw, path, content)
    _check_limits(raw, path, content)
    document = convert_document(raw, document_type, path)
    return SourceDocument(
        path=path, name=name or path, content=content, document=document
    )


def compile_documents(
    documents: Sequence[SourceDocument],
    *,
    root: str = "",
    directory: Literal["required", "optional", "ignored"] = "required",
) -> LoadedPolicies:
    """Compile decoded documents: every policy, and exactly one directory.

    Args:
        documents: Decoded policy and directory files.
        root: Where they came from, cited when the set as a whole is wrong.
        directory: "required" (exactly one directory file), "optional" (a
            bundle built for daemons that follow a signed directory may
            carry none: the result's directory is then ``NO_DIRECTORY``) or
            "ignored" (the caller's directory comes from elsewhere: directory
            files are not compiled and the result's is ``NO_DIRECTORY``).

    Returns:
        The compiled policy set and directory.

    Raises:
        PolicyError: No files, no directory file (when required) or more
            than one (unless ignored), or any compile error (see
            ``compile_policy_set``, ``compile_directory``).
    """
    if not documents:
        raise PolicyError(
            f"expected policy files ending {', '.join(sorted(SUFFIXES))}, got none",
            path=root,
        )
    # One pass by type: testing membership in the policy list instead made
    # loading quadratic in the number of files (20,000 at 100,000 rules).
    policies: list[SourceDocument] = []
    directories: list[SourceDocument] = []
    for item in documents:
        is_policy = isinstance(item.document, PolicyDocument)
        (policies if is_policy else directories).append(item)
    without = directory == "ignored" or (directory == "optional" and not directories)
    if len(directories) != 1 and not without:
        found = ", ".join(item.path for item in directories) or "none"
        raise PolicyError(
            f"expected exactly one directory file, got {found}", path=root
        )
    policy_set = compile_policy_set(policies)
    if without:
        return LoadedPolicies(policy_set, NO_DIRECTORY)
    return LoadedPolicies(policy_set, compile_directory(directories[0], policy_set))


def _read(path: pathlib.Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise PolicyError(
            f"expected a readable file, got {err}", path=str(path)
        ) from err


def _expanded_size(value: Any, seen: dict[int, int]) -> int:
    # Memoised by identity: a YAML alias decodes to the same object, so the
    # walk is linear in the file while the count is what it expands to.
    # Only containers are memoised and recursed into: a scalar counts one
    # wherever it appears, and skipping the call for each keeps the walk
    # over a 100,000-rule file to a fraction of a second.
    known = seen.get(id(value))
    if known is not None:
        return known
    if isinstance(value, dict):
        children: Any = value.values()
    elif isinstance(value, list):
        children = value
    else:
        return 1
    size = 1
    for child in children:
        if isinstance(child, (dict, list)):
            size += _expanded_size(child, seen)
        else:
            size += 1
    seen[id(value)] = size
    return size


def check_expansion(raw: Any, path: str) -> None:
    """Refuse a decoded document that expands past ``MAX_DOCUMENT_VALUES``.

    Raises:
        PolicyError: naming the file and the expanded size.
    """
    size = _expanded_size(raw, {})
    if size > MAX_DOCUMENT_VALUES:
        raise PolicyError(
            f"expected at most {MAX_DOCUMENT_VALUES} values, got {size} once "
            "expanded (YAML aliases?)",
            path=path,
        )


def _document_type(raw: Any, path: str) -> type[PolicyDocument | DirectoryDocument]:
    if not isinstance(raw, dict):
        raise PolicyError(
            f"expected a mapping at the top, got {type(raw).__name__}",
            path=path,
            location="$",
        )
    header = convert_document(raw, DocumentHeader, path)
    if header.format_version != FORMAT_VERSION or isinstance(
        header.format_version, bool
    ):
        got = (
            "nothing" if header.format_version is None else repr(header.format_version)
        )
        raise PolicyError(
            f"expected format_version {FORMAT_VERSION}, got {got}",
            path=path,
            location="$.format_version",
        )
    if header.kind not in tuple(DocumentKind):
        raise PolicyError(
            f"expected kind 'policy' or 'directory', got {header.kind!r}",
            path=path,
            location="$.kind",
        )
    return _DOCUMENT_TYPES[DocumentKind(header.kind)]


def _check_roles(raw: dict[str, Any], path: str, content: bytes) -> None:
    # Validated one by one first: msgspec reports a bad value inside a map
    # as `$.roles[...]`, losing the role's name.
    roles = raw.get("roles")
    if not isinstance(roles, dict):
        return
    _check_names(roles, "roles", "a role name", path, content)
    for role, definition in roles.items():
        convert_document(definition, RoleDocument, path, prefix=f"$.roles.{role}")


def _check_limits(raw: dict[str, Any], path: str, content: bytes) -> None:
    # As roles: one by one, so an error names the limit (`$.limits.x.window`).
    limits = raw.get("limits")
    if not isinstance(limits, dict):
        return
    _check_names(
        limits,
        "limits",
        "a limit name (a CEL identifier such as refunds_today)",
        path,
        content,
    )
    for name, definition in limits.items():
        convert_document(
            definition,
            LimitDocument,
            path,
            prefix=f"$.limits.{name}",
            choices={"scope": tuple(LimitScope)},
        )


def _check_names(
    mapping: dict[Any, Any], section: str, what: str, path: str, content: bytes
) -> None:
    """Refuse a key of ``mapping`` (the top-level ``section``) that is not
    text, naming it as written: YAML reads an unquoted ``true``, ``yes``,
    ``null``, ``~``, a number or a date as no string, and msgspec would say
    only "expected str, got bool - at key in $.limits"."""
    for name in mapping:
        if isinstance(name, str):
            continue
        written, line = _written_key(content, section, name)
        on_line = f" on line {line}" if line else ""
        raise PolicyError(
            f"expected {what} as text, got {_yaml_type(name)} {written!r}"
            f"{on_line} (YAML reads an unquoted true, false, yes, no, on, off, "
            "null, ~, number or date as no text)",
            path=path,
            location=f"$.{section}.{written}",
        )


def _yaml_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "bool", int: "int", float: "float"}.get(
        type(value), type(value).__name__
    )


def _written_key(content: bytes, section: str, name: Any) -> tuple[str, int]:
    """The first key of the top-level mapping ``section`` that YAML does not
    read as a string, as written, and its line (from 1); ``name`` in YAML's
    spelling and line 0 when the text cannot tell."""
    if name is None or isinstance(name, bool):
        fallback = {None: "null", True: "true", False: "false"}[name]
    else:
        fallback = str(name)
    try:
        root = yaml.compose(content, Loader=yaml.SafeLoader)
    except (yaml.YAMLError, ValueError):
        return fallback, 0
    if not isinstance(root, yaml.MappingNode):
        return fallback, 0
    for key_node, value_node in root.value:
        if key_node.value != section or not isinstance(value_node, yaml.MappingNode):
            continue
        for name_node, _ in value_node.value:
            if name_node.tag not in (_STR_TAG, _MERGE_TAG):
                return str(name_node.value), name_node.start_mark.line + 1
    return fallback, 0


_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"


def convert_document(
    raw: Any,
    target: type,
    path: str,
    *,
    prefix: str = "$",
    choices: Mapping[str, tuple[Any, ...]] | None = None,
) -> Any:
    """Validate a decoded document with msgspec, in the loader's phrasing.

    Args:
        raw: the decoded YAML/JSON/TOML value.
        target: the msgspec type to convert to.
        path: the file, cited in errors.
        prefix: the document path ``raw`` sits at, e.g. ``$.tests[0]``.
        choices: field name -> allowed values, named when an enum is wrong
            (added to the loader's own: effect, mode, kind).

    Raises:
        PolicyError: naming the file, the location and what was expected.
    """
    try:
        return msgspec.convert(raw, target)
    except msgspec.ValidationError as err:
        message, where = _AT.match(str(err)).groups()
        where = prefix + (where or "$")[1:]
        known = {**_CHOICES, **(choices or {})}
        raise PolicyError(
            _rewrite(message, where, known), path=path, location=where
        ) from err


def _rewrite(message: str, where: str, choices: Mapping[str, tuple]) -> str:
    for pattern, rewrite in _REWRITES:
        match = pattern.fullmatch(message)
        if match:
            return rewrite(match, where, choices)
    return message[:1].lower() + message[1:]


def _expected_choice(got: str, where: str, choices: Mapping[str, tuple]) -> str:
    field = where.rsplit(".", 1)[-1]
    allowed = ", ".join(
        repr(getattr(choice, "value", choice)) for choice in choices.get(field, ())
    )
    return f"expected one of {allowed}, got {got}" if allowed else f"got {got}"
