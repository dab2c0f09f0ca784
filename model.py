"""
The model: KronLinear, a drop-in for nn.Linear whose weight is a sum of Kronecker products, and a
nanoGPT-style GPT whose matrices (MLP, attention, the tied token embedding) can each be one.
The math lives in kron.py; compression specs, presets and the budget solver in compress.py;
checkpoints and Hugging Face export in checkpoint.py.

Orientation: every weight here is (out, in) as in nn.Linear. GPT-2's Conv1D stores (in, out);
from_hf_state_dict / to_hf_state_dict transpose at the boundary and nowhere else.
"""

import json
import math
import os
import re
from dataclasses import dataclass, asdict, fields
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import autotune
import kron

def matrix_kind(name):
    """A matrix name's kind: "wte", "lm_head" or, for h.<i>.<kind>, the kind ("mlp.c_fc", "attn.q", ...)."""
    return name if name in ("wte", "lm_head") else name.split(".", 2)[2]


class KronLinear(nn.Module):
    """y = x W^T + b with W = P_rows^T (sum_k A_k (x) B_k) P_cols^T, i.e. W[rows][:, cols] = sum A_k (x) B_k.

    A: (r, m1, n1), B: (r, m2, n2), out_features = m1*m2, in_features = n1*n2 (nn.Linear orientation;
    GPT-2's Conv1D stores W^T, see from_conv1d). rows/cols are optional permutations stored as index
    buffers: the forward gathers x[..., cols] and scatters the output by rows, one gather each.
    A permutation can be folded into a neighbour instead: the output order of an MLP's c_fc is free
    (GELU is elementwise), so giving c_proj's cols the same permutation as c_fc's rows cancels both
    gathers; the model does that fold, this layer just carries the index buffers.
    impl: 'auto' (measured per shape, device and batch), one of kron.ORDERS, or 'dense'.
    scales: a learnable scalar per term, W = sum_k s_k A_k (x) B_k (Krony-PT's 92M-4 model). It adds
    r parameters and no expressive power (s_k can be folded into A_k); it changes the optimization.
    """

    def __init__(self, in_features, out_features, m1, n1, r=1, bias=True, rows=None, cols=None,
                 impl="auto", scales=False, device=None, dtype=None):
        super().__init__()
        m2, n2 = kron.split_shape(out_features, in_features, m1, n1)
        kron.check_pos_int("r", r)
        if impl not in autotune.IMPLS:
            raise ValueError(f"impl must be one of {autotune.IMPLS}, got {impl!r}")
        self.in_features, self.out_features = in_features, out_features
        self.m1, self.n1, self.m2, self.n2, self.r = m1, n1, m2, n2, r
        self.impl = impl
        self.seen, self.fixed = {}, {}     # impl="auto": the choices made, per training/eval mode; fix_impl()
        kw = dict(device=device, dtype=dtype)
        self.A = nn.Parameter(torch.empty(r, m1, n1, **kw))
        self.B = nn.Parameter(torch.empty(r, m2, n2, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        self.scales = nn.Parameter(torch.ones(r, **kw)) if scales else None
        # rows/cols are saved; their inverses are derived (rebuilt on load, see _load_from_state_dict)
        self.register_buffer("rows", None)
        self.register_buffer("cols", None)
        self.register_buffer("row_inv", None, persistent=False)
        self.register_buffer("col_inv", None, persistent=False)
        self.set_permutations(rows, cols)
        self.reset_parameters()

    def reset_parameters(self, std=0.02):
        """Random factors whose product has entries of std `std` (GPT-2's init): each factor entry
        has std (std^2 / r)^(1/4), since a product entry is a sum of r products of two entries."""
        s = (std ** 2 / self.r) ** 0.25
        with torch.no_grad():
            self.A.normal_(0.0, s)
            self.B.normal_(0.0, s)
            if self.bias is not None:
                self.bias.zero_()
            if self.scales is not None:
                self.scales.fill_(1.0)

    def scaled_A(self):
        return self.A if self.scales is None else self.A * self.scales.view(-1, 1, 1)

    def set_permutations(self, rows=None, cols=None):
        for name, p, size in (("rows", rows, self.out_features), ("cols", cols, self.in_features)):
            if p is None:
                continue
            p = torch.as_tensor(p)
            if p.is_meta:                    # transformers builds models on the meta device before loading
                continue
            if p.dim() != 1 or p.numel() != size or p.dtype not in (torch.int64, torch.int32) or \
                    not torch.equal(torch.sort(p).values.cpu(), torch.arange(size)):
                raise ValueError(f"{name} must be a permutation of range({size}), got shape {tuple(p.shape)} "
                                 f"dtype {p.dtype}")
        dev = self.A.device
        self.rows = None if rows is None else torch.as_tensor(rows, dtype=torch.long, device=dev)
        self.row_inv = None if rows is None else torch.argsort(self.rows)
        self.cols = None if cols is None else torch.as_tensor(cols, dtype=torch.long, device=dev)
        self.col_inv = None if cols is None else torch.argsort(self.cols)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kw):
        if prefix + "s" in state_dict and prefix + "scales" not in state_dict:   # saved before the rename
            state_dict[prefix + "scales"] = state_dict.pop(prefix + "s")
        # a checkpoint may carry permutations this freshly built layer does not have yet: give the
        # buffers a placeholder of the saved size so that they load, then validate and rebuild inverses
        for name in ("rows", "cols"):
            t = state_dict.get(prefix + name)
            if t is not None and getattr(self, name) is None:
                setattr(self, name, torch.empty(t.shape, dtype=torch.long, device=self.A.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kw)
        self.set_permutations(self.rows, self.cols)

    def dense_weight(self):
        """The equivalent dense (out_features, in_features) weight."""
        W = kron.kron_dense(self.scaled_A(), self.B)
        if self.col_inv is not None:
            W = W[:, self.col_inv]
        if self.row_inv is not None:
            W = W[self.row_inv]
        return W

    def weight_rows(self, idx):
        """dense_weight()[idx] without building the matrix: the embedding lookup of a factored,
        tied token embedding. Row i = i1*m2 + i2 of sum_k A_k (x) B_k is sum_k A_k[i1] (x) B_k[i2]."""
        if self.row_inv is not None:
            idx = self.row_inv[idx]
        w = kron.kron_rows(self.scaled_A(), self.B, idx)    # memory-bounded: nothing (r, tokens, n) kept
        return w if self.col_inv is None else w[..., self.col_inv]

    def forward(self, x):
        if self.cols is not None:
            x = x[..., self.cols]
        A = self.scaled_A()
        impl = self.impl
        if impl == "auto":
            train = torch.is_grad_enabled() and self.A.requires_grad
            impl = self.fixed.get(train) if self.fixed else None
            if impl is None:
                impl = self.seen[train] = autotune.choose_impl(x, A, self.B, self.bias, train)
        bias = self.bias if self.row_inv is None else None
        y = autotune.forward_impl(x, A, self.B, bias, impl)
        if self.row_inv is not None:
            y = y[..., self.row_inv]
            if self.bias is not None:
                y = y + self.bias
        return y

    def fix_impl(self):
        """Freeze the implementations impl="auto" chose in the calls so far (training and eval
        separately), so that later calls do not look them up: torch.compile then traces only the
        chosen product, never the timing code."""
        self.fixed = dict(self.seen)

    def macs_per_token(self):
        """Multiply-adds per token of this layer's product as it is computed: the factored order in
        use (the cheaper one while impl="auto" has not chosen), or in * out for "dense"."""
        impl = self.impl if self.impl != "auto" else self.fixed.get(True) or self.seen.get(True)
        b_first, a_first = kron.kron_macs(self.m1, self.n1, self.m2, self.n2, self.r)
        if impl == "dense":
            return self.in_features * self.out_features
        if impl in ("b", "b_bmm"):
            return b_first
        return a_first if impl in ("a", "a_bmm", "einsum") else min(b_first, a_first)

    def extra_repr(self):
        perm = ", permuted" if self.rows is not None or self.cols is not None else ""
        sc = ", scales" if self.scales is not None else ""
        return (f"in={self.in_features}, out={self.out_features}, A=({self.r}, {self.m1}, {self.n1}), "
                f"B=({self.r}, {self.m2}, {self.n2}), bias={self.bias is not None}, impl={self.impl}{perm}{sc}")

    # ---- constructors from a dense weight

    @classmethod
    def from_dense(cls, weight, bias, m1, n1, r=1, method="vl", impl="auto", scales=False, **kw):
        """Factor a dense (out, in) weight: method 'vl' (Van Loan, optimal Frobenius fit), 'prune'
        (Krony-PT's sub-matrix init; kw: select, fill), 'perm' (permutation search; kw go to
        kron.permuted_kronecker), 'whiten' (the fit of the layer's outputs on inputs of second moment
        kw["cov"], kron.whitened_kronecker; kw: cov, damp, iters) or 'random' (GPT-2-scale random
        factors, the weight is ignored)."""
        kron.check_matrix(weight, "weight")
        out_f, in_f = weight.shape
        if bias is not None and tuple(bias.shape) != (out_f,):
            raise ValueError(f"bias must have shape ({out_f},), got {tuple(bias.shape)}")
        methods = ("vl", "prune", "perm", "whiten", "random")
        if method not in methods:
            raise ValueError(f"method must be one of {methods}, got {method!r}")
        layer = cls(in_f, out_f, m1, n1, r, bias=bias is not None, impl=impl, scales=scales,
                    device=weight.device, dtype=weight.dtype)
        W = weight.detach()
        rows = cols = None
        if method == "vl":
            A, B = kron.nearest_kronecker(W, m1, n1, r)
        elif method == "prune":
            A, B = kron.prune_kronecker(W, m1, n1, r, **kw)
        elif method == "whiten":
            if kw.get("cov") is None:
                raise ValueError("method 'whiten' needs cov, the (in, in) second moment of the layer's inputs")
            A, B = kron.whitened_kronecker(W, m1, n1, r, **kw)
        elif method == "perm":
            A, B, rows, cols = kron.permuted_kronecker(W, m1, n1, r, **kw)
            # an identity permutation costs a gather per call and nothing else: leave it out
            rows = None if torch.equal(rows.cpu(), torch.arange(out_f)) else rows
            cols = None if torch.equal(cols.cpu(), torch.arange(in_f)) else cols
        else:
            A, B = layer.A.detach(), layer.B.detach()
        with torch.no_grad():
            layer.A.copy_(A)
            layer.B.copy_(B)
            if bias is not None:
                layer.bias.copy_(bias.detach())
        layer.set_permutations(rows, cols)
        return layer

    @classmethod
    def from_linear(cls, linear, m1, n1, r=1, method="vl", **kw):
        return cls.from_dense(linear.weight, linear.bias, m1, n1, r, method, **kw)

    @classmethod
    def from_conv1d(cls, conv, m1, n1, r=1, method="vl", **kw):
        """From GPT-2's Conv1D (weight stored as (in, out), y = x W + b). m1, n1 are given in the
        nn.Linear orientation of the result: a Conv1D factor of shape (a, b) is (b, a) here."""
        return cls.from_dense(conv.weight.t(), conv.bias, m1, n1, r, method, **kw)


# -----------------------------------------------------------------------------
# GPT (nanoGPT's layout; GPT-2's architecture, read from any GPT-2-family config)

_ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}   # HF name -> F.gelu mode


# The Llama family: one block layout (RMSNorm, rotary positions, SwiGLU, grouped-query attention)
# under three Hugging Face model types that differ in biases and defaults.
LLAMA_FAMILY = ("llama", "qwen2", "mistral")
ARCHS = ("gpt2",) + LLAMA_FAMILY
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class GPTConfig:
    block_size: int = 1024          # n_positions (GPT-2), max_position_embeddings (Llama family)
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_inner: int = 3072             # MLP width (GPT-2: 4 * n_embd; Llama: intermediate_size)
    layer_norm_epsilon: float = 1e-5    # LayerNorm's eps, or RMSNorm's (rms_norm_eps)
    activation_function: str = "gelu_new"
    dropout: float = 0.0
    arch: str = "gpt2"              # the Hugging Face model_type: the block's layout and the dense export's class
    n_kv_head: int = 0              # key-value heads of grouped-query attention (0: n_head)
    head_dim: int = 0               # 0: n_embd // n_head
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None     # {"rope_type": "linear" or "llama3", its fields}; None: plain
    qkv_bias: bool = False          # Qwen2's q, k, v projections carry biases
    tie_word_embeddings: bool = True

    def __post_init__(self):
        for f in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "n_inner"):
            kron.check_pos_int(f, getattr(self, f))
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.arch == "gpt2":
            self.check_gpt2()
        else:
            self.check_llama()
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not (isinstance(self.layer_norm_epsilon, (int, float)) and 0 < self.layer_norm_epsilon < 1):
            raise ValueError(f"layer_norm_epsilon must be a finite number in (0, 1), got {self.layer_norm_epsilon!r}")

    def check_gpt2(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.activation_function not in _ACTIVATIONS:
            raise ValueError(f"activation_function must be one of {sorted(_ACTIVATIONS)}, "
                             f"got {self.activation_function!r}")
        if self.n_kv_head not in (0, self.n_head) or self.head_dim not in (0, self.n_embd // self.n_head) \
                or self.qkv_bias or not self.tie_word_embeddings or self.rope_scaling:
            raise ValueError("a gpt2 config has n_head key-value heads, n_embd // n_head head size, biases "
                             "everywhere, a tied head and no rotary positions")

    def check_llama(self):
        if self.activation_function != "silu":
            raise ValueError(f"the Llama family's MLP is SwiGLU: activation_function must be silu, "
                             f"got {self.activation_function!r}")
        for f in ("n_kv_head", "head_dim"):
            if isinstance(getattr(self, f), bool) or not isinstance(getattr(self, f), int) or getattr(self, f) < 0:
                raise ValueError(f"{f} must be a non-negative integer, got {getattr(self, f)!r}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.kv_heads})")
        if self.head_size % 2:
            raise ValueError(f"rotary positions need an even head size, got {self.head_size}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 1):
            raise ValueError(f"rope_theta must be a number above 1, got {self.rope_theta!r}")
        kind = (self.rope_scaling or {}).get("rope_type", "default")
        if kind not in ROPE_TYPES:
            raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")

    @property
    def kv_heads(self):
        return self.n_kv_head or self.n_head

    @property
    def head_size(self):
        return self.head_dim or self.n_embd // self.n_head

    @property
    def rotary(self):
        return self.arch != "gpt2"

    def asdict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_hf(cls, hf):
        """From a transformers config (or its dict): GPT-2 (model_type gpt2) or the Llama family
        (llama, qwen2, mistral). Refuses the options this model does not implement rather than
        silently computing something else."""
        get = (lambda k, default=None: hf.get(k, default)) if isinstance(hf, dict) else \
            (lambda k, default=None: getattr(hf, k, default))
        kind = get("model_type")
        if kind in LLAMA_FAMILY:
            return cls.from_hf_llama(get, kind)
        if kind not in (None, "gpt2"):
            raise ValueError(f"model_type {kind!r} is not supported: GPT-2 (gpt2) or the Llama family "
                             f"({', '.join(LLAMA_FAMILY)})")
        for k, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("add_cross_attention", False), ("tie_word_embeddings", True)):
            if get(k, ok) != ok:
                raise ValueError(f"this GPT-2 checkpoint sets {k}={get(k)!r}; only {k}={ok} is supported")
        n_embd = get("n_embd")
        return cls(block_size=get("n_positions"), vocab_size=get("vocab_size"), n_layer=get("n_layer"),
                   n_head=get("n_head"), n_embd=n_embd, n_inner=get("n_inner") or 4 * n_embd,
                   layer_norm_epsilon=get("layer_norm_epsilon", 1e-5),
                   activation_function=get("activation_function", "gelu_new"))

    @classmethod
    def from_hf_llama(cls, get, kind):
        """A LlamaConfig, Qwen2Config or MistralConfig. Qwen2 has q, k, v biases; Llama's optional
        attention_bias and mlp_bias are refused, as is a sliding window shorter than the context
        (attention within the window equals full attention only up to the window's length)."""
        for k in ("attention_bias", "mlp_bias"):
            if get(k, False):
                raise ValueError(f"this {kind} checkpoint sets {k}=True, which is not supported")
        window = get("sliding_window") if (kind != "qwen2" or get("use_sliding_window", False)) else None
        context = get("max_position_embeddings")
        if window is not None and window < context:
            raise ValueError(f"this {kind} checkpoint attends within a sliding window of {window} tokens, shorter "
                             f"than its context of {context}; sliding-window attention is not supported")
        rope = dict(get("rope_parameters") or {})            # transformers 5; before it rope_theta and rope_scaling
        if not rope:
            rope = dict(get("rope_scaling") or {}, rope_theta=get("rope_theta", 10000.0))
        theta = rope.pop("rope_theta", get("rope_theta", 10000.0))
        rope["rope_type"] = rope.get("rope_type") or rope.pop("type", "default")
        heads = get("num_attention_heads")
        return cls(block_size=context, vocab_size=get("vocab_size"), n_layer=get("num_hidden_layers"),
                   n_head=heads, n_embd=get("hidden_size"), n_inner=get("intermediate_size"),
                   layer_norm_epsilon=get("rms_norm_eps", 1e-6), activation_function=get("hidden_act", "silu"),
                   arch=kind, n_kv_head=get("num_key_value_heads") or heads, head_dim=get("head_dim") or 0,
                   rope_theta=float(theta), rope_scaling=None if rope["rope_type"] == "default" else rope,
                   qkv_bias=kind == "qwen2", tie_word_embeddings=bool(get("tie_word_embeddings", False)))


def check_compatible(student, teacher, same_width=True):
    """A teacher can distil into (or initialize) a student only if they share the vocabulary and,
    when hidden states are compared (same_width), the residual width; depth, context and MLP width
    may differ. Both are GPTConfig."""
    for k in ("vocab_size", "n_embd") if same_width else ("vocab_size",):
        a, b = getattr(student, k), getattr(teacher, k)
        if a != b:
            raise ValueError(f"teacher and student differ in {k}: teacher {b}, student {a}; "
                             f"use a teacher of the same GPT-2 family (same tokenizer and width)")


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        n = config.n_embd
        self.n_head, self.n_embd, self.dropout = config.n_head, n, config.dropout
        self.c_attn = nn.Linear(n, 3 * n)       # replaced by q, k, v when split_qkv() is called
        self.q = self.k = self.v = None
        self.c_proj = nn.Linear(n, n)
        self.resid_dropout = nn.Dropout(config.dropout)

    def split_qkv(self):
        """Replace c_attn by three (n_embd, n_embd) projections, so that each can be factored alone.
        Exact: the rows of c_attn are [W_q; W_k; W_v]."""
        if self.c_attn is None:
            return
        n, w, b = self.n_embd, self.c_attn.weight, self.c_attn.bias
        for i, name in enumerate("qkv"):
            lin = nn.Linear(n, n, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                lin.weight.copy_(w[i * n:(i + 1) * n])
                lin.bias.copy_(b[i * n:(i + 1) * n])
            setattr(self, name, lin)
        self.c_attn = None

    def forward(self, x, return_qk=False, cache=None, layer=0, mask=None):
        """With return_qk, also (q, k), each (B, n_head, T, head_size): the inputs of the attention
        maps softmax(q k^T / sqrt(head_size)), for attention-map distillation (distill.attn_kl
        computes their KL chunk by chunk; the maps themselves are never formed here).

        cache: a KVCache (or transformers' DynamicCache: the same update()), which this call extends
        with its keys and values and attends over in full. mask: a boolean (T, S) or (B, 1, T, S)
        from attention_mask(), S the keys' count; None is plain causal attention over x alone, or
        over the whole cache when T = 1."""
        B, T, C = x.shape
        if self.c_attn is not None:
            q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        hs = C // self.n_head
        q, k, v = (t.view(B, T, self.n_head, hs).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(k, v, layer)
        causal = mask is None and k.size(2) == T and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        y = self.resid_dropout(self.c_proj(y))
        return (y, (q, k)) if return_qk else y


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.n_inner)
        self.c_proj = nn.Linear(config.n_inner, config.n_embd)
        self.approximate = _ACTIVATIONS[config.activation_function]
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class RMSNorm(nn.Module):
    """The Llama family's norm: x / sqrt(mean(x^2) + eps) * weight, in float32 whatever x's dtype
    (as transformers' LlamaRMSNorm computes it; Zhang and Sennrich 2019)."""

    def __init__(self, n, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_frequencies(config):
    """The rotary inverse frequencies theta^(-2i/d), i < d/2 (Su et al. 2021), with the config's
    scaling: "linear" divides them by its factor; "llama3" (Llama 3.1) divides the low frequencies
    (wavelengths beyond original_max_position_embeddings / low_freq_factor) by the factor, keeps
    the high ones (below ... / high_freq_factor) and interpolates between. float32, as transformers."""
    d = config.head_size
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    sc = config.rope_scaling or {}
    if sc.get("rope_type") == "linear":
        return inv / sc["factor"]
    if sc.get("rope_type") == "llama3":
        factor, low, high = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        mixed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        return torch.where(medium, mixed, scaled)
    return inv


def rope_tables(inv_freq, pos):
    """(cos, sin) of the positions pos, (T,) or (B, T): each (..., T, d) with the d/2 angles twice,
    the layout transformers' rotate_half pairs with."""
    with torch.autocast(device_type=pos.device.type, enabled=False):
        angles = pos[..., None].float() * inv_freq.to(pos.device, torch.float32)
        emb = torch.cat((angles, angles), dim=-1)
        return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    """Rotate x (B, heads, T, d) by its positions' angles: x cos + rotate_half(x) sin, where
    rotate_half(x) = [-x2, x1] for the halves x1, x2 of the last axis."""
    if cos.dim() == 3:                     # per-sequence positions (B, T, d): one table per batch row
        cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class RotaryAttention(nn.Module):
    """The Llama family's attention: q_proj, k_proj, v_proj (n_kv_head heads: grouped-query
    attention, each key-value head serving n_head / n_kv_head query heads), rotary positions on q and
    k, o_proj. The same call as CausalSelfAttention plus rope, the (cos, sin) tables of the positions."""

    def __init__(self, config):
        super().__init__()
        n, hs = config.n_embd, config.head_size
        self.n_head, self.n_kv, self.hs, self.dropout = config.n_head, config.kv_heads, hs, config.dropout
        self.q_proj = nn.Linear(n, self.n_head * hs, bias=config.qkv_bias)
        self.k_proj = nn.Linear(n, self.n_kv * hs, bias=config.qkv_bias)
        self.v_proj = nn.Linear(n, self.n_kv * hs, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * hs, n, bias=False)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, return_qk=False, cache=None, layer=0, mask=None, rope=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hs).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hs).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hs).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:                   # the cache holds the n_kv heads, not their copies
            k, v = cache.update(k, v, layer)
        if self.n_kv != self.n_head:            # key-value head j serves query heads j*g ... j*g + g-1
            g = self.n_head // self.n_kv
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        causal = mask is None and k.size(2) == T and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = self.resid_dropout(self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hs)))
        return (y, (q, k)) if return_qk else y


