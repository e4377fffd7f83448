"""``fastbert bench``: the command runs end to end at toy sizes and writes reports with the
promised fields; op suites are discovered, and missing or failing ones are named; the
FLOP arithmetic matches GPU.md's. Numbers themselves are not checked (they are timings)."""

import json
import os
import re
import subprocess
import sys
import types

import pytest
import torch

import fastbert
import fastbert.cli
from fastbert.benchmarks import bench_model, cli, report
from fastbert.benchmarks.common import Measurement
from fastbert.benchmarks.workloads import BASE, WORKLOADS, model_flops, random_inputs, tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEASUREMENT_KEYS = {"suite", "name", "case", "impl", "mode", "ms", "gbps", "tflops", "extra"}
PARITY_KEYS = {"parity_of", "max_abs_diff_vs_hf", "max_err_vs_fp32", "hf_eager_err_vs_fp32", "parity_ok"}


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One real run of the command in a subprocess, as a user would start it."""
    out = tmp_path_factory.mktemp("bench")
    workloads = "base-b32-s512-varlen,train-base-b32-s128,minilm-b64"
    cmd = [sys.executable, "-m", "fastbert", "bench", "--tiny", "--quick", "--no-compile", "--ops", "layernorm",
           "--workloads", workloads, "--out", str(out)]
    env = dict(os.environ, TQDM_DISABLE="1")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(os.listdir(out))
    stems = {os.path.splitext(f)[0] for f in files}
    assert len(stems) == 1, files
    return out, stems.pop(), proc.stdout


def test_bench_writes_json_markdown_and_chart(bench_run):
    out, stem, stdout = bench_run
    slug = "cpu" if not torch.cuda.is_available() else r"[a-z0-9-]+"
    assert re.fullmatch(rf"bench-{slug}-\d{{4}}-\d\d-\d\d-[0-9a-f]{{4,}}(-dirty)?|bench-{slug}-\d{{4}}-\d\d-\d\d-unknown", stem)
    for ext in ("json", "md", "png"):
        assert os.path.getsize(out / f"{stem}.{ext}") > 0
    with open(out / f"{stem}.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "fastbert" in stdout and "wrote" in stdout  # the plain table and the paths


def test_bench_json_fields(bench_run):
    out, stem, _ = bench_run
    with open(out / f"{stem}.json", encoding="utf-8") as f:
        data = json.load(f)
    meta = data["meta"]
    assert data["status"] == "complete"
    assert meta["device"] and meta["commit"] and meta["date"]
    assert meta["command"].startswith("fastbert bench") and "--tiny" in meta["command"]
    assert {"torch", "triton", "cuda", "transformers", "python"} <= set(meta["versions"])
    assert meta["versions"]["torch"] == torch.__version__
    assert set(meta["ops"]) == set(fastbert.ops.OPS) == set(meta["ops_on_device"])
    assert meta["ops_on_device"]["linear_gelu"] == "composed (F.linear, then bias_gelu)"  # what "auto" runs
    if not torch.cuda.is_available():
        assert meta["device"].startswith("CPU")
        assert any("needs a CUDA GPU" in n for n in data["notes"])  # layernorm was asked for on a CPU
    assert data["ceilings"] and data["ceilings"]["n"] > 0

    model = [m for m in data["measurements"] if m["suite"] == "model"]
    for m in model:
        assert set(m) == MEASUREMENT_KEYS
        assert m["ms"] > 0 and m["tflops"] > 0
        assert PARITY_KEYS <= set(m["extra"]), m
    by_workload = {}
    for m in model:
        by_workload.setdefault(m["extra"]["workload"], set()).add(m["impl"])
    assert {"fastbert", "fastbert-padded", "hf-eager", "hf-sdpa", "native"} <= by_workload["base-b32-s512-varlen"]
    assert by_workload["train-base-b32-s128"] == {"fastbert", "hf-eager", "hf-sdpa"}
    if bench_model.C.minilm_path() is not None:
        assert "fastbert" in by_workload["minilm-b64"]
    for m in model:  # fastbert agrees with Hugging Face on every workload it ran
        if m["impl"].startswith("fastbert"):
            assert m["extra"]["parity_ok"], m
    native = [m for m in model if m["impl"] == "native"]
    assert native and all(m["extra"]["fast_path"] and m["extra"]["nested_tensors"] for m in native)

    pairs = {(s["name"], s["vs"]) for s in data["speedups"]}
    varlen = next(m["name"] for m in model if m["extra"]["workload"] == "base-b32-s512-varlen")
    assert (varlen, "fastbert-padded") in pairs and (varlen, "hf-eager") in pairs
    for s in data["speedups"]:
        assert s["speedup"] == pytest.approx(s["other_ms"] / s["fastbert_ms"])


def test_bench_markdown_has_the_tables(bench_run):
    out, stem, _ = bench_run
    text = (out / f"{stem}.md").read_text(encoding="utf-8")
    assert "## Model" in text and "parity ok" in text and "max abs diff vs HF eager" in text
    assert f"![speed-ups]({stem}.png)" in text
    if not torch.cuda.is_available():
        assert "CPU run" in text


def _fake_bench(name, run):
    module = types.ModuleType(name)
    module.run = run
    return module


def test_op_suites_are_discovered_and_failures_named(monkeypatch):
    """A present suite is run; a missing, a broken and a failing one become notes."""
    mod = "fastbert.benchmarks.bench_embedding"

    def good(quick, dtype, device):
        assert quick is True and dtype is torch.float32 and device == "cpu"
        return [Measurement("op", "embedding", "3x37x96 fp32", impl, "fwd", ms) for impl, ms in (("fastbert", 1.0), ("eager", 3.0))]

    labels = []
    monkeypatch.setitem(sys.modules, mod, _fake_bench(mod, good))
    notes = []
    got = cli.run_ops(["embedding", "attention"], True, torch.float32, "cpu", notes, labels.append)
    assert [m.impl for m in got] == ["fastbert", "eager"]
    assert labels == ["op embedding", "op attention"]
    assert len(notes) == 1 and "attention" in notes[0] and "needs a CUDA GPU" in notes[0]
    speedups = report.speedups([m.as_dict() for m in got])
    assert [(s["vs"], s["speedup"]) for s in speedups] == [("eager", 3.0)]

    def broken(quick, dtype, device):
        raise RuntimeError("kernel exploded")
    monkeypatch.setitem(sys.modules, mod, _fake_bench(mod, broken))
    notes = []
    assert cli.run_ops(["embedding"], True, torch.float32, "cpu", notes, labels.append) == []
    assert notes and "failed" in notes[0] and "kernel exploded" in notes[0]

    monkeypatch.setitem(sys.modules, mod, None)  # the module cannot be imported
    notes = []
    assert cli.run_ops(["embedding"], True, torch.float32, "cpu", notes, labels.append) == []
    assert notes and "skipped" in notes[0] and mod in notes[0]


def test_stems_follow_the_op_registry():
    assert cli.op_stems() == {"embedding": "embedding", "layernorm": "add_layernorm", "gelu": "bias_gelu",
                              "linear_gelu": "linear_gelu", "softmax": "softmax_mask", "attention": "attention"}


@pytest.mark.parametrize("argv, message", [
    (["--ops", "layernorm,nope"], "unknown op"),
    (["--workloads", "nope"], "unknown workload"),
    (["--impls", "nope"], "unknown competitor"),
])
def test_bad_arguments_are_refused(argv, message, capsys, tmp_path):
    rc = fastbert.cli.main(["bench", "--tiny", "--out", str(tmp_path)] + argv)
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_model_flops_match_gpu_md():
    """GPU.md: a BERT-base forward at B=32, S=128 is about 715 GFLOP."""
    flops = model_flops(BASE, [128] * 32)
    assert flops == pytest.approx(715e9, rel=0.01)
    assert model_flops(BASE, [128] * 16 + [0] * 16) == pytest.approx(flops / 2, rel=1e-6)  # padding is not useful work
    train = model_flops(dict(BASE), [128] * 32, train=True)
    assert train > 3 * flops  # fwd+bwd, plus the vocabulary decoder


def test_varlen_inputs_are_right_padded_and_seeded():
    w = tiny(WORKLOADS["base-b32-s512-varlen"])
    a, b = random_inputs(w, 997, "cpu"), random_inputs(w, 997, "cpu")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
    mask, ids = a["attention_mask"], a["input_ids"]
    lengths = mask.sum(1)
    lo, hi = w.lengths
    assert ((lengths >= lo) & (lengths <= hi)).all()
    assert torch.equal(mask, (torch.arange(w.seqlen)[None] < lengths[:, None]).long())
    assert (ids[mask.bool()] > 0).all() and (ids[~mask.bool()] == 0).all()


def test_device_slugs():
    assert report.device_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert report.device_slug("NVIDIA H200") == "h200"
    assert report.device_slug("NVIDIA A100-SXM4-80GB") == "a100"
    assert report.device_slug("CPU: AMD EPYC (2 threads)") == "cpu"


def test_time_limit_leaves_the_rest_named():
    """Past the deadline no pair starts; each is reported as not run, none silently dropped."""
    seen = []
    suite = bench_model.run_suite(True, torch.float32, "cpu", ["base-b1-s128", "train-base-b32-s128"], tiny_sizes=True,
                                  compile_=False, deadline=0.0, on_result=lambda m, label: seen.append((m, label)))
    assert suite.measurements == []
    expected = bench_model.count_pairs(True, "cpu", ["base-b1-s128", "train-base-b32-s128"], tiny_sizes=True, compile_=False)
    assert len(seen) == expected > 0 and all(m is None for m, _ in seen)
    assert sum("time limit" in n for n in suite.notes) == expected


def test_pretrain_flops_match_the_step_formula():
    """With every token masked and equal lengths, the run's FLOPs are the training step's."""
    from fastbert.benchmarks.bench_pretrain import pretrain_flops
    records = [{"tokens": 32 * 100, "sequences": 32, "masked": 32 * 100}] * 3
    assert pretrain_flops(BASE, records) == pytest.approx(3 * model_flops(BASE, [100] * 32, train=True), rel=1e-12)
    fewer = [{"tokens": 3200, "sequences": 32, "masked": 480}]
    assert pretrain_flops(BASE, fewer) < pretrain_flops(BASE, records[:1])  # the vocabulary only on masked tokens


def test_pretraining_run_of_both_models():
    """The real loop, tiny: tokens/s and losses for fastbert and HF, from the same weights,
    which the run does not change for the other workloads."""
    from fastbert.benchmarks import bench_pretrain, competitors
    w = tiny(WORKLOADS["pretrain-base-b32-s128"])
    cache = competitors.ModelCache("cpu")
    before = {k: v.clone() for k, v in cache.get(w, "fastbert", torch.float32).state_dict().items()}
    runs = {impl: bench_pretrain.measure(w, impl, "cpu", True, cache) for impl in competitors.PRETRAIN_IMPLS}
    for impl, m in runs.items():
        e = m.extra
        assert m.mode == "train" and m.ms > 0 and m.tflops > 0, impl
        assert e["steps"] == 6 and e["steps_timed"] == 4 and e["tokens_per_s"] > 0
        assert 0 < e["real_tokens_per_step"] <= w.batch * w.seqlen and 0 < e["masked_per_step"] < e["real_tokens_per_step"]
        assert 0 < e["loss_last"] < 20 and e["loss_first"] == pytest.approx(runs["fastbert"].extra["loss_first"], rel=0.05)
    assert runs["fastbert"].case == runs["hf-sdpa"].case  # the report pairs them for the speed-up
    after = cache.get(w, "fastbert", torch.float32).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_tune_script_runs_every_case(tmp_path, capsys):
    """The launch-config sweep at toy sizes (interpreter): every candidate runs, agrees with
    the reference, and the shipped config is among those timed."""
    from fastbert.benchmarks import tune
    assert tune.main(["--tiny", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.iterdir()
    rows = json.loads(path.read_text())["rows"]
    cases = {(r["op"], r["shape"]) for r in rows}
    assert {op for op, _ in cases} == {"attention fwd", "attention bwd", "bias_gelu fwd", "bias_gelu bwd",
                                       "add_layernorm fwd", "add_layernorm bwd", "softmax_mask fwd", "linear_gelu fwd",
                                       "linear_gelu few rows fwd"}
    assert all("error" not in r and r["rel_err"] < 1e-5 and r["us"] > 0 for r in rows), rows
    for case in cases:
        assert sum(r["shipped"] for r in rows if (r["op"], r["shape"]) == case) == 1, case
    assert "* = the shipped config" in capsys.readouterr().out
    assert {shape for op, shape in cases if op == "attention bwd"} == {"B=2 S=24 no mask", "B=3 S=16 padding mask"}


def test_tune_script_runs_only_the_cases_asked_for(tmp_path):
    from fastbert.benchmarks import tune
    assert tune.main(["--tiny", "--ops", "attention,rows", "--cases", "attention bwd, add_layernorm bwd",
                      "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.iterdir()
    assert {r["op"] for r in json.loads(path.read_text())["rows"]} == {"attention bwd", "add_layernorm bwd"}


def test_sass_summary_shows_wide_loads_and_warpgroup_mma():
    """Compiled for sm_90 without a GPU: the row kernels (both directions) load and store 16
    bytes per access at their BERT configs, the attention's (both directions) and the fused
    GEMM's products are warpgroup MMAs (HGMMA), the GEMM's TMA variant loads by TMA (UTMALDG,
    no cp.async), and no kernel spills registers to local memory
    at its shipped config (add_layernorm's backward with dropout, the attention backward's
    32/128 candidates and add_layernorm's 4096-element 4-warp tiles would)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastbert.benchmarks.sass"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode == 2 and "cannot compile for sm_90" in proc.stderr:
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("  ")[0]: line for line in proc.stdout.splitlines()}
    row_kernels = [name for name in rows if name.startswith(("add_layernorm", "bias_gelu", "softmax_mask"))]
    assert len(row_kernels) == 5
    for name in row_kernels:
        assert "LDG.E.128" in rows[name] and "STG.E.128" in rows[name], rows[name]
    assert "HGMMA" in rows["attention fwd D=64 (BM=64 BN=64)"], rows
    assert "HGMMA" in rows["linear_gelu fwd 4096x768->3072 (128x128x64)"], rows
    (bwd,) = [row for name, row in rows.items() if name.startswith("attention bwd D=64")]
    assert "HGMMA" in bwd, bwd
    tma = [row for name, row in rows.items() if name.startswith("linear_gelu fwd TMA")]
    assert len(tma) == 2 and all("HGMMA" in row and "UTMALDG" in row and "LDGSTS" not in row for row in tma), tma
    assert len(rows) == 10
    for name, row in rows.items():
        assert "stack 0 B" in row and "'STL'" not in row and "'LDL'" not in row, row


