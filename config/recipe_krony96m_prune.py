"""Recipe: preset krony-96m, prune init, on the same data, budget and schedule as the other recipe
configs, so that they compare on equal terms. Reference teacher and OpenWebText sample by default;
for GPT-2 override --teacher=gpt2 --dataset=data/owt --block_size=1024 and scale the batch.
"""
teacher = "../shared/teacher/owt-mini-gpt2"
preset = "krony-96m"
init = "prune"
dataset = "data/owt_sample"
out_dir = "checks/recipe_krony96m_prune"

batch_size = 8
block_size = 256
gradient_accumulation_steps = 2
max_iters = 300
lr_decay_iters = 300
warmup_iters = 10
learning_rate = 1e-3
min_lr = 1e-4

kd_weight = 0.0   # Krony-PT's final recipe: no distillation, cross-entropy only
ce_weight = 1.0
temperature = 1.0

eval_interval = 50
eval_iters = 10
log_interval = 10
device = "cpu"
