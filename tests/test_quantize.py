"""The int8 base (quantize.py and its kernel, kernels/int8_linear.cpp) against the reference:
the dequantised weight in one fp32 linear; the w8a8 base against its own (the rows rounded too)."""

import pytest
import torch
from torch import nn

from loramux.engine import Engine
from loramux.engine.compiled import CompiledDecoder
from loramux.errors import LoramuxError
from loramux.kernels import build_error, int8_linear_op
from loramux.models import load_base
from loramux.quantize import _KERNEL, KERNEL_ROWS, Int8Linear, W8A8Linear, quantize_linears, quantize_rows

from .engine.test_engine import PROMPTS, greedy, lib  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def kernel():
    op = int8_linear_op()
    assert op is not None, f"the int8 kernel did not build here: {build_error()}"
    return op


def quantized(d_in: int, d_out: int, bias: bool, seed: int = 0, mode: str = "int8") -> tuple[nn.Linear, Int8Linear]:
    torch.manual_seed(seed)
    linear = nn.Linear(d_in, d_out, bias=bias)
    holder = nn.Sequential(linear)
    quantize_linears(holder, mode)
    return linear, holder[0]


@pytest.mark.parametrize("d_in,d_out,bias", [(32, 64, False), (300, 77, True), (7, 3, True), (576, 1536, False)])
def test_the_kernel_equals_the_reference_at_every_row_count(kernel, d_in, d_out, bias):
    """Sizes that are and are not multiples of the kernel's 8-wide chunks and 8-channel groups,
    every row count up to KERNEL_ROWS (its 4-row blocks and their remainders) and past it (the
    dequantising GEMM), and a 3-D input."""
    _, q = quantized(d_in, d_out, bias)
    assert _KERNEL["op"] is kernel
    for rows in range(1, KERNEL_ROWS + 3):
        x = torch.randn(rows, d_in)
        torch.testing.assert_close(q(x), q.reference(x), atol=1e-5 * d_in ** 0.5, rtol=1e-5)
    x = torch.randn(2, 3, d_in)
    torch.testing.assert_close(q(x), q.reference(x), atol=1e-5 * d_in ** 0.5, rtol=1e-5)


@pytest.mark.parametrize("d_in,d_out,bias", [(32, 64, False), (300, 77, True), (7, 3, True), (576, 1536, False)])
def test_w8a8_equals_its_reference_and_a_row_does_not_depend_on_its_batch(d_in, d_out, bias):
    """Row counts on the few-row kernel, below and above the integer GEMM's padding, and a 3-D
    input; a row's output is bit for bit the same alone (the kernel) and in any batch (the GEMM):
    integer sums are exact."""
    _, q = quantized(d_in, d_out, bias, mode="w8a8")
    assert isinstance(q, W8A8Linear) and _KERNEL["w8a8"] is not None
    x = torch.randn(20, d_in)
    for rows in range(1, 21):
        torch.testing.assert_close(q(x[:rows]), q.reference(x[:rows]), atol=1e-5 * d_in ** 0.5, rtol=1e-5)
    alone = torch.cat([q(x[i:i + 1]) for i in range(20)])
    assert torch.equal(q(x), alone) and torch.equal(q(x[3:9]), alone[3:9])
    x = torch.randn(2, 3, d_in)
    torch.testing.assert_close(q(x), q.reference(x), atol=1e-5 * d_in ** 0.5, rtol=1e-5)


def test_rows_are_rounded_each_with_its_own_scale():
    x = torch.randn(4, 50) * torch.tensor([[1.0], [100.0], [0.0], [1e-3]])
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8 and scale.shape == (4, 1)
    assert bool((q[2] == 0).all())  # a zero row stays zero (no division by a zero scale)
    assert [int(r.abs().max()) for r in q[[0, 1, 3]]] == [127, 127, 127]
    assert bool(((q.float() * scale - x).abs() <= scale / 2 + 1e-9).all())