def test_configs_compile_and_fit_on_other_gpus():
    """benchmarks/arch_check.py: every launch the ops make, with the config they pick on an
    A10 (sm_86, 99 KB of shared memory per block) and an A100 (sm_80, 163 KB), compiles for that
    architecture and needs no more shared memory than the GPU has."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastbert.benchmarks.arch_check", "--gpus", "a10,a100", "--quick"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode == 2 and "cannot compile here" in proc.stderr:
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("\n0 failed"), proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = [line.split() for line in proc.stdout.splitlines()[1:-1]]
    assert {r[0] for r in rows} == {"a10", "a100"}
    kernels = {r[1] for r in rows}
    assert {"_attn_fwd", "_attn_bwd", "_attn_bwd_delta", "_add_layernorm_fwd", "_add_layernorm_bwd", "_sum_partials",
            "_bias_gelu_fwd", "_bias_gelu_bwd", "_softmax_mask_fwd", "_softmax_mask_bwd", "_linear_gelu_fwd"} <= kernels
    assert all(r[-1] == "ok" for r in rows)


def test_launch_spec_reads_types_and_specialisations():
    """arch_check's view of a launch: pointer types from the tensors, None and constexpr
    parameters as constexprs, multiples of 16 specialised unless do_not_specialize."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction  # not triton.jit: the tests run under TRITON_INTERPRET

    from fastbert.benchmarks import arch_check

    def body(x, y, n, m, scale, maybe, BLOCK: tl.constexpr):
        pass

    kernel = JITFunction(body, do_not_specialize=["m"])
    spec = arch_check._launch_spec(kernel, (torch.empty(4, dtype=torch.float16), torch.empty(4, dtype=torch.int64), 32, 48,
                                            0.5, None), {"BLOCK": 64, "num_warps": 8})
    assert spec.signature == {"x": "*fp16", "y": "*i64", "n": "i32", "m": "i32", "scale": "fp32"}
    assert spec.constexprs == {"maybe": None, "BLOCK": 64}
    assert spec.divisible == ("x", "y", "n") and (spec.num_warps, spec.num_stages) == (8, 3)
    fits = arch_check.Result("a10", "kernel", "fp16", "", 101376, 101376, 64, 0, "")
    assert fits.ok and not fits._replace(shared=101377).ok and not fits._replace(error="CompilationError: x").ok


