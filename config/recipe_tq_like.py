"""Recipe: preset tq-like, perm init, on the same data, budget and schedule as the other recipe
configs, so that they compare on equal terms. Reference teacher and OpenWebText sample by default;
for GPT-2 override --teacher=gpt2 --dataset=data/owt --block_size=1024 and scale the batch.
"""
teacher = "../shared/teacher/owt-mini-gpt2"
preset = "tq-like"
init = "perm"
dataset = "data/owt_sample"
out_dir = "checks/recipe_tq_like"

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
temperature = 1.0

eval_interval = 50
eval_iters = 10
log_interval = 10
device = "cpu"
