"""Facts every package shares, in one torch-free home: metric formulas, speculative method names,
model presets and shapes, profile metadata, command-line help and text tables.

Engine, profiler, planner and API import it; it imports only ``configs`` and torch-free libraries, so a
planner host can use it without torch.
"""