def test_host_cost_script_prints_every_op(capsys):
    """benchmarks/host.py: one row per op and implementation, positive times, and the
    profile of each fastbert forward and backward when asked."""
    from fastbert.benchmarks import host
    host.main(["--calls", "2", "--profile", "--model", "--model-calls", "1"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0] in
            ("identity", "add_layernorm", "bias_gelu", "softmax_mask", "attention")]
    assert [r[:2] for r in rows] == [["identity", "fastbert"]] + [[op, impl] for op in
                                     ("add_layernorm", "bias_gelu", "softmax_mask", "attention")
                                     for impl in ("fastbert", "eager")], out
    assert all(float(v) > 0 for r in rows for v in r[2:]), rows
    assert out.count("## cProfile") == 10
    section = out.split("# host ms per call")[1].split("\n\n")[0]
    models = [line.split() for line in section.splitlines()[2:]]
    assert models[0][0] == "fastbert" and all(float(v) > 0 for m in models for v in m[-2:]), models


def test_kernel_profile_groups_and_prints(capsys):
    """benchmarks/kernel_profile.py: library GEMMs grouped, fastbert's kernels by name, and a
    table per workload (kernels on a GPU, CPU operators on a CPU) with the wall time."""
    from fastbert.benchmarks import kernel_profile as kp
    assert kp.kernel_group("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64") == "GEMM (cuBLAS)"
    assert kp.kernel_group("nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NTN") == "GEMM (cuBLAS)"
    assert kp.kernel_group("nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NTN", gemms=True) \
        == "GEMM nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NTN"
    assert kp.kernel_group("void cutlass::Kernel2<cutlass_80_tensorop_f16_s16816gemm_64x64_32x6_tn_align8>(T1::Params)",
                           gemms=True) == "GEMM cutlass_80_tensorop_f16_s16816gemm_64x64_32x6_tn_align8"
    assert kp.kernel_group("_attn_fwd", gemms=True) == "_attn_fwd"
    assert kp.kernel_group("_attn_fwd") == "_attn_fwd"
    assert kp.kernel_group("_linear_gelu_fwd") == "_linear_gelu_fwd"
    assert kp.kernel_group("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float> >(int)") \
        == "void at::native::vectorized_elementwise_kernel"
    from types import SimpleNamespace as Event
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    kernel = Event(device_type=cuda, self_device_time_total=7.0, self_cpu_time_total=0.0)
    launcher = Event(device_type=cpu, self_device_time_total=7.0, self_cpu_time_total=3.0)  # aten::mm, say
    assert (kp.event_us(kernel, True), kp.event_us(launcher, True)) == (7.0, 0.0)  # each kernel counted once
    assert kp.event_us(launcher, False) == 3.0
    assert kp.main(["--tiny", "--iters", "2", "--workloads", "base-b32-s512-varlen"]) == 0
    out = capsys.readouterr().out
    assert "lengths 32..512 [tiny], eager, backend auto" in out
    on_gpu = torch.cuda.is_available()  # on a GPU the tables list kernels, on a CPU operators
    assert ("sum of kernels" if on_gpu else "sum of operators") in out and "wall time per forward" in out
    assert kp.main(["--workloads", "pretrain-base-b32-s128", "--tiny"]) == 2  # a whole run, not one call
    assert kp.main(["--tiny", "--iters", "2", "--workloads", "train-base-b32-s128"]) == 0
    out = capsys.readouterr().out
    assert "train BERT-base B=32 S=128 (bf16 autocast) [tiny], eager, backend auto, bf16 autocast" in out
    assert "wall time per step" in out


