"""
The main job, one command: decompose a teacher with the project's recipe, distil, export to Hugging
Face format, evaluate teacher and student the same way, print one table and write the plots.

  make demo                                   (= python demo.py)
  python demo.py --quick                      a few steps and a few thousand tokens scored (the CI check)
  python demo.py --teacher gpt2 --device cuda  GPT-2 124M on a GPU (hub access)

Teacher: `gpt2` from the hub by default. Where the hub cannot be reached and ../shared holds the
reference teacher and data (the case offline and in CI), the reference teacher shaped like GPT-2
(../shared/teacher/owt-6x256-bpe8k: 6 blocks, 256 wide, its own 8,192-token BPE) and the local
OpenWebText sample and evaluation sets are used instead; the first line printed says which. Every
text is tokenized with the teacher's own tokenizer. The README gives the time it takes.

The recipe (scripts/compare.py's row 7, docs/RESULTS.md): compress.solve_budget picks, for every
matrix kind, which matrices to factor and each one's shape and number of terms so that the student
has --ratio of the teacher's parameters (default 65.8%, DistilGPT2's ratio to GPT-2) with the least
Van Loan tail energy; Van Loan init; distillation (KL to the teacher's next-token distribution).

The stages are the scripts' own command lines, run in this order (the README shows them):
  data/owt/prepare.py -> kron_decompose.py --target_params -> train.py --init_from=<decomposed>
  -> krony_to_gpt.py -> perplexity_eval.py
The table scores the teacher, the student right after decomposition (no training) and the student
after distillation, the same way; loss.png shows the student's held-out loss from its first step
with the teacher's on the same batches as a line. Outputs (the folder is printed at the end): init/
(the decomposed student), train/ (checkpoint, metrics.jsonl), hf/ (dense GPT2LMHeadModel),
hf_compact/ (factors kept), results.json, loss.png, reconstruction.png.
"""

import argparse
import json
import os
import sys
import time

import atomic
import checkpoint
import compress
import plots
import scoring
import tokenizer
from configurator import (OWT_SAMPLE, REFERENCE_TEACHER, ROOT, SHARED, CommandFailed, device_type, positive_int,
                          read_config_file, run_command)
from data import check_data, load_tokens
from model import GPT, KronLinear, count_params


def hub_reachable(timeout=3.0):
    """Whether huggingface.co answers at all (a failed from_pretrained spends ~30 s in retries)."""
    import socket
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_cached(name):
    from huggingface_hub import try_to_load_from_cache
    return isinstance(try_to_load_from_cache(name, "config.json"), str)


def pick_teacher(name, log=print):
    """(model, hf_config, where it came from, reference?): the named teacher, or, when that cannot
    be loaded and it is the hub default, the reference teacher in ../shared."""
    try:
        if name == "gpt2" and not hub_reachable() and not hub_cached(name):
            raise ConnectionError("huggingface.co cannot be reached and gpt2 is not in the local cache")
        model, hf_config = GPT.from_pretrained(name)
        return model, hf_config, name, is_reference(name)
    except Exception as e:
        if name != "gpt2":
            raise SystemExit(f"demo.py: error: cannot load the teacher {name!r}: {e}")
        if not (os.path.isdir(REFERENCE_TEACHER) and os.path.exists(OWT_SAMPLE)):
            raise SystemExit(f"demo.py: error: gpt2 could not be loaded from the hub ({e}) and the "
                             f"reference teacher and data are not at {SHARED} (set KRONY_SHARED to that folder)")
        log(f"teacher: gpt2 could not be loaded ({e}); using the reference teacher "
            f"{os.path.normpath(REFERENCE_TEACHER)} and the local data in "
            f"{os.path.normpath(os.path.join(SHARED, 'data'))}")
        model, hf_config = GPT.from_pretrained(REFERENCE_TEACHER)
        return model, hf_config, REFERENCE_TEACHER, True


