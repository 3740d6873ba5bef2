"""Compile the Triton kernels for an H100 (sm_90) without a GPU, with the wheel's own ptxas.

The interpreter that runs the other kernel tests has no register limits and lets through what
a GPU compiler rejects, so this test compiles, ahead of time, exactly the launches the GPU
launchers make at the MNIST shapes (PrimaryCaps squash: [128, 1152, 8]; DigitCaps routing:
u_hat [128, 1152, 10, 16], 3 iterations, backward under both gradient policies, "last" with its
squash backward of ds^(r); the split variant at B = 32, 128 and 512, whose chunking depends
on the batch; the fused DigitCaps layer capsule_linear: u [128, 1152, 8], W [1152, 10, 16, 8],
the same iterations and policies, the forward keeping the couplings each policy's backward
reads, and its split variant at B = 32, 128 and 512, and backward kernel B at the other launches
the kernels stage times), in float32, bfloat16 and float64, and reads each binary's
registers and local-memory use (spills) with the bundled cuobjdump, and its shared memory.

Each launch is compiled twice: by the Triton installed here, and by the Triton of the GPU
machines' image (3.6.0; one H200's, docs/PERF.md), whose compiler makes other code (other
register counts, other spills) from the same kernels. ./setup.sh puts a copy of that Triton in
.venv/triton-gpu-image for this test alone; where the installed Triton is the image's, the
second compile would repeat the first and is skipped, as it is (saying so) where the copy is
missing.

Compiling needs a process without TRITON_INTERPRET (this test session has it set), so the test
runs this file as a script in a subprocess: the script calls the real launchers with their
kernels replaced by recorders, then compiles every recorded launch with the launch's own block
sizes, num_warps and argument specialization (ints equal to 1 become constants, pointers and
multiples of 16 are marked 16-divisible, as Triton's JIT does, but for do_not_specialize
arguments).

docs/KERNELS.md tabulates every launch's registers, stack, shared memory and CTAs per SM, one
section per Triton version; the test fails while the section of the Triton it compiled with
differs from the compile, and warns where that Triton has no section. `python tests/test_kernels_compile.py --table` prints the section.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import warnings

import pytest

BATCH, INPUTS, PARENTS, DIMS, PRIMARY_DIMS, ITERATIONS = 128, 1152, 10, 16, 8, 3
SPLIT_BATCHES = (32, 128, 512)
# A spill inside a loop over I is what costs: a spilled tile is at least 64 B a thread (the
# smallest routing tile is 16 fp32 or 8 fp64 values per thread) stored and reloaded per tile. So
# no kernel may touch local memory inside an innermost loop of its SASS (the loops over I), and
# its local memory and stack frame stay under one tile. Outside those loops ptxas may park a few
# loop-invariant scalars (Triton 3.6 caps the backward kernels A at 128 registers: 8-40 B, stored
# before the loops and reloaded once per routing iteration, read off the SASS): free.
SPILL_LIMIT_BYTES = 64
COMPILED_DTYPES = ("float32", "bfloat16", "float64")
_TORCH_TO_TRITON = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}


# The Triton of the GPU machines' image, and where ./setup.sh installs a copy of it beside the
# venv's own (a folder put first on PYTHONPATH for the compiling subprocess).
GPU_IMAGE_TRITON = "3.6.0"
GPU_IMAGE_TRITON_DIR = os.path.join(sys.prefix, "triton-gpu-image")


def _compiler_environment(triton_build):
    """The subprocess's environment for the "installed" Triton or the "gpu-image" one, and the
    version it must report; skips where the image's would repeat the installed one or is missing."""
    import triton

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if triton_build == "installed":
        return env, triton.__version__
    if triton.__version__ == GPU_IMAGE_TRITON:
        pytest.skip(f"the installed Triton is the GPU machine's ({GPU_IMAGE_TRITON}): compiled once, as installed")
    if not os.path.isdir(os.path.join(GPU_IMAGE_TRITON_DIR, "triton")):
        pytest.skip(f"no copy of the GPU machine's Triton {GPU_IMAGE_TRITON} in {GPU_IMAGE_TRITON_DIR}: "
                    f"./setup.sh installs it")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (GPU_IMAGE_TRITON_DIR, env.get("PYTHONPATH"))))
    return env, GPU_IMAGE_TRITON


