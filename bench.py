"""
What the benchmark scripts share: the students they measure (built once from a teacher, a random
GPT-2 small unless given), peak-memory counting on a CPU or a GPU, one process per measured case, and
the report. scripts/bench_train.py, bench_infer.py and gpu_check.py use it.
"""

import json
import os
import subprocess

import numpy as np
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
STUDENTS = ("krony-81m", "budget")
DISTILGPT2 = 81_912_576
GPT2_SMALL = 124_439_808



def build(workdir, teacher, target=DISTILGPT2, device="cpu", log=print):
    """Teacher folder (random GPT-2 small unless given), random token files in its vocabulary, and
    the two students' checkpoints (the budget one at `target` parameters, or with target None at
    DistilGPT2's 65.8% of the teacher's; solved on `device`), made once in workdir. Returns the
    teacher's path."""
    import checkpoint
    import compress
    from model import GPT, GPTConfig, count_params
    os.makedirs(workdir, exist_ok=True)
    if teacher is None:
        teacher = os.path.join(workdir, "teacher")
        if not os.path.exists(os.path.join(teacher, "model.safetensors")):
            from transformers import GPT2Config, GPT2LMHeadModel
            torch.manual_seed(0)
            GPT2LMHeadModel(GPT2Config()).save_pretrained(teacher)
    data = os.path.join(workdir, "data")
    if not os.path.exists(os.path.join(data, "val.bin")):
        from transformers import AutoConfig
        vocab = GPTConfig.from_hf(AutoConfig.from_pretrained(teacher, trust_remote_code=False)).vocab_size
        os.makedirs(data, exist_ok=True)
        rng = np.random.default_rng(0)
        for split, n in (("train", 1 << 20), ("val", 1 << 16)):
            rng.integers(0, vocab, n).astype(np.uint16).tofile(os.path.join(data, f"{split}.bin"))
    for case in STUDENTS:
        out = os.path.join(workdir, case)
        if os.path.exists(os.path.join(out, "model.safetensors")):
            continue
        model, hf_config = GPT.from_pretrained(teacher)
        model.to(device)
        if case == "krony-81m":          # on a Llama-family teacher its shapes on SwiGLU: llama-mlp-b4
            preset = "llama-mlp-b4" if compress.model_family(model.config) == "llama" else "krony-81m"
            plan = compress.resolve_spec(compress.load_spec(preset), model.config)
        else:
            plan = compress.solve_budget(model, target or round(DISTILGPT2 / GPT2_SMALL * count_params(model)["hf"]),
                                         log=log)
        compress.decompose(model, plan, compare=())
        checkpoint.save_student(model, out, plan, hf_config=hf_config, teacher=teacher)
        log(f"built {out}")
    return teacher


def reset_peak(device):
    """Start the peak-memory count. On a CPU: hand the memory that loading and the warm-up freed back to
    the kernel (malloc_trim; machine.keep_freed_memory would hold it otherwise), then reset the
    resident-set high-water mark."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        return
    import ctypes
    import gc
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_bytes(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))


def run_case(case, cmd):
    """Run one case's measuring process; its row, the JSON on the last line of its output."""
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"case {case} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(text, rows, args):
    """Print the table; write the rows (and the arguments) as JSON to args.json when given."""
    print(text)
    if args.json:
        import atomic
        atomic.write_json(args.json, dict(args=vars(args), rows=rows))
