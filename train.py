"""
Train a Kronecker-compressed student with knowledge distillation from its teacher.

  python train.py config/train_mini.py                       two CPU cores, minutes
  python train.py config/train_gpt2.py --batch_size=8        one GPU
  torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
  python train.py config/train_gpt2.py --init_from=resume    continue exactly where a run stopped
  python train.py config/train_bpe8k.py --init_from=scratch  the same factored student from random factors
  python train.py config/train_bpe8k.py --init_from=scratch --preset=None --n_layer=4   a dense GPT from scratch

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
Training from scratch (init_from=scratch), the baseline that says whether the teacher's weights
help at a given token budget: the student's factored architecture (preset/spec/stages) with random
factors, or, with no preset, spec or stages, a dense GPT of shape n_layer x n_head x n_embd (each
the teacher's by default; vocabulary and context are the teacher's), GPT-2's random init either way;
the objective is the same.
"""

import gc
import json
import math
import os
import signal
import sys
import time
import uuid
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace

import torch

import atomic
import autotune
import checkpoint
import compress
import distill
import machine
import model as model_lib
from configurator import ConfigError, parse_config, resolve_device
from data import check_data, get_batch, load_tokens
from model import GPT, RESIDUAL_KINDS, check_compatible, count_params, matrix_kind


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = field(default="checks", metadata={"help": "run directory: ckpt/ and metrics.jsonl"})
    init_from: str = field(default="decompose", metadata={
        "help": "decompose (teacher + preset/spec/stages), scratch (the same shapes, random weights), resume "
                "(out_dir/ckpt), or a student checkpoint path"})
    teacher: str | None = field(default=None, metadata={
        "help": "hub name or local GPT-2 directory (default: the one the init checkpoint or the resumed run "
                "records, else gpt2)"})
    allow_teacher_change: bool = field(default=False, metadata={
        "help": "distil a student checkpoint from another teacher than the one it records"})
    preset: str | None = "krony-81m"
    spec: str | None = None
    init: str | None = field(default=None, metadata={"help": "override the spec's init: vl, prune, perm, whiten, random"})
    calib_tokens: int = field(default=compress.CALIB_TOKENS, metadata={
        "help": "init whiten: training tokens on which each layer's input second moment is measured"})
    stages: list = field(default_factory=list, metadata={"help": "multi-step schedule (see the docstring)"})
    n_layer: int | None = field(default=None, metadata={"help": "init_from=scratch, dense: blocks (the teacher's)"})
    n_head: int | None = field(default=None, metadata={"help": "init_from=scratch, dense: heads (the teacher's)"})
    n_embd: int | None = field(default=None, metadata={"help": "init_from=scratch, dense: width (the teacher's)"})
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
    kd_chunk: int = field(default=256, metadata={
        "help": "positions per chunk of the KL and cross-entropy: each (chunk, vocab) float32 buffer is 51 MB at 256"})
    # evaluation and logging
    eval_interval: int = 250
    eval_iters: int = 50
    eval_only: bool = False
    log_interval: int = 10
    always_save_checkpoint: bool = True
    overwrite: bool = field(default=False, metadata={
        "help": "a fresh run (init_from other than resume) may replace the run already in out_dir (at its first save)"})
    allow_config_change: bool = field(default=False, metadata={
        "help": "resume with values that differ from the run's (no longer an exact resume); train_state.json keeps "
                "every configuration the run has had"})
    wandb_log: bool = False
    wandb_project: str = "krony"
    wandb_run_name: str = "run"
    wandb_mode: str = field(default="online", metadata={"help": "online, offline or disabled"})
    # system
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N"})
    dtype: str = field(default="auto", metadata={
        "help": "autocast dtype: auto (bfloat16 on a GPU that has it, else float32), float32, bfloat16, float16 (GPU)"})
    compile: bool = False
    impl_cache: str = field(default="~/.cache/krony/impl_cache.json", metadata={
        "help": "the factored layers' implementations, chosen by timing once per machine and kept here, so that "
                "fresh runs with equal seeds are identical; '' times them again in every run"})
    peak_tflops: float = field(default=0.0, metadata={
        "help": "the device's peak FLOP/s in TFLOP/s for MFU; 0: from the GPU's name (H100, A100, ...)"})
    seed: int = 1337
    progress: bool = True

    def __post_init__(self):            # so that every TrainConfig, dataclasses.replace's too, is checked
        validate(self)


class TrainingError(RuntimeError):
    pass