def is_reference(name):
    """Whether the teacher is one of the reference teachers in ../shared/teacher (trained on the OWT
    sample, whose last 71 documents they never saw): GPT-2-shaped, Llama-shaped or the mini one."""
    where = os.path.realpath(os.path.join(SHARED, "teacher"))
    return os.path.isdir(name) and os.path.dirname(os.path.realpath(name)) == where


def default_dataset(reference, teacher_name):
    """data/owt_bpe8k for the GPT-2-shaped reference teacher (its 8,192-token BPE), data/owt_<name>
    for another reference teacher, data/owt (GPT-2's tokenizer) otherwise."""
    if not reference:
        return os.path.join(ROOT, "data", "owt")
    name = os.path.basename(os.path.normpath(teacher_name))
    return os.path.join(ROOT, "data", "owt_bpe8k" if name == "owt-6x256-bpe8k" else f"owt_{name}")


def prepare_data(reference, dataset, tok, vocab_size):
    """The training tokens in the teacher's tokenizer: the reference teacher's own split of the OWT
    sample (its 71 held-out documents are the validation set), or KnGPT2's 10% of OpenWebText for
    GPT-2 (config/train_gpt2.py trains on it once). Prepared when missing; refused when another
    tokenizer made it."""
    if all(os.path.exists(os.path.join(dataset, f)) for f in ("train.bin", "val.bin")):
        try:           # the check train.py makes, before the decomposition rather than after it
            check_data(dataset, [load_tokens(dataset, s) for s in ("train", "val")], vocab_size,
                             tok.name, print)
        except ValueError as e:
            raise SystemExit(f"demo.py: error: {e} (or pass --dataset to another folder)")
        return
    split = ["--input", OWT_SAMPLE, "--val_last", "71"] if reference else ["--fraction", "0.1"]
    run_command("data/owt/prepare.py", [*split, "--out", dataset, "--tokenizer", tok.name])


def reconstruction_errors(teacher, student):
    """{matrix: ||W_teacher - W_student|| / ||W_teacher||} for every factored matrix of the student
    (Frobenius; the student's W is sum_k A_k (x) B_k with its permutations applied)."""
    out = {}
    for name in student.matrix_names():
        layer = student.get_matrix(name)
        if isinstance(layer, KronLinear):
            W = teacher.get_matrix(name).weight.detach().float()
            out[name] = ((layer.dense_weight().detach().float() - W).norm() / W.norm()).item()
    return out


def score(model, args, dataset, tok):
    """kp perplexities (WikiText-103, WikiText-2, LAMBADA plain text) and the harness's LAMBADA
    accuracy, each stream cut to --max_tokens when given; OWT validation perplexity and bits per
    byte on all of the held-out documents (cut only by --quick). Every text in the teacher's tokenizer."""
    r = scoring.score_suite(
        model, tok, [("wiki103", "kp"), ("wiki2", "kp"), ("lambada", "kp"), ("lambada", "harness"), ("owt", "kp")],
        args.data_dir, os.path.join(dataset, "val.bin"), args.device, args.max_tokens,
        owt_tokens=args.max_tokens if args.quick else None)
    return dict(wiki103=r["wiki103 kp"]["ppl"], wiki2=r["wiki2 kp"]["ppl"], lambada=r["lambada kp"]["ppl"],
                owt=r["owt kp"]["ppl_token_weighted"], owt_bpb=r["owt kp"]["bits_per_byte"],
                lambada_acc=r["lambada harness"]["acc"], lambada_passages=r["lambada harness"]["passages"])


