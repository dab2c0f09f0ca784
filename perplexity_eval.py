"""
Perplexity evaluation on WikiText-103, WikiText-2 and LAMBADA (python perplexity_eval.py MODEL [DATASET ...]). Not built yet.
"""

import sys

if __name__ == "__main__":
    print("perplexity_eval.py: perplexity evaluation on WikiText-103, WikiText-2 and LAMBADA (python perplexity_eval.py MODEL [DATASET ...]) is not built yet.", file=sys.stderr)
    sys.exit(2)
