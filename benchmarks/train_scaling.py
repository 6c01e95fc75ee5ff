"""End-to-end training throughput, maximum context and the alternatives, on GPUs.

One process per GPU (``torchrun --nproc_per_node G benchmarks/train_scaling.py ...``, or plain
``python`` for one GPU).  The sequence-parallel size is the world size, so the context is
``tokens per GPU x GPUs``.  The model (default ~1B parameters: 16 layers, d_model 2048, 16 query /
4 KV heads) is trained under DeepSpeed (bf16, ZeRO stage ``--zero``) for a few steps, on one batch of
random tokens taken every step (``--data random``) or on a fresh batch of text each step (``--data
stdlib``: the bytes of this Python's standard library sources, one token per byte); we report
tokens/s, MFU (6 x matmul params + useful attention FLOPs, per the pattern) and peak memory, then probe the longest context that trains, and run the same model with the
alternatives a user would pick (FlexAttention for the same pattern; dense causal SDPA) at the
lengths they fit.  Prints a table and writes JSON (``--out``).

``--checkpointing`` and ``--fused`` list the activation-checkpointing modes and element-wise
settings to measure side by side at every ``--lengths`` entry (``mode/on`` pins one setting to a
mode, e.g. ``full/off,selective@8/on``). Every variant trains on the same batches from the same seed,
and its losses are printed against the first variant's; ``--noise-runs K`` adds K runs of the first
variant with its initial weights perturbed by about half a bf16 unit, whose spread is the bar.
One more step of each run is taken under torch.profiler, and its GPU time is reported by kernel
category (sparse attention, matrix products, element-wise, copies, host copies (the transfers of
``--offload``), communication, other) next to the timing, with the time no kernel ran and the CPU
operators that ran meanwhile (``idle_stretches``; the profiler's own overhead is part of it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

from sparse_parallel.model import Transformer
from sparse_parallel.model import layers as model_layers
from sparse_parallel.patterns import Pattern
from sparse_parallel.training.config import ModelConfig

PATTERNS = {
    "main": {"causal": True, "components": [{"type": "window", "left": 4096}, {"type": "strided", "stride": 64},
                                            {"type": "global", "first": 128, "queries": False}]},
    "dilated": {"causal": True, "components": [{"type": "dilated", "window": 4096, "levels": 4}]},
}
PEAK_TFLOPS = 989.0  # H200 dense bf16, the usual MFU denominator
#: --checkpointing names -> ModelConfig.activation_checkpointing
CHECKPOINTING = {"none": False, "full": True, "keep": "keep_attention", "selective": "selective"}
FUSED = {"on": True, "off": False}


def checkpointing_mode(name: str) -> tuple[bool | str, int | None]:
    """A ``--checkpointing`` entry -> (model.activation_checkpointing, model.checkpoint_layers): a mode
    name, or ``mode@k`` for that mode in the first k layers only."""
    mode, _, layers = name.partition("@")
    if mode not in CHECKPOINTING or (layers and not layers.isdigit()):
        raise ValueError(f"a mode is one of {list(CHECKPOINTING)}, optionally @<layers>")
    return CHECKPOINTING[mode], int(layers) if layers else None


def model_config(args, pattern: dict, backend: str, checkpointing: str, fused: str) -> ModelConfig:
    mode, layers = checkpointing_mode(checkpointing)
    cfg = ModelConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                      n_kv_heads=args.kv_heads, activation_checkpointing=mode,
                      loss_chunk=16384, attention_backend=backend, pattern=pattern,
                      fused_elementwise=FUSED[fused])
    cfg.mlp_chunk = args.mlp_chunk
    cfg.offload_activations = args.offload
    cfg.checkpoint_layers = layers
    cfg.validate()
    return cfg


# -- where the GPU time of a step goes ------------------------------------------------------------
CATEGORIES = ("attention", "matmul", "elementwise", "copies", "host_copies", "communication", "other")
# Kernel names (CUDA) and operator names (CPU smoke run), lower-cased, by category; the first match
# wins: inductor's fused kernels (model.fused_elementwise) name the ops they fuse, "_to_copy" among
# them, and eager casts run as "elementwise_kernel<direct_copy_kernel_cuda>", counted as copies.
# host_copies are the device-host transfers, nearly all of them host offload's (a few small ones
# move tokens in and results out), matched before the other copies. They run on a side stream, as
# NCCL (sequence parallelism, gradients) does, so with either the categories may add up to more
# than the step.
_NAME_PARTS = (
    ("host_copies", ("memcpy dtoh", "memcpy htod")),
    ("attention", ("flash", "fmha", "flex_attention", "triton_tem_fused", "sdpa", "attention")),
    ("communication", ("nccl",)),
    ("elementwise", ("triton_poi", "triton_per", "triton_red")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "splitk", "aten::mm", "aten::addmm", "aten::bmm")),
    ("copies", ("copy", "memcpy", "memset", "catarray", "aten::cat")),
    ("elementwise", ("elementwise", "aten::mul", "aten::add", "aten::sub", "aten::silu", "aten::rsqrt",
                     "aten::pow", "aten::neg", "aten::fill_")),
)


def _attention_kernels() -> tuple[str, ...]:
    """Names of this project's Triton attention kernels (every ``*_kernel`` of the kernel module)."""
    try:
        from sparse_parallel.kernels import triton_kernels
    except ImportError:
        return ()
    return tuple(name.lstrip("_") for name in vars(triton_kernels) if name.endswith("_kernel"))


