"""
Kronecker factor shapes, and decomposing a whole GPT-2 into an initialized student checkpoint.

  python kron_decompose.py --list 3072 768 --r 1                  every factorization of a 3072x768 matrix
  python kron_decompose.py --list 3072 768 --budget 600000        those at or under 600k parameters
  python kron_decompose.py --list 3072 768 --json                 machine-readable rows (--json FILE: to a file)
  python kron_decompose.py 768 768 1                              Krony-PT's form: every MLP of the teacher,
                                                                  c_fc's first factor 768x768 in GPT-2's
                                                                  Conv1D orientation, c_proj transposed, r = 1
  python kron_decompose.py --teacher gpt2 --preset krony-81m --init vl --out checks/krony81m_init
  python kron_decompose.py --teacher DIR --spec my_spec.json --out checks/mine
  python kron_decompose.py --teacher ../shared/teacher/owt-6x256-llama-bpe8k --preset llama-mlp-b4
  python kron_decompose.py --teacher gpt2 --target_params 81912576 --out checks/distil_size
  python kron_decompose.py --teacher gpt2 --preset krony-81m --init whiten --dataset data/owt
                                                                  fit each matrix to its outputs on 8,192
                                                                  training tokens (--calib_tokens)

--list shapes are in nn.Linear orientation: a matrix is (out, in), A is (m1, n1), B is (m2, n2).
The teacher is a hub name or a local Hugging Face GPT-2 directory (default gpt2). r is the number of
Kronecker terms everywhere; --r and --budget filter --list (a decomposition takes r from
N_FACTORS, the preset, the spec, or --max_r with --target_params). Exit status: 2 for a bad command
line, 1 for a failure.
"""

import argparse
import json
import sys

import kron
from configurator import device_type, positive_int, run_main


