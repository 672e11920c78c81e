"""The native ONNX Runtime op ai.dga::DynamicGroupAttention (csrc/ort/) against the reference.

Models are built by hand (one node in domain ai.dga) so these tests need no exporter. The
output buffer is bound pre-filled with NaN, so a row the kernel forgets to write fails.
"""

import ctypes
import math

import subprocess
import sys
import textwrap

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

from dga_compile.config import DGAConfig
from dga_compile.errors import NativeBuildError
from dga_compile.onnx import DOMAIN, OP_TYPE, native
from dga_compile.onnx._schema import node_attributes
from dga_compile.reference import reference_attention

from _onnx_models import run_poisoned

ATOL = RTOL = 1e-4


@pytest.fixture(scope="module")
def library():
    try:
        return native.build_library()
    except NativeBuildError as err:
        pytest.skip(f"native ORT op library cannot be built here: {err}")


def _model(with_mask: bool, attrs: dict, elem=TensorProto.FLOAT) -> bytes:
    """One op node on float32 inputs; for another ``elem``, q/k/v are Cast to it and the output
    back to float32 (feeds types numpy lacks, such as bfloat16)."""
    names = ["q", "k", "v"] + (["attn_mask"] if with_mask else [])
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "qkv"]
    if with_mask:
        inputs.append(helper.make_tensor_value_info("attn_mask", TensorProto.BOOL, None))
    nodes, op_io = [], (names, "out")
    if elem != TensorProto.FLOAT:
        nodes = [helper.make_node("Cast", [n], [f"{n}_t"], to=elem) for n in "qkv"]
        op_io = ([f"{n}_t" for n in "qkv"] + names[3:], "out_t")
    nodes.append(helper.make_node(OP_TYPE, op_io[0], [op_io[1]], domain=DOMAIN, **attrs))
    if elem != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", ["out_t"], ["out"], to=TensorProto.FLOAT))
    graph = helper.make_graph(nodes, "dga", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def _session(library, model: bytes, threads: int = 0, provider: str = "CPUExecutionProvider"):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.register_custom_ops_library(str(library))
    return ort.InferenceSession(model, so, providers=[provider])


def _run_native(library, q, k, v, mask, cfg, is_causal, scale, threads=0, provider="CPUExecutionProvider",
                attributes=None):
    """The op's output as a tensor (inputs and a NaN-poisoned output bound in host memory);
    ``attributes`` replaces the node's attributes."""
    attrs = node_attributes(cfg, is_causal, scale) if attributes is None else attributes
    sess = _session(library, _model(mask is not None, attrs), threads, provider)
    feeds = dict(q=q.numpy(), k=k.numpy(), v=v.numpy()) | ({} if mask is None else {"attn_mask": mask.numpy()})
    return torch.from_numpy(run_poisoned(sess, feeds, (*q.shape[:3], v.shape[3])))


def _inputs(B, Hq, Hkv, Nq, Nk, D, Dv, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Nq, D, generator=g), torch.randn(B, Hkv, Nk, D, generator=g),
            torch.randn(B, Hkv, Nk, Dv, generator=g))


def _padding_mask(B, N, seed=1):
    """Key padding: batch b keeps its first N - 7·(b+1) keys; [B, 1, 1, N] bool."""
    keep = torch.arange(N)[None, :] < (N - 7 * (torch.arange(B)[:, None] + 1))
    return keep[:, None, None, :]


