"""The in-process emulator of a B1 TTFS chip: its physics (closed form), the device, its
profiles and a slow time-stepped reference (docs/emulator.md)."""
