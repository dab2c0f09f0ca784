"""TQCompressor-style multi-step distillation: first the odd blocks' MLPs, then the embedding too,
distilling after each step (the tq-like preset in two stages).
  python train.py config/recipe_common.py config/recipe_tq_multistep.py"""
preset = None
stages = [
    {"iters": 100, "init": "perm", "rules": [
        {"kinds": ["mlp.c_fc"], "layers": "odd", "b": [4, 2], "r": 4},
        {"kinds": ["mlp.c_proj"], "layers": "odd", "b": [2, 4], "r": 4}]},
    {"iters": 100, "preset": "tq-like", "init": "perm"},
]
kd_weight = 1.0
ce_weight = 0.0
out_dir = "checks/recipe_tq_multistep"
