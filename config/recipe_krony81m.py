"""Krony-PT 81M: every MLP, Van Loan init, cross-entropy only (Krony-PT's final recipe: no distillation).
  python train.py config/recipe_common.py config/recipe_krony81m.py"""
preset = "krony-81m"
init = "vl"
kd_weight = 0.0
ce_weight = 1.0
out_dir = "checks/recipe_krony81m"
