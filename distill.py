"""
The distillation objective's terms, with memory bounded at any scale.

At GPT-2's shapes a batch of 12 x 1024 positions has 50257-way logits: one float32 copy is 2.5 GB.
Written plainly, KL(teacher || student) keeps the two log-softmaxes for backward (two more copies)
and attention-map distillation keeps about three float32 (T x T) maps per layer and head (29 GB
at batch 12). Here each term is an autograd function that saves only its inputs (tensors that
exist anyway: the logits, the queries and keys) and recomputes the softmaxes chunk by chunk in
backward, so the extra memory is one chunk's worth, whatever the batch.

  logit_losses   T^2 * KL(softmax(t/T) || softmax(s/T)) (Hinton et al.) and cross-entropy on the
                 data, from the same logits in one pass, the mean over positions
  attn_kl        KL(teacher || student) of the causal attention maps softmax(q k^T / sqrt(d)),
                 from each layer's queries and keys, the mean over (batch, head, query) rows
  hidden_mse     the MSE between residual streams, the mean over layers

Every value and gradient equals the plain formula (tested in float64).
"""

import math

import torch
import torch.nn.functional as F


def _div(x, T):
    return x if T == 1 else x / T           # no vocabulary-sized copy at T = 1


def _compute_dtype(x):
    return torch.promote_types(x.dtype, torch.float32)        # float32, or float64 when given float64


# -----------------------------------------------------------------------------
# logits: distillation KL and cross-entropy


class _LogitLosses(torch.autograd.Function):
    """(kd, ce) from student logits s (N, V), teacher logits t (N, V) or None, targets y (N,) or
    None (-1: ignored). Saves s, t, y; recomputes each chunk's softmaxes in backward."""

    @staticmethod
    def forward(ctx, s, t, y, T, chunk):
        dt = _compute_dtype(s)
        kd = s.new_zeros((), dtype=dt)
        ce = s.new_zeros((), dtype=dt)
        for i in range(0, s.shape[0], chunk):
            sc = s[i:i + chunk].to(dt)
            ce_done = False
            if t is not None:            # sum p_t (log p_t - log p_s), in place: two (chunk, V) buffers
                ls, lt = F.log_softmax(_div(sc, T), -1), F.log_softmax(_div(t[i:i + chunk].to(dt), T), -1)
                if y is not None and T == 1:          # the cross-entropy from the same log-softmax
                    ce += F.nll_loss(ls, y[i:i + chunk], ignore_index=-1, reduction="sum")
                    ce_done = True
                ls.neg_().add_(lt)
                kd += torch.dot(lt.exp_().view(-1), ls.view(-1))
                del ls, lt
            if y is not None and not ce_done:
                ce += F.cross_entropy(sc, y[i:i + chunk], ignore_index=-1, reduction="sum")
        n_valid = (y != -1).sum().clamp_min(1) if y is not None else None
        ctx.save_for_backward(s, t, y, n_valid)
        ctx.T, ctx.chunk = T, chunk
        kd = kd * T * T / s.shape[0] if t is not None else kd
        ce = ce / n_valid if y is not None else ce
        return kd, ce

    @staticmethod
    def backward(ctx, g_kd, g_ce):
        s, t, y, n_valid = ctx.saved_tensors
        T, chunk, N = ctx.T, ctx.chunk, s.shape[0]
        dt = _compute_dtype(s)
        grad = torch.empty_like(s)
        for i in range(0, N, chunk):
            sc = s[i:i + chunk].to(dt)
            p = F.softmax(_div(sc, T), -1) if t is not None else None
            if t is not None:      # d/ds of T^2/N sum p_t (log p_t - log p_s) = (T/N) (p_s - p_t)
                g = (p - F.softmax(_div(t[i:i + chunk].to(dt), T), -1)).mul_(g_kd * T / N)
            else:
                g = torch.zeros_like(sc)
            if y is not None:      # d/ds of the mean cross-entropy = (softmax(s) - onehot(y)) / n_valid
                yc = y[i:i + chunk]
                q = p if p is not None and T == 1 else F.softmax(sc, -1)      # p is not needed after g
                q[torch.arange(len(yc), device=s.device), yc.clamp_min(0)] -= 1
                g.add_(q.mul_((yc != -1).unsqueeze(1) * (g_ce / n_valid)))
            grad[i:i + chunk] = g
        return grad, None, None, None, None


