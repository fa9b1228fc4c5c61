"""The virtual chip: the chip core, one session per dialect, the link (connections, faults,
accept loop) and the server (docs/protocol.md)."""
