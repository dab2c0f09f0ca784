"""TQCompressor-like: odd blocks' MLP (r = 4) and the embedding, permutation init, distillation.
  python train.py config/recipe_common.py config/recipe_tq_like.py"""
preset = "tq-like"
init = "perm"
kd_weight = 1.0
ce_weight = 0.0
out_dir = "checks/recipe_tq_like"
