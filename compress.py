"""
Which matrices of a GPT to factor, and how: compression specs, the published presets, the
parameter-budget solver, and applying a plan to a model.

A spec is JSON-able: {"rules": [rule, ...]} with each rule
    {"kinds": ["mlp.c_fc"],          # the model's kinds (model.matrix_kinds): GPT-2's wte, attn.c_attn (or
                                     # attn.q/k/v, which split it), attn.c_proj, mlp.c_fc, mlp.c_proj; the
                                     # Llama family's wte, attn.q_proj/k_proj/v_proj/o_proj,
                                     # mlp.gate_proj/up_proj/down_proj and, untied, lm_head
     "layers": "all",                # "all", "odd", "even" (0-based block index) or a list of ints
     "b": [4, 1],                    # the shape of B (m2, n2), or "a": [m1, n1] the shape of A
     "r": 1,                         # number of Kronecker terms
     "init": "vl",                   # vl | prune | perm | whiten | random (KronLinear.from_dense)
     "scales": false}                # a learnable scalar per term (Krony-PT's 92M-4)
and optionally "models": "gpt2" or "llama" (the family whose kinds the rules name: model_family), which
a model of the other family refuses by name; the presets carry it.
Shapes are in nn.Linear orientation, (out, in). Giving B rather than A lets one spec fit every
GPT-2 size (c_fc is always (4*n_embd, n_embd)). "wte" ignores "layers".

Resolving a spec against a model config gives a plan: {matrix name: MatrixPlan} in model order;
the budget solver gives one too. A checkpoint's config.json stores it under "factors" as
{matrix name: {"m1", "n1", "r", "init", "scales", "rows", "cols"}} (check_plan reads it back).
"""

import dataclasses
import json
import math
import os

import numpy as np
import torch

import kron
from configurator import read_small_file
from data import calibration_windows
from model import GPT, KronLinear, count_params, default_kinds, matrix_kind, matrix_kinds

INITS = ("vl", "prune", "perm", "whiten", "random")
_RULE_KEYS = {"kinds", "layers", "a", "b", "r", "init", "scales"}
# DistilGPT2's size as a share of GPT-2 small's (81,912,576 / 124,439,808 = 0.6582): the size every
# comparison compresses to unless told otherwise.
DISTIL_RATIO = 0.658
CALIB_TOKENS = 8192          # default calibration size (calibrate): docs/INIT.md measures what it costs
WHITEN_DAMP = 0.01           # the whiten init's ridge (kron.whitened_kronecker's damp): docs/INIT.md
# The tied embedding's: C is the head's input moment, but the same matrix is also the lookup, whose
# rows' errors add up unweighted (Frobenius). delta = 1 gives the ridge the trace of C: both uses
# weigh the same. Best of 0.01 / 0.1 / 1 / 10 on both reference teachers (docs/INIT.md).
WHITEN_DAMP_WTE = 1.0

# The published models, with the counts their papers print. Counting conventions (see
# model.count_params): "hf" = tie once, wpe in; "nanogpt" = hf minus wpe.
#   Krony-PT positional form: kron_decompose.py DIM1 DIM2 1 gives c_fc (Conv1D, 768 x 3072) a first
#   factor DIM1 x DIM2, i.e. A = (DIM2, DIM1) in nn.Linear orientation, and c_proj the transposed shape.
PRESETS = {
    "krony-81m": dict(
        models="gpt2",
        about="Krony-PT 81M: every MLP, c_fc A 768x768 (x) B 1x4 in Conv1D orientation, r = 1",
        published="81,972,576 (hf); Krony-PT prints 81M = 81,186,144 (nanogpt)",
        rules=[dict(kinds=["mlp.c_fc"], layers="all", b=[4, 1], r=1),
               dict(kinds=["mlp.c_proj"], layers="all", b=[1, 4], r=1)]),
    "krony-96m": dict(
        models="gpt2",
        about="Krony-PT 96M: every MLP, c_fc A 384x3072 (x) B 2x1 in Conv1D orientation, r = 1",
        published="96,128,304 (hf); the paper's 96M is hf, its README's 95M nanogpt",
        rules=[dict(kinds=["mlp.c_fc"], layers="all", b=[1, 2], r=1),
               dict(kinds=["mlp.c_proj"], layers="all", b=[2, 1], r=1)]),
    "krony-80m-2": dict(
        models="gpt2",
        about="Krony-PT 80M-2: every MLP, A 1024x256 (x) B 3x3, r = 2",
        published="80M: 80,400,048 (hf), 79,613,616 (nanogpt)",
        rules=[dict(kinds=["mlp.c_fc", "mlp.c_proj"], layers="all", b=[3, 3], r=2)]),
    "krony-92m-4": dict(
        models="gpt2",
        about="Krony-PT 92M-4: every MLP, A 1024x256 (x) B 3x3, r = 4, learnable per-term scalars",
        published="92M = 92,197,056 (nanogpt); 92,983,488 (hf)",
        rules=[dict(kinds=["mlp.c_fc", "mlp.c_proj"], layers="all", b=[3, 3], r=4, scales=True)]),
    "tq-like": dict(
        models="gpt2",
        about="TQCompressor-like: odd blocks' MLP, A 768x384 (x) B 4x2, r = 4, permutation init, plus the "
              "embedding A 50257x192 (x) B 1x4 kept tied to the head",
        published="TQCompressedGPT-2 81M = 81,336,388 excluding its untied dense head (119,933,764 with it); "
                  "here the head stays tied, so 81,336,388 is the whole model (hf)",
        rules=[dict(kinds=["mlp.c_fc"], layers="odd", b=[4, 2], r=4, init="perm"),
               dict(kinds=["mlp.c_proj"], layers="odd", b=[2, 4], r=4, init="perm"),
               dict(kinds=["wte"], b=[1, 4], r=1, init="perm")]),
    "kngpt2-like": dict(
        models="gpt2",
        about="KnGPT2-like: the embedding and every attention and MLP matrix of the odd blocks halved "
              "(B 2x1 or 1x2, r = 1, Van Loan init)",
        published="KnGPT2 prints 83M excluding the head; here 83,121,074 (nanogpt), 83,907,506 (hf)",
        rules=[dict(kinds=["wte"], b=[1, 2], r=1),
               dict(kinds=["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"], layers="odd", b=[2, 1], r=1)]),
    # The same recipes in the Llama family's words (Llama, Qwen2, Mistral: SwiGLU gate/up/down and
    # q/k/v/o). No paper prints counts for them; tests/test_compress.py checks each against the
    # arithmetic of the reference Llama teacher's shapes.
    "llama-mlp-b4": dict(
        models="llama",
        about="krony-81m's shapes on SwiGLU: every gate_proj and up_proj A (f/4)xn (x) B 4x1, down_proj "
              "A nx(f/4) (x) B 1x4, r = 1 (each MLP matrix keeps a quarter of its weights)",
        published="none (a Llama-family analogue of Krony-PT 81M)",
        rules=[dict(kinds=["mlp.gate_proj", "mlp.up_proj"], layers="all", b=[4, 1], r=1),
               dict(kinds=["mlp.down_proj"], layers="all", b=[1, 4], r=1)]),
    "llama-tq-like": dict(
        models="llama",
        about="tq-like on SwiGLU: odd blocks' gate_proj and up_proj B 4x2, down_proj B 2x4, r = 4, "
              "permutation init, plus the embedding B 1x4 (kept tied to the head where the model ties it)",
        published="none (a Llama-family analogue of TQCompressor's recipe)",
        rules=[dict(kinds=["mlp.gate_proj", "mlp.up_proj"], layers="odd", b=[4, 2], r=4, init="perm"),
               dict(kinds=["mlp.down_proj"], layers="odd", b=[2, 4], r=4, init="perm"),
               dict(kinds=["wte"], b=[1, 4], r=1, init="perm")]),
    "llama-kngpt2-like": dict(
        models="llama",
        about="kngpt2-like on the Llama family: the embedding and every attention and MLP matrix of the "
              "odd blocks halved (B 2x1 or 1x2, r = 1, Van Loan init)",
        published="none (a Llama-family analogue of KnGPT2)",
        rules=[dict(kinds=["wte"], b=[1, 2], r=1),
               dict(kinds=["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj",
                           "mlp.up_proj", "mlp.down_proj"], layers="odd", b=[2, 1], r=1)]),
}


