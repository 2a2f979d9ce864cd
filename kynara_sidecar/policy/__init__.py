"""Policies: the file formats, their loader, CEL conditions and the compiler.

Everything here is pure except ``load_policies``, which reads files. The
compiled ``PolicySet`` and ``Directory`` are immutable; a reload builds new
ones and the caller swaps them in whole.
"""

from kynara_sidecar.policy.compiler import (
    CompiledRule,
    Directory,
    PolicySet,
    Principal,
    compile_directory,
    compile_policy_set,
)
from kynara_sidecar.policy.conditions import Condition, ConditionFailure
from kynara_sidecar.policy.loader import (
    LoadedPolicies,
    compile_documents,
    decode_document,
    load_policies,
)

__all__ = [
    "CompiledRule",
    "Condition",
    "ConditionFailure",
    "Directory",
    "LoadedPolicies",
    "PolicySet",
    "Principal",
    "compile_directory",
    "compile_documents",
    "compile_policy_set",
    "decode_document",
    "load_policies",
]