def format_table(rows):
    head = ["A (m1 x n1)", "B (m2 x n2)", "r", "params", "compression", "term rank", "kron rank",
            "MACs/token", "vs dense", "order"]
    body = [[f"{s.m1} x {s.n1}", f"{s.m2} x {s.n2}", str(s.r), f"{s.params:,}", f"{s.compression:.1f}x",
             f"{s.term_rank:,}", f"{s.kron_rank:,}", f"{s.macs:,}", f"{s.macs / s.dense_macs:.3f}",
             "B first" if s.order == "b" else "A first"] for s in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def list_shapes(m, n, r, budget=None, as_json=False):
    rows = kron.factor_shapes(m, n, r)
    if budget is not None:
        rows = [s for s in rows if s.params <= budget]
    if as_json:
        return json.dumps([s.asdict() for s in rows], indent=1)
    title = (f"{len(rows)} factorizations of a {m} x {n} matrix ({m * n:,} dense parameters, "
             f"{m * n:,} MACs/token) with r = {r} term{'s' if r > 1 else ''}"
             + (f", at most {budget:,} parameters" if budget is not None else "")
             + "; parameters exclude the bias")
    return title + "\n" + format_table(rows)


def show_shapes(args):
    text = list_shapes(args.list[0], args.list[1], args.r or 1, args.budget, as_json=args.json is not None)
    if args.json in (None, "-"):
        print(text)
    else:
        import atomic
        atomic.write_text(args.json, text + "\n")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dims", nargs="*", type=positive_int, metavar="DIM1 DIM2 N_FACTORS",
                   help="Krony-PT's form: decompose every MLP matrix of the teacher")
    p.add_argument("--list", nargs=2, type=positive_int, metavar=("M", "N"),
                   help="list every factorization of an M x N matrix (out x in)")
    p.add_argument("--r", type=positive_int, help="with --list: number of Kronecker terms r (default 1)")
    p.add_argument("--budget", type=positive_int, help="with --list: keep shapes with at most this many parameters")
    p.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help="the rows as JSON instead of a table: to FILE, or printed when no FILE is given")
    g = p.add_argument_group("decomposing a model")
    g.add_argument("--teacher", default="gpt2", help="hub name or local Hugging Face folder of a GPT-2 or a Llama, "
                                                     "Qwen2 or Mistral model (default gpt2)")
    g.add_argument("--preset", help="a named spec: for GPT-2 " + ", ".join(compress_presets("gpt2")) +
                                    "; for the Llama family " + ", ".join(compress_presets("llama")))
    g.add_argument("--spec", help="a JSON spec file (see compress.py)")
    g.add_argument("--target_params", type=positive_int,
                   help="solve for a model of at most this many parameters (HF convention: tie once, wpe in)")
    g.add_argument("--kinds", default=None,
                   help="with --target_params: the matrix kinds it may factor, comma-separated (default: every "
                        "kind; GPT-2: wte,attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj; the Llama family: wte,"
                        "attn.q_proj,attn.k_proj,attn.v_proj,attn.o_proj,mlp.gate_proj,mlp.up_proj,mlp.down_proj"
                        " and, untied, lm_head)")
    g.add_argument("--max_r", type=positive_int, default=4, help="with --target_params: most terms per matrix")
    g.add_argument("--objective", choices=("tail", "relative", "output"), default="tail",
                   help="with --target_params: minimize the total Van Loan tail energy (default), the sum "
                        "of each matrix's relative tail, or the predicted output error (calibrates: --dataset)")
    g.add_argument("--init", choices=("vl", "prune", "perm", "whiten", "random"),
                   help="init of every factored matrix (default: the spec's, vl for the positional form); "
                        "whiten fits each matrix to its outputs on training tokens (--dataset, --calib_tokens)")
    g.add_argument("--dataset", default="data/owt",
                   help="with init whiten: a prepared dataset folder (prepare.py) whose train split calibrates "
                        "(default data/owt); its tokenizer must be the teacher's")
    g.add_argument("--calib_tokens", type=positive_int, default=8192,
                   help="with init whiten: the number of training tokens the inputs' second moments are measured on")
    g.add_argument("--out", help="output checkpoint directory (default checks/<name>_init)")
    g.add_argument("--seed", type=int, default=1337, help="random seed (random init, permutation search kicks)")
    g.add_argument("--device", type=device_type, default="auto",
                   help="where the spectra and factorizations are computed: auto (default: a GPU if there is one), "
                        "cpu, cuda, cuda:N; the checkpoint is the same either way, up to float32 rounding")
    args = p.parse_args(argv)
    if args.list:
        if args.dims:
            p.error("give either --list M N or the positional DIM1 DIM2 N_FACTORS, not both")
        return run_main("kron_decompose.py", show_shapes, args)
    for flag in ("r", "budget"):
        if getattr(args, flag) is not None:
            p.error(f"--{flag} filters --list only; a decomposition takes r from N_FACTORS, the preset, the spec, "
                    f"or --max_r with --target_params")
    sources = [bool(args.dims), bool(args.preset), bool(args.spec), args.target_params is not None]
    if sum(sources) == 0:
        p.error("nothing to do: give --list M N, DIM1 DIM2 N_FACTORS, --preset, --spec or --target_params")
    if sum(sources) > 1:
        p.error("give only one of DIM1 DIM2 N_FACTORS, --preset, --spec, --target_params")
    if args.dims and len(args.dims) != 3:
        p.error(f"the positional form takes exactly DIM1 DIM2 N_FACTORS, got {len(args.dims)} numbers")
    return run_main("kron_decompose.py", decompose_model, args)


def compress_presets(models):
    import compress
    return [name for name, spec in compress.PRESETS.items() if spec["models"] == models]


def krony_spec(dim1, dim2, n_factors):
    """Krony-PT's DIM1 DIM2 N_FACTORS: c_fc's Conv1D weight (n_embd x n_inner) gets a first factor
    DIM1 x DIM2, c_proj's (n_inner x n_embd) the transposed shape DIM2 x DIM1. In nn.Linear
    orientation (what the spec takes) both are transposed: c_fc A = (DIM2, DIM1), c_proj A = (DIM1, DIM2)."""
    return {"rules": [dict(kinds=["mlp.c_fc"], layers="all", a=[dim2, dim1], r=n_factors),
                      dict(kinds=["mlp.c_proj"], layers="all", a=[dim1, dim2], r=n_factors)]}