def model_family(config):
    """The presets' word for a model: "gpt2" (learned positions, GELU MLP) or "llama" (rotary
    positions, SwiGLU: Llama, Qwen2, Mistral)."""
    return "llama" if config.rotary else "gpt2"


def presets_for(config):
    """The preset names written for this model's family."""
    return [name for name, spec in PRESETS.items() if spec["models"] == model_family(config)]


def load_spec(path_or_name):
    """A preset name, or the path of a JSON spec file."""
    if path_or_name in PRESETS:
        return PRESETS[path_or_name]
    if not os.path.exists(path_or_name):
        raise ValueError(f"{path_or_name!r} is neither a preset ({', '.join(PRESETS)}) nor a spec file")
    try:
        spec = json.loads(read_small_file(path_or_name, "spec file"))
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"spec file {path_or_name} is not valid JSON: {e}")
    if not isinstance(spec, dict) or not isinstance(spec.get("rules"), list):
        raise ValueError(f"spec file {path_or_name} must be a JSON object with a list under \"rules\"")
    return spec


def _layers(sel, n_layer):
    if sel == "all":
        return list(range(n_layer))
    if sel == "odd":
        return list(range(1, n_layer, 2))
    if sel == "even":
        return list(range(0, n_layer, 2))
    if isinstance(sel, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in sel):
        bad = [i for i in sel if not 0 <= i < n_layer]
        if bad:
            raise ValueError(f"layers {bad} out of range for a model with n_layer = {n_layer}")
        return sorted(set(sel))
    raise ValueError(f"layers must be 'all', 'odd', 'even' or a list of block indices, got {sel!r}")


def matrix_shape(config, name):
    """(out, in) of a factorable matrix, from the config alone."""
    kind = matrix_kind(name)
    n, f, V = config.n_embd, config.n_inner, config.vocab_size
    if config.rotary:
        q, kv = config.n_head * config.head_size, config.kv_heads * config.head_size
        return {"wte": (V, n), "lm_head": (V, n), "attn.q_proj": (q, n), "attn.k_proj": (kv, n),
                "attn.v_proj": (kv, n), "attn.o_proj": (n, q), "mlp.gate_proj": (f, n), "mlp.up_proj": (f, n),
                "mlp.down_proj": (n, f)}[kind]
    return {"wte": (V, n), "attn.c_attn": (3 * n, n), "attn.q": (n, n), "attn.k": (n, n),
            "attn.v": (n, n), "attn.c_proj": (n, n), "mlp.c_fc": (f, n), "mlp.c_proj": (n, f)}[kind]


