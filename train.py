"""
Train a Kronecker-compressed student with knowledge distillation from its teacher.

  python train.py config/train_mini.py                       two CPU cores, minutes
  python train.py config/train_gpt2.py --batch_size=8        one GPU
  torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
  python train.py config/train_gpt2.py --init_from=resume    continue exactly where a run stopped

Configuration: config files of `key = value` literals, then --key=value overrides, all validated
against TrainConfig below (python train.py -h lists every key). Outputs in out_dir: ckpt/ (the
student checkpoint, readable by krony_to_gpt.py and perplexity_eval.py, plus optimizer and training
state) and metrics.jsonl.

Objective, each term weighted by config:
  kd_weight     KL(teacher || student) of the next-token distributions at temperature T, times T^2
                (Hinton et al.), computed in chunks of kd_chunk positions
  ce_weight     cross-entropy on the data
  hidden_weight mean over layers of the MSE between student and teacher residual streams (KnGPT2)
  attn_weight   mean over layers of KL(teacher || student) of the attention maps (KnGPT2)
Multi-step compression (TQCompressor): `stages`, a list of {"iters": N, "preset" or "spec" or
"rules": ..., "init": ...}; stage 0 initializes the student, each later stage factors more (or
re-factors smaller) and distillation continues.
"""

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

import checkpoint
import compress
import model as model_lib
from configurator import ConfigError, parse_config
from model import GPT, check_compatible, count_params


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = field(default="checks", metadata={"help": "run directory: ckpt/ and metrics.jsonl"})
    init_from: str = field(default="decompose", metadata={
        "help": "decompose (teacher + preset/spec/stages), resume (out_dir/ckpt), or a student checkpoint path"})
    teacher: str = field(default="gpt2", metadata={"help": "hub name or local GPT-2 directory"})
    preset: str | None = "krony-81m"
    spec: str | None = None
    init: str | None = field(default=None, metadata={"help": "override the spec's init: vl, prune, perm, random"})
    stages: list = field(default_factory=list, metadata={"help": "multi-step schedule (see the docstring)"})
    # data
    dataset: str = field(default="data/owt", metadata={"help": "directory with train.bin and val.bin"})
    batch_size: int = 12
    block_size: int = 1024
    gradient_accumulation_steps: int = 40
    # optimizer and schedule (AdamW, linear warmup then cosine decay, nanoGPT's)
    max_iters: int = 5000
    learning_rate: float = 6e-5
    min_lr: float = 6e-6
    warmup_iters: int = 100
    lr_decay_iters: int = 5000
    decay_lr: bool = True
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # distillation
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    hidden_weight: float = 0.0
    attn_weight: float = 0.0
    temperature: float = 1.0
    kd_chunk: int = 1024
    # evaluation and logging
    eval_interval: int = 250
    eval_iters: int = 50
    eval_only: bool = False
    log_interval: int = 10
    always_save_checkpoint: bool = True
    wandb_log: bool = False
    wandb_project: str = "krony"
    wandb_run_name: str = "run"
    wandb_mode: str = field(default="online", metadata={"help": "online, offline or disabled"})
    # system
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N"})
    dtype: str = field(default="auto", metadata={"help": "auto (bfloat16 on a GPU that has it), float32, bfloat16, float16"})
    compile: bool = False
    seed: int = 1337
    progress: bool = True


class TrainingError(RuntimeError):
    pass


