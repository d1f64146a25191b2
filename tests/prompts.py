"""Prompts the engine tests share (token ids of the tiny model's vocabulary). A module of its own,
so tests/test_cuda.py, which runs on GPU machines, imports nothing from the CPU-only test modules."""

PROMPTS = [[1, 2, 3, 4, 5], [7] * 30, [9, 8, 7], [11] * 3, [300, 200, 100, 50, 25]]
REPEATING = [[5, 6, 7, 8] * 6, [9, 10, 11] * 7, [12, 13] * 9]  # the history drafter finds matches here