# (id, B, Hq, Hkv, N, D, Dv, is_causal, mask kind, config changes)
CASES = [
    ("B1-H4-N300-D64-causal", 1, 4, 4, 300, 64, 64, True, None, {}),
    ("B2-H2-N37-D32-noncausal", 2, 2, 2, 37, 32, 32, False, None, {"group_size": 4, "window": 8}),
    ("B1-H1-N1-D16-causal", 1, 1, 1, 1, 16, 16, True, None, {}),
    ("B1-H8-Hkv2-N211-D64-causal-gqa", 1, 8, 2, 211, 64, 64, True, None, {"window": 32}),
    ("B1-H3-Hkv1-N150-D40-Dv24-noncausal-mqa", 1, 3, 1, 150, 40, 24, False, None, {"group_size": 5}),
    ("B1-H2-N300-D64-causal-w0-beta0", 1, 2, 2, 300, 64, 64, True, None, {"window": 0, "group_bias": 0.0}),
    ("B2-H2-N257-D32-causal-padmask", 2, 2, 2, 257, 32, 32, True, "pad", {"window": 16, "group_size": 8}),
    ("B2-H2-N200-D32-noncausal-padmask", 2, 2, 2, 200, 32, 32, False, "pad", {"group_size": 8}),
    ("B1-H2-N190-D32-maskcausal", 1, 2, 2, 190, 32, 32, False, "causal4d", {"window": 20, "group_size": 6}),
    ("B1-H2-N160-D32-randmask-hq", 1, 2, 2, 160, 32, 32, False, "random", {"group_size": 4, "focus_ratio": 0.25}),
    ("B1-H2-N120-D32-causal-emptyrows", 1, 2, 2, 120, 32, 32, True, "emptyrows", {"group_size": 4, "window": 8}),
    ("B1-H2-N130-D32-causal-true1111", 1, 2, 2, 130, 32, 32, True, "true1111", {"group_size": 4, "window": 8}),
    ("B1-H2-N130-D32-false1111", 1, 2, 2, 130, 32, 32, False, "false1111", {"group_size": 4}),
    ("B1-H2-N1100-D64-causal-defaults", 1, 2, 2, 1100, 64, 64, True, None, None),
]


def _mask(kind, B, H, N):
    if kind is None:
        return None
    if kind == "pad":
        return _padding_mask(B, N)
    if kind == "causal4d":
        return torch.ones(N, N, dtype=torch.bool).tril()[None, None].expand(B, 1, N, N).contiguous()
    if kind == "random":
        return torch.rand(B, H, N, N, generator=torch.Generator().manual_seed(3)) < 0.9
    if kind in ("true1111", "false1111"):  # the exporter's "no mask", and its negation
        return torch.full((1, 1, 1, 1), kind == "true1111")
    if kind == "emptyrows":
        m = torch.ones(B, 1, N, N, dtype=torch.bool)
        m[:, :, 50:53] = False  # fully masked rows -> 0
        return m
    raise AssertionError(kind)


def _check_case(library, B, Hq, Hkv, N, D, Dv, is_causal, mask_kind, changes, provider):
    cfg = DGAConfig() if changes is None else DGAConfig(min_seq_len=0).replace(**changes)
    q, k, v = _inputs(B, Hq, Hkv, N, N, D, Dv)
    mask = _mask(mask_kind, B, Hq, N)
    scale = 1.0 / math.sqrt(D)
    ref = reference_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, config=cfg)
    out = _run_native(library, q, k, v, mask, cfg, is_causal, scale, provider=provider)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    if mask_kind == "emptyrows":
        assert bool((out[:, :, 50:53] == 0).all())


CASE_PARAMS = [pytest.param(*c[1:], id=c[0]) for c in CASES]


@pytest.mark.parametrize("B,Hq,Hkv,N,D,Dv,is_causal,mask_kind,changes", CASE_PARAMS)
def test_native_matches_reference(library, B, Hq, Hkv, N, D, Dv, is_causal, mask_kind, changes):
    _check_case(library, B, Hq, Hkv, N, D, Dv, is_causal, mask_kind, changes, "CPUExecutionProvider")


@pytest.mark.gpu
@pytest.mark.parametrize("B,Hq,Hkv,N,D,Dv,is_causal,mask_kind,changes", CASE_PARAMS)
def test_native_cuda_matches_reference(library, B, Hq, Hkv, N, D, Dv, is_causal, mask_kind, changes):
    """The CUDA kernel (session compute stream) on the same cases as the CPU kernel."""
    if not ctypes.CDLL(str(library)).DgaOrtHasCuda():
        pytest.skip("the library was built without nvcc: no CUDA kernel")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    _check_case(library, B, Hq, Hkv, N, D, Dv, is_causal, mask_kind, changes, "CUDAExecutionProvider")


@pytest.mark.gpu
def test_native_cuda_refuses_sinks_and_expansion(library):
    """The CUDA kernel has no sinks or step 5′ yet: a node asking for them fails with NYI, never a
    different answer."""
    if not ctypes.CDLL(str(library)).DgaOrtHasCuda():
        pytest.skip("the library was built without nvcc: no CUDA kernel")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    q, k, v = _inputs(1, 2, 2, 64, 64, 16, 16)
    for changes in (dict(sinks=4), dict(expand_mass=0.5)):
        with pytest.raises(Exception, match=r"NYI: sinks=.* expand_mass="):
            _run_native(library, q, k, v, None, DGAConfig(min_seq_len=0, **changes), True, 0.25,
                        provider="CUDAExecutionProvider")


