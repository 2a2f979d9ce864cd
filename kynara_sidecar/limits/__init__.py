"""Limits that remember: the decisions each declared limit counted, kept
in memory for the pipeline and in the audit log's ``limits`` database
(``book``), and shared across the fleet through the central store
(``fleet``)."""