def test_model_pairs_run_in_the_order_a_time_limit_should_cut():
    """Eager pairs, then compiles with CUDA graphs, then the pre-training run, then the
    default-mode compiles: `fastbert bench --quick` at its time limit keeps the telling rows."""
    from types import SimpleNamespace
    from fastbert.benchmarks.bench_model import _run_order
    base, pretrain = SimpleNamespace(pretrain=False), SimpleNamespace(pretrain=True)
    pairs = [(base, "hf-sdpa+compile"), (pretrain, "fastbert"), (base, "fastbert+compile"),
             (base, "fastbert+compile-ro"), (base, "hf-sdpa+compile-ro"), (base, "fastbert"), (base, "hf-sdpa")]
    order = [(w.pretrain, impl) for w, impl in sorted(pairs, key=_run_order)]
    assert order == [(False, "fastbert"), (False, "hf-sdpa"), (False, "hf-sdpa+compile-ro"),
                     (False, "fastbert+compile-ro"), (True, "fastbert"), (False, "fastbert+compile"),
                     (False, "hf-sdpa+compile")]


def test_ragged_workloads_time_the_padded_graph_beside_the_packed_one():
    """On a GPU a batch with padding runs captured both packed and padded (what packing saves,
    graph against graph); a full batch has no padded twin."""
    from fastbert.benchmarks.bench_model import impls_for
    from fastbert.benchmarks.workloads import WORKLOADS
    ragged, _ = impls_for(WORKLOADS["base-b32-s512-varlen"], "cuda", True, False, None)
    assert ragged[:3] == ["fastbert", "fastbert+cudagraph", "fastbert-padded+cudagraph"]
    full, _ = impls_for(WORKLOADS["base-b32-s128"], "cuda", True, False, None)
    assert "fastbert-padded+cudagraph" not in full and "fastbert+cudagraph" in full
    on_cpu, _ = impls_for(WORKLOADS["base-b32-s512-varlen"], "cpu", True, False, None)
    assert not any("cudagraph" in i for i in on_cpu)