def _sdpa(q, k, v, mask, is_causal, scale):
    if mask is not None and is_causal:
        mask = mask & torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
        is_causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


@pytest.mark.parametrize("Nq,Nk,is_causal,changes", [
    pytest.param(200, 200, True, {"focus_ratio": 1.0}, id="N200-causal-gamma1"),
    pytest.param(200, 200, False, {"group_size": 1}, id="N200-noncausal-m1"),
    pytest.param(200, 200, True, {"group_size": 1, "window": 0}, id="N200-causal-m1-w0"),
    pytest.param(37, 300, False, {}, id="Nq37-Nk300-cross"),
    pytest.param(5, 300, False, {"min_seq_len": 0}, id="Nq5-Nk300-decode"),
    pytest.param(300, 300, True, {"min_seq_len": 1024}, id="N300-causal-short"),
])
def test_native_exact_cases_equal_sdpa(library, Nq, Nk, is_causal, changes):
    cfg = DGAConfig(min_seq_len=0).replace(**changes)
    q, k, v = _inputs(1, 4, 2, Nq, Nk, 32, 32, seed=5)
    mask = _padding_mask(1, Nk)
    out = _run_native(library, q, k, v, mask, cfg, is_causal, 0.2)
    torch.testing.assert_close(out, _sdpa(q, k, v, mask, is_causal, 0.2), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("elem,dtype,tol", [pytest.param(TensorProto.FLOAT16, torch.float16, 2e-3, id="fp16"),
                                            pytest.param(TensorProto.BFLOAT16, torch.bfloat16, 2e-2, id="bf16"),
                                            pytest.param(TensorProto.DOUBLE, torch.float64, 1e-4, id="fp64")])
@pytest.mark.parametrize("is_causal,mask_kind", [pytest.param(True, None, id="B2-H2-N203-D32-causal"),
                                                 pytest.param(False, "pad", id="B2-H2-N203-D32-padmask")])
def test_native_other_dtypes(library, is_causal, mask_kind, elem, dtype, tol):
    """Other float types compute in float32 (the reference: float32 for 16-bit types, float64 for
    float64, so fp64 agrees to float32 accuracy only); the output comes back in the input type."""
    cfg = DGAConfig(min_seq_len=0, group_size=8, window=16)
    q, k, v = (t.to(dtype) for t in _inputs(2, 2, 2, 203, 203, 32, 32, seed=11))
    mask = _mask(mask_kind, 2, 2, 203)
    ref = reference_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=0.2, config=cfg).float()
    sess = _session(library, _model(mask is not None, node_attributes(cfg, is_causal, 0.2), elem))
    feeds = {n: t.float().numpy() for n, t in zip("qkv", (q, k, v))} | ({} if mask is None else {"attn_mask": mask.numpy()})
    torch.testing.assert_close(torch.from_numpy(sess.run(None, feeds)[0]), ref, atol=tol, rtol=tol)


def test_native_missing_attributes_take_dgaconfig_defaults(library):
    """dga::Params' defaults are DGAConfig's: a node with only is_causal and scale computes DGAConfig()
    (N = 1100 ≥ the default min_seq_len)."""
    q, k, v = _inputs(1, 2, 2, 1100, 1100, 32, 32, seed=13)
    out = _run_native(library, q, k, v, None, None, True, 0.2, attributes={"is_causal": 1, "scale": 0.2})
    torch.testing.assert_close(out, reference_attention(q, k, v, None, True, 0.2, DGAConfig()), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("is_causal,mask_kind", [pytest.param(True, "pad", id="B2-H4-Hkv2-N203-D32-causal-padmask"),
                                                 pytest.param(False, "random", id="B2-H4-Hkv2-N203-D32-randmask")])
def test_native_sinks_and_expansion_match_reference(library, is_causal, mask_kind):
    """Sinks and step 5′ read from the node's attributes (query blocks that do not divide N); each of
    the five fields changes the output of these inputs."""
    cfg = DGAConfig(min_seq_len=0, group_size=4, window=8, num_probe=16, sinks=4, expand_mass=0.8, expand_bias=0.5,
                    query_block=30, expand_max=0.6)
    q, k, v = _inputs(2, 4, 2, 203, 203, 32, 32, seed=17)
    mask = _mask(mask_kind, 2, 4, 203)
    ref = reference_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=0.5, config=cfg)
    torch.testing.assert_close(_run_native(library, q, k, v, mask, cfg, is_causal, 0.5), ref, atol=ATOL, rtol=RTOL)