class SwiGLU(nn.Module):
    """The Llama family's MLP: down_proj(silu(gate_proj(x)) * up_proj(x)) (Shazeer 2020)."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.n_inner, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.n_inner, bias=False)
        self.down_proj = nn.Linear(config.n_inner, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        norm = (lambda: RMSNorm(config.n_embd, config.layer_norm_epsilon)) if config.rotary else \
            (lambda: nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon))
        self.ln_1 = norm()
        self.attn = RotaryAttention(config) if config.rotary else CausalSelfAttention(config)
        self.ln_2 = norm()
        self.mlp = SwiGLU(config) if config.rotary else MLP(config)

    def forward(self, x, return_qk=False, cache=None, layer=0, mask=None, rope=None):
        kw = dict(cache=cache, layer=layer, mask=mask, **({"rope": rope} if rope is not None else {}))
        if return_qk:
            a, qk = self.attn(self.ln_1(x), return_qk=True, **kw)
            x = x + a
            return x + self.mlp(self.ln_2(x)), qk
        x = x + self.attn(self.ln_1(x), **kw)
        return x + self.mlp(self.ln_2(x))


class KVCache:
    """The keys and values of the tokens seen so far, per layer, for incremental decoding: each
    forward appends its own and attends over all. It has the two methods of transformers'
    DynamicCache that attention uses, so GPT.forward takes either."""

    def __init__(self):
        self.k, self.v = [], []

    def update(self, k, v, layer):
        """Append k, v (B, n_head, T, head_size) to the layer's and return the layer's in full."""
        if layer == len(self.k):
            self.k.append(k)
            self.v.append(v)
        else:
            self.k[layer] = torch.cat((self.k[layer], k), dim=2)
            self.v[layer] = torch.cat((self.v[layer], v), dim=2)
        return self.k[layer], self.v[layer]

    def get_seq_length(self, layer=0):
        return self.k[layer].size(2) if layer < len(self.k) else 0


def attention_mask(T, past, mask=None, device=None):
    """Which keys each of T new queries may attend, after `past` cached tokens: None where plain
    causal attention does (no padding, and nothing cached or a single query), else a boolean (T, S)
    or, with a padding mask (B, S) of 1 for tokens and 0 for padding, (B, 1, T, S), S = past + T.
    A padding query attends to itself alone, so that no row is empty (softmax of nothing is NaN,
    and a NaN value would reach real tokens through the zero weights that mask it)."""
    S = past + T
    if mask is None and (past == 0 or T == 1):
        return None
    i = torch.arange(past, S, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    allowed = j <= i
    if mask is None:
        return allowed
    if mask.dim() != 2 or mask.size(1) != S:
        raise ValueError(f"attention_mask must be (batch, {S}): the cached and the new tokens, got {tuple(mask.shape)}")
    return ((allowed & mask[:, None, :].bool()) | (j == i))[:, None]


class GPTOutput(NamedTuple):
    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
    hidden: Optional[list] = None
    qk: Optional[list] = None
    cache: Optional[object] = None


# matrix names, relative to model.transformer: "wte", "h.3.attn.c_attn", "h.3.attn.q", "h.3.mlp.c_fc", ...;
# the Llama family's in its own words ("h.3.attn.q_proj", "h.3.mlp.gate_proj", ...), and "lm_head"
# for an untied output head (a name of the model itself, not of its transformer)
GPT2_KINDS = ("wte", "attn.c_attn", "attn.q", "attn.k", "attn.v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
LLAMA_KINDS = ("wte", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
               "mlp.down_proj", "lm_head")
MATRIX_KINDS = GPT2_KINDS + LLAMA_KINDS[1:]


# The matrices that write into the residual stream: GPT-2 (and nanoGPT) initialize them at
# 0.02 / sqrt(2 n_layer), so that the residual's variance does not grow with depth.
RESIDUAL_KINDS = ("attn.c_proj", "mlp.c_proj", "attn.o_proj", "mlp.down_proj")


def matrix_kinds(config):
    """The kinds of matrix a model of this GPTConfig has, in model order (lm_head only untied)."""
    if not config.rotary:
        return GPT2_KINDS
    return LLAMA_KINDS if not config.tie_word_embeddings else LLAMA_KINDS[:-1]


def default_kinds(config):
    """The kinds the budget solver considers by default: every matrix, GPT-2's q, k, v as c_attn."""
    return tuple(k for k in matrix_kinds(config) if k not in ("attn.q", "attn.k", "attn.v"))