def validate(cfg):
    for k in ("batch_size", "block_size", "gradient_accumulation_steps", "max_iters", "eval_interval",
              "eval_iters", "log_interval", "kd_chunk"):
        if getattr(cfg, k) < 1:
            raise ConfigError(f"{k} must be at least 1, got {getattr(cfg, k)}")
    for k in ("kd_weight", "ce_weight", "hidden_weight", "attn_weight", "weight_decay", "learning_rate", "min_lr"):
        if getattr(cfg, k) < 0:
            raise ConfigError(f"{k} must be non-negative, got {getattr(cfg, k)}")
    if cfg.temperature <= 0:
        raise ConfigError(f"temperature must be positive, got {cfg.temperature}")
    if cfg.kd_weight + cfg.ce_weight + cfg.hidden_weight + cfg.attn_weight == 0:
        raise ConfigError("every loss weight is 0: nothing to train on")
    if cfg.wandb_mode not in ("online", "offline", "disabled"):
        raise ConfigError(f"wandb_mode must be online, offline or disabled, got {cfg.wandb_mode!r}")
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {cfg.dtype!r}")
    if cfg.stages:
        for i, st in enumerate(cfg.stages):
            if not isinstance(st, dict) or not isinstance(st.get("iters"), int) or st["iters"] < 1:
                raise ConfigError(f"stages[{i}] must be a dict with a positive int \"iters\", got {st!r}")
            unknown = set(st) - {"iters", "preset", "spec", "rules", "init"}
            if unknown:
                raise ConfigError(f"stages[{i}]: unknown keys {sorted(unknown)}; allowed: iters, preset, spec, rules, init")
            if sum(k in st for k in ("preset", "spec", "rules")) != 1:
                raise ConfigError(f"stages[{i}] needs exactly one of preset, spec, rules")
        total = sum(st["iters"] for st in cfg.stages)
        if total != cfg.max_iters:
            raise ConfigError(f"the stages' iters add up to {total} but max_iters is {cfg.max_iters}; make them equal")
    return cfg


# -----------------------------------------------------------------------------
# data: nanoGPT's uint16 memmaps, batches drawn from a generator seeded by (seed, iteration, micro
# step), so that the data position is the iteration number and resume replays nothing and skips nothing


def load_tokens(dataset, split):
    path = os.path.join(dataset, f"{split}.bin")
    if not os.path.exists(path):
        raise TrainingError(f"{path} not found; create it with `python data/owt/prepare.py --out_dir {dataset}` "
                            f"(offline: add --input ../shared/data/openwebtext/owt10k_sample_docs.jsonl.xz)")
    return np.memmap(path, dtype=np.uint16, mode="r")


def get_batch(data, block_size, batch_size, seed, it, micro, device):
    if len(data) <= block_size + 1:
        raise TrainingError(f"a token file of {len(data)} tokens is too short for block_size {block_size}")
    g = torch.Generator().manual_seed(hash((seed, it, micro)) & 0x7FFFFFFFFFFFFFFF)
    ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=g).tolist()
    x = torch.from_numpy(np.stack([data[i:i + block_size] for i in ix]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size] for i in ix]).astype(np.int64))
    if device.startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# -----------------------------------------------------------------------------
# loss


def kd_kl(student_logits, teacher_logits, T, chunk):
    """T^2 * mean over positions of KL(softmax(t/T) || softmax(s/T)), in chunks of positions so that
    two more vocab-sized float32 tensors are never alive for the whole batch."""
    s = student_logits.reshape(-1, student_logits.size(-1))
    t = teacher_logits.reshape(-1, teacher_logits.size(-1))
    total = s.new_zeros((), dtype=torch.float32)
    for i in range(0, s.size(0), chunk):
        ls = F.log_softmax(s[i:i + chunk].float() / T, dim=-1)
        lt = F.log_softmax(t[i:i + chunk].float() / T, dim=-1)
        total = total + F.kl_div(ls, lt, log_target=True, reduction="sum")
    return total / s.size(0) * T * T


def attn_kl(s_att, t_att):
    """KL(teacher || student) of attention rows, averaged over rows; masked entries (0) add 0."""
    t = t_att.float()
    return (t * (torch.log(t.clamp_min(1e-12)) - torch.log(s_att.float().clamp_min(1e-12)))).sum(-1).mean()


