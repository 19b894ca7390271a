"""Figures against peers: speed, fidelity and unlearning tables, side by side.

Each benchmark is a module run with ``python -m benchmarks.<name>`` from the repository
root; it prints a markdown table and writes its raw numbers and the table under
``benchmarks/results/``. Peer libraries come from the ``bench`` extra (see README.md).
"""
