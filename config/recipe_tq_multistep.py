"""TQCompressor-style multi-step distillation: first the odd blocks' MLPs, then the embedding too,
distilling after each step (the tq-like preset in two stages)."""
teacher = "../shared/teacher/owt-mini-gpt2"
dataset = "data/owt_sample"
out_dir = "checks/recipe_tq_multistep"
preset = None
stages = [
    {"iters": 150, "init": "perm", "rules": [
        {"kinds": ["mlp.c_fc"], "layers": "odd", "b": [4, 2], "r": 4},
        {"kinds": ["mlp.c_proj"], "layers": "odd", "b": [2, 4], "r": 4}]},
    {"iters": 150, "preset": "tq-like", "init": "perm"},
]

batch_size = 8
block_size = 256
gradient_accumulation_steps = 2
max_iters = 300
lr_decay_iters = 300
warmup_iters = 10
learning_rate = 1e-3
min_lr = 1e-4
kd_weight = 1.0
ce_weight = 0.0   # measured: distillation alone beats distillation + cross-entropy (README, Training)
eval_interval = 50
eval_iters = 10
log_interval = 10
device = "cpu"