def distill_loss(cfg, s_logits, s_extra, t_logits, t_extra, targets):
    parts = {}
    if cfg.ce_weight:
        parts["ce"] = F.cross_entropy(s_logits.view(-1, s_logits.size(-1)).float(), targets.view(-1))
    if cfg.kd_weight:
        parts["kd"] = kd_kl(s_logits, t_logits, cfg.temperature, cfg.kd_chunk)
    if (cfg.hidden_weight or cfg.attn_weight) and len(s_extra["hidden"]) != len(t_extra["hidden"]):
        raise TrainingError(f"hidden-state and attention distillation pair layers one to one: the student has "
                            f"{len(s_extra['hidden']) - 1} blocks, the teacher {len(t_extra['hidden']) - 1}")
    if cfg.hidden_weight:
        parts["hidden"] = torch.stack([F.mse_loss(a.float(), b.float()) for a, b in
                                       zip(s_extra["hidden"], t_extra["hidden"])]).mean()
    if cfg.attn_weight:
        parts["attn"] = torch.stack([attn_kl(a, b) for a, b in zip(s_extra["attn"], t_extra["attn"])]).mean()
    w = dict(ce=cfg.ce_weight, kd=cfg.kd_weight, hidden=cfg.hidden_weight, attn=cfg.attn_weight)
    return sum(w[k] * v for k, v in parts.items()), parts


def lr_at(it, cfg):
    """nanoGPT's schedule: linear warmup, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def make_optimizer(model, cfg, device):
    """AdamW; weight decay on matrices and Kronecker factors (dim >= 2), none on biases, norms and
    per-term scales."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=cfg.weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    fused = device.startswith("cuda")
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused)


# -----------------------------------------------------------------------------
# checkpoints: the student checkpoint format plus optimizer.safetensors and train_state.json, the
# whole directory written atomically (checkpoint.atomic_dir)


def _impl_cache_to_json():
    return [[*[str(x) for x in k], v] for k, v in model_lib._IMPL_CACHE.items()]


def _impl_cache_from_json(rows):
    for row in rows:
        *k, v = row
        m1, n1, m2, n2, r, dev, dtype, n, train = k
        key = (int(m1), int(n1), int(m2), int(n2), int(r), dev, getattr(torch, dtype.split(".")[-1]),
               int(n), train == "True")
        model_lib._IMPL_CACHE[key] = v


