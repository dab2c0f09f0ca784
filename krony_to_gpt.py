"""
Conversion of a student checkpoint to Hugging Face GPT-2 format (python krony_to_gpt.py CHECKPOINT OUT_DIR). Not built yet.
"""

import sys

if __name__ == "__main__":
    print("krony_to_gpt.py: conversion of a student checkpoint to Hugging Face GPT-2 format (python krony_to_gpt.py CHECKPOINT OUT_DIR) is not built yet.", file=sys.stderr)
    sys.exit(2)
