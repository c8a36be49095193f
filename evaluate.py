"""Evaluate an eviction policy: python evaluate.py model=<model> method=<policy> budget=<M> task=<task>."""

from trimkv.cli import evaluate_main

if __name__ == "__main__":
    evaluate_main()
