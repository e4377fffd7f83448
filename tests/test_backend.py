"""The backend switch: set_backend, use_backend, FASTBERT_BACKEND, and what each backend runs."""

import os
import subprocess
import sys

import pytest
import torch

import fastbert
from fastbert import ops, reference
from utils import DEVICE


def _python(code: str, **env_changes) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("FASTBERT_BACKEND", "TRITON_INTERPRET")}
    env.update(env_changes)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_set_and_use_backend():
    assert fastbert.get_backend() == "auto"
    fastbert.set_backend("EAGER")
    assert fastbert.get_backend() == "eager"
    with fastbert.use_backend("triton"):
        assert fastbert.get_backend() == "triton"
        with fastbert.use_backend("auto"):
            assert fastbert.get_backend() == "auto"
        assert fastbert.get_backend() == "triton"
    assert fastbert.get_backend() == "eager"
    with pytest.raises(RuntimeError, match="boom"):
        with fastbert.use_backend("auto"):
            raise RuntimeError("boom")
    assert fastbert.get_backend() == "eager"  # restored after an exception too


def test_use_backend_is_per_thread():
    """Two threads' overlapping blocks neither see nor restore each other's backend; the
    default (set_backend) is every thread's outside a block."""
    import threading
    inside, leave, seen = threading.Barrier(2), threading.Barrier(2), {}

    def run(name):
        with fastbert.use_backend(name):
            inside.wait()  # both blocks open at once
            seen[name] = fastbert.get_backend()
            leave.wait()
        seen[name + " after"] = fastbert.get_backend()
    threads = [threading.Thread(target=run, args=(name,)) for name in ("triton", "eager")]
    with fastbert.use_backend("auto"):
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert fastbert.get_backend() == "auto"
    assert seen == {"triton": "triton", "eager": "eager", "triton after": "auto", "eager after": "auto"}
    assert fastbert.get_backend() == "auto"


def test_checkpointed_layers_recompute_under_the_forwards_backend():
    """A checkpointed layer is recomputed in the backward, which for CUDA tensors runs on
    autograd's own thread: it runs under the backend its forward had (here the backward is
    run from another thread, as autograd does on a GPU)."""
    import threading
    model = fastbert.BertModel(fastbert.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=2, intermediate_size=64)).train()
    model.gradient_checkpointing_enable()
    seen = []
    model.encoder.layer[0].register_forward_pre_hook(lambda *_: seen.append(fastbert.get_backend()))
    with fastbert.use_backend("eager"):
        out = model(torch.randint(1, 50, (2, 6))).last_hidden_state.sum()
    backward = threading.Thread(target=out.backward)
    backward.start(), backward.join()
    assert seen == ["eager", "eager"]  # the forward, then its recomputation


@pytest.mark.parametrize("name", ["cuda", "", "fast"])
def test_unknown_backend_names(name):
    with pytest.raises(ValueError, match="unknown fastbert backend .*choose one of auto, triton, eager"):
        fastbert.set_backend(name)
    with pytest.raises(ValueError, match="unknown fastbert backend"):
        with fastbert.use_backend(name):
            pass
    assert fastbert.get_backend() == "auto"


def test_environment_variable_and_triton_on_cpu_without_the_interpreter():
    """FASTBERT_BACKEND picks the backend at import; the "triton" backend on a CPU tensor
    without TRITON_INTERPRET gives ops.py's clear error (one subprocess for both)."""
    code = (
        "import torch, fastbert\n"
        "from fastbert import functional as F\n"
        "print('BACKEND:', fastbert.get_backend())\n"
        "try:\n"
        "    F.bias_gelu(torch.randn(3, 8), torch.randn(8))\n"
        "except RuntimeError as e:\n"
        "    print('ERROR:', e)\n"
    )
    run = _python(code, FASTBERT_BACKEND="triton")
    assert run.returncode == 0, run.stderr
    msg = run.stdout
    assert "BACKEND: triton" in msg and "ERROR:" in msg, msg
    # either the kernel needs CUDA here, or it cannot be imported at all; both name the way out
    assert ("needs a CUDA tensor" in msg and "TRITON_INTERPRET=1" in msg) or "kernel is unavailable" in msg, msg
    assert "'auto' or 'eager' backend" in msg
    bad = _python("import fastbert", FASTBERT_BACKEND="warp")
    assert bad.returncode != 0 and "unknown fastbert backend 'warp'" in bad.stderr


def test_eager_always_gives_the_reference():
    with fastbert.use_backend("eager"):
        for name, op in ops.OPS.items():
            assert ops.implementation(name, torch.device("cpu")) is op.reference
            assert ops.implementation(name, torch.device("cuda")) is op.reference  # no CUDA call is made
    assert ops.OPS["attention"].reference is reference.attention


def test_auto_on_cpu_uses_the_reference_or_the_cpu_composition_for_triton_ops():
    from fastbert import cpu

    for name, op in ops.OPS.items():
        fn = ops.implementation(name, torch.device("cpu"))
        if not op.native_cpu:
            assert fn is (op.cpu or op.reference), name
    assert ops.OPS["attention"].cpu is cpu.attention


