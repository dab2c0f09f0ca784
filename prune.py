"""
Width pruning as Minitron does it (Muralidharan et al. 2024, arXiv 2407.14679; Sreenivas et al.
2024, arXiv 2408.11796): rank the MLP neurons, the attention heads and the embedding channels by
their activations on calibration text, keep the most important ones, and distil. The result is an
ordinary dense GPT-2 of smaller width (n_embd, n_head, n_inner): what practitioners pick today
because it runs fast anywhere, the baseline a factored model has to beat at the same size.

Importance (the papers' activation-based scores, aggregated over a sequence by the mean of the
magnitude and over sequences by the L2 norm, their best aggregation, Table 11 of 2407.14679):
  neuron i of block l: |GELU(x W_fc + b)_i|, the MLP's hidden activation (what c_proj reads)
  head h of block l: ||y_h||, the head's attention output (its slice of c_proj's input)
  embedding channel j: sum over every LayerNorm (ln_1, ln_2 of each block, ln_f) of |LN(x)_j|
GPT-2 ties a head's width to the embedding's (n_embd = n_head x head size), so a narrower
embedding keeps n_embd / head size heads per block, the most important ones; the head size stays.
"""

import math

import torch

from data import calibration_windows
from model import GPT, GPTConfig, count_params

CALIB_TOKENS = 8192
NEURON_STEP = 32            # MLP widths searched in steps of this many neurons


def check_gpt2(model):
    if model.config.rotary:
        raise ValueError("width pruning is implemented for GPT-2's block (LayerNorm, one head size per "
                         "embedding); this model is " + model.config.arch)
    if any(n != "wte" and not isinstance(model.get_matrix(n), torch.nn.Linear) for n in model.matrix_names()) \
            or model.transformer.h[0].attn.c_attn is None:
        raise ValueError("width pruning needs the dense teacher (no factored matrices, c_attn whole)")