def category(name: str, attention_kernels: tuple[str, ...]) -> str:
    if name.lstrip("_").startswith(attention_kernels):
        return "attention"
    low = name.lower()
    for cat, parts in _NAME_PARTS:
        if any(part in low for part in parts):
            return cat
    return "other"


def idle_stretches(device_spans, cpu_leaves, min_us: float = 100.0, top: int = 8) -> dict:
    """Where a profiled step leaves the GPU without work, and what the CPU did meanwhile.

    ``device_spans``: (start, end) in microseconds of every device activity (kernels and copies, any
    stream); ``cpu_leaves``: (name, start, end) of the CPU operators and runtime calls with no children.
    The step's idle time is the part of [first start, last end] that no device span covers; a gap of
    at least ``min_us`` is a stretch.  ``cpu_ms`` sums, per name, the CPU leaves' time inside the
    stretches (largest ``top``): a synchronisation there means the GPU drained; the rest of a stretch,
    no leaf at all, is Python between the operators.
    """
    spans = sorted((a, b) for a, b in device_spans if b > a)
    if not spans:
        return {"idle_ms": 0.0, "stretches": 0, "longest_ms": 0.0, "cpu_ms": []}
    merged = [list(spans[0])]
    for a, b in spans[1:]:
        if a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    gaps = [(x[1], y[0]) for x, y in zip(merged, merged[1:])]
    idle = sum(b - a for a, b in gaps)
    gaps = [(a, b) for a, b in gaps if b - a >= min_us]
    per_name: dict[str, float] = defaultdict(float)
    leaves = sorted(cpu_leaves, key=lambda e: e[1])
    first = 0  # leaves ending before the current gap are done with: gaps and leaves are both sorted
    for a, b in gaps:
        while first < len(leaves) and leaves[first][2] <= a:
            first += 1
        for name, s, e in leaves[first:]:
            if s >= b:
                break
            per_name[name] += max(0.0, min(e, b) - max(s, a))
    cpu = sorted(per_name.items(), key=lambda kv: -kv[1])[:top]
    return {"idle_ms": idle / 1e3, "stretches": len(gaps),
            "longest_ms": max((b - a for a, b in gaps), default=0.0) / 1e3,
            "cpu_ms": [{"name": name[:120], "ms": us / 1e3} for name, us in cpu]}