def resolve_spec(spec, config, init=None):
    """The plan of a spec on a model of this GPTConfig. `init` overrides every rule's init."""
    if init is not None and init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    models = spec.get("models", model_family(config))
    if models != model_family(config):
        raise ValueError(f"this spec is written for the {models} family's matrices ({spec.get('about', '')}); "
                         f"a {config.arch} model takes the presets {', '.join(presets_for(config))}")
    rules = spec.get("rules")
    if not isinstance(rules, list) or not rules:
        raise ValueError("a spec needs a non-empty list of rules")
    plan = {}
    for i, rule in enumerate(rules):
        where = f"rule {i}"
        if not isinstance(rule, dict):
            raise ValueError(f"{where} must be an object, got {rule!r}")
        unknown = sorted(set(rule) - _RULE_KEYS)
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; allowed: {sorted(_RULE_KEYS)}")
        kinds = rule.get("kinds")
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not kinds or any(k not in matrix_kinds(config) for k in kinds):
            raise ValueError(f"{where}: kinds must be a list from this {config.arch} model's "
                             f"{matrix_kinds(config)}, got {rule.get('kinds')!r}")
        if ("a" in rule) == ("b" in rule):
            raise ValueError(f"{where}: give exactly one of \"a\" (shape of A) or \"b\" (shape of B)")
        r = rule.get("r", 1)
        kron.check_pos_int(f"{where}: r", r)
        rule_init = init or rule.get("init", "vl")
        if rule_init not in INITS:
            raise ValueError(f"{where}: init must be one of {INITS}, got {rule_init!r}")
        scales = rule.get("scales", False)
        if not isinstance(scales, bool):
            raise ValueError(f"{where}: scales must be true or false")
        layers = _layers(rule.get("layers", "all"), config.n_layer)
        for kind in kinds:
            for name in ([kind] if kind in ("wte", "lm_head") else [f"h.{l}.{kind}" for l in layers]):
                if name in plan:
                    raise ValueError(f"{where}: {name} is already factored by an earlier rule")
                m, n = matrix_shape(config, name)
                shape = rule.get("a") or rule.get("b")
                if not (isinstance(shape, list) and len(shape) == 2):
                    raise ValueError(f"{where}: a shape is a list [rows, cols], got {shape!r}")
                if "a" in rule:
                    m1, n1 = shape
                else:
                    m2, n2 = shape
                    if m % m2 or n % n2:
                        raise ValueError(f"{where}: B of shape {m2}x{n2} does not tile {name} ({m}x{n})")
                    m1, n1 = m // m2, n // n2
                try:
                    m2, n2 = kron.split_shape(m, n, m1, n1)
                except ValueError as e:
                    raise ValueError(f"{where}, {name} ({m}x{n}): {e}")
                if r > min(m1 * n1, m2 * n2):       # that many terms already reproduce any matrix exactly
                    raise ValueError(f"{where}, {name}: r = {r} exceeds the Kronecker rank ceiling "
                                     f"min(m1*n1, m2*n2) = {min(m1 * n1, m2 * n2)} of A {m1}x{n1} (x) B {m2}x{n2}; "
                                     f"more terms only add parameters")
                plan[name] = MatrixPlan(m1, n1, r, rule_init, scales)
    for name in plan:
        if name.endswith(("attn.q", "attn.k", "attn.v")):
            whole = name.rsplit(".", 1)[0] + ".c_attn"
            if whole in plan:
                raise ValueError(f"{whole} and {name} cannot both be factored: q, k, v split c_attn")
    return in_model_order(plan, config)


@dataclasses.dataclass(frozen=True)
class MatrixPlan:
    """How one matrix is factored: A is m1 x n1 and B is what the matrix's shape leaves
    (kron.split_shape), r terms, fitted by `init` (INITS), with a learnable scalar per term if
    `scales`; rows / cols say whether the factored layer permutes its outputs / inputs (set when a
    factored model's plan is read back: plan_of)."""
    m1: int
    n1: int
    r: int = 1
    init: str = "vl"
    scales: bool = False
    rows: bool = False
    cols: bool = False

    def asdict(self):
        return dataclasses.asdict(self)


def in_model_order(plan, config):
    kinds = matrix_kinds(config)
    order = ["wte"] + [f"h.{l}.{k}" for l in range(config.n_layer) for k in kinds[1:] if k != "lm_head"]
    order += ["lm_head"] if "lm_head" in kinds else []
    return {k: plan[k] for k in order if k in plan}


def check_plan(plan, config):
    """The plan {name: MatrixPlan} a checkpoint's config.json stores under "factors", checked against
    its model config."""
    if not isinstance(plan, dict):
        raise ValueError("factors must be an object {matrix name: {m1, n1, r, ...}}")
    out = {}
    for name, entry in plan.items():
        parts = name.split(".")
        kinds = matrix_kinds(config)
        ok = name in ("wte", "lm_head") and name in kinds or (
            len(parts) == 4 and parts[0] == "h" and parts[1].isdigit() and int(parts[1]) < config.n_layer
            and ".".join(parts[2:]) in kinds)
        if not ok:
            raise ValueError(f"factors: {name!r} is not a matrix of a {config.n_layer}-layer {config.arch} model")
        need = {f.name for f in dataclasses.fields(MatrixPlan)}
        if not isinstance(entry, dict) or set(entry) != need:
            raise ValueError(f"factors[{name!r}] must have exactly the keys {sorted(need)}, got {entry!r}")
        m, n = matrix_shape(config, name)
        kron.split_shape(m, n, entry["m1"], entry["n1"])
        kron.check_pos_int(f"factors[{name!r}].r", entry["r"])
        if entry["init"] not in INITS or not all(isinstance(entry[k], bool) for k in ("scales", "rows", "cols")):
            raise ValueError(f"factors[{name!r}]: init must be one of {INITS} and scales, rows, cols true or false, "
                             f"got {entry!r}")
        out[name] = MatrixPlan(**entry)
    return out