def logit_losses(student_logits, teacher_logits=None, targets=None, T=1.0, chunk=1024):
    """(kd, ce): T^2 * mean over positions of KL(softmax(t/T) || softmax(s/T)), and the mean
    cross-entropy of the student on `targets` (-1 ignored). Either input may be None (its term is
    0). Logits of any shape (..., V); computed in float32 (float64 if given), `chunk` positions at a
    time, with nothing vocabulary-sized kept for backward but the logits themselves."""
    V = student_logits.shape[-1]
    s = student_logits.reshape(-1, V)
    t = None if teacher_logits is None else teacher_logits.detach().reshape(-1, V)
    y = None if targets is None else targets.reshape(-1)
    if t is not None and t.shape != s.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} do not match the student's "
                         f"{tuple(student_logits.shape)}")
    return _LogitLosses.apply(s, t, y, float(T), int(chunk))


# -----------------------------------------------------------------------------
# attention maps


class _AttnKL(torch.autograd.Function):
    """Sum over rows of KL(p_t || p_s) with p = softmax(q k^T * scale), causal, from queries and
    keys (B, H, T, d). Query rows in chunks of `rows`; only keys up to the chunk's last row."""

    @staticmethod
    def forward(ctx, qs, ks, qt, kt, scale, rows):
        dt = _compute_dtype(qs)
        total = qs.new_zeros((), dtype=dt)
        for i in range(0, qs.shape[2], rows):
            ls, lt, mask = _log_maps(qs, ks, qt, kt, i, rows, scale, dt)
            total += torch.where(mask, lt.exp() * (lt - ls), 0.0).sum()
        ctx.save_for_backward(qs, ks, qt, kt)
        ctx.scale, ctx.rows = scale, rows
        return total

    @staticmethod
    def backward(ctx, g):
        qs, ks, qt, kt = ctx.saved_tensors
        scale, rows = ctx.scale, ctx.rows
        dt = _compute_dtype(qs)
        gq, gk = torch.zeros_like(qs, dtype=dt), torch.zeros_like(ks, dtype=dt)
        for i in range(0, qs.shape[2], rows):
            ls, lt, mask = _log_maps(qs, ks, qt, kt, i, rows, scale, dt)
            gs = torch.where(mask, ls.exp() - lt.exp(), 0.0) * (g * scale)   # d/d(scores) of sum KL
            j = ls.shape[-1]
            gq[:, :, i:i + rows] += gs @ ks[:, :, :j].to(dt)
            gk[:, :, :j] += gs.transpose(-2, -1) @ qs[:, :, i:i + rows].to(dt)
        return gq.to(qs.dtype), gk.to(ks.dtype), None, None, None, None


def _log_maps(qs, ks, qt, kt, i, rows, scale, dt):
    """Log attention maps of query rows i..i+rows for student and teacher, over keys 0..i+rows-1."""
    j = min(i + rows, qs.shape[2])
    mask = torch.ones(j - i, j, dtype=torch.bool, device=qs.device).tril(diagonal=i)
    maps = []
    for q, k in ((qs, ks), (qt, kt)):
        scores = (q[:, :, i:j].to(dt) @ k[:, :, :j].to(dt).transpose(-2, -1)) * scale
        maps.append(F.log_softmax(scores.masked_fill(~mask, float("-inf")), -1))
    return maps[0], maps[1], mask


def attn_kl(q_s, k_s, q_t, k_t, max_elems=2 ** 25):
    """Mean over (batch, head, query) rows of KL(teacher || student) of the causal attention maps
    softmax(q k^T / sqrt(d)). q, k: (B, H, T, d). The maps are never formed whole: query rows go in
    chunks of at most `max_elems` map entries, recomputed in backward."""
    if q_s.shape != q_t.shape or k_s.shape != k_t.shape:
        raise ValueError(f"student and teacher attention inputs differ: {tuple(q_s.shape)} vs {tuple(q_t.shape)}")
    B, H, T, d = q_s.shape
    rows = max(1, min(T, max_elems // max(B * H * T, 1)))
    total = _AttnKL.apply(q_s, k_s, q_t.detach(), k_t.detach(), 1.0 / math.sqrt(d), rows)
    return total / (B * H * T)


# -----------------------------------------------------------------------------
# residual streams


def hidden_mse(student_hidden, teacher_hidden):
    """Mean over layers of the MSE between residual streams (lists of (B, T, C) tensors, paired
    one to one)."""
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"hidden-state distillation pairs layers one to one: the student has "
                         f"{len(student_hidden) - 1} blocks, the teacher {len(teacher_hidden) - 1}")
    return torch.stack([F.mse_loss(a.float(), b.detach().float()) for a, b in
                        zip(student_hidden, teacher_hidden)]).mean()