def time_breakdown(run_step, device) -> dict:
    """One ``run_step()`` under torch.profiler -> its GPU time (ms) by category and the largest kernels.

    On CPU (the smoke run) operators' self CPU time stands in for kernel time: that checks this code
    and measures nothing.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        run_step()
        if cuda:
            torch.cuda.synchronize()
    per_name: dict[str, float] = defaultdict(float)  # microseconds
    idle = {}
    if cuda:
        spans, leaves = [], []
        for event in prof.events():
            if event.device_type == DeviceType.CUDA:
                per_name[event.name] += event.time_range.elapsed_us()
                spans.append((event.time_range.start, event.time_range.end))
            elif not event.cpu_children:
                leaves.append((event.name, event.time_range.start, event.time_range.end))
        idle = {"idle": idle_stretches(spans, leaves)}
    else:
        for avg in prof.key_averages():
            per_name[avg.key] += avg.self_cpu_time_total
    kernels = _attention_kernels()
    ms = dict.fromkeys(CATEGORIES, 0.0)
    for name, us in per_name.items():
        ms[category(name, kernels)] += us / 1e3
    busy = sum(ms.values())
    top = sorted(per_name.items(), key=lambda kv: -kv[1])[:12]
    return {"time_of": "GPU kernels" if cuda else "CPU operators (smoke run)", "time_ms": ms, "busy_ms": busy,
            "share": {c: v / busy if busy else 0.0 for c, v in ms.items()},
            "top_kernels": [{"name": name[:160], "ms": us / 1e3, "category": category(name, kernels)}
                            for name, us in top], **idle}


# -- the alternatives, swapped in for the model's attention call ---------------------------------
def _flex_attention_fn(pattern: Pattern, n: int, device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, q_idx, kv_idx):
        ok = q_idx < 0
        for c in pattern.components:
            ok = ok | c.allows(q_idx, kv_idx)
        return ok & (kv_idx <= q_idx) if pattern.causal else ok

    torch._dynamo.config.cache_size_limit = 64
    torch._dynamo.config.accumulated_cache_size_limit = 512
    block_mask = create_block_mask(mask_mod, None, None, n, n, device=device, _compile=True)
    compiled = torch.compile(flex_attention)

    def attend(q, k, v, _pattern, **kw):
        out = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                       enable_gqa=True)
        return out.transpose(1, 2)

    return attend


def _sdpa_dense(q, k, v, _pattern, **kw):
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True)
    return out.transpose(1, 2)


def train_steps(args, pattern_name: str, n_local: int, attention: str, world: int, rank: int,
                checkpointing: str, fused: str, perturbed: int = 0) -> dict:
    """Build model + engine, run warm-up, timed and profiled steps; returns the measurements.

    ``perturbed`` = s > 0: every initial weight times ``1 + 2^-9 * randn`` (about half a bf16 unit; randn
    seeded with s), so that the losses of the run show the spread that bf16 rounding alone makes
    (``--noise-runs``)."""
    import deepspeed

    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    pattern = PATTERNS[pattern_name]
    n = n_local * world
    original = model_layers.sparse_attention
    engine = None
    if attention == "flex":
        model_layers.sparse_attention = _flex_attention_fn(Pattern.from_dict(pattern), n, device)
    elif attention == "sdpa":
        model_layers.sparse_attention = _sdpa_dense
    try:
        torch.manual_seed(0)
        cfg = model_config(args, pattern, "triton" if device.type == "cuda" else "reference", checkpointing, fused)
        with device:
            model = Transformer(cfg)
        if perturbed:
            gen = torch.Generator(device="cpu").manual_seed(perturbed)
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1 + 2.0 ** -9 * torch.randn(p.shape, generator=gen).to(p.device))
        if world > 1:
            from sparse_parallel.model import apply_sequence_parallel
            from sparse_parallel.parallel import SequenceParallel

            apply_sequence_parallel(model, SequenceParallel())
        ds_cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                  "train_batch_size": world, "bf16": {"enabled": device.type == "cuda"}, "gradient_clipping": 1.0,
                  "zero_optimization": {"stage": args.zero},
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
                  "steps_per_print": 1 << 30}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_cfg)
        start = rank * n_local
        batches = batch_source(args, n)
        pos = torch.arange(start, start + n_local, device=device)
        times, losses = [], []
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

        def train_step():
            tokens = batches(len(losses))
            x = tokens[:, start:start + n_local].to(device)
            y = tokens[:, start + 1:start + n_local + 1].to(device)
            total, count = engine(x, y, pos)
            loss = total / (count * world)
            engine.backward(loss * world)
            engine.step()
            losses.append(loss.detach().item() * world)

        for step in range(args.warmup + args.steps):
            sync()
            t0 = time.perf_counter()
            train_step()
            sync()
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
        breakdown = time_breakdown(train_step, device) if args.profile else {}
        step_s = sorted(times)[len(times) // 2]
        useful_flops_tok = model.flops_per_token(n)
        flops_tok = useful_flops_tok if attention != "sdpa" else _dense_flops_per_token(model, n, useful_flops_tok)
        return {"pattern": pattern_name, "attention": attention, "checkpointing": checkpointing, "fused": fused,
                "perturbed": perturbed,
                "gpus": world, "tokens_per_gpu": n_local, "context": n, "step_s": step_s, "tokens_per_s": n / step_s,
                "mfu": useful_flops_tok * n / step_s / world / (PEAK_TFLOPS * 1e12),
                "executed_tflops_per_gpu": flops_tok * n / step_s / world / 1e12,
                "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0,
                "params": model.num_params(), "losses": losses, **breakdown, "status": "ok"}
    finally:
        model_layers.sparse_attention = original
        if engine is not None:  # its gradient hooks live on the parameters and would keep the model alive
            engine.destroy()


def batch_source(args, n: int):
    """``step -> [1, n + 1]`` token ids, the same for every variant of the run: ``random``: one batch of
    uniform random ids (seed 1) at every step, which the model learns by heart; ``stdlib``: step s takes
    the bytes ``s*n .. s*n + n`` of this Python's standard library sources (one token per byte, files in
    :func:`~sparse_parallel.training.data.stdlib_files`' order), a fresh batch of real text each step."""
    if args.data == "random":
        gen = torch.Generator(device="cpu").manual_seed(1)
        tokens = torch.randint(0, args.vocab, (1, n + 1), generator=gen)
        return lambda step: tokens
    from sparse_parallel.training.data import stdlib_files

    steps = args.warmup + args.steps + int(args.profile)
    need = steps * n + 1
    stream = bytearray()
    for f in stdlib_files(need):
        stream += f.read_bytes()
    if len(stream) < need:
        raise ValueError(f"--data stdlib: the standard library holds {len(stream)} bytes, {steps} steps of {n} "
                         f"tokens need {need}")
    ids = torch.frombuffer(stream[:need], dtype=torch.uint8).long()[None]
    return lambda step: ids[:, step * n:step * n + n + 1]