def test_a_gradient_flows_through_the_w8a8_rounding():
    """Rounding has no gradient: the input's gradient is that of the dequantised weight's linear
    at the rounded input (straight through)."""
    _, q = quantized(40, 24, bias=True, mode="w8a8")
    x = torch.randn(3, 40, requires_grad=True)
    y = q(x)
    torch.testing.assert_close(y, q.reference(x.detach()))
    y.square().sum().backward()
    rows, scale = quantize_rows(x.detach())
    x2 = (rows.float() * scale).requires_grad_()
    torch.nn.functional.linear(x2, q.dequantized(), q.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    assert x.grad.abs().sum() > 0


def test_the_rounding_operator_equals_quantize_rows(kernel):
    """The compiled step's C++ rounding (kernels/int8_linear.cpp) bit for bit against the tensor
    ops: ties (x/scale at .5), a zero row, tiny values, a non-contiguous input; a NaN row keeps
    a NaN scale (its outputs are NaN either way)."""
    from loramux.kernels import quantize_rows_op

    op = quantize_rows_op()
    x = torch.randn(6, 300)
    x[1] = 0
    x[2] *= 1e-30
    x[3, :4] = torch.tensor([127.0, 0.5, 1.5, -2.5])  # scale 1: ties round to even
    x[3, 4:] = 0.25
    cases = [x, torch.randn(300, 5).t()]
    for xs in cases:
        got, want = op(xs), quantize_rows(xs)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert op(x)[0][3, :4].tolist() == [127, 0, 2, -2]
    nan = torch.randn(2, 16)
    nan[1, 3] = float("nan")
    assert torch.isnan(op(nan)[1][1]).all() and torch.isnan(quantize_rows(nan)[1][1]).all()


def exact_w8a8(q: W8A8Linear, x: torch.Tensor) -> torch.Tensor:
    """W8A8Linear's definition computed in int64: the rounded rows, exact sums, the two scales."""
    rows, scale = quantize_rows(x.float())
    y = (rows.long() @ q.weight.long().t()).float() * scale * q.scale
    return y if q.bias is None else y + q.bias


@pytest.mark.parametrize("d_in,d_out", [(32, 64), (300, 77), (7, 3), (576, 1536), (2100, 96), (1, 1)])
def test_the_w8a8_kernel_equals_the_exact_integer_product(kernel, d_in, d_out):
    """The few-row w8a8 kernel (kernels/int8_linear.cpp) bit for bit against the definition, for
    1 to 4 rows, widths that are and are not multiples of its 32-wide steps and 4-channel blocks,
    weights at ±127, a non-contiguous input and a NaN row; it refuses a fifth row."""
    from loramux.kernels import w8a8_linear_op

    op = w8a8_linear_op()
    _, q = quantized(d_in, d_out, bias=False, mode="w8a8")
    assert _KERNEL["w8a8"] is op is not None
    q.weight.data[0] = 127
    q.weight.data[-1, ::2] = -127
    for rows in range(1, 5):
        x = torch.randn(rows, d_in) * 3
        x[0] = x[0].abs().max()  # a row at +127 everywhere, against the ±127 weights
        assert torch.equal(op(x, q.weight, q.scale), exact_w8a8(q, x))
    xt = torch.randn(d_in, 3).t()
    assert torch.equal(op(xt, q.weight, q.scale), exact_w8a8(q, xt))
    nan = torch.randn(2, d_in)
    nan[1, 0] = float("nan")
    got = op(nan, q.weight, q.scale)
    assert torch.equal(got[0], exact_w8a8(q, nan[:1])[0]) and torch.isnan(got[1]).all()
    with pytest.raises(RuntimeError, match="at most 4 rows"):
        op(torch.randn(5, d_in), q.weight, q.scale)


NARROWER = {"avx2": ["-mno-avx512f"], "plain loop": ["-mno-avx512f", "-mno-avx2", "-mno-fma"]}


@pytest.fixture(scope="module", params=sorted(NARROWER))
def narrower_ops(request):
    """kernels/int8_linear.cpp built for fewer instruction sets than this CPU has, under its own
    operator namespace: the paths a smaller CPU takes (AVX2 integer sums, or plain loops)."""
    import hashlib
    import platform

    from torch.utils import cpp_extension

    from loramux.kernels import _SOURCE, _cpu_flags, _ninja_on_path

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the narrower builds are x86 instruction-set flags")
    _ninja_on_path()
    namespace = "loramux_" + request.param.replace(" ", "_")
    flags = ["-O3", "-march=native", *NARROWER[request.param], "-fopenmp", f"-DLORAMUX_NAMESPACE={namespace}"]
    key = hashlib.sha256("|".join([_SOURCE.read_text(), torch.__version__, _cpu_flags(), *flags]).encode()).hexdigest()[:12]
    cpp_extension.load(name=f"{namespace}_{key}", sources=[str(_SOURCE)], extra_cflags=flags,
                       extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    ops = getattr(torch.ops, namespace)
    return ops.w8a8_linear, ops.int8_linear


@pytest.mark.parametrize("d_in,d_out", [(300, 77), (7, 3), (2100, 96)])
def test_the_narrower_builds_compute_the_same(kernel, narrower_ops, d_in, d_out):
    """The AVX2 and plain-loop builds of both kernels: w8a8 bit for bit the exact integer product,
    int8 within fp32 rounding of the exact product, at 1 to 4 rows and odd widths."""
    w8a8, int8 = narrower_ops
    _, q = quantized(d_in, d_out, bias=False, mode="w8a8")
    q.weight.data[0] = 127
    for rows in range(1, 5):
        x = torch.randn(rows, d_in) * 3
        x[0] = x[0].abs().max()
        assert torch.equal(w8a8(x, q.weight, q.scale), exact_w8a8(q, x))
        # fp32 sums in another order than the reference's: bounded by the size of the terms summed
        w = q.dequantized().double()
        error = (int8(x, q.weight, q.scale).double() - x.double() @ w.T).abs()
        assert (error <= 1e-6 * d_in ** 0.5 * (x.double().abs() @ w.abs().T)).all()


@pytest.mark.parametrize("path", ["kernel", "rounding operator", "tensor ops"])
def test_the_compiled_few_row_w8a8_forms_equal_the_definition(kernel, monkeypatch, path):
    """DecodeGraph's forms for up to 4 rows, compiled by Inductor, bit for bit equal to
    W8A8Linear's exact integer product, with a K past one fp32 chunk: the kernel; without it,
    rows rounded once and int8 products summed in fp32 chunks, then int32 (with and without the
    rounding operator)."""
    from loramux.engine.graph import DecodeGraph

    _, q = quantized(2100, 96, bias=True, mode="w8a8")
    assert _KERNEL["w8a8"] is not None
    calls = []
    if path == "kernel":  # counted as Dynamo traces the step: the program calls the operator
        op = _KERNEL["w8a8"]
        monkeypatch.setitem(_KERNEL, "w8a8", lambda *args: calls.append(1) or op(*args))
    else:
        monkeypatch.setitem(_KERNEL, "w8a8", None)
    if path == "tensor ops":
        monkeypatch.setitem(_KERNEL, "quantize_rows", None)
    graph = DecodeGraph.__new__(DecodeGraph)
    nn.Module.__init__(graph)
    graph.gemv_rows, graph.w8a8 = 4, True
    torch._dynamo.reset()
    fn = torch.compile(lambda x: graph._apply(x, q), fullgraph=True, backend="inductor")
    for rows in (1, 2, 4):
        x = torch.randn(rows, 2100) * 3
        assert torch.equal(fn(x), exact_w8a8(q, x))
    assert bool(calls) == (path == "kernel")


def test_the_compiled_step_takes_a_blocks_projections_in_one_kernel_call(kernel, monkeypatch):
    """DecodeGraph._bases, compiled by Inductor: q, k and v (widths as a grouped-query block's)
    from one `w8a8_linears` call, each bit for bit its exact integer product, at 1 to 4 rows; 5
    rows take each projection's GEMM."""
    from loramux.engine.graph import DecodeGraph

    qs = [quantized(576, n, bias=b, seed=n, mode="w8a8")[1] for n, b in ((576, False), (192, True), (192, False))]
    graph = DecodeGraph.__new__(DecodeGraph)
    nn.Module.__init__(graph)
    graph.gemv_rows, graph.w8a8 = 4, True
    op, traced = _KERNEL["w8a8s"], []
    monkeypatch.setitem(_KERNEL, "w8a8s", lambda x, w, s: traced.append(x.shape[0]) or op(x, w, s))
    torch._dynamo.reset()
    fn = torch.compile(lambda x: graph._bases(x, tuple(qs)), fullgraph=True, backend="inductor")
    for rows in (1, 3, 4, 5):
        x = torch.randn(rows, 576) * 3
        for y, q in zip(fn(x), qs):
            assert torch.equal(y, exact_w8a8(q, x))
    assert traced == [1, 3, 4]  # one call of the operator for all three projections, none at 5 rows


def test_w8a8_is_refused_where_the_integer_gemm_is_not_exact(monkeypatch):
    import loramux.quantize as quantize

    assert quantize._int_mm_is_exact()
    monkeypatch.setattr(quantize, "_int_mm_is_exact", lambda: False)
    with pytest.raises(LoramuxError, match="not return exact sums.*--quantize int8"):
        quantize_linears(nn.Sequential(nn.Linear(8, 8)), "w8a8")


def test_rounding_is_per_channel_and_within_half_a_step():
    linear, q = quantized(64, 48, bias=True)
    linear.weight.data[5] = 0  # an all-zero channel stays zero (no division by a zero scale)
    q = Int8Linear(linear)
    err = (q.dequantized() - linear.weight).abs()
    assert bool((err <= q.scale[:, None] / 2 + 1e-7).all())
    assert q.weight.dtype == torch.int8 and int(q.weight.abs().max()) == 127
    assert bool((q.dequantized()[5] == 0).all())
    assert torch.equal(q.bias, linear.bias.detach())


def test_a_gradient_flows_to_the_input():
    """No backward in the kernel: an input that needs a gradient (a LoRA trained over an int8
    base) takes the dequantising path, whose gradient is the reference's."""
    _, q = quantized(40, 24, bias=True)
    x = torch.randn(3, 40, requires_grad=True)
    q(x).square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    q.reference(x2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("mode", ["int8", "w8a8", "w8a8 without its few-row kernel"])
def test_the_kernel_compiles_inside_a_graph(kernel, mode, monkeypatch):
    """torch.compile keeps the operators as one call each (their shape-only implementations) up
    to 4 rows; above that w8a8's rounding compiles around the integer GEMM, and without the
    few-row kernel around the padded GEMM for fewer rows too."""
    _, q = quantized(40, 24, bias=True, mode=mode.split()[0])
    if mode.endswith("few-row kernel"):
        monkeypatch.setitem(_KERNEL, "w8a8", None)
    torch._dynamo.reset()
    fn = torch.compile(lambda x: torch.relu(q(x)) * 2, fullgraph=True, backend="inductor")
    for rows in (1, 3, 6):
        x = torch.randn(rows, 40)
        torch.testing.assert_close(fn(x), torch.relu(q.reference(x)) * 2, atol=1e-5, rtol=1e-5)


def reference_base(tiny_model_dir):
    """The fp32 base with every linear's weight replaced by its dequantised int8 one (a new
    tensor: the head's weight is tied to the embedding, which stays fp32)."""
    base = load_base(str(tiny_model_dir))
    for m in base.model.modules():
        if type(m) is nn.Linear:
            m.weight = nn.Parameter(Int8Linear(m).dequantized(), requires_grad=False)
    return base


def w8a8_reference_base(tiny_model_dir):
    """The w8a8 base with every linear running its readable reference."""
    base = load_base(str(tiny_model_dir), quantize="w8a8")
    for m in base.model.modules():
        if isinstance(m, W8A8Linear):
            m.forward = m.reference
    return base


@pytest.mark.parametrize("mode", ["int8", "w8a8", "w8a8 without its few-row kernel"])
def test_a_quantized_base_serves_the_library_as_its_dequantised_reference(tiny_model_dir, lib, mode, monkeypatch):
    """Same fingerprint (the library's adapters apply), every linear int8 (w8a8), and generation
    with adapters, a mixture and the base model token for token equal to the reference base's,
    eagerly and through the compiled decode step (up to gemv_rows rows and above); w8a8 also
    without its few-row kernel (the padded integer GEMM, and the step's generated form)."""
    without = mode.startswith("w8a8 ")
    if without:
        import loramux.kernels

        monkeypatch.setattr(loramux.kernels, "w8a8_linear_op", lambda: None)  # as if it did not build
        monkeypatch.setitem(_KERNEL, "w8a8", None)
        monkeypatch.setitem(_KERNEL, "w8a8s", None)
    mode = mode.split()[0]
    base = load_base(str(tiny_model_dir), quantize=mode)
    if mode == "w8a8":
        assert (_KERNEL["w8a8"] is None) == without
    assert base.fingerprint == load_base(str(tiny_model_dir)).fingerprint and base.quantization == mode
    linears = [m for m in base.model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is (Int8Linear if mode == "int8" else W8A8Linear) for m in linears)
    requests = [greedy(PROMPTS[0], {"a": 1.0}, n=10), greedy(PROMPTS[1], None, n=10),
                greedy(PROMPTS[2], {"b": 0.7, "c": 0.3}, n=10)]
    want = []
    for b in ((reference_base if mode == "int8" else w8a8_reference_base)(tiny_model_dir), base):
        engine = Engine(b, lib)
        for name in ("a", "b", "c"):
            engine.load(name)
        want.append([r.token_ids for r in engine.generate(requests)])
        if b is base:  # the compiled step's few-row kernels up to gemv_rows; above it int8's kernel, w8a8's GEMM
            for gemv_rows in (4, 0):
                engine.compiled = CompiledDecoder(engine.fused, backend="eager", gemv_rows=gemv_rows)
                want.append([r.token_ids for r in engine.generate(requests)])
    assert want[0] == want[1] == want[2] == want[3]


def test_quantize_refuses_what_it_cannot_do(tiny_model_dir, monkeypatch):
    with pytest.raises(LoramuxError, match="int4.*none, int8, w8a8"):
        load_base(str(tiny_model_dir), quantize="int4")
    with pytest.raises(LoramuxError, match="CPU fp32 option.*--dtype bfloat16"):
        load_base(str(tiny_model_dir), dtype="bfloat16", quantize="int8")
    bf16 = nn.Sequential(nn.Linear(8, 8).to(torch.bfloat16))
    with pytest.raises(LoramuxError, match="fp32 base"):
        quantize_linears(bf16)
    assert type(bf16[0]) is nn.Linear  # refused before any change
    with pytest.raises(LoramuxError, match="not nn.Linear"):
        quantize_linears(nn.Sequential(nn.Conv1d(4, 4, 1)))
    import loramux.kernels as kernels

    monkeypatch.setitem(_KERNEL, "op", None)
    monkeypatch.setattr(kernels, "_state", {"op": None, "error": "RuntimeError: no compiler"})
    with pytest.raises(LoramuxError, match="could not be built here: RuntimeError: no compiler"):
        quantize_linears(nn.Sequential(nn.Linear(8, 8)))


def test_w8a8_without_its_operator_says_so_and_still_quantizes(monkeypatch, caplog):
    """No compiler: few rows are rounded with tensor ops and multiplied by the integer GEMM (exact,
    slower), and the log says why."""
    import loramux.kernels as kernels

    monkeypatch.setitem(_KERNEL, "quantize_rows", None)
    monkeypatch.setitem(_KERNEL, "w8a8", None)
    monkeypatch.setitem(_KERNEL, "w8a8s", None)
    monkeypatch.setattr(kernels, "_state", {"op": None, "error": "RuntimeError: no compiler"})
    holder = nn.Sequential(nn.Linear(8, 8))
    with caplog.at_level("WARNING", logger="loramux.quantize"):
        assert quantize_linears(holder, "w8a8") == 1
    assert type(holder[0]) is W8A8Linear and _KERNEL["quantize_rows"] is None and _KERNEL["w8a8"] is None
    assert _KERNEL["w8a8s"] is None
    x = torch.randn(2, 8)  # torch._int_mm multiplies the few rows instead
    assert torch.equal(holder[0](x), exact_w8a8(holder[0], x))
    assert "could not be built (RuntimeError: no compiler)" in caplog.text


def test_the_several_weight_w8a8_kernel_equals_each_weights_product(kernel):
    """`w8a8_linears` (q, k and v, or gate and up, in one call): each output bit for bit the exact
    integer product of its weight, with widths that split the 32-channel groups unevenly among
    weights and threads, at 1 to 4 rows."""
    from loramux.kernels import w8a8_linears_op

    op = w8a8_linears_op()
    qs = [quantized(300, n, bias=False, seed=n, mode="w8a8")[1] for n in (77, 1, 64, 200)]
    assert op is not None and _KERNEL["w8a8s"] is op
    qs[0].weight.data[0] = 127
    for rows in range(1, 5):
        x = torch.randn(rows, 300) * 3
        x[0] = x[0].abs().max()
        got = op(x, [q.weight for q in qs], [q.scale for q in qs])
        assert len(got) == len(qs)
        for y, q in zip(got, qs):
            assert torch.equal(y, exact_w8a8(q, x))
    with pytest.raises(RuntimeError, match="shapes do not match"):
        op(torch.randn(1, 300), [qs[0].weight, torch.zeros(3, 299, dtype=torch.int8)], [qs[0].scale, torch.ones(3)])