def test_native_missing_expansion_attributes_take_dgaconfig_defaults(library):
    """expand_bias, query_block, expand_max default as in DGAConfig when a node gives only τ."""
    q, k, v = _inputs(1, 2, 2, 150, 150, 16, 16, seed=19)
    attributes = {"is_causal": 1, "scale": 0.3, "min_seq_len": 0, "group_size": 4, "window": 8, "expand_mass": 0.6}
    cfg = DGAConfig(min_seq_len=0, group_size=4, window=8, expand_mass=0.6)
    out = _run_native(library, q, k, v, None, None, True, 0.3, attributes=attributes)
    torch.testing.assert_close(out, reference_attention(q, k, v, None, True, 0.3, cfg), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name,value,message", [
    pytest.param("sinks", -1, r"sinks=-1 >= 0", id="sinks-negative"),
    pytest.param("expand_mass", 1.0, r"expand_mass=1\.0+ in \[0,1\)", id="expand_mass-1"),
    pytest.param("expand_bias", float("inf"), r"expand_bias=inf finite", id="expand_bias-inf"),
    pytest.param("query_block", 0, r"query_block=0 >= 1", id="query_block-0"),
    pytest.param("expand_max", 0.0, r"expand_max=0\.0+ in \(0,1\]", id="expand_max-0"),
])
def test_native_bad_expansion_attribute_raises(library, name, value, message):
    attrs = node_attributes(DGAConfig(), True, 0.125) | {name: value}
    with pytest.raises(Exception, match=message):
        _session(library, _model(False, attrs)).run(None, {n: np.zeros((1, 1, 4, 8), np.float32) for n in "qkv"})


def test_native_missing_scale_raises(library):
    with pytest.raises(Exception, match=r"scale attribute is required"):
        _session(library, _model(False, {"is_causal": 1})).run(None, {n: np.zeros((1, 1, 4, 8), np.float32) for n in "qkv"})


_WORK_ITEM_FAILS = textwrap.dedent("""
    import resource, sys
    import numpy as np, onnxruntime as ort
    from onnx import TensorProto, helper
    from dga_compile.config import DGAConfig
    from dga_compile.onnx import DOMAIN, OP_TYPE
    from dga_compile.onnx._schema import node_attributes
    node = helper.make_node(OP_TYPE, ["q", "k", "v"], ["out"], domain=DOMAIN,
                            **node_attributes(DGAConfig(min_seq_len=0), True, 0.1))
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
    model = helper.make_model(helper.make_graph([node], "g", [vi(n) for n in "qkv"], [vi("out")]),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.register_custom_ops_library(sys.argv[1])
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    # Zeros (calloc'ed, untouched) so that the inputs take address space but no memory.
    q, k = (np.zeros((1, 2, 8192, 4096), np.float32) for _ in range(2))
    v = np.zeros((1, 2, 8192, 16), np.float32)
    # Address space for the output but not for the 128 MiB key panel a work item builds (more
    # than the allocator may hold free from before).
    used = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (used + 8 * 2**20, resource.RLIM_INFINITY))
    try:
        sess.run(None, dict(q=q, k=k, v=v))
        print("no error")
    except Exception as e:
        print("error:", e)
""")