@pytest.mark.parametrize("triton_build", ["installed", "gpu-image"])
@pytest.mark.parametrize("dtype", COMPILED_DTYPES)
def test_kernels_compile_for_h100_without_spills(dtype, triton_build):
    env, version = _compiler_environment(triton_build)
    proc = subprocess.run([sys.executable, __file__, dtype], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"compiling for sm_90 failed:\n{proc.stdout}\n{proc.stderr}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["triton"] == version
    results = report["launches"]
    kernels = {r["kernel"] for r in results}
    assert kernels == {"squash._squash_forward_kernel", "squash._squash_backward_kernel",
                       "routing._routing_forward_kernel", "routing._routing_backward_ds_all_kernel",
                       "routing._routing_backward_u_hat_kernel",
                       "routing_split.split_forward_kernel", "routing_split.split_backward_ds_all_kernel",
                       "capsule_linear._capsule_linear_forward_kernel",
                       "capsule_linear._capsule_linear_backward_ds_all_kernel",
                       "capsule_linear_weight.backward_weight_kernel",
                       "capsule_linear_split.split_forward_kernel",
                       "capsule_linear_split.split_backward_ds_all_kernel"}
    for r in results:
        print(f"{version:6s} {dtype:9s} {r['kernel']:53s} {r['config']}: {r['registers']} registers, "
              f"{r['local_bytes']} B local, {r['stack_bytes']} B stack, {r['shared_bytes']} B shared, "
              f"{ctas_per_sm(r)} CTAs/SM")
    spilling = [r for r in results
                if r["inner_loop_local_accesses"] or r["local_bytes"] + r["stack_bytes"] >= SPILL_LIMIT_BYTES]
    assert not spilling, f"kernels that spill to local memory on sm_90: {spilling}"
    assert all(0 < r["registers"] <= 255 for r in results)
    # Float32 inputs keep SPEC 8's float32 accuracy: no product may run in TF32 (the tl.dot of the
    # fused backward's kernel B asks for IEEE; the interpreter ignores input_precision).
    assert not [r for r in results if r["tf32"]], "kernels whose PTX computes in TF32"
    documented = _documented_rows(version)
    if documented is None:                     # CI takes the newest Triton: not a failure, but said
        warnings.warn(f"{RESOURCE_TABLE} has no section for Triton {version}: add one with "
                      f"`python {os.path.relpath(__file__)} --table`")
    else:
        rows = set(_table_rows(results, dtype))
        assert rows == {row for row in documented if f"| {dtype} |" in row}, (
            f"{RESOURCE_TABLE} differs from the compile under Triton {version} in {dtype}: regenerate its "
            f"section with `python {os.path.relpath(__file__)} --table`" +
            (f" (PYTHONPATH={GPU_IMAGE_TRITON_DIR})" if triton_build == "gpu-image" else "") +
            f"\ncompiled, not documented: {sorted(rows - documented)}")


RESOURCE_TABLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "KERNELS.md")


def _table_rows(results, dtype):
    """The Markdown rows of docs/KERNELS.md for one dtype's launches (identical rows once)."""
    rows = []
    for r in results:
        constants = ", ".join(f"{k} {v}" for k, v in r["config"].items() if k not in ("COMPUTE_DTYPE", "num_warps"))
        row = (f"| `{r['kernel']}` | {dtype} | {constants} | {r['config']['num_warps']} | {r['registers']} | "
               f"{r['stack_bytes']} | {r['shared_bytes'] / 1024:.1f} | {ctas_per_sm(r)} |")
        if row not in rows:
            rows.append(row)
    return rows


def _documented_rows(version):
    """The rows of docs/KERNELS.md's section "### Triton <version>", or None where it has none."""
    with open(RESOURCE_TABLE) as f:
        sections = f.read().split("\n### ")
    for section in sections:
        if section.startswith(f"Triton {version}"):
            return {line for line in section.splitlines() if line.startswith("| `")}
    return None


