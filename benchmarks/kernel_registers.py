"""Compile the kernels a pattern launches for Hopper (sm_90a) on a machine without a GPU.

Runs the real launchers on CPU tensors under a stand-in Triton driver whose target is sm_90a: every
launch is compiled (the device's tile configuration, ``core.default_config("cuda")``) and not run.
Prints, per compiled kernel, its constexpr specialisation and ptxas's registers, spill bytes and
shared memory; ``--ptx DIR`` also writes each kernel's PTX (without debug information) and the digest
is of that text, so that two trees can be compared for an unchanged code generation. It checks
compilation and resources only: speed needs the GPU.

    python3 benchmarks/kernel_registers.py --triton /path/to/unpacked/triton-3.6 --ptx /tmp/ptx

``--triton`` puts a Triton (e.g. the version the GPU machine has, unpacked from its wheel) first on
the path; ptxas is the one that Triton ships.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def _code(ptx: str) -> str:
    """The PTX without its debug information (line tables, DWARF sections, their labels), which moves
    with every edit of the source file: equal code gives equal text."""
    ptx = re.split(r"^\s*\.section\s+\.debug", ptx, maxsplit=1, flags=re.M)[0]
    keep = [line for line in ptx.splitlines()
            if not re.match(r"\s*(\.loc|\.file)\b", line) and not re.match(r"\$L__tmp\d+:", line)]
    return "\n".join(keep) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--triton", default="", help="directory holding the triton package to use")
    ap.add_argument("--patterns", default="window,wsg,dilated",
                    help="comma list of: window, wsg (W1024+S64+G128), dilated, random, docs")
    ap.add_argument("--heads", default="16/16,16/4")
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--ptx", default="", help="write each compiled kernel's PTX here")
    ap.add_argument("--json", default="", help="write the rows as JSON here")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=INT",
                    help="override a core.Config field of the CUDA defaults (repeatable), e.g. --set bn_dq=32")
    args = ap.parse_args()
    if args.triton:
        sys.path.insert(0, args.triton)
    sys.path.insert(0, os.path.join(HERE, ".."))
    import torch
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    from sparse_parallel import Documents
    from sparse_parallel.kernels import core
    from sparse_parallel.kernels.function import triton_attention
    from sparse_parallel.patterns import Dilated, Global, RandomBlocks, Strided, Window, as_pattern

    target = GPUTarget("cuda", args.arch, 32)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")

    class CompileOnly:
        """The parts of a driver that the JIT asks for before it compiles."""

        def get_current_target(self):
            return target

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def __getattr__(self, name):
            raise AttributeError(f"the compile-only driver has no {name}")

    driver.set_active(CompileOnly())
    rows, seen = [], set()
    label = {"now": ""}

    def compile_and_skip(key=None, fn=None, compile=None, **kw):
        if key in seen:
            return True
        seen.add(key)
        jit = fn.jit_function
        configs = compile["configs"]
        src = triton.compiler.ASTSource(jit, compile["signature"], compile["constants"],
                                        configs[0] if configs else None)
        options = {k: compile[k] for k in ("num_warps", "num_ctas", "num_stages", "enable_fp_fusion")}
        constexprs = compile["constants"]
        kernel = triton.compile(src, target=target, options=options)
        ptx = kernel.asm["ptx"]
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        res = subprocess.run([ptxas, f"-arch=sm_{args.arch}a", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True)
        os.unlink(f.name)
        info = res.stderr
        regs = re.search(r"Used (\d+) registers", info)
        spill = re.search(r"(\d+) bytes spill stores", info)
        consts = {k[0] if isinstance(k, tuple) and len(k) == 1 else str(k): v for k, v in constexprs.items()
                  if isinstance(v, (int, bool)) and not isinstance(v, type)}
        name = kernel.metadata.name
        code = _code(ptx).replace(name, "KERNEL")
        digest = hashlib.sha1(code.encode()).hexdigest()[:12]
        row = {"case": label["now"], "fn": fn.name, "regs": int(regs.group(1)) if regs else None,
               "spill_bytes": int(spill.group(1)) if spill else None, "shared": kernel.metadata.shared,
               "warps": kernel.metadata.num_warps, "stages": kernel.metadata.num_stages, "ptx_sha1": digest,
               "constexprs": consts}
        rows.append(row)
        if args.ptx:
            os.makedirs(args.ptx, exist_ok=True)
            with open(os.path.join(args.ptx, f"{len(rows):02d}_{row['fn']}.ptx"), "w") as f:
                f.write(code)
        print(f"{label['now']:28s} {row['fn']:16s} regs {row['regs']} spill {row['spill_bytes']} B shared "
              f"{row['shared']} warps {row['warps']} stages {row['stages']} ptx {digest}", flush=True)
        return True  # compiled here; nothing to launch

    knobs.runtime.jit_cache_hook = compile_and_skip
    pats = {
        "window": as_pattern(Window(4096)),
        "wsg": Window(1024) | Strided(64) | Global(first=128, queries=False),
        "dilated": as_pattern(Dilated(window=1024, levels=4)),
        "random": RandomBlocks(block=64, per_query_block=3) | Window(512),
        "docs": (Window(1024) | Strided(64) | Global(first=128, queries=False)).within(
            Documents.from_lengths([[args.n // 3, args.n - args.n // 3]])),
    }
    overrides = {}
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in vars(core.default_config("cuda")) or not value.lstrip("-").isdigit():
            fields = sorted(vars(core.default_config("cuda")))
            raise SystemExit(f"--set {item}: expected FIELD=INT with FIELD one of {fields}")
        overrides[name] = int(value)
    cfg = core.default_config("cuda").replace(sms=132, **overrides)
    for name in args.patterns.split(","):
        for heads in args.heads.split(","):
            hq, hkv = (int(x) for x in heads.split("/"))
            label["now"] = f"{name} {heads}"
            q, k, v = (torch.zeros(1, args.n, h, 128, dtype=torch.bfloat16, requires_grad=True)
                       for h in (hq, hkv, hkv))
            out, lse = triton_attention(q, k, v, pats[name], config=cfg)
            out.backward(torch.zeros_like(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "arch": args.arch, "n": args.n, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