def _dense_flops_per_token(model: Transformer, n: int, useful_flops_tok: float) -> float:
    """Training FLOPs per token of the same model with dense causal attention instead of its patterns."""
    head_dim = model.cfg.dim // model.cfg.n_heads
    sparse = {p: p.describe(n, heads=model.cfg.n_heads, dim=head_dim)["useful_flops_fwd_bwd"]
              for p in {layer.attn.pattern for layer in model.layers}}
    sparse_attn = sum(sparse[layer.attn.pattern] for layer in model.layers) / n
    dense_attn = 3.5 * 4 * model.cfg.n_heads * head_dim * (n + 1) / 2 * len(model.layers)
    return useful_flops_tok - sparse_attn + dense_attn


def loss_agreement(losses: list, first: list, noise: list) -> dict:
    """How a variant's per-step ``losses`` compare with the ``first`` variant's: the largest and the last
    relative difference, and, given the losses of ``noise`` runs (the first variant with perturbed initial
    weights), at how many steps the difference is at most the largest noise run's difference there."""
    steps = min(len(losses), len(first), *(len(n) for n in noise))
    rel = [abs(a - b) / abs(b) for a, b in zip(losses[:steps], first[:steps])]
    out = {"steps": steps, "max_rel": max(rel), "last_rel": rel[-1]}
    if noise:
        band = [max(abs(n[i] - first[i]) for n in noise) for i in range(steps)]
        out["inside"] = sum(abs(losses[i] - first[i]) <= band[i] for i in range(steps))
    return out


