"""kernels/_build_check.py: every kernel configuration that real code launches, built for sm_90 on CPU.

The interpreter runs a kernel's arithmetic in Python but never Triton's compiler. The build check
records the launches of the step backend, the public launchers, the attention API and the fused
GroupNorm on fake CUDA tensors, lets Triton's launcher specialise them as on a GPU and compiles
them for an H100 target with the wheel's compiler and ptxas (a process with TRITON_INTERPRET=0).
These tests fail when a configuration does not build, spills, needs more shared memory than an
H100 block has, when a step kernel on a multiple-of-16 element count moves less than 16 bytes per
access, or when a kernel of the package is launched by no scenario. They also show that the check
catches the defect it was written for: `do_not_specialize=["numel"]` on the sampling loop's kernel.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import kernels
from kernels import _build_check as B

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not kernels.INTERPRETED and torch.cuda.is_available(),
                                reason="on a GPU every kernel test compiles the kernels for real")


def _env():
    env = dict(os.environ, TRITON_INTERPRET="0")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(args, timeout=900):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("build_check") / "rows.json"
    r = _run(["-m", "kernels._build_check", "--quick", "--jobs", "2", "--json", str(out)])
    assert r.returncode in (0, 1), r.stderr[-3000:]  # 1: some rule failed, reported per row below
    with open(out) as f:
        return json.load(f)["rows"], r.stdout


def test_every_kernel_is_launched_and_builds(quick):
    rows, _ = quick
    launched = {r["kernel"] for r in rows}
    # the package's kernels today; a new one must be reached by a quick scenario (see SCENARIOS)
    assert {"_table_kernel", "_affine_kernel", "_fwd_kernel", "_gn_fwd_kernel", "_gn_bwd_kernel"} <= launched
    broken = [f"{r['scenario']} {r['kernel']}: {p}" for r in rows for p in r["problems"]
              if p.startswith(("does not build", "scenario failed", "no Triton launch")) or "no scenario" in p]
    assert not broken, "\n".join(broken)


def test_no_configuration_spills_or_exceeds_h100_shared_memory(quick):
    rows, table = quick
    built = [r for r in rows if "hash" in r]
    assert len(built) >= 15, table
    assert all(isinstance(r["registers"], int) and 0 < r["registers"] <= 255 for r in built), table
    spills = [f"{r['kernel']} ({r['launch'][:80]}): {r['spill_bytes']} B" for r in built if r["spill_bytes"]]
    assert not spills, "\n".join(spills)
    big = [f"{r['kernel']}: {r['shared_bytes']} B" for r in built if r["shared_bytes"] > B.H100_MAX_SHARED]
    assert not big, "\n".join(big)


def test_step_kernels_move_16_bytes_per_access(quick):
    rows, _ = quick
    ruled = [r for r in rows if r.get("vector_rule")]
    assert {r["kernel"] for r in ruled} == {"_table_kernel", "_affine_kernel"}
    narrow = [f"{r['scenario']} {r['kernel']} [{r['launch'][:90]}]: {p}" for r in ruled for p in r["problems"]]
    table = [r for r in ruled if r["kernel"] == "_table_kernel"]
    assert not any("numel" in r["do_not_specialize"] for r in table), "issue 18: numel must be specialised"
    assert not narrow, "\n".join(narrow)


def test_the_check_catches_an_unspecialised_element_count():
    """The sampling loop's kernel built twice through the same recorder: with `numel` left out
    of specialisation its fp32 accesses are 4 bytes wide and the rule fails; specialised, 16."""
    code = textwrap.dedent("""
        import json, torch
        from triton.runtime.driver import driver
        from triton.runtime.jit import JITFunction
        from kernels import _build_check as B, sampler_step as S
        driver.set_active(B._Sm90Driver())
        sc = next(s for s in B.SCENARIOS if s.name == "step/sample-loop")
        out = {}
        for label, dns in (("unspecialised", ["numel", "step"]), ("specialised", ["step"])):
            S._table_kernel = JITFunction(S._table_kernel.fn, do_not_specialize=dns)
            launches = []
            with B.fake_mode(), B.recording(sc.name, launches):
                B._sampling_loop([(torch.float32, torch.float32)])
            row = B.facts(next(la for la in launches if la.args["NOISE"] == 2), sc)
            out[label] = {"t0": row["accesses"]["t0"], "out_ptr": row["accesses"]["out_ptr"],
                          "problems": row["problems"]}
        print(json.dumps(out))
    """)
    r = _run(["-c", code], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    bad, good = got["unspecialised"], got["specialised"]
    assert set(bad["t0"]["load"]) == {"4"} and set(bad["out_ptr"]["store"]) == {"4"}
    assert any("t0: loads of 4 bytes" in p for p in bad["problems"])
    assert set(good["t0"]["load"]) == {"16"} and set(good["out_ptr"]["store"]) == {"16"}
    assert good["problems"] == []


# --- the PTX reading, on hand-written PTX (no compiler) ----------------------------------------

PTX = """
.global .align 4 .b8 __cudart_i2opi_f[24] = {65, 144};
.visible .entry k(
	.param .u64 .ptr .global .align 1 k_param_0,
	.param .u64 .ptr .global .align 1 k_param_1,
	.param .u32 k_param_2
)
{
	ld.param.u64 	%rd1, [k_param_0];
	ld.param.u64 	%rd2, [k_param_1];
	ld.param.u32 	%r1, [k_param_2];
	mul.wide.s32 	%rd3, %r1, 4;
	add.s64 	%rd4, %rd1, %rd3;
	@%p1 ld.global.v4.b32 { %r2, %r3, %r4, %r5 }, [ %rd4 + 0 ];
	ld.global.b32 { %r6 }, [ %rd2 + 0 ];
	mov.u64 	%rd9, __cudart_i2opi_f;
	ld.global.nc.b32 	%r7, [%rd9];
	add.s64 	%rd5, %rd2, %rd3;
	@%p1 st.global.v2.b16 [ %rd5 + 0 ], { %rs1, %rs2 };
	cp.async.cg.shared.global [ %r8 + 0 ], [ %rd4 + 0 ], 0x10, %r9;
}
"""


def test_access_widths_attributes_each_access_to_its_pointer():
    got = B.access_widths(PTX, ["x", "y", None])
    assert got["x"] == {"load": {16: 2}, "store": {}}  # a v4.b32 load and a 16-byte cp.async
    assert got["y"] == {"load": {4: 1}, "store": {4: 1}}  # a scalar load and a v2.b16 store
    assert set(got) == {"x", "y"}  # the libdevice table and the integer argument name nothing


def test_rules_on_rows():
    row = {"spill_bytes": 8, "shared_bytes": B.H100_MAX_SHARED + 1,
           "accesses": {"t0": {"load": {8: 4}, "store": {}}, "c0": {"load": {4: 4}, "store": {}}},
           "vector_rule": {"bytes": 16, "arguments": ["t0", "out_ptr"]}}
    p = B.problems(row)
    assert len(p) == 3 and "spills 8" in p[0] and "shared memory" in p[1] and p[2].startswith("t0: loads of 8")
    assert B.problems(dict(row, spill_bytes=0, shared_bytes=0, vector_rule=None)) == []
    assert B.step_vector_rule({"numel": 196608}) == 16 and B.step_vector_rule({"numel": 1000 * 3}) is None


def test_fake_backward_reaches_a_custom_backward_with_the_right_gradients():
    """The graph walk that stands in for autograd's engine on fake CUDA tensors, checked on CPU
    against the engine: broadcasting, a dtype change and a non-tensor argument on the way."""
    seen = []

    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, k, w):
            ctx.k = k
            ctx.save_for_backward(w)
            return x * w * k

        @staticmethod
        def backward(ctx, g):
            seen.append((tuple(g.shape), g.dtype))
            (w,) = ctx.saved_tensors
            return g * w * ctx.k, None, None

    x = torch.randn(3, 4, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    w = torch.randn(3, 4, dtype=torch.float64)
    y = Scale.apply((x + b).double(), 2.0, w).float() * 3
    B.fake_backward(y)
    torch.autograd.backward(y, torch.ones_like(y))
    assert seen == [((3, 4), torch.float64)] * 2


@pytest.mark.parametrize("argv,says", [(["--quick"], "TRITON_INTERPRET=0"),  # this process runs the interpreter
                                        (["--scenario", "nope"], "unknown scenario 'nope'"),
                                        (["--jobs", "0"], "--jobs must be >= 1")])
def test_cli_errors_are_one_line(capsys, argv, says):
    assert B.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err


def test_the_unet_launches_are_recorded_from_bench():
    """bench/build_check.py adds the U-Net (kernels must not import wgfcore): its fused training
    step reaches the GroupNorm kernels both ways and the one-tile attention forward and backward."""
    r = _run([os.path.join("bench", "build_check.py"), "--list", "--scenario", "unet/tiny-train"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    kernels_seen = {line.split()[1].rstrip(":") for line in r.stdout.splitlines() if line.startswith("unet/")}
    assert {"_gn_fwd_kernel", "_gn_bwd_kernel", "_fwd_kernel", "_bwd_one_block_kernel"} <= kernels_seen