# Keys a resumed run may change and still compute exactly what the uninterrupted run would have:
# where it writes and how it reports, and max_iters (the schedule follows lr_decay_iters).
RESUME_FREE = frozenset({"init_from", "out_dir", "overwrite", "allow_config_change", "max_iters", "log_interval",
                         "progress", "wandb_log", "wandb_project", "wandb_run_name", "wandb_mode", "impl_cache",
                         "peak_tflops", "eval_only"})


def resume_changes(old, cfg):
    """The values of cfg that differ from the stored configuration `old` (a dict) of the run being
    resumed, outside RESUME_FREE, as ["key old -> new", ...]."""
    new = asdict(cfg)
    return [f"{k} {old.get(k)!r} -> {v!r}" for k, v in new.items()
            if k not in RESUME_FREE and (k not in old or old[k] != v)]


def stop_requested(run, got):
    """Whether any rank received a stop signal (ranks must stop at the same step, or the others wait
    in a collective forever). One all-reduce of one number per step under DDP."""
    flag = float(bool(got))
    if run.ddp:
        import torch.distributed as dist
        t = torch.tensor([flag], device=run.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        flag = t.item()
    return flag > 0


def validate(cfg):
    """Every value of a TrainConfig checked, before anything is read or written: a ConfigError
    (a bad command line or config file, exit status 2) naming the key."""
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{f.name} must be a finite number, got {v}")
    for k in ("batch_size", "block_size", "gradient_accumulation_steps", "max_iters", "eval_interval",
              "eval_iters", "log_interval", "kd_chunk", "calib_tokens"):
        if getattr(cfg, k) < 1:
            raise ConfigError(f"{k} must be at least 1, got {getattr(cfg, k)}")
    for k in ("kd_weight", "ce_weight", "hidden_weight", "attn_weight", "weight_decay", "learning_rate", "min_lr",
              "grad_clip", "warmup_iters", "lr_decay_iters", "peak_tflops"):
        if getattr(cfg, k) < 0:
            raise ConfigError(f"{k} must be non-negative, got {getattr(cfg, k)}" +
                              (" (0 turns clipping off)" if k == "grad_clip" else ""))
    for k in ("beta1", "beta2"):
        if not 0 <= getattr(cfg, k) < 1:
            raise ConfigError(f"{k} must be in [0, 1), got {getattr(cfg, k)}")
    try:
        resolve_device(cfg.device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.temperature <= 0:
        raise ConfigError(f"temperature must be positive, got {cfg.temperature}")
    if cfg.kd_weight + cfg.ce_weight + cfg.hidden_weight + cfg.attn_weight == 0:
        raise ConfigError("every loss weight is 0: nothing to train on")
    if cfg.wandb_mode not in ("online", "offline", "disabled"):
        raise ConfigError(f"wandb_mode must be online, offline or disabled, got {cfg.wandb_mode!r}")
    shape = [k for k in ("n_layer", "n_head", "n_embd") if getattr(cfg, k) is not None]
    if shape and (cfg.init_from != "scratch" or cfg.preset or cfg.spec or cfg.stages):
        raise ConfigError(f"{', '.join(shape)} shape a dense student trained from scratch: give them with "
                          f"init_from=scratch and preset=None (a factored student takes the teacher's shape)")
    for k in shape:
        if getattr(cfg, k) < 1:
            raise ConfigError(f"{k} must be at least 1, got {getattr(cfg, k)}")
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
# data: nanoGPT's memmaps (uint16, or uint32 for a vocabulary over 65,536), batches drawn from a
# generator seeded by (seed, iteration, micro step), so that the data position is the iteration
# number and resume replays nothing and skips nothing


# -----------------------------------------------------------------------------
# loss: the terms (memory-bounded) live in distill.py


def distill_loss(cfg, s_out, t_out, targets):
    """The weighted objective and its terms {name: value}, from the student's and teacher's
    GPTOutput. Logit terms in float32 with nothing vocabulary-sized kept but the logits."""
    parts = {}
    if cfg.kd_weight or cfg.ce_weight:
        kd, ce = distill.logit_losses(s_out.logits, t_out.logits if cfg.kd_weight else None,
                                      targets if cfg.ce_weight else None, cfg.temperature, cfg.kd_chunk)
        parts.update({k: v for k, v in (("kd", kd), ("ce", ce)) if getattr(cfg, f"{k}_weight")})
    if cfg.hidden_weight:
        parts["hidden"] = distill.hidden_mse(s_out.hidden, t_out.hidden)
    if cfg.attn_weight:
        if len(s_out.qk) != len(t_out.qk):
            raise TrainingError(f"attention distillation pairs layers one to one: the student has "
                                f"{len(s_out.qk)} blocks, the teacher {len(t_out.qk)}")
        parts["attn"] = torch.stack([distill.attn_kl(qs, ks, qt, kt) for (qs, ks), (qt, kt)
                                     in zip(s_out.qk, t_out.qk)]).mean()
    return sum(getattr(cfg, f"{k}_weight") * v for k, v in parts.items()), parts


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
# the student and its stages


def stage_spec(stage):
    if "preset" in stage or "spec" in stage:
        return compress.load_spec(stage.get("preset") or stage.get("spec"))
    return {"rules": stage["rules"]}


def stages_of(cfg):
    if cfg.stages:
        return cfg.stages
    if not (cfg.preset or cfg.spec):
        if cfg.init_from in ("scratch", "resume"):
            return None                         # a dense student: nothing is factored
        raise ConfigError("init_from=decompose needs a preset, a spec or stages")
    return [dict(iters=cfg.max_iters, **({"preset": cfg.preset} if cfg.preset else {"spec": cfg.spec}),
                 **({"init": cfg.init} if cfg.init else {}))]


def apply_stage(student, plan, stage, progress, tokens=None, calib_tokens=compress.CALIB_TOKENS):
    """Factor what the stage's spec names: new matrices from their dense weights; a factored one
    with another shape or r is first multiplied out (GPT.densify), then factored again. Matrices
    with init whiten are fitted to their inputs in the student as it is now, measured on
    calib_tokens of `tokens` (the training split)."""
    new = compress.resolve_spec(stage_spec(stage), student.config, init=stage.get("init"))
    todo = {}
    for name, mp in new.items():
        old = plan.get(name)
        if old and (old.m1, old.n1, old.r) == (mp.m1, mp.n1, mp.r):
            continue
        if old:
            student.densify(name)
        todo[name] = mp
    covs, calib = {}, compress.needs_calibration(todo)
    if calib:
        if tokens is None:
            raise ConfigError("init whiten needs the training tokens to calibrate on")
        covs = compress.calibrate(student, tokens, calib, n_tokens=calib_tokens, progress=progress)
    rows = compress.decompose(student, todo, compare=(), progress=progress, covs=covs)
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
        device = resolve_device(cfg.device)
    if cfg.dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    else:
        dtype = cfg.dtype
    if device.startswith("cuda"):                   # TF32 for the float32 matmuls (the output head)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return ddp, rank, world, device, dtype


@dataclass
class Run:
    """What the steps of a training run share: configuration, models, optimizer, data, state."""
    cfg: TrainConfig
    log: object
    ddp: bool
    rank: int
    world: int
    device: str
    dtype: str
    ctx: object                      # autocast, or a null context in float32
    teacher: object                  # GPT or None (plain language-model training)
    student: object                  # the GPT itself: saved, switched between stages
    plan: dict
    hf_config: dict
    train_data: object
    val_data: object
    stages: list
    state: dict                      # iter_num, best_val_loss, stage, tokens: saved in train_state.json
    model: object = None             # what the step calls: student, compiled and/or DDP-wrapped
    teacher_fwd: object = None       # the teacher's forward, compiled or not
    optimizer: object = None
    scaler: object = None
    flops_per_iter: float = 0.0
    teacher_val: float = None        # the teacher's held-out loss on the evaluation batches
    metrics: str = None              # the metrics file records are appended to (checkpoint.open_metrics)

    @property
    def master(self):
        return self.rank == 0

    @property
    def accum(self):
        return self.cfg.gradient_accumulation_steps // self.world

    @property
    def ckpt_dir(self):
        return os.path.join(self.cfg.out_dir, "ckpt")


def scratch_student(cfg, teacher_config):
    """A randomly initialized student: the teacher's architecture, or the dense shape cfg gives."""
    shape = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd") if getattr(cfg, k) is not None}
    if "n_embd" in shape:          # the teacher's MLP ratio: GPT-2's 4, a SwiGLU model's own (Llama: about 8/3)
        shape["n_inner"] = teacher_config.n_inner * shape["n_embd"] // teacher_config.n_embd
    try:
        return GPT(replace(teacher_config, **shape))
    except ValueError as e:
        raise ConfigError(f"init_from=scratch: {e}")


def random_factors(student, plan, stage, progress):
    """Factor a random student as the stage says, with random factors at GPT-2's init scale (the
    residual projections at 0.02 / sqrt(2 n_layer), as GPT.__init__ sets the dense ones)."""
    plan, rows = apply_stage(student, plan, dict(stage, init="random"), progress)
    for name in plan:
        if matrix_kind(name) in RESIDUAL_KINDS:
            student.get_matrix(name).reset_parameters(std=0.02 / math.sqrt(2 * student.config.n_layer))
    return plan, rows


def load_models(cfg, log, master, tokens=None):
    """(teacher or None, student, plan, hf_config) as cfg.init_from says; tokens (the training
    split) calibrate a whiten init."""
    need_teacher = cfg.init_from in ("decompose", "scratch") or cfg.kd_weight or cfg.hidden_weight or cfg.attn_weight
    teacher = hf_config = None
    if need_teacher:
        teacher, hf_config = GPT.from_pretrained(cfg.teacher)
        teacher.requires_grad_(False).eval()
    stages = stages_of(cfg) if cfg.init_from in ("decompose", "scratch") else None
    if cfg.init_from == "decompose":
        student = GPT(teacher.config)
        student.load_state_dict(teacher.state_dict())
        plan, rows = apply_stage(student, {}, stages[0], cfg.progress and master, tokens, cfg.calib_tokens)
        if master:
            log(compress.format_report(rows))
    elif cfg.init_from == "scratch":
        student, plan = scratch_student(cfg, teacher.config), {}
        if stages:
            plan, _ = random_factors(student, plan, stages[0], cfg.progress and master)
    else:
        path = os.path.join(cfg.out_dir, "ckpt") if cfg.init_from == "resume" else cfg.init_from
        student, meta = checkpoint.load_student(path)
        plan, hf_config = meta["factors"], meta.get("hf_config") or hf_config
    if teacher is not None:
        check_compatible(student.config, teacher.config, same_width=bool(cfg.hidden_weight or cfg.attn_weight))
    if cfg.block_size > student.config.block_size:
        raise ConfigError(f"block_size {cfg.block_size} exceeds the model's context {student.config.block_size}")
    return teacher, student, plan, hf_config


def setup(cfg, log, stored=None):
    """Device, data, models and state of a new or resumed run (models not yet prepared); `stored`:
    the train_state.json of the run being resumed."""
    machine.keep_freed_memory()
    ddp, rank, world, device, dtype = setup_device(cfg)
    if cfg.gradient_accumulation_steps % world:
        raise ConfigError(f"gradient_accumulation_steps ({cfg.gradient_accumulation_steps}) must be divisible by "
                          f"the number of processes ({world}) so that the global batch stays the same")
    torch.manual_seed(cfg.seed)
    amp = dtype != "float32"                 # autocast: weights, norms, residual stream and logits in float32
    if dtype == "float16" and not device.startswith("cuda"):
        raise ConfigError("dtype float16 needs a GPU (its loss scaling); on a CPU use bfloat16 or float32")
    ctx = torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, dtype)) if amp else nullcontext()
    data = load_tokens(cfg.dataset, "train"), load_tokens(cfg.dataset, "val")
    teacher, student, plan, hf_config = load_models(cfg, log, rank == 0, data[0])
    source = cfg.teacher if teacher is not None else (os.path.join(cfg.out_dir, "ckpt") if cfg.init_from == "resume"
                                                      else cfg.init_from)
    check_data(cfg.dataset, data, student.config.vocab_size, source, log)
    note = autotune.load_file(os.path.expanduser(cfg.impl_cache)) if cfg.impl_cache else None
    if note:
        log(f"note: {note}")
    if stored:                  # the implementations the resumed run used, before any is timed again
        autotune.load_cache_rows(stored.get("impl_cache", []))
    if teacher is not None:         # float32 weights: under autocast its matmuls run in bf16, its
        teacher.to(device)          # residual stream, norms and logits (the KD targets) in float32
    stages = stages_of(cfg) if cfg.init_from in ("decompose", "scratch", "resume") else None
    state = dict(iter_num=0, best_val_loss=float("inf"), stage=0, tokens=0)
    run = Run(cfg, log, ddp, rank, world, device, dtype, ctx, teacher, student.to(device), plan, hf_config,
              *data, stages, state)
    run.scaler = torch.amp.GradScaler("cuda", enabled=dtype == "float16")
    return run