def out_name(args):
    """The default output's name: checks/<name>_<init>."""
    if args.dims:
        return "krony_{}x{}_r{}".format(*args.dims)
    if args.preset or args.spec:
        return args.preset or args.spec.rsplit("/", 1)[-1].removesuffix(".json")
    return f"budget_{args.target_params}"


def decompose_model(args):
    import torch
    import atomic
    import checkpoint
    import compress
    from model import GPT, count_params, default_kinds, matrix_kinds, param_table, source_name

    out = args.out or f"checks/{out_name(args)}_{args.init or 'init'}"
    atomic.check_replaceable(out, "student", (args.teacher,))      # before any work
    spec = compress.load_spec(args.preset or args.spec) if args.preset or args.spec else None
    torch.manual_seed(args.seed)
    device = args.device
    model, hf_config = GPT.from_pretrained(args.teacher)
    model.to(device)
    before = count_params(model)
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip()) if args.kinds else \
        default_kinds(model.config)
    covs = calibration = None
    if args.dims and model.config.rotary:
        raise ValueError(f"the positional form DIM1 DIM2 N_FACTORS is Krony-PT's, for GPT-2's MLP; a "
                         f"{model.config.arch} model takes --preset ({', '.join(compress.presets_for(model.config))}), --spec "
                         f"(kinds {', '.join(matrix_kinds(model.config))}) or --target_params")
    if args.dims:
        d1, d2, n = args.dims
        spec = krony_spec(d1, d2, n)
        plan = compress.resolve_spec(spec, model.config, init=args.init or "vl")
    elif spec is not None:
        plan = compress.resolve_spec(spec, model.config, init=args.init)
    else:
        bad = [k for k in kinds if k not in matrix_kinds(model.config)]
        if bad:
            raise ValueError(f"--kinds: this {model.config.arch} model has no {bad}; choose from "
                             f"{', '.join(matrix_kinds(model.config))}")
        spec = {"target_params": args.target_params, "kinds": list(kinds), "max_r": args.max_r,
                "objective": args.objective}
        if args.objective == "output":
            covs, calibration = calibrate_on_data(model, compress.matrices_of_kinds(model, kinds), args)
        plan = compress.solve_budget(model, args.target_params, kinds=kinds, max_r=args.max_r,
                                     init=args.init or "vl", objective=args.objective, covs=covs)
    print(f"teacher {args.teacher}: {model.config.n_layer} layers, n_embd {model.config.n_embd}, "
          f"vocab {model.config.vocab_size}; {len(plan)} matrices to factor")
    if compress.needs_calibration(plan) and covs is None:
        covs, calibration = calibrate_on_data(model, compress.needs_calibration(plan), args)
    rows = compress.decompose(model, plan, compare=("vl", "prune", "whiten"), covs=covs)
    print(compress.format_report(rows))
    after = count_params(model)
    print(param_table(after, reference=before))
    checkpoint.save_student(model, out, plan, hf_config=hf_config, inputs=(args.teacher,), teacher=source_name(args.teacher),
                            spec=spec, seed=args.seed, **({"calibration": calibration} if calibration else {}))
    print(f"wrote {out} ({after['hf']:,} parameters, HF convention; "
          f"{after['nanogpt']:,} without wpe, the nanoGPT convention)")
    return 0


def calibrate_on_data(model, names, args):
    """The second moments of the inputs of these matrices, on --calib_tokens tokens of --dataset's train
    split; and the record the checkpoint keeps of it."""
    import compress
    from data import DataError, check_data, load_tokens
    try:
        data = load_tokens(args.dataset, "train"), load_tokens(args.dataset, "val")
        check_data(args.dataset, data, model.config.vocab_size, args.teacher, print)
    except DataError as e:
        raise ValueError(f"--dataset: {e}")
    covs = compress.calibrate(model, data[0], names, n_tokens=args.calib_tokens, seed=args.seed)
    print(f"calibrated {len(names)} matrices on {args.calib_tokens:,} tokens of {args.dataset}/train.bin")
    return covs, dict(dataset=args.dataset, split="train", tokens=args.calib_tokens, seed=args.seed)


if __name__ == "__main__":
    sys.exit(main())
