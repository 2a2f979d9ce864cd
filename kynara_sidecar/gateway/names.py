"""How upstream MCP tools are named to policies and to agents.

Server names (the keys of ``gateway.servers``) and upstream tool names may
hold any text; actions and resource kinds are dotted names of
``[A-Za-z0-9_-]`` segments. One rule, ``escape``, bridges them: every
character outside ``[A-Za-z0-9_-]`` is replaced by ``_`` followed by the
upper-case hex of each of its UTF-8 bytes, two digits a byte. So
``get.file`` becomes ``get_2Efile`` and ``café`` becomes ``caf_C3_A9``.

The rule is readable, not reversible: ``get_2Efile`` is also a name of its
own. The gateway therefore refuses, when it loads an upstream's tools, any
two tools that come out with one name (``Catalog``), rather than guessing.

For a tool ``T`` of server ``S``:

- the action is ``mcp.<escape(S)>.<escape(T)>``, unless
  ``gateway.servers.S.actions`` maps ``T`` to another action;
- the resource is kind ``mcp.tool``, id ``<escape(S)>.<escape(T)>``;
- agents see it as ``<escape(S)>__<escape(T)>``.
"""

from __future__ import annotations

import re

import msgspec

__all__ = [
    "RESOURCE_KIND",
    "ToolName",
    "escape",
    "tool_name",
]

RESOURCE_KIND = "mcp.tool"
# Between server and tool in the name agents see: MCP clients that pass tool
# names on to model APIs accept only [A-Za-z0-9_-], so no dot.
SEPARATOR = "__"

_PLAIN = re.compile(r"[A-Za-z0-9_-]")


def escape(name: str) -> str:
    """Escape ``name`` into ``[A-Za-z0-9_-]`` by the module's one rule."""
    return "".join(
        char
        if _PLAIN.fullmatch(char)
        else "".join(f"_{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))
        for char in name
    )


class ToolName(msgspec.Struct, frozen=True):
    """Every name one upstream tool goes by."""

    server: str
    tool: str
    # What agents call it.
    exposed: str
    action: str
    resource_id: str


def tool_name(
    server: str, tool: str, actions: dict[str, str] | None = None
) -> ToolName:
    """Name an upstream tool.

    Args:
        server: the server's key in ``gateway.servers``.
        tool: the tool's name as the upstream lists it.
        actions: the server's configured tool -> action mapping.
    """
    plain = f"{escape(server)}.{escape(tool)}"
    action = (actions or {}).get(tool) or f"mcp.{plain}"
    return ToolName(
        server=server,
        tool=tool,
        exposed=f"{escape(server)}{SEPARATOR}{escape(tool)}",
        action=action,
        resource_id=plain,
    )
