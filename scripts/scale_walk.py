"""
A model family's real shapes through every command line on this machine, with each stage's wall
time and peak memory: a random-weight model with the published model's configuration (no hub, no
weights to download; the time and memory of every stage depend on the shapes, not on the values) is
decomposed by a preset, by the budget solver and by a whitened preset, distilled for two steps at its
context, exported dense and compact (each export checks its logits against the student's) and scored.

  python scripts/scale_walk.py smollm2-135m              # SmolLM2-135M's shapes (docs/SCALE.md)
  python scripts/scale_walk.py smollm2-135m --block_size 1024 --skip target   # a shorter walk

Writes OUT (default out/scale/<model>): teacher/ (the random model), data/ (random token ids), one
folder and one .log per stage, and walk.json: per stage its command line, wall time and the peak
resident memory of its process (os.wait4's ru_maxrss). A failing stage stops the walk with its exit
status and log named. Random ids stand in for text; the exports carry the reference Llama teacher's
8,192-token tokenizer (its ids fit any vocabulary at least that large), so that the exported folder
is complete and the evaluation has text to score.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from atomic import write_text  # noqa: E402
from configurator import ROOT, SHARED, CommandFailed  # noqa: E402

# Published configurations (config.json of each hub model), the fields that set the shapes.
MODELS = {
    "smollm2-135m": dict(cls="LlamaConfig", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                         bos_token_id=0, eos_token_id=0),
}
PRESET = {"smollm2-135m": "llama-mlp-b4"}
STAGES = ("preset", "target", "whiten", "train", "dense", "compact", "evaluate")


def build(name, out, n_train=65536, n_val=32768):
    """The random-weight teacher and random token files, once."""
    import torch
    import transformers
    spec = dict(MODELS[name])
    config = getattr(transformers, spec.pop("cls"))(**spec)
    if not os.path.exists(os.path.join(out, "teacher", "config.json")):
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(os.path.join(out, "teacher"))
    data = os.path.join(out, "data")
    os.makedirs(data, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        rng.integers(0, config.vocab_size, n).astype(np.uint16).tofile(os.path.join(data, f"{split}.bin"))
    return config


def stage(script, args, log_path):
    """Run one command line; (wall seconds, peak resident GB of its process)."""
    t = time.time()
    with open(log_path, "w") as log:
        p = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *map(str, args)], stdout=log,
                             stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise CommandFailed(f"{script} exited with status {p.returncode}; its output is in {log_path}")
    return time.time() - t, usage.ru_maxrss / 2 ** 20


def commands(name, out, config, args):
    """(stage, script, arguments) of the walk, in order."""
    import torch
    import transformers
    with torch.device("meta"):
        total = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(config).parameters())
    teacher, data, train = f"{out}/teacher", f"{out}/data", f"{out}/train"
    tok = os.path.abspath(os.path.join(SHARED, "teacher", "owt-6x256-llama-bpe8k"))
    block = args.block_size or config.max_position_embeddings
    student = f"{out}/target" if "target" not in args.skip else f"{out}/preset"
    return [
        ("preset", "kron_decompose.py", ["--teacher", teacher, "--preset", PRESET[name], "--out", f"{out}/preset"]),
        ("target", "kron_decompose.py", ["--teacher", teacher, "--target_params", round(args.ratio * total),
                                         "--out", f"{out}/target"]),
        ("whiten", "kron_decompose.py", ["--teacher", teacher, "--preset", PRESET[name], "--init", "whiten",
                                         "--dataset", data, "--calib_tokens", args.calib_tokens,
                                         "--out", f"{out}/whiten"]),
        ("train", "train.py", [f"--init_from={student}", f"--teacher={teacher}", f"--dataset={data}",
                               f"--out_dir={train}", f"--block_size={block}", "--batch_size=1",
                               "--gradient_accumulation_steps=1", "--max_iters=2", "--lr_decay_iters=2",
                               "--warmup_iters=0", "--eval_interval=2", "--eval_iters=1", "--log_interval=1",
                               "--kd_weight=1", "--ce_weight=1", "--device=cpu", "--progress=False"]),
        ("dense", "krony_to_gpt.py", [f"{train}/ckpt", f"{out}/hf", "--tokenizer", tok]),
        ("compact", "krony_to_gpt.py", [f"{train}/ckpt", f"{out}/hf_compact", "--tokenizer", tok, "--compact"]),
        ("evaluate", "perplexity_eval.py", [f"{out}/hf_compact", "owt", "--owt_bin", f"{data}/val.bin",
                                            "--max_tokens", 2 * block, "--block_size", block, "--batch_size", 1,
                                            "--json", f"{out}/eval.json"]),
    ]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=sorted(MODELS))
    p.add_argument("--out", help="default out/scale/<model>")
    p.add_argument("--block_size", type=int, default=0, help="training and scoring context (default: the model's)")
    p.add_argument("--ratio", type=float, default=0.658, help="the budget stage's target, a share of the teacher")
    p.add_argument("--calib_tokens", type=int, default=8192)
    p.add_argument("--skip", nargs="*", default=[], choices=STAGES, help="stages left out")
    args = p.parse_args()
    out = os.path.abspath(args.out or os.path.join(ROOT, "out", "scale", args.model))
    for d in ("train", "hf", "hf_compact", "preset", "target", "whiten"):     # a walk starts afresh
        shutil.rmtree(os.path.join(out, d), ignore_errors=True)
    config = build(args.model, out)
    walk = {}
    for name, script, cmd in commands(args.model, out, config, args):
        if name in args.skip:
            continue
        wall, peak = stage(script, cmd, os.path.join(out, f"{name}.log"))
        walk[name] = dict(command=" ".join(map(str, ["python", script, *cmd])), wall_s=round(wall, 1),
                          peak_rss_gb=round(peak, 2))
        print(f"{name:<10}{wall:>9.1f} s{peak:>8.2f} GB  python {script} {' '.join(map(str, cmd))}", flush=True)
        write_text(os.path.join(out, "walk.json"), json.dumps(dict(model=args.model, stages=walk), indent=1))


if __name__ == "__main__":
    try:
        main()
    except CommandFailed as e:
        sys.exit(f"scale_walk.py: {e}")