def test_native_work_item_exception_is_an_ort_error(library):
    """Regression: a work item that throws on ORT's intra-op pool (here std::bad_alloc) made the run
    hang or terminate; it must reach the caller as an ONNX Runtime error. In a child process."""
    proc = subprocess.run([sys.executable, "-c", _WORK_ITEM_FAILS, str(library)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "error:" in proc.stdout and "bad_alloc" in proc.stdout, proc.stdout


def test_native_threads_agree(library):
    """The intra-op thread pool splits work items only: 1 and 2 threads give the same bits."""
    cfg = DGAConfig(min_seq_len=0, window=16)
    q, k, v = _inputs(1, 2, 2, 333, 333, 32, 32, seed=7)
    one = _run_native(library, q, k, v, None, cfg, True, 0.25, threads=1)
    two = _run_native(library, q, k, v, None, cfg, True, 0.25, threads=2)
    assert torch.equal(one, two)


def test_native_bad_shapes_raise_clearly(library):
    sess = _session(library, _model(False, node_attributes(DGAConfig(), True, 0.125)))
    q = np.zeros((1, 2, 8, 16), np.float32)
    with pytest.raises(Exception, match=r"Hq=3 is not a multiple of Hkv=2"):
        sess.run(None, dict(q=np.zeros((1, 3, 8, 16), np.float32), k=q, v=q))
    with pytest.raises(Exception, match=r"must be rank 4"):
        sess.run(None, dict(q=q[0], k=q, v=q))


def test_native_bad_attribute_raises(library):
    attrs = node_attributes(DGAConfig(), True, 0.125) | {"group_size": 0}
    with pytest.raises(Exception, match=r"group_size=0 >= 1"):
        _session(library, _model(False, attrs)).run(None, {n: np.zeros((1, 1, 4, 8), np.float32) for n in "qkv"})


# A fake OrtApiBase: GetApi(version) serves versions up to `served`, GetVersionString names it.
_GET_API = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_uint32)
_VERSION_STRING = ctypes.CFUNCTYPE(ctypes.c_void_p)  # a char* the test keeps alive


class _ApiBase(ctypes.Structure):
    _fields_ = [("GetApi", _GET_API), ("GetVersionString", _VERSION_STRING)]


@pytest.mark.parametrize("served,ok", [pytest.param(20, False, id="runtime-older"),
                                       pytest.param(40, True, id="runtime-newer")])
def test_library_api_version_check(library, served, ok):
    lib = ctypes.CDLL(str(library))
    built = lib.DgaOrtApiVersion()
    dummy = ctypes.c_int(0)
    get_api = _GET_API(lambda version: ctypes.addressof(dummy) if version <= served else None)
    text_buf = ctypes.create_string_buffer(f"1.{served}.0".encode())
    version_string = _VERSION_STRING(lambda: ctypes.addressof(text_buf))
    base = _ApiBase(get_api, version_string)
    msg = ctypes.create_string_buffer(512)
    rc = lib.DgaOrtCheckApi(ctypes.byref(base), msg, len(msg))
    assert rc == (0 if ok else 1)
    if not ok:
        text = msg.value.decode()
        assert f"C API version {built}" in text and f"1.{served}.0" in text and "ORT_INCLUDE_DIR" in text


def test_python_api_version_check(library):
    built = native.check_api_version(library)
    assert built == native.check_api_version(library, f"1.{built}.0")
    with pytest.raises(RuntimeError, match=rf"C API version {built} .* ONNX Runtime 1\.{built - 1}\.3 provides only up to {built - 1}"):
        native.check_api_version(library, f"1.{built - 1}.3")


def test_register_library(library):
    so = ort.SessionOptions()
    assert native.register_library(so) == native.library_path()


@pytest.mark.slow
@pytest.mark.parametrize("mask_kind,is_causal", [pytest.param(None, True, id="B1-H4-Hkv2-N3001-causal"),
                                                 pytest.param("pad", True, id="B2-H4-Hkv2-N3001-causal-padmask"),
                                                 pytest.param("causal4d", False, id="B1-H4-Hkv2-N3001-maskcausal")])
def test_native_long_defaults(library, mask_kind, is_causal):
    """Default DGAConfig at a length where every part (window, many groups, focus prefix) is in play."""
    B = 2 if mask_kind == "pad" else 1
    _check_case(library, B, 4, 2, 3001, 64, 64, is_causal, mask_kind, None, "CPUExecutionProvider")


def test_cli_build_ort_op(library, tmp_path, capsys):
    from dga_compile.cli import main

    assert main(["build-ort-op"]) == 0  # up to date: nothing rebuilt
    assert main(["build-ort-op", "--include-dir", str(tmp_path), "--force"]) == 1
    assert "has no onnxruntime_cxx_api.h" in capsys.readouterr().err
    assert native.library_path() == library
