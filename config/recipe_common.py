"""What every recipe shares, so that they compare on equal terms: teacher, data, tokens, schedule.
Pass it before the recipe's own file (later files override earlier ones):
  python train.py config/recipe_common.py config/recipe_tq_like.py
Reference teacher and OpenWebText sample by default; for GPT-2 override --teacher=gpt2
--dataset=data/owt --block_size=1024 and scale the batch.
"""
teacher = "../shared/teacher/owt-mini-gpt2"
dataset = "data/owt_teacher"

batch_size = 4
block_size = 256
gradient_accumulation_steps = 2
max_iters = 200
lr_decay_iters = 200
warmup_iters = 10
learning_rate = 1e-3
min_lr = 1e-4
temperature = 1.0
kd_chunk = 256

eval_interval = 50
eval_iters = 10
log_interval = 10
device = "cpu"
