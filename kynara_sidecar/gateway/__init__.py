"""The MCP gateway: agents reach their MCP tools through the daemon.

It shows each agent only the tools it may use and authorizes every
``tools/call`` through the one decision pipeline (``names`` maps tools to
actions, ``catalog`` keeps the upstreams' tools, ``proxy`` serves agents,
``http`` and ``stdio`` carry it).
"""