def build_student(config, plan):
    """A GPT with KronLinear layers where the plan says (random values, identity permutations where
    the plan has them): the skeleton a checkpoint's tensors are loaded into."""
    model = GPT(config)
    for name, mp in plan.items():
        lin = model.dense_matrix(name)
        layer = KronLinear(lin.in_features, lin.out_features, mp.m1, mp.n1, mp.r, bias=lin.bias is not None,
                           scales=mp.scales, rows=torch.arange(lin.out_features) if mp.rows else None,
                           cols=torch.arange(lin.in_features) if mp.cols else None)
        model.set_matrix(name, layer)
    return model


def plan_of(model, plan):
    """The stored plan of a factored model: the requested entries plus which permutations exist."""
    out = {}
    for name, mp in plan.items():
        layer = model.get_matrix(name)
        if not isinstance(layer, KronLinear):
            raise ValueError(f"{name} is in the plan but not factored in the model")
        out[name] = MatrixPlan(layer.m1, layer.n1, layer.r, mp.init, scales=layer.scales is not None,
                               rows=layer.rows is not None, cols=layer.cols is not None)
    return out


def needs_calibration(plan):
    """The matrices of a plan whose init fits the layer's inputs (init "whiten")."""
    return [name for name, mp in plan.items() if mp.init == "whiten"]


def calibrate(model, tokens, names, n_tokens=CALIB_TOKENS, batch_size=8, seed=0, progress=True):
    """The second moment C = E[x x^T] of the inputs of each named matrix, measured by running `model`
    on n_tokens tokens of `tokens` (a 1-D token array: the training split, never held-out text) in
    windows of the model's context at seeded random offsets. Streaming: each batch's x^T x is formed
    in the model's dtype and summed in float64. Returns {name: C (n, n) float64 on the CPU}.

    The tied embedding gets its head's input, the final hidden state after ln_f: as the output
    layer its error is h . (e_v - e_hat_v) for every token v, weighted by C; as the lookup table it is
    read one row at a time, where the plain Frobenius error (Van Loan) is already the right measure
    for the rows taken together; an untied embedding (the Llama family's lm_head apart) is only a
    lookup table and has no input to weight by. q, k and v share c_attn's input (the Llama family:
    q_proj's), gate_proj and up_proj theirs: each is measured once."""
    from tqdm import tqdm
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"calibration tokens must be a positive integer, got {n_tokens!r}")
    T = min(model.config.block_size, n_tokens)
    sources = {}                                  # module -> the names that read its input
    for name in names:
        if name == "wte" and not model.config.tie_word_embeddings:
            raise ValueError("wte is untied from the output head here: a lookup table has no inputs to whiten "
                             "by (use the vl init for it)")
        if name.endswith(("attn.q", "attn.k", "attn.v")) and not model.config.rotary:
            attn = model.transformer.h[int(name.split(".")[1])].attn
            mod = attn.c_attn if attn.c_attn is not None else attn.q
        elif name.endswith(("attn.k_proj", "attn.v_proj", "mlp.up_proj")):
            mod = model.get_matrix(name.rsplit(".", 1)[0] + (".gate_proj" if name.endswith("up_proj") else ".q_proj"))
        else:
            mod = model.get_matrix(name)
        sources.setdefault(mod, []).append(name)
    sums, fired = {mod: None for mod in sources}, set()

    class Done(Exception):          # every input of this batch is measured: skip the rest of the forward
        pass

    def hook(mod, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1])
        g = (x.t() @ x).to("cpu", torch.float64)
        sums[mod] = g if sums[mod] is None else sums[mod] + g
        fired.add(mod)
        if len(fired) == len(sources):
            raise Done

    handles = [mod.register_forward_pre_hook(hook) for mod in sources]
    n_seq = -(-n_tokens // T)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x in tqdm(calibration_windows(tokens, T, n_tokens, batch_size, seed), total=-(-n_seq // batch_size),
                          desc="calibrate", unit="batch", disable=not progress):
                fired.clear()
                try:
                    model(torch.from_numpy(x).to(device))
                except Done:
                    pass
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: sums[mod] / (n_seq * T) for mod, group in sources.items() for name in group}


