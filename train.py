"""
Training with knowledge distillation (python train.py config/train_gpt2.py). Not built yet.
"""

import sys

if __name__ == "__main__":
    print("train.py: training with knowledge distillation (python train.py config/train_gpt2.py) is not built yet.", file=sys.stderr)
    sys.exit(2)
