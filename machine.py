"""
What a long run needs from the machine and the process: stop signals acted on between steps,
freed memory kept for the next step, the device's peak FLOP/s (for MFU) and peak memory.
"""

import signal
import threading
from contextlib import contextmanager

import torch


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM (what batch schedulers send), acted on between two steps: the
    checkpoint then saved holds whole steps only."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def deferred_signals(log):
    """SIGINT and SIGTERM append to a list instead of raising: a KeyboardInterrupt inside
    optimizer.step() would leave updated weights labelled with the previous iteration, and resume
    would apply that step twice. The loop checks the list between steps (stop_requested). A second
    signal while stopping is noted, so the save it is waiting for completes."""
    got = []
    if threading.current_thread() is not threading.main_thread():       # signal handlers live there
        yield got
        return

    def handler(signum, frame):
        if got:
            log(f"{signal.Signals(signum).name} again: still saving the checkpoint, please wait")
        got.append(signum)
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield got
    finally:
        for s, h in old.items():
            signal.signal(s, h)


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


# Dense peak throughput per GPU (bfloat16/float16, TF32) in FLOP/s, for MFU; the first name found in
# torch.cuda.get_device_name() is used. nanoGPT's estimate divides by the A100's 312e12.
PEAK_FLOPS = (("H200", 989e12, 494e12), ("H100", 989e12, 494e12), ("A100", 312e12, 156e12),
              ("L40S", 362e12, 183e12), ("A10", 125e12, 62.5e12), ("L4", 121e12, 60e12))


def peak_flops(device, dtype, peak_tflops=0.0):
    """FLOP/s that 100% MFU means: peak_tflops if set, else the GPU's from PEAK_FLOPS; None on a CPU
    or an unknown GPU (no MFU is reported)."""
    if peak_tflops:
        return peak_tflops * 1e12
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    for key, half, tf32 in PEAK_FLOPS:
        if key in name:
            return tf32 if dtype == "float32" else half
    return None


def peak_memory(device):
    """Bytes: CUDA's max_memory_allocated, or on a CPU the process's peak resident set size."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device)
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
