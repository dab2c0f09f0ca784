"""GPT-2 small to Krony-PT's 81M shape (every MLP, 768x768 (x) 4x1) on OpenWebText, distilled from
GPT-2, sized for one 80 GB GPU: 12 x 1024 tokens x 40 accumulation steps = 491,520 tokens per step.
Eight GPUs (the global batch is unchanged; accumulation is divided across ranks):
  torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
"""
teacher = "gpt2"
preset = "krony-81m"
init = "vl"
dataset = "data/owt"
out_dir = "checks"

batch_size = 12
block_size = 1024
gradient_accumulation_steps = 40
max_iters = 10000
lr_decay_iters = 10000
warmup_iters = 200
learning_rate = 6e-5
min_lr = 6e-6
weight_decay = 0.1

kd_weight = 1.0
ce_weight = 0.0   # measured: distillation alone beats distillation + cross-entropy (README, Training)
temperature = 1.0

eval_interval = 500
eval_iters = 100
log_interval = 10
compile = True
