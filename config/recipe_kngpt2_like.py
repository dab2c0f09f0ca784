"""KnGPT2-like: the embedding and the odd blocks' attention and MLP halved, with KnGPT2's
intermediate-layer distillation (logits, hidden states, attention maps) plus cross-entropy.
  python train.py config/recipe_common.py config/recipe_kngpt2_like.py"""
preset = "kngpt2-like"
init = "vl"
kd_weight = 1.0
ce_weight = 1.0
hidden_weight = 1.0
attn_weight = 1.0
out_dir = "checks/recipe_kngpt2_like"
