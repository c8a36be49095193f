"""Distil TRIM-KV retention gates: python train.py model=<model> budget=<M> [data=<data>]."""

from trimkv.cli import train_main

if __name__ == "__main__":
    train_main()
