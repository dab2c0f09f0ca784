"""The train_gpt2.py recipe scaled to the reference teacher (4 layers, 128 wide, 256 context) and
the OpenWebText sample: runs on two CPU cores in minutes. Prepare the data first:
  python data/owt/prepare.py --input ../shared/data/openwebtext/owt10k_sample_docs.jsonl.xz \
      --out data/owt_teacher --val_last 71     (the teacher's own split: its held-out documents)
"""
teacher = "../shared/teacher/owt-mini-gpt2"
preset = "krony-81m"
dataset = "data/owt_teacher"
out_dir = "checks/mini"

batch_size = 4
block_size = 256
gradient_accumulation_steps = 2
max_iters = 200
lr_decay_iters = 200
warmup_iters = 10
learning_rate = 1e-3
min_lr = 1e-4

kd_weight = 1.0
ce_weight = 0.0   # measured: distillation alone beats distillation + cross-entropy (docs/training.md)
temperature = 1.0
kd_chunk = 256

eval_interval = 50
eval_iters = 10
log_interval = 10
device = "cpu"