class GPT(nn.Module):
    """GPT-2 with the token embedding held as an (vocab, n_embd) nn.Linear(n_embd, vocab) named wte:
    the same module embeds (row lookup) and predicts (its forward is the output head), so the weight
    tie survives when wte becomes a KronLinear: the factored embedding is the factored head."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        parts = dict(wte=nn.Linear(config.n_embd, config.vocab_size, bias=False))
        if not config.rotary:
            parts["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        parts.update(drop=nn.Dropout(config.dropout), h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                     ln_f=RMSNorm(config.n_embd, config.layer_norm_epsilon) if config.rotary else
                     nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon))
        self.transformer = nn.ModuleDict(parts)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self.init_weights)
        # GPT-2's scaled init of the residual projections (RESIDUAL_KINDS; nanoGPT), the Llama family's alike
        for name, p in self.named_parameters():
            if name.endswith(("c_proj.weight", "o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ---- matrices by name

    def get_matrix(self, name):
        mod = self if name == "lm_head" else self.transformer
        for part in name.split("."):
            mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
        if not isinstance(mod, (nn.Linear, KronLinear)):
            raise ValueError(f"{name!r} is not a matrix of this model (kinds: {MATRIX_KINDS})")
        return mod

    def set_matrix(self, name, module):
        parent_name, _, leaf = name.rpartition(".")
        parent = self if name == "lm_head" else self.transformer
        for part in filter(None, parent_name.split(".")):
            parent = parent[int(part)] if part.isdigit() else getattr(parent, part)
        setattr(parent, leaf, module)

    def matrix_names(self):
        """Every matrix that can be factored, in model order (GPT-2: c_attn or q, k, v per layer)."""
        names = ["wte"]
        for i, block in enumerate(self.transformer.h):
            if self.config.rotary:
                kinds = list(LLAMA_KINDS[1:-1])
            else:
                kinds = ["attn.c_attn"] if block.attn.c_attn is not None else ["attn.q", "attn.k", "attn.v"]
                kinds += ["attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
            names += [f"h.{i}.{k}" for k in kinds]
        return names + ([] if self.lm_head is None else ["lm_head"])

    def dense_matrix(self, name):
        """The dense nn.Linear `name`, splitting c_attn first when name is a q, k or v."""
        if name.endswith(("attn.q", "attn.k", "attn.v")) and not self.config.rotary:
            self.transformer.h[int(name.split(".")[1])].attn.split_qkv()
        lin = self.get_matrix(name)
        if isinstance(lin, KronLinear):
            raise ValueError(f"{name} is already factored")
        return lin

    def factor(self, name, m1, n1, r=1, init="vl", scales=False, **kw):
        """Replace the matrix `name` by a KronLinear with A of shape (r, m1, n1), initialized from the
        current weight by `init` (see KronLinear.from_dense). Returns the new layer."""
        lin = self.dense_matrix(name)
        new = KronLinear.from_dense(lin.weight, lin.bias, m1, n1, r, method=init, scales=scales, **kw)
        self.set_matrix(name, new)
        return new

    def fold_mlp_permutations(self):
        """A permuted c_fc computes its outputs in a permuted order and scatters them back; the MLP's
        hidden order is free (GELU is elementwise), so keep the permuted order and let c_proj read
        it: c_fc's output scatter disappears and c_proj's input gather (if any) absorbs it. Exact.
        (SwiGLU's hidden order is shared by gate_proj and up_proj, so their permutations stay.)"""
        if self.config.rotary:
            return
        for block in self.transformer.h:
            fc, proj = block.mlp.c_fc, block.mlp.c_proj
            if not isinstance(fc, KronLinear) or fc.rows is None:
                continue
            perm, inv = fc.rows, fc.row_inv          # new hidden h' = h[perm], so h = h'[inv]
            with torch.no_grad():
                if fc.bias is not None:
                    fc.bias.copy_(fc.bias[perm])
                fc.set_permutations(None, fc.cols)
                if isinstance(proj, KronLinear):
                    proj.set_permutations(proj.rows, inv if proj.cols is None else inv[proj.cols])
                else:
                    proj.weight.copy_(proj.weight[:, perm])

    # ---- forward

    def embed(self, idx):
        wte = self.transformer.wte
        return wte.weight_rows(idx) if isinstance(wte, KronLinear) else F.embedding(idx, wte.weight)

    def forward(self, idx, targets=None, return_hidden=False, return_qk=False, cache=None, mask=None, pos=None,
                logits_to_keep=0):
        """idx (B, T) token ids -> GPTOutput: logits (B, T, vocab); loss, the mean cross-entropy when
        targets are given (-1 ignored), else None; hidden, with return_hidden, the residual stream
        after the embedding and after every block (n_layer + 1 tensors), else None; qk, with
        return_qk, every block's attention (q, k) (CausalSelfAttention.forward), else None.

        Incremental decoding: cache (a KVCache, or transformers' DynamicCache) holds the earlier
        tokens' keys and values; idx are the tokens after them, and the call appends theirs (the
        cache is returned too). mask (B, past + T): 1 for tokens, 0 for padding, over the cached and
        the new tokens (left-padded batches). pos: the positions of idx, (T,) or (B, T); by default
        they follow the cache, counting tokens only (transformers' convention: cumsum(mask) - 1,
        padding at 0). logits_to_keep: only the last that many positions' logits (0: all), which
        spares generation a (B, T, vocab) tensor at prefill.

        The output head runs in the head's own dtype (float32 for float32 weights) with autocast off:
        in bfloat16, GPT-2's logits (large and negative) would be off by up to ~0.25, and they are
        what distillation matches and perplexity scores."""
        B, T = idx.shape
        past = 0 if cache is None else cache.get_seq_length()
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of length {past + T} exceeds block_size {self.config.block_size}")
        if pos is None:
            pos = torch.arange(past, past + T, device=idx.device) if mask is None else \
                (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        if self.config.rotary:          # positions rotate q and k in every block; nothing is added here
            x, rope = self.transformer.drop(self.embed(idx)), rope_tables(rope_frequencies(self.config), pos)
        else:
            x, rope = self.transformer.drop(self.embed(idx) + self.transformer.wpe(pos)), None
        amask = attention_mask(T, past, mask, idx.device)
        hidden, qk = [x], []
        for i, block in enumerate(self.transformer.h):
            if return_qk:
                x, pair = block(x, return_qk=True, cache=cache, layer=i, mask=amask, rope=rope)
                qk.append(pair)
            else:
                x = block(x, cache=cache, layer=i, mask=amask, rope=rope)
            hidden.append(x)
        x = self.transformer.ln_f(x[:, -logits_to_keep:] if logits_to_keep else x)
        head = self.transformer.wte if self.lm_head is None else self.lm_head
        with torch.autocast(device_type=idx.device.type, enabled=False):
            logits = head(x.to(head.weight.dtype if isinstance(head, nn.Linear) else head.A.dtype))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return GPTOutput(logits, loss, hidden if return_hidden else None, qk if return_qk else None, cache)

    def fix_impls(self):
        """KronLinear.fix_impl on every factored matrix (after a warm-up call in each mode)."""
        for mod in self.modules():
            if isinstance(mod, KronLinear):
                mod.fix_impl()

    def flops_per_token(self, T, train=True):
        """Floating-point operations per token at context T, nanoGPT's estimate (6N + 12 L C T for
        a training step, a third of it for a forward) with N counted as the multiply-adds the
        matrices really do: a factored matrix its factored product in the order it uses, the output
        head (the tied embedding) included, the embedding lookups and layer norms not."""
        macs = 0
        for name in self.matrix_names():
            layer = self.get_matrix(name)
            macs += layer.macs_per_token() if isinstance(layer, KronLinear) else layer.weight.numel()
        c = self.config
        forward = 2 * macs + 4 * c.n_layer * c.n_head * c.head_size * T
        return 3 * forward if train else forward

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """nanoGPT's sampling loop: append max_new_tokens tokens to idx (B, T), each drawn from the
        softmax of the last logits / temperature, restricted to the top_k; temperature 0 is greedy.
        With a KV cache: each step runs the new token alone. Once the sequence outgrows block_size,
        each step reruns the last block_size tokens (the positions are learned: nothing to slide)."""
        cache, x = KVCache(), idx[:, -self.config.block_size:]
        for _ in range(max_new_tokens):
            if cache.get_seq_length() + x.size(1) > self.config.block_size:
                cache, x = KVCache(), idx[:, -self.config.block_size:]
            logits = self(x, cache=cache, logits_to_keep=1).logits[:, -1, :]
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx, x = torch.cat((idx, nxt), dim=1), nxt
        return idx

    def densify(self, name):
        """Replace a factored matrix by the dense nn.Linear of the same weight (exact): a later
        stage of multi-step compression can then factor it again, smaller."""
        layer = self.get_matrix(name)
        if not isinstance(layer, KronLinear):
            return layer
        lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                        device=layer.A.device, dtype=layer.A.dtype)
        with torch.no_grad():
            lin.weight.copy_(layer.dense_weight())
            if layer.bias is not None:
                lin.bias.copy_(layer.bias)
        self.set_matrix(name, lin)
        return lin

    def keep_layers(self, keep):
        """A shallower GPT made of these blocks of this one, in this order, with its embeddings and
        final layer norm: DistilGPT2's initialization (Sanh et al. take every other block of the
        teacher). The blocks are copies. Drop layers before factoring: a plan names blocks by index."""
        keep = list(keep)
        n = self.config.n_layer
        if not keep or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n for i in keep) \
                or len(set(keep)) != len(keep):
            raise ValueError(f"keep must be distinct block indices in [0, {n}), got {keep}")
        import copy
        config = GPTConfig.from_dict(dict(self.config.asdict(), n_layer=len(keep)))
        out = GPT(config)
        t, s = self.transformer, out.transformer
        for part in ("wte", "wpe", "ln_f"):
            if part in t:
                setattr(s, part, copy.deepcopy(getattr(t, part)))
        s.h = nn.ModuleList([copy.deepcopy(t.h[i]) for i in keep])
        out.lm_head = copy.deepcopy(self.lm_head)
        return out.to(t.ln_f.weight.device)

    # ---- Hugging Face GPT-2 weights (Conv1D orientation) in and out

    @classmethod
    def from_hf_state_dict(cls, sd, config):
        """Build a dense GPT from a GPT2LMHeadModel state dict (Conv1D weights are transposed), or
        from a Llama-family one (nn.Linear weights, renamed only)."""
        model = cls(config)
        if config.rotary:
            ours = {llama_to_ours(k): v for k, v in sd.items()}
            if config.tie_word_embeddings:
                ours.pop("lm_head.weight", None)
            missing, unexpected = model.load_state_dict(ours, strict=False)
            if missing or unexpected:
                raise ValueError(f"{config.arch} state dict does not match the config: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
            return model
        ours = {}
        for k, v in sd.items():
            if k == "lm_head.weight" or k.endswith(".attn.bias") or k.endswith(".attn.masked_bias"):
                continue                                   # tied head; causal-mask buffers of old files
            name = k if k.startswith("transformer.") else "transformer." + k
            conv1d = name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))
            ours[name] = v.t() if conv1d else v
        missing, unexpected = model.load_state_dict(ours, strict=False)
        if missing or unexpected:
            raise ValueError(f"GPT-2 state dict does not match the config: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        return model

    def to_hf_state_dict(self):
        """The dense GPT2LMHeadModel state dict of this (possibly factored) model: factors are
        multiplied out, permutations applied, q/k/v concatenated, weights transposed to Conv1D. For the
        Llama family, its own class's state dict (factors multiplied out, names mapped back)."""
        if self.config.rotary:
            return self.to_llama_state_dict()
        sd = {}
        t = self.transformer
        with torch.no_grad():
            sd["transformer.wte.weight"] = _dense(t.wte)
            sd["lm_head.weight"] = sd["transformer.wte.weight"]
            sd["transformer.wpe.weight"] = t.wpe.weight.detach()
            for i, blk in enumerate(t.h):
                p = f"transformer.h.{i}."
                a = blk.attn
                if a.c_attn is not None:
                    w, b = _dense(a.c_attn), a.c_attn.bias
                else:
                    w = torch.cat([_dense(a.q), _dense(a.k), _dense(a.v)])
                    b = torch.cat([a.q.bias, a.k.bias, a.v.bias])
                sd[p + "attn.c_attn.weight"], sd[p + "attn.c_attn.bias"] = w.t(), b.detach()
                for name, mod in (("attn.c_proj", a.c_proj), ("mlp.c_fc", blk.mlp.c_fc), ("mlp.c_proj", blk.mlp.c_proj)):
                    sd[p + name + ".weight"], sd[p + name + ".bias"] = _dense(mod).t(), mod.bias.detach()
                for ln in ("ln_1", "ln_2"):
                    sd[p + ln + ".weight"] = getattr(blk, ln).weight.detach()
                    sd[p + ln + ".bias"] = getattr(blk, ln).bias.detach()
            sd["transformer.ln_f.weight"] = t.ln_f.weight.detach()
            sd["transformer.ln_f.bias"] = t.ln_f.bias.detach()
        return {k: v.contiguous() for k, v in sd.items()}

    def to_llama_state_dict(self):
        sd = {}
        with torch.no_grad():
            for name, p in self.state_dict().items():
                if name.endswith((".A", ".B", ".scales", ".rows", ".cols")):
                    continue                            # a factored matrix: its dense weight below
                sd[ours_to_llama(name)] = p.detach()
            for name in self.matrix_names():
                sd[ours_to_llama(("" if name == "lm_head" else "transformer.") + name + ".weight")] = \
                    _dense(self.get_matrix(name))
            if self.lm_head is None:
                sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        return {k: v.contiguous() for k, v in sd.items()}

    @classmethod
    def from_pretrained(cls, name_or_dir, dtype=torch.float32):
        """Any GPT-2-family checkpoint: a hub name (gpt2, gpt2-medium, distilgpt2, ...) or a local
        Hugging Face directory, loaded through transformers' own from_pretrained. Returns (model,
        hf_config_dict); the dict is kept so that exports reproduce the source's config."""
        from safetensors import SafetensorError
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.utils import logging
        level = logging.get_verbosity()
        logging.set_verbosity_error()        # its multi-line load report: the error below says it in one
        check_source(name_or_dir)
        try:
            hf_config = AutoConfig.from_pretrained(name_or_dir, trust_remote_code=False)
            check_finite_config(hf_config.to_dict(), name_or_dir)
            config = GPTConfig.from_hf(hf_config)
            if os.path.isdir(name_or_dir):
                check_sizes(name_or_dir, config)          # before transformers allocates what config.json says
            hf, info = AutoModelForCausalLM.from_pretrained(name_or_dir, dtype=dtype, trust_remote_code=False,
                                                            use_safetensors=True, output_loading_info=True)
        except OSError as e:          # not on disk and not reachable on the hub: say so in one line
            raise ValueError(f"cannot load GPT-2 checkpoint {name_or_dir!r}: {str(e).splitlines()[0]} "
                             f"(offline? pass a local Hugging Face directory)") from None
        except ValueError as e:       # e.g. a folder that names its own code: never run (trust_remote_code)
            if "trust_remote_code" not in str(e):
                raise
            raise ValueError(f"{name_or_dir} names code of its own (auto_map) for a model type transformers "
                             f"does not know; this toolkit never runs a folder's code (trust_remote_code=False): "
                             f"give a GPT-2-family checkpoint") from None
        except (RuntimeError, SafetensorError) as e:      # truncated file, tensors of other shapes
            why = ("tensors of other shapes than its config.json gives"
                   if any(w in str(e) for w in ("mismatched", "size mismatch", "loading state_dict")) else
                   f"{type(e).__name__}: {str(e).splitlines()[0]}")
            raise ValueError(f"cannot load GPT-2 checkpoint {name_or_dir!r}: its weights are damaged or do not fit "
                             f"its config.json ({why})") from None
        finally:
            logging.set_verbosity(level)
        check_loaded(name_or_dir, info, hf_config)
        sd = hf.state_dict()
        check_finite_tensors(sd, name_or_dir)
        model = cls.from_hf_state_dict(sd, config)
        return model, hf_config.to_dict()


def check_finite_config(d, where, path=""):
    """Refuse a config with a non-finite number anywhere (a layer_norm_epsilon of NaN would be copied
    into every student and export), naming the key."""
    for k, v in d.items():
        if isinstance(v, dict):
            check_finite_config(v, where, f"{path}{k}.")
        elif isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{where}: config value {path}{k} is {v}; a model's configuration must be finite")


def check_finite_tensors(sd, where):
    """Refuse weights holding Inf or NaN, naming the first such tensor: they would pass into every
    student, export and score."""
    for k, v in sd.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ValueError(f"{where}: tensor {k} holds non-finite values (Inf or NaN); the checkpoint is "
                             f"damaged or diverged")


def tensor_shapes(directory):
    """{name: shape} of the safetensors weights in a local folder (model.safetensors, or the shards
    its index names), read from the file headers alone; {} where there are none."""
    from safetensors import safe_open
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f).get("weight_map", {}).values()))
    else:
        files = ["model.safetensors"] if os.path.isfile(os.path.join(directory, "model.safetensors")) else []
    shapes = {}
    for name in files:
        with safe_open(os.path.join(directory, name), framework="pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return shapes


def check_sizes(directory, config):
    """Refuse a config.json whose sizes its weights do not have, from the file headers and before
    anything is allocated: a damaged n_layer of 1e9 would otherwise hang building a billion blocks,
    and a width far beyond the file would allocate until memory runs out."""
    shapes = tensor_shapes(directory)
    if not shapes:
        if os.path.isfile(os.path.join(directory, "pytorch_model.bin")):
            raise ValueError(pickle_refusal(directory))
        return
    blocks = {int(m.group(1)) for k in shapes if (m := re.search(r"(?:^|\.)(?:h|layers)\.(\d+)\.", k))}
    found = dict(n_layer=len(blocks))
    if config.rotary:
        where = (("norm.weight", "n_embd", 0), ("embed_tokens.weight", "vocab_size", 0),
                 ("layers.0.mlp.up_proj.weight", "n_inner", 0))
        hf_key = dict(n_layer="num_hidden_layers", n_embd="hidden_size", vocab_size="vocab_size",
                      n_inner="intermediate_size")
    else:
        where = (("ln_f.weight", "n_embd", 0), ("wpe.weight", "block_size", 0), ("wte.weight", "vocab_size", 0),
                 ("h.0.mlp.c_fc.bias", "n_inner", 0))
        hf_key = dict(n_layer="n_layer", n_embd="n_embd", block_size="n_positions", vocab_size="vocab_size",
                      n_inner="n_inner")
    for key, field, axis in where:
        hit = next((s for k, s in shapes.items() if k == key or k.endswith("." + key)), None)
        if hit is not None:
            found[field] = hit[axis]
    for field, n in found.items():
        if getattr(config, field) != n:
            unset = hf_key[field] in unset_keys(directory, hf_key.values())
            raise ValueError(f"{directory}: config.json gives {field} {getattr(config, field)}, its weights have "
                             f"{n}; " + (f"config.json does not set {hf_key[field]}, so {'its class' if config.rotary else 'GPT-2'}'s default was assumed"
                                         if unset else "the folder is damaged or its files do not belong together"))


def unset_keys(directory, keys):
    """The keys config.json leaves out (transformers then assumes GPT-2 small's values)."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        return []
    given = set(json.load(open(path)))
    return [k for k in keys if k not in given]


def check_source(name_or_dir):
    """A source that can only be a path must exist: transformers tries any name it cannot find on disk
    as a hub name, so a mistyped ../teacher would fail with a message about the hub (or, online,
    load someone else's model). A hub name is NAME or ORG/NAME."""
    if os.path.exists(name_or_dir):
        return
    if name_or_dir.startswith((".", "/", "~")) or name_or_dir.count("/") > 1 or name_or_dir.endswith("/") \
            or os.sep in name_or_dir.replace("/", ""):
        raise ValueError(f"{name_or_dir}: no such folder (relative to {os.getcwd()}); a hub name is NAME or ORG/NAME")


def source_name(name_or_dir):
    """How a model source is recorded: a local folder by its absolute path (it then names the same
    folder from any directory), a hub name as typed."""
    return os.path.abspath(name_or_dir) if os.path.isdir(name_or_dir) else name_or_dir


def pickle_refusal(directory):
    return (f"{directory} holds pytorch_model.bin, a pickle, which this toolkit does not load (unpickling can run "
            f"code); convert a checkpoint you trust to safetensors first: load it with transformers' "
            f"from_pretrained(..., use_safetensors=False) and save_pretrained(..., safe_serialization=True)")


def check_loaded(name_or_dir, info, hf_config):
    """Refuse a checkpoint whose tensors do not cover its config: transformers would fill the gaps
    with random weights and only warn (a config.json without n_layer means GPT-2's 12 layers)."""
    missing, wrong = sorted(info.get("missing_keys", [])), list(info.get("mismatched_keys", []))
    if not missing and not wrong:
        return
    unset = unset_keys(name_or_dir, ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size"))
    raise ValueError(f"{name_or_dir}: its weights do not match its config.json ({len(missing)} tensors missing, e.g. "
                     f"{(missing or ['none'])[0]}; {len(wrong)} of another shape)" +
                     (f"; config.json does not set {', '.join(unset)}, so GPT-2's defaults were assumed" if unset
                      else ""))


def _dense(mod):
    return (mod.dense_weight() if isinstance(mod, KronLinear) else mod.weight).detach()


# The Llama family's tensor names and ours: the same tensors (nn.Linear orientation), renamed.
_LLAMA_NAMES = (("model.embed_tokens.", "transformer.wte."), ("model.norm.", "transformer.ln_f."),
                ("model.layers.", "transformer.h."), (".self_attn.", ".attn."), (".input_layernorm.", ".ln_1."),
                (".post_attention_layernorm.", ".ln_2."))


def llama_to_ours(key):
    for theirs, ours in _LLAMA_NAMES:
        key = key.replace(theirs, ours)
    return key


def ours_to_llama(key):
    for theirs, ours in _LLAMA_NAMES:
        key = key.replace(ours, theirs)
    return key


# -----------------------------------------------------------------------------
# parameter accounting: the one function every script uses to count

_COMPONENTS = (("attn.q_proj", "attn.q_proj"), ("attn.k_proj", "attn.k_proj"), ("attn.v_proj", "attn.v_proj"),
               ("attn.o_proj", "attn.o_proj"), ("mlp.gate_proj", "mlp.gate_proj"), ("mlp.up_proj", "mlp.up_proj"),
               ("mlp.down_proj", "mlp.down_proj"), ("wte", "wte (tied head)"), ("wpe", "wpe"),
               ("attn.c_attn", "attn.c_attn (q, k, v)"), ("attn.q", "attn.c_attn (q, k, v)"),
               ("attn.k", "attn.c_attn (q, k, v)"), ("attn.v", "attn.c_attn (q, k, v)"), ("attn.c_proj", "attn.c_proj"),
               ("mlp.c_fc", "mlp.c_fc"), ("mlp.c_proj", "mlp.c_proj"), ("ln_", "layer norms"),
               ("lm_head", "lm_head (untied)"), ("embed_tokens", "wte (tied head)"), ("self_attn.q_proj", "attn.q_proj"),
               ("self_attn.k_proj", "attn.k_proj"), ("self_attn.v_proj", "attn.v_proj"),
               ("self_attn.o_proj", "attn.o_proj"), ("layernorm", "layer norms"), ("norm", "layer norms"))


def _component(name):
    for key, label in _COMPONENTS:
        if f".{key}" in f".{name}":
            return label
    return "other"


def count_params(module):
    """Count a model's parameters under every convention in use, from the module itself.

      hf       unique parameters (a tied matrix once), position embeddings included: Hugging Face's
               num_parameters() and the published GPT-2 small figure 124,439,808
      nanogpt  hf minus the position embeddings: nanoGPT's get_num_params(), Krony-PT's printed sizes
      bytes    bytes of the unique parameters and saved buffers (permutation indices): the tensor
               payload of the model's safetensors file
      components  {component: parameters} (hf convention), in model order
    Works on this project's GPT and on transformers' GPT2LMHeadModel alike (wpe is found by name)."""
    hf = wpe = nbytes = 0
    components = {}
    seen = set()
    for name, p in module.named_parameters():          # named_parameters() lists a tied tensor once
        if id(p) in seen:
            continue
        seen.add(id(p))
        hf += p.numel()
        nbytes += p.numel() * p.element_size()
        if name.endswith("wpe.weight"):
            wpe += p.numel()
        label = _component(name)
        components[label] = components.get(label, 0) + p.numel()
    for name, b in module.named_buffers():
        mod_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(mod_name) if mod_name else module
        if leaf not in getattr(owner, "_non_persistent_buffers_set", ()):
            nbytes += b.numel() * b.element_size()
    return dict(hf=hf, nanogpt=hf - wpe, bytes=nbytes, components=components)


def param_table(counts, reference=None):
    """A per-component table of count_params() output; with `reference` (another count) a column
    of what each component keeps of it."""
    lines = [f"{'component':<24}{'params':>14}" + (f"{'of reference':>14}" if reference else "")]
    for label, n in counts["components"].items():
        ref = reference["components"].get(label) if reference else None
        lines.append(f"{label:<24}{n:>14,}" + (f"{n / ref:>13.1%}" if ref else ""))
    lines.append(f"{'total, HF convention':<24}{counts['hf']:>14,}" +
                 (f"{counts['hf'] / reference['hf']:>13.1%}" if reference else ""))
    lines.append(f"{'total, nanoGPT (no wpe)':<24}{counts['nanogpt']:>14,}")
    lines.append(f"{'bytes (tensors)':<24}{counts['bytes']:>14,}")
    return "\n".join(lines)