def fix_implementations(run):
    """Choose each factored matrix's implementation in one eager forward and backward (training) and
    one eval forward on a real batch, their RNG and gradients dropped, and fix it (under DDP, rank
    0's choices for every rank), so that a compiled graph never holds the timing code."""
    cfg, student = run.cfg, run.student
    x, _ = get_batch(run.train_data, cfg.block_size, cfg.batch_size, cfg.seed, -2, 0, run.device)
    with torch.random.fork_rng(devices=[run.device] if run.device.startswith("cuda") else []):
        with run.ctx:
            loss = student(x).logits.float().sum()
        loss.backward()
        with torch.no_grad(), run.ctx:
            student.eval()(x)
        student.train()
    student.zero_grad(set_to_none=True)
    if run.ddp:
        import torch.distributed as dist
        seen = [{n: m.seen for n, m in student.named_modules() if isinstance(m, model_lib.KronLinear)}]
        dist.broadcast_object_list(seen, src=0)
        for n, m in student.named_modules():
            if n in seen[0]:
                m.seen = seen[0][n]
    student.fix_impls()
    note = autotune.save_file(os.path.expanduser(cfg.impl_cache)) if run.master and cfg.impl_cache else None
    if note:
        run.log(f"note: {note}")


def prepare(run):
    """Make the student ready to step, at the start and after every stage switch: fix its
    implementations, then compile, wrap in DDP (the wrap registers the current parameters and
    broadcasts rank 0's values), and build the optimizer, keeping the moments of the parameters
    that survived a switch."""
    cfg, student = run.cfg, run.student
    fix_implementations(run)
    release_wrappers(run)
    model = torch.compile(student) if cfg.compile else student
    if run.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[int(run.device.split(":")[1])] if run.device.startswith("cuda") else None,
                    find_unused_parameters=not (cfg.kd_weight or cfg.ce_weight))   # ln_f feeds only the logits
    run.model = model
    if run.teacher is not None and run.teacher_fwd is None:
        run.teacher_fwd = torch.compile(run.teacher) if cfg.compile else run.teacher
    old = run.optimizer
    run.optimizer = make_optimizer(student, cfg, run.device)
    if old is not None:
        for p in student.parameters():
            if p in old.state:
                run.optimizer.state[p] = old.state[p]
    uses_teacher = run.teacher is not None and (cfg.kd_weight or cfg.hidden_weight or cfg.attn_weight)
    per_token = student.flops_per_token(cfg.block_size) + \
        (run.teacher.flops_per_token(cfg.block_size, train=False) if uses_teacher else 0)
    run.flops_per_iter = per_token * cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size