def format_table(rows, eval_tokens, tok_name):
    w = max(34, 2 + max(len(name) for name, _ in rows))
    head = f"{'model':<{w}}{'params (hf)':>14}{'WikiText-103':>14}{'WikiText-2':>12}{'LAMBADA':>10}" \
           f"{'OWT val':>10}{'OWT bpb':>9}{'LAMBADA acc':>13}"
    lines = [head, "-" * len(head)]
    for name, r in rows:
        lines.append(f"{name:<{w}}{r['params']:>14,}{r['wiki103']:>14.2f}{r['wiki2']:>12.2f}{r['lambada']:>10.2f}"
                     f"{r['owt']:>10.2f}{r['owt_bpb']:>9.4f}{r['lambada_acc']:>13.2%}")
    lines.append(f"perplexities per token of the teacher's tokenizer ({tok_name}): kp protocol (Krony-PT's script: "
                 "non-overlapping windows of the model's context, exp of the mean window loss), OWT token-weighted "
                 "on the held-out documents; OWT bpb: the same windows' loss in bits per UTF-8 byte (comparable "
                 "across tokenizers); LAMBADA acc: lm-evaluation-harness lambada_openai" +
                 (f"; WikiText and LAMBADA cut to their first {eval_tokens:,} tokens" if eval_tokens else "") +
                 ". params: every tensor once, the tied head once (count_params hf).")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="gpt2", help="hub name or local Hugging Face folder of a GPT-2 or a Llama, "
                                                     "Qwen2 or Mistral model (default gpt2)")
    p.add_argument("--ratio", type=float, default=compress.DISTIL_RATIO, help="student parameters / teacher parameters")
    p.add_argument("--max_iters", type=positive_int, help="training steps (default: the config's: 200 for the reference "
                                                 "teacher, 1,800 for gpt2)")
    p.add_argument("--max_tokens", type=positive_int,
                   help="score only the first N tokens of each evaluation stream (default: 65,536 with the "
                        "reference teacher, everything with gpt2)")
    p.add_argument("--quick", action="store_true", help="2 steps, 4,096 tokens scored: checks the pipeline only")
    p.add_argument("--out", default="out/demo", help="output folder")
    p.add_argument("--dataset", help="train.bin / val.bin folder (default data/owt_bpe8k, the GPT-2-shaped reference "
                                     "teacher's split in its tokenizer, or data/owt for gpt2; prepared when missing)")
    p.add_argument("--data_dir", help="local evaluation data (default: ../shared/data with the reference teacher)")
    p.add_argument("--device", type=device_type, default="auto", help="auto, cpu, cuda, cuda:N")
    args = p.parse_args(argv)
    if not 0 < args.ratio < 1:
        p.error(f"--ratio must be between 0 and 1, got {args.ratio}")
    try:
        return run_demo(args)
    except CommandFailed as e:         # the stage printed its own error line above
        print(f"demo.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:          # an interrupted stage ends the job: nothing after it runs
        print("demo.py: interrupted; the stages after the interrupted one did not run and no results were "
              "written", file=sys.stderr)
        return 130


def train_args(args, reference, teacher_name, dataset, init_dir, out):
    """train.py's command line for the training stage: the reference teacher's config
    (config/train_bpe8k.py) or GPT-2's, pointed at this job's teacher, data and folders."""
    base = os.path.join(ROOT, "config", "train_bpe8k.py" if reference else "train_gpt2.py")
    over = dict(teacher=teacher_name, dataset=dataset, init_from=init_dir, out_dir=os.path.join(out, "train"),
                device=args.device, progress=False, preset=None, overwrite=True)
    if args.max_iters:
        warmup = read_config_file(base).get("warmup_iters", 0)
        over.update(max_iters=args.max_iters, lr_decay_iters=args.max_iters,
                    warmup_iters=min(warmup, args.max_iters // 2), eval_interval=max(1, args.max_iters // 4))
    return [base] + [f"--{k}={v}" for k, v in over.items()]


def run_demo(args):
    t_start = time.time()
    teacher, hf_config, teacher_name, reference = pick_teacher(args.teacher)
    if reference and args.data_dir is None and os.path.isdir(os.path.join(SHARED, "data")):
        args.data_dir = os.path.join(SHARED, "data")
    if args.quick:
        args.max_iters, args.max_tokens = args.max_iters or 2, args.max_tokens or 4096
    elif reference and args.max_tokens is None:
        args.max_tokens = 65536
    dataset = args.dataset or default_dataset(reference, teacher_name)
    out = args.out
    os.makedirs(out, exist_ok=True)
    target = round(args.ratio * count_params(teacher)["hf"])
    try:
        tok = tokenizer.for_model(teacher_name, teacher.config.vocab_size)
    except ValueError as e:
        raise SystemExit(f"demo.py: error: {e}")

    print(f"[1/5] data: {dataset} (tokenizer: {tok.name})", flush=True)
    prepare_data(reference, dataset, tok, teacher.config.vocab_size)

    print(f"[2/5] decompose: {teacher_name} -> {target:,} parameters ({args.ratio:.1%}), budget solver, Van Loan init",
          flush=True)
    init_dir = os.path.join(out, "init")
    run_command("kron_decompose.py", ["--teacher", teacher_name, "--target_params", target, "--max_r", 128,
                                      "--out", init_dir, "--device", args.device])
    student0, _ = checkpoint.load_student(init_dir)
    before = reconstruction_errors(teacher, student0)

    print("[3/5] train: distillation from the teacher", flush=True)
    run_command("train.py", train_args(args, reference, teacher_name, dataset, init_dir, out))
    ckpt = os.path.join(out, "train", "ckpt")
    student, meta = checkpoint.load_student(ckpt)
    after = reconstruction_errors(teacher, student)
    shape = compress.structure(student.config, meta["factors"])     # the table names what the plan chose
    with open(os.path.join(ckpt, checkpoint.TRAIN_STATE)) as f:
        iters = json.load(f)["iter_num"]

    print("[4/5] convert: Hugging Face folders of the teacher's class, dense and compact", flush=True)
    run_command("krony_to_gpt.py", [ckpt, os.path.join(out, "hf"), "--device", args.device])
    run_command("krony_to_gpt.py", [ckpt, os.path.join(out, "hf_compact"), "--compact", "--device", args.device])

    print("[5/5] evaluate: teacher, student before training and student after (from the exported folder), "
          "the same streams", flush=True)
    exported, _ = scoring.load_model(os.path.join(out, "hf"), device=args.device)
    rows = [(f"teacher ({os.path.basename(os.path.normpath(teacher_name))})", teacher.to(args.device).eval()),
            ("student (decomposed, no training)", student0.to(args.device).eval()),
            (f"student ({shape}, distilled)", exported)]
    params = [count_params(teacher)["hf"], count_params(student0)["hf"], count_params(student)["hf"]]
    rows = [(name, dict(params=n, **score(m, args, dataset, tok))) for (name, m), n in zip(rows, params)]
    table = format_table(rows, args.max_tokens, os.path.basename(os.path.normpath(tok.name)))

    plots.plot_runs([os.path.join(out, "train")], os.path.join(out, "loss.png"))
    plots.plot_reconstruction(before, after, os.path.join(out, "reconstruction.png"))
    atomic.write_json(os.path.join(out, "results.json"), dict(
        teacher=teacher_name, reference_teacher=reference, tokenizer=tok.info(), target_params=target, iters=iters,
        eval_tokens=args.max_tokens, rows={n: r for n, r in rows}, reconstruction_before=before,
        reconstruction_after=after, minutes=round((time.time() - t_start) / 60, 2)))
    print()
    print(table)
    print(f"\n{len(before)} factored matrices; mean reconstruction error {sum(before.values()) / len(before):.3f} "
          f"after decomposition, {sum(after.values()) / len(after):.3f} after training")
    print(f"outputs in {os.path.abspath(out)}: results.json, loss.png, reconstruction.png, hf/, hf_compact/, "
          f"train/ckpt, init/  ({(time.time() - t_start) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