def importance(model, tokens, n_tokens=CALIB_TOKENS, batch_size=8, seed=0):
    """Minitron's scores on n_tokens tokens of `tokens` (the training split): a dict of float64
    tensors, "emb" (n_embd,), "heads" (n_layer, n_head), "neurons" (n_layer, n_inner)."""
    check_gpt2(model)
    c = model.config
    sq = dict(emb=torch.zeros(c.n_embd, dtype=torch.float64),
              heads=torch.zeros(c.n_layer, c.n_head, dtype=torch.float64),
              neurons=torch.zeros(c.n_layer, c.n_inner, dtype=torch.float64))

    def add(key, idx, a):                  # a (B, T, k): mean over T of |a|, squares summed over B
        s = (a.abs().double().mean(1) ** 2).sum(0).cpu()
        if idx is None:
            sq[key] += s
        else:
            sq[key][idx] += s

    hooks = []
    for l, block in enumerate(model.transformer.h):
        hooks.append(block.mlp.c_proj.register_forward_pre_hook(lambda m, a, l=l: add("neurons", l, a[0])))
        hooks.append(block.attn.c_proj.register_forward_pre_hook(
            lambda m, a, l=l: add("heads", l, a[0].unflatten(-1, (c.n_head, -1)).norm(dim=-1))))
        for ln in (block.ln_1, block.ln_2):
            hooks.append(ln.register_forward_hook(lambda m, a, out: add("emb", None, out)))
    hooks.append(model.transformer.ln_f.register_forward_hook(lambda m, a, out: add("emb", None, out)))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x in calibration_windows(tokens, min(c.block_size, n_tokens), n_tokens, batch_size, seed):
                model(torch.from_numpy(x).to(device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {k: v.sqrt() for k, v in sq.items()}


def widths(config, target):
    """Every (n_embd, n_inner) that fits `target` parameters (count_params' "hf"), n_embd in steps of
    the head size, n_inner the widest multiple of NEURON_STEP that fits (at least one step): one
    candidate per embedding width, widest embedding first."""
    hs = config.n_embd // config.n_head
    out = []
    for d in range(config.n_embd, 0, -hs):
        fixed = (config.vocab_size + config.block_size) * d + 2 * d + config.n_layer * (4 * d * d + 9 * d)
        per_neuron = config.n_layer * (2 * d + 1)          # c_fc's row and bias, c_proj's column
        f = min(config.n_inner, (target - fixed) // per_neuron // NEURON_STEP * NEURON_STEP)
        if f >= NEURON_STEP:
            out.append((d, f))
    return out


def keep_width(model, scores, n_embd, n_inner):
    """A dense GPT-2 of width n_embd (n_embd / head size heads per block) and MLP width n_inner made
    of this one's most important channels, heads and neurons (`scores` from importance), in their
    original order. The kept weights are copies; nothing else changes (LayerNorm normalizes over the
    kept channels, as Minitron's pruned models do)."""
    check_gpt2(model)
    c = model.config
    hs = c.n_embd // c.n_head
    if n_embd % hs or not 0 < n_embd <= c.n_embd or not 0 < n_inner <= c.n_inner:
        raise ValueError(f"width ({n_embd}, {n_inner}) must be a multiple of the head size {hs} up to {c.n_embd}, "
                         f"and an MLP width up to {c.n_inner}")
    top = lambda s, k: torch.sort(torch.topk(s, k).indices).values   # noqa: E731
    ch = top(scores["emb"], n_embd)
    out = GPT(GPTConfig.from_dict(dict(c.asdict(), n_embd=n_embd, n_head=n_embd // hs, n_inner=n_inner)))
    t, s = model.transformer, out.transformer
    with torch.no_grad():
        s.wte.weight.copy_(t.wte.weight[:, ch])
        s.wpe.weight.copy_(t.wpe.weight[:, ch])
        s.ln_f.weight.copy_(t.ln_f.weight[ch])
        s.ln_f.bias.copy_(t.ln_f.bias[ch])
        for l, (tb, sb) in enumerate(zip(t.h, s.h)):
            heads = top(scores["heads"][l], n_embd // hs)
            hd = (heads[:, None] * hs + torch.arange(hs)).flatten()       # the kept heads' dimensions
            qkv = torch.cat([hd + i * c.n_embd for i in range(3)])
            nr = top(scores["neurons"][l], n_inner)
            for a, b in ((tb.ln_1, sb.ln_1), (tb.ln_2, sb.ln_2)):
                b.weight.copy_(a.weight[ch])
                b.bias.copy_(a.bias[ch])
            sb.attn.c_attn.weight.copy_(tb.attn.c_attn.weight[qkv][:, ch])
            sb.attn.c_attn.bias.copy_(tb.attn.c_attn.bias[qkv])
            sb.attn.c_proj.weight.copy_(tb.attn.c_proj.weight[ch][:, hd])
            sb.attn.c_proj.bias.copy_(tb.attn.c_proj.bias[ch])
            sb.mlp.c_fc.weight.copy_(tb.mlp.c_fc.weight[nr][:, ch])
            sb.mlp.c_fc.bias.copy_(tb.mlp.c_fc.bias[nr])
            sb.mlp.c_proj.weight.copy_(tb.mlp.c_proj.weight[ch][:, nr])
            sb.mlp.c_proj.bias.copy_(tb.mlp.c_proj.bias[ch])
    return out.to(t.wte.weight.device)


def calibration_loss(model, tokens, n_tokens=CALIB_TOKENS, batch_size=8, seed=1):
    """The mean next-token loss (nats) on n_tokens tokens of `tokens` (the training split): how a
    pruned candidate is ranked before any training."""
    total, n = 0.0, 0
    model.eval()
    with torch.no_grad():
        for x in calibration_windows(tokens, min(model.config.block_size, n_tokens) + 1, n_tokens, batch_size, seed):
            x = torch.from_numpy(x).to(next(model.parameters()).device)
            loss = model(x[:, :-1], targets=x[:, 1:]).loss
            total, n = total + float(loss) * x[:, 1:].numel(), n + x[:, 1:].numel()
    return total / n


def prune_to(model, target, tokens, log=print, n_tokens=CALIB_TOKENS):
    """Minitron's width pruning at a budget: the importance scores, then every width that fits
    (widths) pruned and scored by its calibration loss before training, the lowest kept (the papers
    rank candidate architectures after a short retraining; this ranks them before it). Returns the
    pruned GPT."""
    scores = importance(model, tokens, n_tokens)
    cands = widths(model.config, target)
    if not cands:
        raise ValueError(f"no GPT-2 of this vocabulary and depth fits {target:,} parameters by width alone")
    best = None
    for d, f in cands:
        m = keep_width(model, scores, d, f)
        loss = calibration_loss(m, tokens, n_tokens)
        log(f"width n_embd {d}, n_head {d * model.config.n_head // model.config.n_embd}, n_inner {f}: "
            f"{count_params(m)['hf']:,} parameters, calibration loss {loss:.4f} nats")
        if best is None or loss < best[0]:
            best = (loss, m)
    log(f"kept: n_embd {best[1].config.n_embd}, n_inner {best[1].config.n_inner} "
        f"(calibration loss {best[0]:.4f}, {math.exp(best[0]):.1f} perplexity)")
    return best[1]