def release_wrappers(run):
    """Drop the previous stage's DDP (and compiled) wrapper, and collect it, before a new one is made
    or the process group is destroyed: two reducers must never hold hooks on the same parameters."""
    if run.model is not None and run.model is not run.student:
        run.model = None
        gc.collect()


def forward_loss(run, x, y):
    """One micro-batch: the student's forward, the teacher's (no grad) when a term needs it, the
    objective. Returns (loss, {term: value})."""
    cfg = run.cfg
    want_hidden, want_qk = cfg.hidden_weight > 0, cfg.attn_weight > 0
    with run.ctx:
        s_out = run.model(x, return_hidden=want_hidden, return_qk=want_qk)
        t_out = None
        if run.teacher_fwd is not None and (cfg.kd_weight or want_hidden or want_qk):
            with torch.no_grad():
                t_out = run.teacher_fwd(x, return_hidden=want_hidden, return_qk=want_qk)
    return distill_loss(cfg, s_out, t_out, y)


def train_step(run, it):
    """One optimizer step over the global batch. Returns {term: value} of the global batch as
    0-d tensors (no host sync) and the gradient norm."""
    cfg = run.cfg
    lr = lr_at(it, cfg)
    for g in run.optimizer.param_groups:
        g["lr"] = lr
    parts = {}
    for micro in range(run.accum):
        x, y = get_batch(run.train_data, cfg.block_size, cfg.batch_size, cfg.seed, it, run.rank * run.accum + micro,
                         run.device)
        if run.ddp:
            run.model.require_backward_grad_sync = micro == run.accum - 1
        loss, terms = forward_loss(run, x, y)
        run.scaler.scale(loss / run.accum).backward()
        for k, v in terms.items():
            parts[k] = parts.get(k, 0.0) + v.detach().float() / run.accum
    if run.ddp:                   # the global batch's terms, not rank 0's share (summed on the device)
        import torch.distributed as dist
        t = torch.stack([parts[k] for k in sorted(parts)])
        dist.all_reduce(t)
        parts = dict(zip(sorted(parts), t / run.world))
    norm = None
    if cfg.grad_clip:
        run.scaler.unscale_(run.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(run.student.parameters(), cfg.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return parts, norm


@torch.no_grad()
def held_out_loss(run, model, data):
    """Mean cross-entropy over eval_iters fixed batches (seed offset -1: the same at every evaluation)."""
    losses = []
    for k in range(run.cfg.eval_iters):
        x, y = get_batch(data, run.cfg.block_size, run.cfg.batch_size, run.cfg.seed, -1, k, run.device)
        with run.ctx:
            losses.append(model(x, y).loss.float())
    return torch.stack(losses).mean().item()


def evaluate(run):
    """{"train", "val": the student's loss on each split; "teacher_val": the teacher's on the same
    validation batches (computed once per run), when there is a teacher}."""
    run.student.eval()
    out = {split: held_out_loss(run, run.student, data) for split, data in (("train", run.train_data),
                                                                              ("val", run.val_data))}
    run.student.train()
    if run.teacher is not None:
        if run.teacher_val is None:
            run.teacher_val = held_out_loss(run, run.teacher, run.val_data)
        out["teacher_val"] = run.teacher_val
    return out


def check_finite(run, what):
    """Refuse to go on (and to save) with non-finite weights: what was found and what is kept."""
    bad = [n for n, p in run.student.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise TrainingError(f"{what}: non-finite weights in {bad[:3]}{' ...' if len(bad) > 3 else ''}; stopped "
                            f"without saving, {run.ckpt_dir} is left as it was (lower learning_rate)")


def save(run):
    """Save the run's checkpoint; the first save of a run that replaces another also moves its
    metrics in (checkpoint.take_metrics): from here on the folder is this run's."""
    if run.master:
        check_finite(run, f"before saving at iteration {run.state['iter_num']}")
        config = checkpoint.student_config(run.student, run.plan, run.hf_config,
                                           teacher=model_lib.source_name(run.cfg.teacher))
        state = dict(run.state, config=asdict(run.cfg), impl_cache=autotune.cache_rows())
        checkpoint.save_run(run.ckpt_dir, run.student, config, run.optimizer, state)
        run.metrics = checkpoint.take_metrics(run.cfg.out_dir, run.metrics)


def switch_stage(run, it):
    """Enter the stage iteration `it` belongs to: factor what it names, then prepare again."""
    run.state["stage"] = stage_at(run.stages, it)
    run.plan, rows = apply_stage(run.student, run.plan, run.stages[run.state["stage"]],
                                 run.cfg.progress and run.master, run.train_data, run.cfg.calib_tokens)
    prepare(run)
    if run.master:
        run.log(f"stage {run.state['stage']} at iter {it}:\n" + compress.format_report(rows))


def check_ranks_agree(run):
    """Under DDP every rank must hold the same weights (a parameter not registered with DDP would
    drift apart silently): compare a float64 fingerprint of every tensor across ranks."""
    import torch.distributed as dist
    fp = torch.stack([p.detach().double().pow(2).sum() for p in run.student.parameters()])
    every = [torch.zeros_like(fp) for _ in range(run.world)]
    dist.all_gather(every, fp)
    if not all(torch.equal(every[0], f) for f in every):
        raise TrainingError("the ranks' weights differ at the end of training: a parameter was not "
                            "synchronized by DDP")
    dist.barrier()          # every rank past its last collective before any tears the group down


def log_step(run, it, parts, norm, lr, dt, iters, bar, emit):
    """The log line and metrics record of iteration `it` (the only host sync of the loop)."""
    vals = dict(zip(parts, torch.stack(list(parts.values())).tolist()))
    total = sum(vals[k] * getattr(run.cfg, f"{k}_weight") for k in vals)
    if not math.isfinite(total):
        raise TrainingError(f"the loss is {total} at iteration {it} ({vals}); stopped without saving, the last "
                            f"good checkpoint in {run.ckpt_dir} is kept (lower learning_rate, or clip harder)")
    tokens = run.cfg.gradient_accumulation_steps * run.cfg.batch_size * run.cfg.block_size * iters
    peak = machine.peak_flops(run.device, run.dtype, run.cfg.peak_tflops)
    mfu = run.flops_per_iter * iters / dt / peak if peak else None
    mem = machine.peak_memory(run.device) / 2 ** 30
    rec = dict(iter=it, loss=total, lr=lr, tokens_per_s=tokens / dt, ms_per_iter=1000 * dt / iters,
               peak_mem_gb=mem, **({"mfu": mfu} if mfu is not None else {}),
               **({"grad_norm": float(norm)} if norm is not None else {}), **{f"loss_{k}": v for k, v in vals.items()})
    if run.master:
        bar.set_postfix(loss=f"{total:.4f}")
        terms = " ".join(f"{k} {v:.4f}" for k, v in vals.items())
        bar.write(f"iter {it}: loss {total:.4f} ({terms}), lr {lr:.2e}, {rec['tokens_per_s']:,.0f} tok/s, "
                  f"{rec['ms_per_iter']:.0f} ms/iter, mfu {f'{mfu:.1%}' if mfu is not None else 'n/a'}, "
                  f"peak mem {mem:.2f} GB")
        emit(rec)
    return total


def train(cfg, log=print):
    """Run (or resume) a training run. Returns a summary dict (final iteration, losses). Ctrl-C or
    SIGTERM saves a checkpoint at the next step boundary and raises Interrupted (a KeyboardInterrupt):
    an interrupted run is never reported as done. One process writes a run folder at a time (its
    lock is held until the run ends, however it ends)."""
    if int(os.environ.get("RANK", 0)) != 0:
        return train_locked(cfg, log)
    with atomic.folder_lock(cfg.out_dir, f"train.py, {cfg.out_dir}"):
        return train_locked(cfg, log)


def resumed_state(cfg):
    """The train_state.json of the run a resume continues (read once per run), after finishing a save
    a kill cut short; {} for a new run."""
    if cfg.init_from != "resume":
        return {}
    ckpt = os.path.join(cfg.out_dir, checkpoint.RUN_CKPT)
    if int(os.environ.get("RANK", 0)) == 0:
        atomic.recover(ckpt)            # a save killed between its renames, stale temporaries
    return checkpoint.read_train_state(ckpt)


def teacher_of(cfg, stored):
    """The teacher: the one given, else the one the resumed run (`stored`) or the init checkpoint
    records, else gpt2. A checkpoint's student was fitted to its recorded teacher; distilling it from
    another is refused unless allow_teacher_change (paths compare by the folder they name)."""
    if cfg.init_from in ("decompose", "scratch"):
        return cfg.teacher or "gpt2"
    if cfg.init_from == "resume":
        return cfg.teacher or (stored.get("config") or {}).get("teacher") or "gpt2"
    recorded = checkpoint.read_config(cfg.init_from).get("teacher")
    if cfg.teacher is None:
        return recorded or "gpt2"
    if recorded and model_lib.source_name(cfg.teacher) != model_lib.source_name(recorded) \
            and not cfg.allow_teacher_change:
        raise TrainingError(f"{cfg.init_from} was made from the teacher {recorded}, not {cfg.teacher}: leave teacher "
                            f"unset to use its own, or set allow_teacher_change=True")
    return cfg.teacher


def check_out_dir(cfg, stored):
    """A resume keeps the run's configuration (resume_changes) unless allow_config_change; a fresh
    run replaces no run, nor anything that is not one, nor its own inputs (checkpoint.check_new_run)."""
    if cfg.init_from != "resume":
        checkpoint.check_new_run(cfg.out_dir, cfg.overwrite, (cfg.init_from, cfg.teacher, cfg.dataset))
        return
    changed = resume_changes(stored.get("config") or {}, cfg)
    if changed and not cfg.allow_config_change:
        raise TrainingError(f"resuming {os.path.join(cfg.out_dir, checkpoint.RUN_CKPT)} with another configuration "
                            f"would not continue the same run ({', '.join(changed)}): start a new run in another "
                            f"out_dir, or resume with --allow_config_change=True (train_state.json then keeps both "
                            f"configurations)")


def train_locked(cfg, log):
    stored = resumed_state(cfg)
    cfg = replace(cfg, teacher=teacher_of(cfg, stored))
    check_out_dir(cfg, stored)
    run = setup(cfg, log, stored)
    prepare(run)
    if stored:
        checkpoint.load_optimizer(run.ckpt_dir, run.optimizer, stored)
        run.state.update({k: v for k, v in stored.items()
                          if k in ("iter_num", "best_val_loss", "stage", "tokens", "run_id", "configs")})
    run.state.setdefault("run_id", uuid.uuid4().hex[:12])
    history = run.state.get("configs") or ([dict(from_iter=0, config=stored["config"])] if stored else [])
    if not history or history[-1]["config"] != asdict(cfg):
        history.append(dict(from_iter=run.state["iter_num"], config=asdict(cfg)))
    run.state["configs"] = history
    if run.master:
        run.metrics = checkpoint.open_metrics(cfg.out_dir, bool(stored), run.state["run_id"], run.state["iter_num"])
        counts = count_params(run.student)
        log(f"student: {counts['hf']:,} parameters (HF convention), {counts['nanogpt']:,} (nanoGPT); device "
            f"{run.device}, dtype {run.dtype}, {run.world} process(es), {cfg.gradient_accumulation_steps} x "
            f"{cfg.batch_size} x {cfg.block_size} tokens per step, {run.flops_per_iter / 1e12:.2f} TFLOP per step")
    wandb_run = None
    if cfg.wandb_log and run.master and cfg.wandb_mode != "disabled":
        import wandb
        wandb_run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=asdict(cfg),
                               mode=cfg.wandb_mode, dir=cfg.out_dir)

    def emit(record):
        if not run.master:
            return
        with open(run.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
        if wandb_run is not None:
            wandb_run.log(record, step=record["iter"])

    from tqdm import tqdm
    bar = tqdm(total=cfg.max_iters, initial=run.state["iter_num"], disable=not (cfg.progress and run.master),
               desc="train", unit="it")
    with machine.deferred_signals(bar.write) as got:
        return run_loop(run, cfg, got, bar, emit, wandb_run)


def evaluate_and_save(run, it, emit):
    """Evaluate at iteration `it`, log and record it, and save when the held-out loss improved (or
    always_save_checkpoint). A non-finite evaluation stops the run before any save. Returns the losses."""
    cfg = run.cfg
    ev = evaluate(run)
    if not all(math.isfinite(v) for v in ev.values()):
        raise TrainingError(f"the evaluation at iteration {it} gave {ev}; stopped without saving, "
                            f"the last good checkpoint in {run.ckpt_dir} is kept (lower learning_rate)")
    if run.master:
        run.log(f"iter {it}: train loss {ev['train']:.4f}, val loss {ev['val']:.4f}" +
                (f" (teacher {ev['teacher_val']:.4f})" if "teacher_val" in ev else ""))
        emit(dict(iter=it, train_loss=ev["train"], val_loss=ev["val"], tokens=run.state["tokens"],
                  **({"teacher_val_loss": ev["teacher_val"]} if "teacher_val" in ev else {})))
    if it > 0 and (ev["val"] < run.state["best_val_loss"] or cfg.always_save_checkpoint) and not cfg.eval_only:
        run.state["best_val_loss"] = min(run.state["best_val_loss"], ev["val"])
        save(run)
    return ev


def run_loop(run, cfg, got, bar, emit, wandb_run):
    """The training loop: evaluate and save on schedule, step, log; on a stop signal (checked
    between steps) save and raise Interrupted."""
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    last, start_iter = {}, run.state["iter_num"]
    t0, since = time.time(), 0
    try:
        while True:
            it = run.state["iter_num"]
            if run.stages and stage_at(run.stages, it) != run.state["stage"]:
                switch_stage(run, it)
            resumed_here = cfg.init_from == "resume" and it == start_iter   # evaluated before that save
            if (it % cfg.eval_interval == 0 or it >= cfg.max_iters) and not resumed_here:
                last.update(evaluate_and_save(run, it, emit))
            if it >= cfg.max_iters or cfg.eval_only:
                break
            if stop_requested(run, got):
                raise machine.Interrupted(got[0] if got else signal.SIGINT)
            parts, norm = train_step(run, it)
            run.state["iter_num"] = it + 1
            run.state["tokens"] += tokens_per_iter
            since += 1
            bar.update(1)
            if it % cfg.log_interval == 0 or it + 1 >= cfg.max_iters:
                dt = time.time() - t0
                last["loss"] = log_step(run, it, parts, norm, lr_at(it, cfg), dt, since, bar, emit)
                t0, since = time.time(), 0
        if run.ddp:
            check_ranks_agree(run)
    except machine.Interrupted:
        if run.master:
            bar.write(f"interrupted at iteration {run.state['iter_num']}: saving {run.ckpt_dir}")
        save(run)
        raise
    finally:
        bar.close()
        if wandb_run is not None:
            wandb_run.finish()
        if run.ddp:
            import torch.distributed as dist
            release_wrappers(run)
            dist.destroy_process_group()
    return dict(iter=run.state["iter_num"], **last)


def main(argv=None):
    try:
        cfg, _ = parse_config(TrainConfig, sys.argv[1:] if argv is None else argv, __doc__)
        train(cfg)
    except ConfigError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except (TrainingError, ValueError, OSError) as e:     # OSError: a full disk, a folder not writable
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    except machine.Interrupted as e:
        print(f"train.py: stopped by {e}; the checkpoint holds every step up to where it stopped (resume with "
              f"--init_from=resume)", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("train.py: interrupted before training began; nothing was saved", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
