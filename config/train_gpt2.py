"""GPT-2 small to Krony-PT's 81M shape (every MLP, 768x768 (x) 4x1) on OpenWebText, distilled from
GPT-2, sized for one 80 GB GPU: 12 x 1024 tokens x 40 accumulation steps = 491,520 tokens per step.
Eight GPUs (the global batch is unchanged; accumulation is divided across ranks):
  torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py

Tokens: 1,800 steps x 491,520 = 885M tokens, one pass over KnGPT2's 10% slice of OpenWebText
(about 904M tokens: python data/owt/prepare.py --fraction 0.1), so no document is seen twice;
repeated passes over a small slice overfit (docs/RESULTS.md). TQCompressor's 3.1% (280M tokens)
would be seen 3.2 times.

Cost, from FLOPs (not measured on a GPU): the student's step is 600M FLOP per token (GPT.flops_per_token
at 1024 context: 6 x its multiply-adds, factored MLPs at their real cost, + attention) and the teacher's
forward 285M, so 885M x 885M tokens = 7.8e17 FLOP. One H100 (989 TFLOP/s dense bf16) at 30-40% MFU:
35-45 minutes. train.py prints the measured MFU in its log line.
"""
teacher = "gpt2"
preset = "krony-81m"
init = "vl"
dataset = "data/owt"
out_dir = "checks"

batch_size = 12
block_size = 1024
gradient_accumulation_steps = 40
max_iters = 1800
lr_decay_iters = 1800
warmup_iters = 100
learning_rate = 6e-5
min_lr = 6e-6
weight_decay = 0.1

kd_weight = 1.0
ce_weight = 0.0   # measured: distillation alone beats distillation + cross-entropy (docs/training.md)
temperature = 1.0

eval_interval = 200
eval_iters = 100
log_interval = 10
compile = True
