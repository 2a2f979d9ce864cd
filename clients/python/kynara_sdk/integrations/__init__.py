"""Guards for agent frameworks' tools, each an optional extra of the SDK.

- ``kynara_sdk.integrations.langchain``: ``pip install 'kynara-sdk[langchain]'``
- ``kynara_sdk.integrations.autogen``: ``pip install 'kynara-sdk[autogen]'``
- ``kynara_sdk.integrations.crewai``: ``pip install 'kynara-sdk[crewai]'``

Each wraps a tool of its framework with a ``kynara_sdk.guard.ToolGuard``:
the daemon decides on the tool's name and parsed arguments before the tool
runs, and the decision id travels with the result, the error and the trace.
"""