def _print_table():
    """docs/KERNELS.md's section for the Triton this process imports: every launch, every dtype."""
    import triton

    print(f"### Triton {triton.__version__}\n")
    print("| kernel | dtype | constants | warps | registers | stack B | shared KB | CTAs/SM |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for dtype in COMPILED_DTYPES:
        proc = subprocess.run([sys.executable, __file__, dtype], capture_output=True, text=True, check=True)
        print("\n".join(_table_rows(json.loads(proc.stdout.strip().splitlines()[-1])["launches"], dtype)))


def test_local_memory_is_found_inside_innermost_loops_only():
    """The SASS reading behind the spill check: an outer loop (over routing iterations) holding two
    inner loops (over I); a reload between the inner loops is free, one inside an inner loop is not."""
    sass = """
        /*0100*/                   STL [R1], R0 ;
        /*0200*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0300*/                   LDL R4, [R1] ;
        /*0400*/              @P0 BRA 0x200 ;
        /*0500*/                   LDL R5, [R1+0x4] ;
        /*0600*/                   FFMA R6, R6, R7, R8 ;
        /*0700*/              @P1 BRA 0x600 ;
        /*0800*/              @P2 BRA 0x200 ;
        /*0900*/                   EXIT ;
    """
    assert _inner_loop_local_accesses(sass) == 1
    assert _inner_loop_local_accesses(sass.replace("LDL R4, [R1]", "NOP")) == 0


def ctas_per_sm(usage):
    """CTAs one sm_90 SM can hold for this register, shared-memory and warp use: 64K registers
    (allocated per warp in units of 256), 228 KB of shared memory (1 KB reserved per CTA),
    64 warps, 32 CTAs."""
    warps = usage["config"]["num_warps"]
    per_warp = -(-usage["registers"] * 32 // 256) * 256
    by_registers = 65536 // (per_warp * warps)
    by_shared = 233472 // (usage["shared_bytes"] + 1024)
    return min(by_registers, by_shared, 64 // warps, 32)


# The subprocess side: record the launches, compile them, report resource usage as JSON.


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` records the launch."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


def _specialize(kernel, args, kwargs):
    """(signature, constexprs, attrs, options) of one launch, as Triton's JIT would derive them."""
    import torch

    options = {k: kwargs.pop(k) for k in ("num_warps", "enable_fp_fusion") if k in kwargs}
    values = dict(zip(kernel.arg_names, args), **kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(kernel.params):
        name = param.name
        value = values[name]
        if name in kwargs:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TORCH_TO_TRITON[str(value.dtype).removeprefix("torch.")]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif value == 1 and not param.do_not_specialize:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0 and not param.do_not_specialize:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs, options


def _resource_usage(cubin):
    """(registers, local bytes, stack bytes, local-memory instructions inside innermost loops)."""
    import triton

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        report, sass = (subprocess.run([triton.knobs.nvidia.cuobjdump.path, flag, path],
                                       capture_output=True, text=True, check=True).stdout
                        for flag in ("-res-usage", "-sass"))
    usage = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", report))
    return int(usage["REG"]), int(usage["LOCAL"]), int(usage["STACK"]), _inner_loop_local_accesses(sass)


def _inner_loop_local_accesses(sass):
    """How many local-memory loads and stores (LDL, STL) lie inside an innermost loop: a loop is
    a branch back to a lower address, innermost when it holds no other loop."""
    instructions = [(int(address, 16), text) for address, text in
                    re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = [(int(target, 16), address) for address, text in instructions
             for target in re.findall(r"\bBRA\b.*?0x([0-9a-f]+)", text) if int(target, 16) < address]
    innermost = [(a, b) for a, b in loops
                 if not any((c, d) != (a, b) and a <= c and d <= b for c, d in loops)]
    return sum(1 for address, text in instructions if re.search(r"\b(LDL|STL)\b", text)
               and any(a <= address <= b for a, b in innermost))


def _compile_mnist_launches(dtype_name):
    import torch
    import triton
    from triton.backends.compiler import GPUTarget

    from capsnet_triton.bench.kernels import BACKWARD_CONFIGS
    from capsnet_triton.kernels import (capsule_linear, capsule_linear_split, capsule_linear_weight, routing,
                                        routing_split, squash)

    dtype = getattr(torch, dtype_name)
    launches = []
    for module, names in ((squash, ("_squash_forward_kernel", "_squash_backward_kernel")),
                          (routing, ("_routing_forward_kernel", "_routing_backward_ds_all_kernel",
                                     "_routing_backward_u_hat_kernel")),
                          (routing_split, ("split_forward_kernel", "split_backward_ds_all_kernel")),
                          (capsule_linear, ("_capsule_linear_forward_kernel",
                                            "_capsule_linear_backward_ds_all_kernel")),
                          (capsule_linear_weight, ("backward_weight_kernel",)),
                          (capsule_linear_split, ("split_forward_kernel", "split_backward_ds_all_kernel"))):
        for name in names:
            setattr(module, name, _Recorder(getattr(module, name), launches))

    # Only shapes, dtypes and strides matter: the recorders launch nothing.
    s = torch.empty(BATCH, INPUTS, PRIMARY_DIMS, dtype=dtype)
    squash.squash_forward(s)
    squash.squash_backward(torch.empty_like(s), s)
    u_hat = torch.empty(BATCH, INPUTS, PARENTS, DIMS, dtype=dtype)
    _, s_all, couplings = routing.routing_forward(u_hat, ITERATIONS, variant="sample")
    dv = torch.empty(BATCH, PARENTS, DIMS, dtype=dtype)
    routing.routing_backward(dv, u_hat, s_all, couplings, gradient="full", variant="sample")
    # Under "last" the forwards keep from another iteration (first_kept), another specialization.
    for variant in ("sample", "split"):
        _, s_all, couplings = routing.routing_forward(u_hat, ITERATIONS, gradient="last", variant=variant)
    routing.routing_backward(dv, u_hat, s_all, couplings, gradient="last")
    for batch in SPLIT_BATCHES:
        u_hat = torch.empty(batch, INPUTS, PARENTS, DIMS, dtype=dtype)
        _, s_all, couplings = routing.routing_forward(u_hat, ITERATIONS, variant="split")
        dv = torch.empty(batch, PARENTS, DIMS, dtype=dtype)
        routing.routing_backward(dv, u_hat, s_all, couplings, gradient="full", variant="split")
    weight = torch.empty(INPUTS, PARENTS, DIMS, PRIMARY_DIMS, dtype=dtype)
    dv = torch.empty(BATCH, PARENTS, DIMS, dtype=dtype)
    _, s_all, couplings = capsule_linear.capsule_linear_forward(s, weight, ITERATIONS, variant="sample")
    capsule_linear.capsule_linear_backward(dv, s, weight, s_all, couplings, gradient="full", variant="sample")
    # Under "last" the forwards keep from another iteration (first_kept), another specialization.
    for variant in ("sample", "split"):
        _, s_all, couplings = capsule_linear.capsule_linear_forward(s, weight, ITERATIONS, gradient="last",
                                                                    variant=variant)
    capsule_linear.capsule_linear_backward(dv, s, weight, s_all, couplings, gradient="last")
    for batch in SPLIT_BATCHES:
        u = torch.empty(batch, INPUTS, PRIMARY_DIMS, dtype=dtype)
        _, s_all, couplings = capsule_linear.capsule_linear_forward(u, weight, ITERATIONS, variant="split")
        dv = torch.empty(batch, PARENTS, DIMS, dtype=dtype)
        capsule_linear.capsule_linear_backward(dv, u, weight, s_all, couplings, gradient="full", variant="split")
    # The kernels stage (python -m capsnet_triton.bench.kernels) times backward kernel B at other
    # launches too: a GPU run must not time a spilling one.
    for _, config in BACKWARD_CONFIGS:
        if "weight_launch" in config:
            capsule_linear.capsule_linear_backward(dv, u, weight, s_all, couplings, **config)

    results, seen = [], set()
    for kernel, args, kwargs in launches:
        signature, constexprs, attrs, options = _specialize(kernel, args, dict(kwargs))
        name = f"{kernel.__module__.rsplit('.', 1)[-1]}.{kernel.__name__}"
        key = (name, repr(signature), repr(constexprs), repr(attrs), repr(options))
        if key in seen:  # compile each distinct launch once
            continue
        seen.add(key)
        source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        registers, local_bytes, stack_bytes, inner_loop_local = _resource_usage(compiled.asm["cubin"])
        config = {k: str(v) for k, v in constexprs.items() if k.isupper()}
        config["num_warps"] = options["num_warps"]
        results.append(dict(kernel=name, config=config, registers=registers,
                            local_bytes=local_bytes, stack_bytes=stack_bytes,
                            inner_loop_local_accesses=inner_loop_local,
                            shared_bytes=compiled.metadata.shared,
                            tf32=bool(re.search(r"\btf32\b", compiled.asm["ptx"]))))
    print(json.dumps(dict(triton=triton.__version__, launches=results)))


if __name__ == "__main__":
    from capsnet_triton.checks import interpreting
    if interpreting():
        sys.exit(f"compiling for a GPU needs a process without TRITON_INTERPRET={os.environ['TRITON_INTERPRET']}")
    if sys.argv[1] == "--table":
        _print_table()
    else:
        _compile_mnist_launches(sys.argv[1])
