"""Krony-PT 96M with its pruning init (their best), cross-entropy only.
  python train.py config/recipe_common.py config/recipe_krony96m_prune.py"""
preset = "krony-96m"
init = "prune"
kd_weight = 0.0
ce_weight = 1.0
out_dir = "checks/recipe_krony96m_prune"