def decompose(model, plan, compare=("vl", "prune"), progress=True, covs=None, perm_kw=None):
    """Factor the model's matrices in place as the plan says. Returns one report row per matrix:
    name, shapes, parameters, and the relative Frobenius error ||W - W_hat|| / ||W|| of the init
    used and of each method in `compare` (cheap ones; the permutation search runs only when it is
    the chosen init); with the matrix's input second moment in `covs` (calibrate), also the
    relative output error sqrt(tr(E C E^T) / tr(W C W^T)) of each. The init "whiten" needs it.
    perm_kw: options of the permutation search (kron.permuted_kronecker: max_iters, kicks, ...).
    MLP permutations are then folded (GPT.fold_mlp_permutations)."""
    from tqdm import tqdm
    covs = covs or {}
    missing = [name for name in needs_calibration(plan) if name not in covs]
    if missing:
        raise ValueError(f"init 'whiten' needs the inputs' second moments (calibrate) of {missing}")
    report = []
    bar = tqdm(plan.items(), desc="decompose", disable=not progress, unit="matrix")
    for name, mp in bar:
        bar.set_postfix_str(name)
        lin = model.dense_matrix(name)
        W = lin.weight.detach()
        m1, n1, r, cov = mp.m1, mp.n1, mp.r, covs.get(name)
        damp = WHITEN_DAMP_WTE if name == "wte" else WHITEN_DAMP
        fits = {}
        for method in compare:
            if method == mp.init or method in ("perm", "random") or (method == "whiten" and cov is None):
                continue
            if method == "prune" and r > (W.shape[0] // m1) * (W.shape[1] // n1):
                continue
            fits[method] = fit_matrix(W, m1, n1, r, method, cov, damp)
        dense_params = count_params(lin)["hf"]
        kw = {"whiten": dict(cov=cov, damp=damp), "perm": perm_kw or {}}.get(mp.init, {})
        layer = model.factor(name, m1, n1, r, init=mp.init, scales=mp.scales, **kw)
        fits[mp.init] = (layer.A.detach(), layer.B.detach(), layer.rows, layer.cols)
        report.append(dict(name=name, shape=tuple(W.shape), a=(m1, n1), b=(layer.m2, layer.n2), r=r, init=mp.init,
                         params=count_params(layer)["hf"], dense=dense_params,
                         errors={k: kron.relative_error(W, *f) for k, f in fits.items()},
                         out_errors={} if cov is None else {k: output_error(W, f, cov) for k, f in fits.items()}))
    model.fold_mlp_permutations()
    return report


def fit_matrix(W, m1, n1, r, method, cov=None, damp=WHITEN_DAMP):
    """(A, B, None, None): the factors of one of the permutation-free inits (damp: whiten's ridge)."""
    if method == "vl":
        return (*kron.nearest_kronecker(W, m1, n1, r), None, None)
    if method == "prune":
        return (*kron.prune_kronecker(W, m1, n1, r), None, None)
    if method == "whiten":
        return (*kron.whitened_kronecker(W, m1, n1, r, cov, damp=damp), None, None)
    raise ValueError(f"fit_matrix: method must be vl, prune or whiten, got {method!r}")


# -----------------------------------------------------------------------------
# one matrix at a parameter count: the best structure this module knows (issue of the frontier)


@dataclasses.dataclass
class Fit:
    """An approximation of one matrix as a sum of Kronecker sums: parts [(A, B)], A (r, m1, n1), B
    (r, m2, n2) (a rank-r product is A (r, m, 1), B (r, 1, n)). family: "lowrank", "kron" (every
    factor dimension >= 2) or "hybrid" (a rank-r product plus a Kronecker sum of the rest)."""
    family: str
    parts: list
    shapes: str

    @property
    def params(self):
        return sum(A.numel() + B.numel() for A, B in self.parts)

    def dense(self):
        return sum(kron.kron_dense(A, B) for A, B in self.parts)


def fit_error(W, fit, cov=None):
    """The squared error of a Fit: tr(E C E^T) with E = W - fit.dense() (C = I when cov is None)."""
    E = W.detach().double() - fit.dense().double()
    return float((E * E).sum()) if cov is None else float(((E @ cov.to(E)) * E).sum())


def _kron_sum(W, m1, n1, r, cov, damp):
    return fit_matrix(W, m1, n1, r, "whiten" if cov is not None else "vl", cov, damp)[:2]


def fit_hybrid(W, rank, shape, cov=None, rounds=4, damp=WHITEN_DAMP):
    """W ~ U V^T + sum_k A_k (x) B_k: low rank takes the dominant directions, a Kronecker sum (shape
    (m1, n1, r)) the residual it leaves. Block coordinate descent on the (weighted) error: the best
    rank-`rank` fit of W - K (SVD-LLM's closed form with cov), then the Kronecker fit of W - L, for
    `rounds` rounds, from K = 0; the best iterate is returned, so the result is never worse than its
    start, the rank-`rank` fit alone. rank 0: the Kronecker sum alone (one fit); r 0: low rank alone."""
    m, n = W.shape
    m1, n1, r = shape
    Wd = W.detach().double()
    K = (torch.zeros(r, m1, n1, dtype=torch.float64), torch.zeros(r, m // m1, n // n1, dtype=torch.float64))
    desc = f"{m1}x{n1} (x) {m // m1}x{n // n1} r{r}"
    desc = f"rank {rank} + {desc}" if rank else desc
    if not r:                               # no parameters for the Kronecker part: low rank itself
        return Fit("lowrank", [_kron_sum(Wd, m, 1, rank, cov, damp)], f"rank {rank}")
    if not rank:
        return Fit("kron", [_kron_sum(Wd, m1, n1, r, cov, damp)], desc)
    best = None
    for _ in range(rounds):
        L = _kron_sum(Wd - kron.kron_dense(*K), m, 1, rank, cov, damp)
        first = Fit("hybrid", [L, K], desc)
        K = _kron_sum(Wd - kron.kron_dense(*L), m1, n1, r, cov, damp)
        for cand in (first, Fit("hybrid", [L, K], desc)):
            err = fit_error(Wd, cand, cov)
            if best is None or err < best[0]:
                best = (err, cand)
    return best[1]


def kron_shapes(W, max_params, top):
    """The `top` Kronecker shapes of W (every factor dimension >= 2) with the smallest Van Loan tail at
    the most terms that fit max_params: [(m1, n1, r)], best first."""
    m, n = W.shape
    shapes = []
    for m1, n1, _ in candidate_shapes(m, n, max_r=10 ** 9, min_compression=1.0, family="kron_only"):
        r = min(max_params // (m1 * n1 + (m // m1) * (n // n1)), m1 * n1, (m // m1) * (n // n1))
        if r >= 1:
            shapes.append((kron.kron_tail_energy(W, m1, n1, r), (m1, n1, r)))
    return [shape for _, shape in sorted(shapes)[:top]]


def best_fit(W, max_params, cov=None, splits=(0.25, 0.5, 0.75), top=3, damp=WHITEN_DAMP):
    """The best approximation of W (m x n) this module knows within max_params numbers, by the
    weighted error tr(E C E^T) when cov (the inputs' second moment) is given, else the Frobenius
    error: low rank at the largest rank that fits; the `top` Kronecker shapes (kron_shapes) fitted
    (whitened with cov); and hybrids giving each fraction of `splits` to low rank and the rest to
    the Kronecker shape that best fits what that low rank leaves (fit_hybrid). Returns a Fit (its
    family says which won)."""
    m, n = W.shape
    if max_params < m + n:
        raise ValueError(f"max_params {max_params:,} is below one rank-1 term ({m + n:,}) of a {m}x{n} matrix")
    Wd = W.detach().double()
    cands = [fit_hybrid(Wd, max_params // (m + n), (1, 1, 0), cov, damp=damp)]
    cands += [fit_hybrid(Wd, 0, shape, cov, damp=damp) for shape in kron_shapes(Wd, max_params, top)]
    for s in splits:
        rank = int(s * max_params) // (m + n)
        if rank < 1:
            continue
        rest = Wd - kron.kron_dense(*_kron_sum(Wd, m, 1, rank, cov, damp))
        cands += [fit_hybrid(Wd, rank, shape, cov, damp=damp)
                  for shape in kron_shapes(rest, max_params - rank * (m + n), 1)]
    return min(cands, key=lambda f: fit_error(Wd, f, cov))


def output_error(W, fit, cov):
    """sqrt(tr(E C E^T) / tr(W C W^T)): the relative error of the layer's outputs on the calibration
    inputs (E = W - W_hat, with the fit's permutations applied to W)."""
    A, B, rows, cols = fit
    Wp = W if rows is None else W[rows]           # a row order does not change tr(E C E^T)
    Wp, C = (Wp, cov) if cols is None else (Wp[:, cols], cov[cols][:, cols])
    Wd, C = Wp.detach().double(), C.to(W.device, torch.float64)
    return math.sqrt(max(kron.weighted_error(Wp, A, B, C), 0.0) / max(float((Wd @ C * Wd).sum()), 1e-300))


def is_low_rank(config, name, mp):
    """Whether a factored matrix is a rank-r product: A m x 1 (x) B 1 x n, or A 1 x n (x) B m x 1
    (W = sum_k a_k b_k^T either way, with its rows or columns reordered): the Kronecker form adds
    nothing to a truncated SVD there."""
    m2, n2 = kron.split_shape(*matrix_shape(config, name), mp.m1, mp.n1)
    return (mp.n1 == 1 and m2 == 1) or (mp.m1 == 1 and n2 == 1)


def structure(config, plan):
    """What a plan's factored matrices are, in words for a table: "dense", "low rank", "Kronecker",
    or "mixed: K Kronecker, L low rank"."""
    low = sum(is_low_rank(config, name, mp) for name, mp in plan.items())
    if not plan:
        return "dense"
    if low == len(plan):
        return "low rank"
    return "Kronecker" if low == 0 else f"mixed: {len(plan) - low} Kronecker, {low} low rank"


def format_report(rows):
    methods = [m for m in INITS if any(m in row["errors"] for row in rows)]
    outs = [m for m in INITS if any(m in row["out_errors"] for row in rows)]
    head = f"{'matrix':<18}{'W':>12}{'A':>12}{'B':>8}{'r':>3}{'params':>11}{'of dense':>9}" + \
        "".join(f"{'err ' + m:>11}" for m in methods) + "".join(f"{'out ' + m:>11}" for m in outs) + "  init"
    lines = [head]
    for row in rows:
        lines.append(f"{row['name']:<18}{'%dx%d' % row['shape']:>12}{'%dx%d' % row['a']:>12}{'%dx%d' % row['b']:>8}"
                     f"{row['r']:>3}{row['params']:>11,}{row['params'] / row['dense']:>9.1%}" +
                     "".join(f"{row['errors'][m]:>11.4f}" if m in row["errors"] else f"{'':>11}" for m in methods)
                     + "".join(f"{row['out_errors'][m]:>11.4f}" if m in row["out_errors"] else f"{'':>11}"
                               for m in outs) + f"  {row['init']}")
    lines.append("params: the factored layer's, bias included; err: relative Frobenius error "
                 "||W - sum A(x)B|| / ||W|| of each init (perm: after the search)")
    if outs:
        lines.append("out: relative error of the layer's outputs on the calibration inputs, "
                     "sqrt(tr(E C E^T) / tr(W C W^T)), C = E[x x^T]")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# the parameter-budget solver


def candidate_shapes(m, n, max_r=4, min_compression=1.5, max_compression=64, family="kron", dmax=2048):
    """The factor shapes the solver considers for an m x n matrix: [(m1, n1, rmax)], each with r
    from 1 to rmax, between `min_compression` and `max_compression` times fewer weights than the
    matrix. Left out: a 1x1 factor (a rescaled copy of W); shapes that cannot reach
    max_compression's size even with max_r terms; shapes whose rearrangement has both sides above
    dmax (only the near-square shapes of a GPT-2 embedding: each one's spectrum alone would cost
    minutes on a CPU, kron.kron_spectra).

    family "lowrank": only A of shape m x 1 and B of shape 1 x n, so that A_k (x) B_k = a_k b_k^T and
    the r-term Van Loan fit is the rank-r truncated SVD (the rearrangement of W is W itself;
    Eckart-Young), r up to max_r. family "kron_only": every factor dimension >= 2, so that no shape
    is a rank-r product in disguise (is_low_rank): what Kronecker structure alone achieves."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    out = []
    for s in kron.factor_shapes(m, n, 1):
        if family == "lowrank" and (s.m1, s.n1) != (m, 1):
            continue
        if family == "kron" and (s.m1 * s.n1 == 1 or s.m2 * s.n2 == 1):
            continue
        if family == "kron_only" and min(s.m1, s.n1, s.m2, s.n2) < 2:
            continue
        if s.params * min_compression > m * n or max_r * s.params * max_compression < m * n:
            continue
        if min(s.m1 * s.n1, s.m2 * s.n2) > dmax:
            continue
        rmax = min(max_r, s.kron_rank, int(m * n / (min_compression * s.params)))
        if rmax >= 1:
            out.append((s.m1, s.n1, rmax))
    return out


def candidate_options(W, max_r=4, family="kron", progress=None, shapes=None):
    """Every (m1, n1, r) option of `shapes` (default: candidate_shapes of W) with its Van Loan tail
    energy ||W||^2 - sum_{k<=r} s_k^2 (the exact squared Frobenius error of the best r-term fit; the
    spectra from kron.kron_spectra). Returns (options, ||W||^2)."""
    m, n = W.shape
    shapes = candidate_shapes(m, n, max_r, family=family) if shapes is None else shapes
    Wd = W.detach().double()
    total = float((Wd * Wd).sum())
    spectra = kron.kron_spectra(Wd, shapes, progress=progress)
    opts = []
    for m1, n1, rmax in shapes:
        kept = np.cumsum(spectra[(m1, n1)].numpy())
        params = m1 * n1 + (m // m1) * (n // n1)
        for r in range(1, rmax + 1):
            opts.append(dict(m1=m1, n1=n1, r=r, params=r * params, tail=max(total - kept[r - 1], 0.0)))
    return opts, total


def matrices_of_kinds(model, kinds):
    """The model's matrix names whose kind ("wte", "mlp.c_fc", ...) is one of `kinds`, in model order."""
    return [nm for nm in model.matrix_names() if matrix_kind(nm) in kinds]


OBJECTIVES = ("tail", "relative", "output")
FAMILIES = ("kron", "lowrank", "kron_only")


def solve_budget(model, target, kinds=None, max_r=4, init="vl", objective="tail", progress=True, log=print,
                 family="kron", unreachable="error", covs=None):
    """Choose which matrices to factor, each one's shape and r, so that count_params(model)["hf"]
    lands at or under `target` with the smallest total Van Loan tail energy sum ||W - W_hat||^2
    (objective "tail"), the smallest sum of relative tails ||W - W_hat||^2 / ||W||^2
    (objective "relative": every matrix weighs the same whatever its scale), or the smallest
    predicted output error (objective "output"): each tail times tr(C)/n, C the matrix's input
    second moment from `covs` (calibrate), which is E||E x||^2 for a residual E whose rows are
    isotropic: a matrix whose inputs carry more energy pays more for the same weight error.

    A multiple-choice knapsack: per matrix, keep it dense or take one candidate factorization.
    Solved by Lagrangian relaxation (each matrix independently minimizes tail + lam * params; lam is
    bisected to the smallest price that fits the budget), then greedy filling of the slack with the
    moves that buy the most energy per parameter. Returns the plan (for resolve_spec's consumers).

    family: "kron" (every factor shape), "lowrank" (truncated SVD, see candidate_options) or
    "kron_only" (every factor dimension >= 2: candidate_shapes).
    unreachable: "error" refuses a target below the smallest model these kinds allow; "closest"
    says so and returns that smallest model instead (the caller compares its size to the target).
    kinds: the matrix kinds it may factor (default: every one, model.default_kinds)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if unreachable not in ("error", "closest"):
        raise ValueError(f"unreachable must be 'error' or 'closest', got {unreachable!r}")
    if isinstance(target, bool) or not isinstance(target, int) or target < 1:
        raise ValueError(f"target must be a positive number of parameters, got {target!r}")
    base = count_params(model)["hf"]
    names = matrices_of_kinds(model, default_kinds(model.config) if kinds is None else kinds)
    if not names:
        raise ValueError(f"no matrices of kinds {kinds} in this model")
    if objective == "output" and any(nm not in (covs or {}) for nm in names):
        raise ValueError("objective 'output' needs the input second moment of every candidate matrix (calibrate)")
    if base <= target:
        log(f"budget: the dense model already has {base:,} <= {target:,} parameters (hf); nothing to factor")
        return {}
    choices, energy = budget_options(model, names, max_r, objective, covs, family, progress, log)
    floor = base - sum(c[0]["params"] - min(o["params"] for o in c) for c in choices)
    if floor > target and unreachable == "closest":
        log(f"budget: target {target:,} is below the smallest model these kinds allow ({floor:,} parameters, "
            f"hf); taking that smallest model instead")
        target = floor
    if floor > target:
        raise ValueError(f"target {target:,} is below the smallest model these kinds allow ({floor:,} "
                         f"parameters, hf convention, every candidate matrix at its smallest factorization); "
                         f"raise the target or add kinds (--kinds)")
    fixed = base - sum(c[0]["params"] for c in choices)
    sel, lam, used = knapsack([[o["params"] for o in c] for c in choices], [[o["tail"] for o in c] for c in choices],
                              target - fixed)
    log(f"budget: target {target:,} parameters (hf convention: tie once, wpe in); dense model {base:,}")
    log(f"budget: price lam = {lam:.3e} squared-error per parameter: each matrix took the option minimizing "
        f"tail energy + lam * params, then leftover parameters bought the most energy per parameter")
    log(f"{'matrix':<18}{'choice':>22}{'params':>12}{'rel err':>9}")
    plan = {}
    for nm, c, j in zip(names, choices, sel):
        o = c[j]
        if j == 0:
            log(f"{nm:<18}{'dense':>22}{o['params']:>12,}{0.0:>9.4f}")
            continue
        m, n = model.get_matrix(nm).weight.shape
        desc = f"{o['m1']}x{o['n1']} (x) {m // o['m1']}x{n // o['n1']} r{o['r']}"
        rel = o["tail"] if objective == "relative" else o["tail"] / energy[nm]
        log(f"{nm:<18}{desc:>22}{o['params']:>12,}{math.sqrt(rel):>9.4f}")
        plan[nm] = MatrixPlan(o["m1"], o["n1"], o["r"], init)
    total_tail = sum(c[j]["tail"] * (energy[nm] if objective == "relative" else 1.0)
                     for nm, c, j in zip(names, choices, sel))
    log(f"budget: {fixed + used:,} parameters ({target - fixed - used:,} under the target); "
        f"total tail energy {total_tail:.4g} = {total_tail / sum(energy.values()):.2%} of these matrices' energy "
        f"(objective: {objective})")
    return in_model_order(plan, model.config)


def uniform_lowrank(model, target, kinds=None, init="whiten", log=print):
    """SVD-LLM's allocation (Wang et al. 2024, arXiv 2403.07378): every matrix of `kinds` at the same
    ratio rho of its weights, rank r = max(1, floor(rho * m n / (m + n))), rho the largest that keeps
    count_params(...)["hf"] at or under `target` (bisected). A target below every matrix at rank 1
    takes rank 1 everywhere, said in the log. Returns the plan (A m x 1 (x) B 1 x n: a rank-r
    product, each MatrixPlan's init `init`)."""
    base = count_params(model)["hf"]
    names = matrices_of_kinds(model, default_kinds(model.config) if kinds is None else kinds)
    shapes = {nm: tuple(model.get_matrix(nm).weight.shape) for nm in names}

    def ranks(rho):
        return {nm: max(1, int(rho * m * n / (m + n))) for nm, (m, n) in shapes.items()}

    def size(rk):
        return base - sum(m * n - rk[nm] * (m + n) for nm, (m, n) in shapes.items())

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if size(ranks(mid)) <= target else (lo, mid)
    rk = ranks(lo)
    if size(rk) > target:
        log(f"uniform: target {target:,} is below every matrix at rank 1 ({size(rk):,} parameters); taking that")
    log(f"uniform: every matrix at {lo:.1%} of its weights, {size(rk):,} parameters (hf) for a target of {target:,}")
    return in_model_order({nm: MatrixPlan(m, 1, rk[nm], init) for nm, (m, n) in shapes.items()}, model.config)


def budget_options(model, names, max_r, objective, covs, family, progress, log):
    """Per matrix, its options for the knapsack: option 0 dense (tail 0), then every candidate
    factorization with its parameters and its tail under the objective's weighting; and each
    matrix's energy in the same units. Returns (choices, energy)."""
    from tqdm import tqdm
    choices = []                  # per matrix: list of options, option 0 = dense
    energy = {}
    shapes = {nm: candidate_shapes(*model.get_matrix(nm).weight.shape, max_r, family=family) for nm in names}
    bar = tqdm(total=sum(len(s) for s in shapes.values()), desc="budget: Kronecker spectra", unit="shape",
               disable=not progress)
    for nm in names:
        bar.set_postfix_str(nm)
        W = model.get_matrix(nm).weight
        opts, total = candidate_options(W, progress=bar.update, shapes=shapes[nm])
        scale = 1 / total if objective == "relative" else \
            float(covs[nm].diagonal().mean()) if objective == "output" else 1.0
        for o in opts:
            o["tail"] *= scale
        energy[nm] = total * (scale if objective == "output" else 1.0)
        choices.append([dict(m1=None, n1=None, r=0, params=W.numel(), tail=0.0)] + opts)
    bar.close()
    left = sum(len(candidate_shapes(*model.get_matrix(nm).weight.shape, max_r, family=family, dmax=math.inf))
               - len(s) for nm, s in shapes.items())
    if left:
        log(f"budget: {left} near-square factor shapes left out (both sides of their rearrangement above "
            f"2048: each spectrum would cost minutes)")
    return choices, energy


def knapsack(params, tails, budget):
    """The multiple-choice knapsack of solve_budget: params[i][j], tails[i][j] of option j of item i;
    pick one option per item with total params <= budget and a small total tail. Lagrangian
    relaxation (each item minimizes tail + lam * params; lam bisected to the smallest price that
    fits), then greedy filling of the slack with the switches that save the most tail per extra
    parameter. Returns (the chosen option per item, lam, the parameters used)."""
    P = [np.array(p, dtype=np.float64) for p in params]
    T = [np.array(t) for t in tails]

    def pick(lam):
        return [int(np.argmin(t + lam * p)) for t, p in zip(T, P)]

    def cost(sel):
        return int(sum(p[j] for p, j in zip(P, sel)))

    lo, hi = 0.0, 1.0
    while cost(pick(hi)) > budget:
        hi *= 2
    for _ in range(100):                              # bisection on the price of a parameter
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(pick(mid)) > budget else (lo, mid)
    sel, lam = pick(hi), hi
    while True:                                       # greedy fill of the slack
        slack = budget - cost(sel)
        best, best_gain = None, 0.0
        for i, (t, p) in enumerate(zip(T, P)):
            extra, saved = p - p[sel[i]], t[sel[i]] - t
            ok = (extra <= slack) & (saved > 0)
            if ok.any():
                gain = np.where(ok, saved / np.maximum(extra, 1), 0.0)
                j = int(np.argmax(gain))
                if gain[j] > best_gain:
                    best, best_gain = (i, j), gain[j]
        if best is None:
            break
        sel[best[0]] = best[1]
    return sel, lam, cost(sel)