def test_model_agrees_across_backends():
    """The model under 'eager' and under 'auto' (C++ embedding once built, else the
    reference) gives the same result on the CPU."""
    torch.manual_seed(0)
    model = fastbert.BertModel(fastbert.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=4, intermediate_size=37,
                                                   max_position_embeddings=16)).eval()
    ids = torch.randint(1, 50, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    with fastbert.use_backend("eager"):
        ref = model(ids, attention_mask=mask).last_hidden_state
    out = model(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_describe_names_every_op():
    info = ops.describe()
    assert set(info) == {"embedding", "add_layernorm", "bias_gelu", "linear_gelu", "softmax_mask", "attention",
                         "attention_qkv"}
    for name, what in info.items():
        assert what == "kernel" or what.startswith("reference only ("), (name, what)


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """The names of the ops that reach the dispatcher below autograd."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _leaves():
    """x, residual, weight, bias, q: small inputs of every Triton op (on the GPU when there is one)."""
    x = torch.randn(3, 5, 16, device=DEVICE, requires_grad=True)
    r = torch.randn(3, 5, 16, device=DEVICE)
    w = torch.ones(16, device=DEVICE, requires_grad=True)
    b = torch.zeros(16, device=DEVICE, requires_grad=True)
    q = torch.randn(2, 7, 2, 16, device=DEVICE, requires_grad=True)
    return x, r, w, b, q


def test_eager_calls_skip_the_custom_op_layer_and_compile_sees_the_ops():
    """Eager calls run the kernels' bodies through an autograd.Function (kernels/_direct.py),
    forward and backward; dispatch modes (fake tensors, op loggers) and torch.compile see the
    fastbert:: custom ops."""
    from fastbert import functional as fb
    from utils import unavailable_kernels

    assert not unavailable_kernels(["add_layernorm", "bias_gelu", "softmax_mask", "attention"])
    x, r, w, b, q = _leaves()

    def step(record=None):
        outs = [fb.add_layernorm(x, r, w, b, 1e-12)]
        outs.append(fb.bias_gelu(outs[-1], b))
        outs.append(fb.softmax_mask(outs[-1], None, 0.5))
        outs.append(fb.attention(q, q, q))
        if record is not None:
            record.extend(type(o.grad_fn).__name__ for o in outs)
        return outs[-2].sum() + outs[-1].sum()

    with fastbert.use_backend("triton"):
        grad_fns = []
        step(grad_fns).backward()
        assert all(name.startswith("fastbert_") and name.endswith("_directBackward") for name in grad_fns), grad_fns
        assert x.grad is not None and w.grad is not None and q.grad is not None

        log = _OpLog()
        with log:
            step().backward()
        for op in ("add_layernorm_fwd", "bias_gelu_fwd", "softmax_mask_fwd", "attention_fwd",
                   "add_layernorm_bwd", "bias_gelu_bwd", "softmax_mask_bwd", "attention_bwd"):
            assert f"fastbert.{op}" in log.names, log.names

        graphs = []

        def backend(gm, _inputs):
            graphs.append(str(gm.graph))
            return gm.forward

        torch._dynamo.reset()
        torch.compile(step, backend=backend, fullgraph=True)()
        traced = "\n".join(graphs)
        for op in ("add_layernorm_fwd", "bias_gelu_fwd", "softmax_mask_fwd", "attention_fwd"):
            assert f"fastbert.{op}" in traced, traced


def test_eager_launches_skip_wrap_triton(monkeypatch):
    """Eager calls launch each Triton kernel directly: wrap_triton's eager path (a higher-order
    op and a side-table entry per launch) costs hundreds of µs per launch. While a dispatch
    mode is active (tracing for torch.compile) the launch goes through wrap_triton."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastbert import functional as fb
    from fastbert.kernels import _direct
    from fastbert.kernels._direct import launch

    seen = []
    real = _direct.wrap_triton
    monkeypatch.setattr(_direct, "wrap_triton", lambda kernel: (seen.append(kernel), real(kernel))[1])
    x, r, w, b, q = _leaves()
    with fastbert.use_backend("triton"):
        h = fb.bias_gelu(fb.add_layernorm(x, r, w, b, 1e-12), b)
        (fb.softmax_mask(h, None, 0.5).sum() + fb.attention(q, q, q).sum()).backward()
    assert seen == [], [k.__name__ for k in seen]  # forward and backward: no wrap_triton
    assert x.grad is not None and q.grad is not None

    class Kernel:  # records how it was launched
        def __getitem__(self, grid):
            return lambda *args, **meta: launched.append((grid, args, meta))

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    kernel, launched = Kernel(), []
    monkeypatch.setattr(_direct, "wrap_triton", lambda k: (seen.append(k), k)[1])
    launch(kernel, (3, 1), 7, BLOCK=16)
    assert seen == [] and launched == [((3, 1), (7,), {"BLOCK": 16})]
    with Mode():
        launch(kernel, (2,), 8)
    assert seen == [kernel] and launched[-1] == ((2,), (8,), {})


def _specialization(kernel, args) -> tuple:
    """The part of Triton's compile key that comes from a launch's runtime arguments: each
    argument's type and what Triton specializes on (an int equal to 1 or divisible by 16, a
    pointer's 16-byte alignment), except where the kernel says do_not_specialize."""
    import inspect

    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    if hasattr(kernel, "params"):  # a compiled JITFunction (on a GPU)
        params = [(p.name, p.is_constexpr, p.do_not_specialize, p.do_not_specialize_on_alignment) for p in kernel.params]
    else:  # an InterpretedFunction: the decorator's arguments are kept in .kwargs
        names = list(inspect.signature(kernel.fn).parameters)
        sig = inspect.signature(kernel.fn).parameters

        def flagged(option):
            given = {names[g] if isinstance(g, int) else g for g in kernel.kwargs.get(option) or ()}
            assert given <= set(names), f"{kernel.fn.__name__}: {option} names no parameter: {given - set(names)}"
            return given
        off, off_align = flagged("do_not_specialize"), flagged("do_not_specialize_on_alignment")
        params = [(n, "constexpr" in str(sig[n].annotation), n in off, n in off_align) for n in names]
    key = []
    for (name, const, no_spec, no_align), arg in zip(params, args):
        if not const:
            key.append((name, native_specialize_impl(BaseBackend, arg, False, not no_spec, not no_align)))
    return kernel.fn.__name__, tuple(key)


@pytest.mark.parametrize("case", ["add_layernorm", "bias_gelu", "softmax_mask", "attention-packed"])
def test_a_new_token_count_compiles_no_new_kernel(monkeypatch, case):
    """Training and serving batches change their number of tokens (packed sequences, masked
    tokens) from one call to the next. Triton compiles one kernel per specialization of the
    integer arguments (equal to 1, divisible by 16), so a token count that only sizes the grid
    and bounds the rows must be do_not_specialize, or a long run keeps stalling on compiles
    (each ~1 s) for counts that happen to be multiples of 16 or 1. Every launch of each op's
    forward and backward must have the same key for 64, 67 and 1 tokens."""
    from fastbert import functional as fb
    from fastbert.kernels import attention, attention_bwd, gelu, layernorm, softmax

    keys = []
    for module in (attention, attention_bwd, gelu, layernorm, softmax):
        real = module.launch
        monkeypatch.setattr(module, "launch", lambda kernel, grid, *args, real=real, **meta:
                            (keys[-1].add(_specialization(kernel, args)), real(kernel, grid, *args, **meta)))

    def run(tokens):
        torch.manual_seed(tokens)
        keys.append(set())

        def leaf(*shape):
            return torch.randn(*shape, device=DEVICE, requires_grad=True)
        if case == "add_layernorm":
            x, r, w, b = leaf(tokens, 48), leaf(tokens, 48), leaf(48), leaf(48)
            outs = [fb.add_layernorm(x, r, w, b, 1e-12), fb.add_layernorm(x, r, w, b, 1e-12, x_bias=b)]
        elif case == "bias_gelu":
            outs = [fb.bias_gelu(leaf(tokens, 96), leaf(96))]
        elif case == "softmax_mask":
            outs = [fb.softmax_mask(leaf(tokens, 2, 1, 16), torch.zeros(1, 1, 1, 16, device=DEVICE))]
        else:  # two sequences packed, of tokens // 2 and the rest (at least one each)
            first = max(1, tokens // 2)
            lengths = [first, max(1, tokens - first)]
            cu = torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32, device=DEVICE)
            q, k, v = (leaf(sum(lengths), 2, 16) for _ in range(3))
            outs = [fb.attention(q, k, v, cu_seqlens=cu, max_seqlen=max(lengths))]
        sum(o.float().sum() for o in outs).backward()
        return keys[-1]

    with fastbert.use_backend("triton"):
        reference_keys = run(64)
        assert reference_keys, "no Triton kernel was launched"
        for tokens in (67, 1):
            got = run(tokens)
            differ = sorted({(name, a[0], a[1], b[1]) for name, key in got for name2, key2 in reference_keys
                             if name == name2 for a, b in zip(key, key2) if a[0] == b[0] and a != b})
            assert got == reference_keys, f"{case}: {tokens} tokens would compile other kernels than 64: {differ}"


def test_assume_valid_ids_switches_this_thread_and_restores():
    """fastbert.assume_valid_ids() turns the CUDA embedding's synchronous id check off for the
    calling thread only, and back on after the block, also after an exception."""
    import threading

    from fastbert import _C

    def check_on() -> bool:
        previous = _C.set_sync_id_check(True)
        _C.set_sync_id_check(previous)
        return previous

    assert check_on()
    with fastbert.assume_valid_ids():
        assert not check_on()
        other = []
        thread = threading.Thread(target=lambda: other.append(check_on()))
        thread.start()
        thread.join()
        assert other == [True]  # another thread still checks
        with fastbert.assume_valid_ids():
            assert not check_on()
        assert not check_on()
    assert check_on()
    with pytest.raises(RuntimeError, match="boom"):
        with fastbert.assume_valid_ids():
            raise RuntimeError("boom")
    assert check_on()