def save_checkpoint(path, student, plan, hf_config, optimizer, state, cfg):
    from safetensors.torch import save_file
    sd = optimizer.state_dict()
    tensors = {f"state.{i}.{k}": v.detach().contiguous().cpu() for i, st in sd["state"].items()
               for k, v in st.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    config = checkpoint.student_config(student, plan, hf_config, teacher=cfg.teacher)
    with checkpoint.atomic_dir(path) as tmp:
        checkpoint.write_student(student, tmp, config)
        save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
        checkpoint.write_json(os.path.join(tmp, "train_state.json"), dict(
            state, param_groups=[{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]],
            config=asdict(cfg), impl_cache=_impl_cache_to_json()))


def load_optimizer_state(path, optimizer):
    from safetensors.torch import load_file
    tensors = load_file(os.path.join(path, "optimizer.safetensors"))
    with open(os.path.join(path, "train_state.json")) as f:
        state = json.load(f)
    per = {}
    for k, v in tensors.items():
        if k.startswith("state."):
            _, i, name = k.split(".", 2)
            per.setdefault(int(i), {})[name] = v
    sd = optimizer.state_dict()
    groups = [dict(g, params=sg["params"]) for g, sg in zip(state["param_groups"], sd["param_groups"])]
    optimizer.load_state_dict({"state": per, "param_groups": groups})
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    _impl_cache_from_json(state.get("impl_cache", []))
    return state


# -----------------------------------------------------------------------------
# the student and its stages


def stage_spec(stage):
    if "preset" in stage or "spec" in stage:
        return compress.load_spec(stage.get("preset") or stage.get("spec"))
    return {"rules": stage["rules"]}


def stages_of(cfg):
    if cfg.stages:
        return cfg.stages
    if not (cfg.preset or cfg.spec):
        raise ConfigError("init_from=decompose needs a preset, a spec or stages")
    return [dict(iters=cfg.max_iters, **({"preset": cfg.preset} if cfg.preset else {"spec": cfg.spec}),
                 **({"init": cfg.init} if cfg.init else {}))]


def apply_stage(student, plan, stage, progress):
    """Factor what the stage's spec names: new matrices from their dense weights; a factored one
    with another shape or r is first multiplied out (GPT.densify), then factored again."""
    new = compress.resolve_spec(stage_spec(stage), student.config, init=stage.get("init"))
    todo = {}
    for name, e in new.items():
        old = plan.get(name)
        if old and (old["m1"], old["n1"], old["r"]) == (e["m1"], e["n1"], e["r"]):
            continue
        if old:
            student.densify(name)
        todo[name] = e
    rows = compress.decompose(student, todo, compare=(), progress=progress)
    plan = dict(plan)
    plan.update(todo)
    return compress.in_model_order(plan, student.config), rows


def stage_at(stages, it):
    """Index of the stage that iteration `it` belongs to."""
    end = 0
    for i, st in enumerate(stages):
        end += st["iters"]
        if it < end:
            return i
    return len(stages) - 1


# -----------------------------------------------------------------------------
# training


def setup_device(cfg):
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        import torch.distributed as dist
        backend = "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"
        dist.init_process_group(backend=backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = f"cuda:{local}" if backend == "nccl" else "cpu"
        if backend == "nccl":
            torch.cuda.set_device(device)
    else:
        rank, world = 0, 1
        device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if cfg.dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    else:
        dtype = cfg.dtype
    return ddp, rank, world, device, dtype


def keep_freed_memory():
    """On glibc, keep freed memory in the process instead of unmapping it: every step allocates and
    frees several vocab-sized logit tensors (hundreds of MB), and returning them to the kernel makes
    the next step page-fault them in again. Measured on config/train_mini.py (2 CPU cores): 520 ->
    1,100 tokens/s, system time 24 s -> 2 s over 6 steps, identical losses."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    ok = libc.mallopt(M_MMAP_THRESHOLD, 2 ** 30) and libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1) \
        and libc.mallopt(M_TOP_PAD, 2 ** 30)
    return bool(ok)


def train(cfg, log=print):
    """Run (or resume) a training run. Returns a summary dict (final iteration, losses)."""
    validate(cfg)
    keep_freed_memory()
    ddp, rank, world, device, dtype = setup_device(cfg)
    master = rank == 0
    if cfg.gradient_accumulation_steps % world:
        raise ConfigError(f"gradient_accumulation_steps ({cfg.gradient_accumulation_steps}) must be divisible by "
                          f"the number of processes ({world}) so that the global batch stays the same")
    accum = cfg.gradient_accumulation_steps // world
    torch.manual_seed(cfg.seed)
    ptdtype = getattr(torch, dtype)
    amp = device.startswith("cuda") and dtype != "float32"
    ctx = torch.autocast(device_type="cuda", dtype=ptdtype) if amp else nullcontext()
    train_data, val_data = load_tokens(cfg.dataset, "train"), load_tokens(cfg.dataset, "val")
    ckpt_dir = os.path.join(cfg.out_dir, "ckpt")
    stages = stages_of(cfg) if cfg.init_from in ("decompose", "resume") else None

    need_teacher = cfg.init_from == "decompose" or cfg.kd_weight or cfg.hidden_weight or cfg.attn_weight
    teacher = hf_config = None
    if need_teacher:
        teacher, hf_config = GPT.from_pretrained(cfg.teacher)
        teacher.requires_grad_(False)
    state = dict(iter_num=0, best_val_loss=float("inf"), stage=0, tokens=0)
    if cfg.init_from == "resume":
        student, meta = checkpoint.load_student(ckpt_dir)
        plan = meta["factors"]
        hf_config = meta.get("hf_config") or hf_config
    elif cfg.init_from == "decompose":
        student = GPT(teacher.config)
        student.load_state_dict(teacher.state_dict())
        plan, rows = apply_stage(student, {}, stages[0], cfg.progress and master)
        if master:
            log(compress.format_report(rows))
    else:
        student, meta = checkpoint.load_student(cfg.init_from)
        plan, hf_config = meta["factors"], meta.get("hf_config") or hf_config
    if teacher is not None:
        check_compatible(student.config, teacher.config)
        teacher.to(device=device, dtype=ptdtype if device.startswith("cuda") else torch.float32).eval()
    if cfg.block_size > student.config.block_size:
        raise ConfigError(f"block_size {cfg.block_size} exceeds the model's context {student.config.block_size}")
    student.to(device)
    optimizer = make_optimizer(student, cfg, device)
    if cfg.init_from == "resume":
        state.update({k: v for k, v in load_optimizer_state(ckpt_dir, optimizer).items()
                      if k in ("iter_num", "best_val_loss", "stage", "tokens")})
    scaler = torch.amp.GradScaler("cuda", enabled=amp and dtype == "float16")
    raw = student
    if cfg.compile:
        student = torch.compile(student)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        student = DDP(student, device_ids=[int(device.split(":")[1])] if device.startswith("cuda") else None)
    want_hidden, want_attn = cfg.hidden_weight > 0, cfg.attn_weight > 0

    def forward_pair(x, y):
        with ctx:
            out = student(x, y, return_hidden=want_hidden, return_attn=want_attn) if (want_hidden or want_attn) \
                else student(x, y)
            s_logits, s_extra = out[0], (out[2] if len(out) > 2 else None)
            t_logits = t_extra = None
            if teacher is not None and (cfg.kd_weight or want_hidden or want_attn):
                with torch.no_grad():
                    t_out = teacher(x, return_hidden=want_hidden, return_attn=want_attn) if (want_hidden or want_attn) \
                        else teacher(x)
                t_logits, t_extra = t_out[0], (t_out[2] if len(t_out) > 2 else None)
            return distill_loss(cfg, s_logits, s_extra, t_logits, t_extra, y)

    @torch.no_grad()
    def estimate_loss():
        out = {}
        raw.eval()
        for split, data in (("train", train_data), ("val", val_data)):
            losses = []
            for k in range(cfg.eval_iters):     # the same batches at every evaluation (seed offset -1)
                x, y = get_batch(data, cfg.block_size, cfg.batch_size, cfg.seed, -1, k, device)
                with ctx:
                    losses.append(raw(x, y)[1].item())
            out[split] = float(np.mean(losses))
        raw.train()
        return out

    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        _truncate_metrics(metrics_path, state["iter_num"])
        counts = count_params(raw)
        log(f"student: {counts['hf']:,} parameters (HF convention), {counts['nanogpt']:,} (nanoGPT); device {device}, "
            f"dtype {dtype}, {world} process(es), {accum * world} x {cfg.batch_size} x {cfg.block_size} tokens per step")
    wandb_run = None
    if cfg.wandb_log and master and cfg.wandb_mode != "disabled":
        import wandb
        wandb_run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=asdict(cfg),
                               mode=cfg.wandb_mode, dir=cfg.out_dir)

    def emit(record):
        if not master:
            return
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if wandb_run is not None:
            wandb_run.log(record, step=record["iter"])

    def save():
        if master:
            save_checkpoint(ckpt_dir, raw, plan, hf_config, optimizer, state, cfg)

    from tqdm import tqdm
    bar = tqdm(total=cfg.max_iters, initial=state["iter_num"], disable=not (cfg.progress and master),
               desc="train", unit="it")
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    last = {}
    start_iter = state["iter_num"]
    t0 = time.time()
    interrupted = False
    try:
        while True:
            it = state["iter_num"]
            if stages and stage_at(stages, it) != state["stage"]:
                state["stage"] = stage_at(stages, it)
                plan, rows = apply_stage(raw, plan, stages[state["stage"]], cfg.progress and master)
                optimizer = make_optimizer(raw, cfg, device)        # new parameters: fresh moments
                if master:
                    log(f"stage {state['stage']} at iter {it}:\n" + compress.format_report(rows))
            resumed_here = cfg.init_from == "resume" and it == start_iter   # evaluated before that save
            if (it % cfg.eval_interval == 0 or it >= cfg.max_iters) and not resumed_here:
                ev = estimate_loss()
                last.update(ev)
                if master:
                    log(f"iter {it}: train loss {ev['train']:.4f}, val loss {ev['val']:.4f}")
                    emit(dict(iter=it, train_loss=ev["train"], val_loss=ev["val"], tokens=state["tokens"]))
                if it > 0 and (ev["val"] < state["best_val_loss"] or cfg.always_save_checkpoint) and not cfg.eval_only:
                    state["best_val_loss"] = min(state["best_val_loss"], ev["val"])
                    save()
            if it >= cfg.max_iters or cfg.eval_only:
                break
            lr = lr_at(it, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            parts_sum = {}
            for micro in range(accum):
                x, y = get_batch(train_data, cfg.block_size, cfg.batch_size, cfg.seed, it, rank * accum + micro, device)
                if ddp:
                    student.require_backward_grad_sync = micro == accum - 1
                loss, parts = forward_pair(x, y)
                loss = loss / accum
                scaler.scale(loss).backward()
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + v.item() / accum
            if ddp:                     # log the global batch's loss, not rank 0's share of it
                import torch.distributed as dist
                keys = sorted(parts_sum)
                t = torch.tensor([parts_sum[k] for k in keys], dtype=torch.float64, device=device)
                dist.all_reduce(t)
                parts_sum = {k: v / world for k, v in zip(keys, t.tolist())}
            total = sum(parts_sum[k] * getattr(cfg, f"{k}_weight") for k in parts_sum)
            if not math.isfinite(total):
                raise TrainingError(f"the loss is {total} at iteration {it} ({parts_sum}); stopped without saving, "
                                    f"the last good checkpoint in {ckpt_dir} is kept (lower learning_rate, "
                                    f"or raise grad_clip's strictness)")
            if cfg.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            state["iter_num"] = it + 1
            state["tokens"] += tokens_per_iter
            bar.update(1)
            if it % cfg.log_interval == 0 and master:
                dt = time.time() - t0
                t0 = time.time()
                tps = tokens_per_iter * (cfg.log_interval if it else 1) / max(dt, 1e-9)
                bar.set_postfix(loss=f"{total:.4f}")
                line = " ".join(f"{k} {v:.4f}" for k, v in parts_sum.items())
                ms = 1000 * dt / (cfg.log_interval if it else 1)
                bar.write(f"iter {it}: loss {total:.4f} ({line}), lr {lr:.2e}, {tps:,.0f} tok/s, {ms:.0f} ms/iter")
                emit(dict(iter=it, loss=total, lr=lr, tokens_per_s=tps, ms_per_iter=ms,
                          **{f"loss_{k}": v for k, v in parts_sum.items()}))
            last["loss"] = total
    except KeyboardInterrupt:
        interrupted = True
        if master:
            bar.write(f"interrupted at iteration {state['iter_num']}: saving {ckpt_dir}")
        save()
    finally:
        bar.close()
        if wandb_run is not None:
            wandb_run.finish()
        if ddp:
            import torch.distributed as dist
            dist.destroy_process_group()
    return dict(iter=state["iter_num"], interrupted=interrupted, **last)


def _truncate_metrics(path, upto):
    """On resume from iteration `upto`, drop the records the resumed run will write again: steps
    from `upto` on, evaluations after it (the evaluation at `upto` came before the save)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [json.loads(l) for l in f if l.strip()]
    keep = [json.dumps(r) + "\n" for r in rows
            if r["iter"] < upto or (r["iter"] == upto and "val_loss" in r)]
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


def main(argv=None):
    try:
        cfg, _ = parse_config(TrainConfig, sys.argv[1:] if argv is None else argv, __doc__)
        summary = train(cfg)
    except (ConfigError, TrainingError, ValueError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    return 130 if summary["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
