"""``kynara-collector``: the centre's witness of every daemon's audit log.

A daemon's log cannot vouch for its own tail; the collector is the party
outside it that does. It takes each daemon's sealed segments, from the
central store (``store``: a durable consumer of the segment stream) or by
pulling the daemon's admin ``AuditService`` (``pull``), and for each:

- verifies it against the daemon's registered keys and everything it
  accepted from that daemon before (``verifier``, pure): signature, chain,
  Merkle root, and consistency with the accepted history;
- archives it whole (``archive``: a directory, or S3-compatible storage);
- commits the daemon's new frontier (``state``, LMDB), and only then
  acknowledges it;
- or refuses it, for good, with an alert (``fork``, ``rollback``, ``gap``,
  ``bad_signature``, ``bad_chain``, ``bad_root``, ``unknown_daemon``,
  ``duplicate_daemon``): logged at ERROR, counted, kept in the state.

Archived records are queried back by daemon and sequence range, verified
again as they are read (``query``), from the command line or over HTTP
(``http``), beside ``/metrics`` (``metrics``). ``intake`` assembles and
settles messages; ``pull`` and ``service`` are the shell.
"""

__all__: list[str] = []