def attempt(args, *a) -> dict:
    what = {"pattern": a[0], "attention": a[2], "checkpointing": a[5], "fused": a[6], "tokens_per_gpu": a[1],
            "perturbed": a[7] if len(a) > 7 else 0}
    try:
        return train_steps(args, *a)
    except torch.OutOfMemoryError as e:
        return {**what, "status": "oom", "error": str(e).splitlines()[0]}
    except Exception as e:  # one failing variant must not cost the others their numbers
        import traceback

        traceback.print_exc()
        return {**what, "status": f"error: {e!r}"[:300]}
    finally:
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="131072,1048576", help="tokens per GPU to measure throughput at")
    ap.add_argument("--max-probe", default="1310720,1572864,2097152",
                    help="tokens per GPU to try, longest first, for the longest context that trains")
    ap.add_argument("--patterns", default="main,dilated")
    ap.add_argument("--alternatives", default="sdpa:131072,flex:131072",
                    help="attention:tokens_per_gpu pairs for the alternatives")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--mlp-chunk", type=int, default=65536)
    ap.add_argument("--zero", type=int, default=1)
    ap.add_argument("--offload", action="store_true",
                    help="checkpointed layer inputs in host memory (whole-layer modes: --checkpointing full or keep)")
    ap.add_argument("--checkpointing", default="full",
                    help=f"activation-checkpointing modes to measure, comma-separated: {', '.join(CHECKPOINTING)}, "
                         "each optionally @k for the first k layers only (model.checkpoint_layers; e.g. "
                         "selective@8), and optionally /on or /off for that fused setting alone (e.g. "
                         "full/off,selective/on); the alternatives, other patterns and the probe use the first")
    ap.add_argument("--fused", default="on",
                    help="fused element-wise kernels (model.fused_elementwise) to measure, comma-separated: on, off")
    ap.add_argument("--noise-runs", type=int, default=0, metavar="K",
                    help="after the first variant, run it K more times with its initial weights perturbed by about "
                         "half a bf16 unit (K seeds): the loss differences bf16 rounding alone makes, next to the "
                         "variants'")
    ap.add_argument("--no-profile", dest="profile", action="store_false",
                    help="skip the profiled step and its GPU-time breakdown")
    ap.add_argument("--data", choices=("random", "stdlib"), default="random",
                    help="random: one batch of random tokens every step; stdlib: a fresh batch of text each step "
                         "(the bytes of this Python's standard library sources)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--budget-s", type=float, default=480, help="start no new run after this many seconds")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: a gloo smoke run of the script itself (reference attention, float32)")
    ap.add_argument("--out", default="benchmarks/results/train_scaling.json")
    args = ap.parse_args()
    fused_settings = args.fused.split(",")
    if not fused_settings or any(v not in FUSED for v in fused_settings):
        ap.error(f"--fused takes a comma-separated list of {list(FUSED)}, got {args.fused!r}")
    variants = []  # (checkpointing, fused) in the order given
    for entry in args.checkpointing.split(","):
        mode, _, pinned = entry.partition("/")
        if pinned and pinned not in FUSED:
            ap.error(f"--checkpointing {entry}: the part after / is one of {list(FUSED)}")
        variants += [(mode, f) for f in ([pinned] if pinned else fused_settings)]
    modes = list(dict.fromkeys(mode for mode, _ in variants))
    for mode, f in variants:  # the config's own rules (offload needs whole-layer checkpoints, layer counts)
        try:
            model_config(args, PATTERNS["main"], "reference", mode, f)
        except ValueError as e:
            ap.error(f"--checkpointing {mode}: {e}")
    if args.data == "stdlib" and args.vocab < 256:
        ap.error(f"--data stdlib takes one token per byte (ids 0-255): --vocab must be at least 256, got {args.vocab}")
    if args.device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = []
    t_start = time.perf_counter()
    meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "gpus": world, "torch": torch.__version__,
            "triton": __import__("triton").__version__, "deepspeed": __import__("deepspeed").__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
            "model": {"layers": args.layers, "dim": args.dim, "heads": args.heads, "kv_heads": args.kv_heads,
                      "vocab": args.vocab, "data": args.data, "zero": args.zero, "mlp_chunk": args.mlp_chunk,
                      "offload_activations": args.offload, "checkpointing": modes,
                      "fused": list(dict.fromkeys(f for _, f in variants))}}

    def record(row):
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))

    def time_left() -> bool:
        return time.perf_counter() - t_start < args.budget_s

    # In order of importance, so that a time budget cuts the least important runs.
    lengths = list(map(int, args.lengths.split(",")))
    plan = []
    for n in lengths:
        noise = [("main", n, "ours", *variants[0], seed) for seed in range(2, 2 + args.noise_runs)]
        plan += [("main", n, "ours", *variants[0], 0), *noise] + [("main", n, "ours", *v, 0) for v in variants[1:]]
    plan += [(spec.split(":")[0], int(spec.split(":")[1]), "alt", *variants[0], 0)
             for spec in filter(None, args.alternatives.split(","))]
    plan += [(name, n, "ours", *variants[0], 0) for name in args.patterns.split(",") if name != "main"
             for n in lengths]
    for what, n_local, kind, mode, f, perturbed in plan:
        if not time_left():
            record({"pattern": what, "tokens_per_gpu": n_local, "attention": kind, "checkpointing": mode,
                    "fused": f, "perturbed": perturbed, "status": "skipped (time budget)"})
            continue
        if kind == "alt":
            record(attempt(args, "main", n_local, what, world, rank, mode, f))
        else:
            record(attempt(args, what, n_local, "ours", world, rank, mode, f, perturbed))
        if what == "main" and n_local == max(lengths) and (mode, f) == variants[-1] and not perturbed:
            # Longest context that trains: probe downwards from the longest candidate.
            for probe in sorted((int(x) for x in args.max_probe.split(",") if x), reverse=True):
                if not time_left():
                    break
                row = attempt(args, "main", probe, "ours", world, rank, *variants[0])
                row["probe"] = True
                record(row)
                if row["status"] == "ok":
                    break

    if rank == 0:
        print(f"\n{'pattern':<9}{'attention':<10}{'ckpt':<13}{'fused':<6}{'GPUs':>5}{'tok/GPU':>10}{'step s':>9}"
              f"{'tok/s':>10}{'MFU':>7}{'peak GiB':>10}  status")
        for r in rows:
            ckpt = r.get("checkpointing", "") + ("*" if r.get("perturbed") else "")
            head = f"{r['pattern']:<9}{r['attention']:<10}{ckpt:<13}{r.get('fused', ''):<6}"
            if r["status"] == "ok":
                print(f"{head}{r['gpus']:>5}{r['tokens_per_gpu']:>10}{r['step_s']:>9.2f}{r['tokens_per_s']:>10.0f}"
                      f"{r['mfu']:>7.1%}{r['peak_mem_gib']:>10.1f}  ok")
                if "time_ms" in r:
                    parts = "  ".join(f"{c} {r['time_ms'][c]:.0f} ({r['share'][c]:.0%})" for c in CATEGORIES)
                    print(f"{'':<9}ms of {r['time_of']} in one step: {parts}; busy {r['busy_ms']:.0f}")
                if "idle" in r:
                    idle = r["idle"]
                    cpu = ", ".join(f"{c['name']} {c['ms']:.0f}" for c in idle["cpu_ms"][:5])
                    print(f"{'':<9}GPU idle {idle['idle_ms']:.0f} ms of the profiled step, {idle['stretches']} "
                          f"stretches (longest {idle['longest_ms']:.1f} ms); CPU ms in them: {cpu or '-'}")
                first = next(q for q in rows if q["status"] == "ok" and q["pattern"] == r["pattern"]
                             and q["attention"] == r["attention"] and q["tokens_per_gpu"] == r["tokens_per_gpu"])
                if first is not r:  # same seed, same data: the variants must train alike
                    noise = [q["losses"] for q in rows if q.get("perturbed") and q["status"] == "ok"
                             and q["pattern"] == r["pattern"] and q["tokens_per_gpu"] == r["tokens_per_gpu"]]
                    agree = loss_agreement(r["losses"], first["losses"], [] if r.get("perturbed") else noise)
                    r["agreement"] = {"against": f"{first['checkpointing']}/{first['fused']}", **agree}
                    print(f"{'':<9}losses against {r['agreement']['against']}: max relative difference "
                          f"{agree['max_rel']:.2e} over {agree['steps']} steps (last step {agree['last_rel']:.2e})"
                          + ("; * = initial weights perturbed by ~half a bf16 unit" if r.get("perturbed") else ""))
                    if "inside" in agree:
                        print(f"{'':<9}within the {len(noise)} noise runs' spread at {agree['inside']} of "
                              f"{agree['steps']} steps")
            else:
                print(f"{head}{world:>5}{r['tokens_per_gpu']:>10}{'':>9}{'':>10}{'':>7}{'':>10}  {r['status']}")
        print(f"wall {time.perf_counter() - t_start:.0f} s")
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))  # with the agreements
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
