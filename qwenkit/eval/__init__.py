"""Benchmarks (`qwenkit eval`): HumanEval(+), MBPP(+), GSM8K, perplexity, needle in a haystack,
with generated code run in a sandbox (sandbox.py). Imports nothing heavy at package import."""
