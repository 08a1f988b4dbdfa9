"""load_image_embeds: only plain dense float tensors of the right shape get through, and a
malicious pickle never runs."""

from __future__ import annotations

import base64
import io
import os
import pickle
import zipfile

import pytest
import torch

from frontend.errors import RequestError
from frontend.media.embeds import load_image_embeds, validate_image_embeds

HIDDEN = 16
PARAM = "messages[0].content[2].image_embeds"
CAP = 1 << 20


def _b64(obj) -> str:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return base64.b64encode(buf.getvalue()).decode()


def load(b64: str, **kw):
    return load_image_embeds(b64, HIDDEN, PARAM, kw.pop("max_bytes", CAP), **kw)


def refused(b64: str, match: str, **kw) -> None:
    with pytest.raises(RequestError, match=match) as e:
        load(b64, **kw)
    assert e.value.param == PARAM and e.value.status == 400


def test_two_dim():
    t = torch.randn(5, HIDDEN)
    out = load(_b64(t))
    assert len(out) == 1 and out[0].dtype == torch.float32 and out[0].is_contiguous()
    assert torch.equal(out[0], t)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_three_dim_and_dtypes(dtype):
    t = torch.randn(2, 3, HIDDEN).to(dtype)
    out = load(_b64(t))
    assert [o.shape for o in out] == [(3, HIDDEN), (3, HIDDEN)]
    assert all(o.dtype == torch.float32 and o.is_contiguous() for o in out)
    assert torch.equal(out[1], t[1].float())


def test_non_contiguous_input_comes_back_contiguous():
    t = torch.randn(HIDDEN, 7).t()  # [7, HIDDEN], transposed view
    out = load(_b64(t))
    assert out[0].is_contiguous() and torch.equal(out[0], t)


def test_wrong_hidden():
    refused(_b64(torch.randn(5, 8)), "must be 16.*got 8")


@pytest.mark.parametrize("t", [torch.ones(5, HIDDEN, dtype=torch.int64),
                               torch.ones(5, HIDDEN, dtype=torch.bool),
                               torch.ones(5, HIDDEN, dtype=torch.complex64)])
def test_non_float_dtype(t):
    refused(_b64(t), "dtype")


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_sparse(layout):
    t = torch.randn(5, HIDDEN)
    t = t.to_sparse() if layout == "coo" else t.to_sparse_csr()
    refused(_b64(t), "dense tensor")


def test_sparse_with_out_of_bounds_indices():
    # Invariants are checked while loading: bad indices must not reach any kernel.
    bad = torch.sparse_coo_tensor(torch.tensor([[0, 99], [0, 1]]), torch.ones(2), (5, HIDDEN),
                                  check_invariants=False)
    refused(_b64(bad), "torch.save")


@pytest.mark.parametrize("shape", [(HIDDEN,), (1, 2, 3, HIDDEN), (0, HIDDEN), (2, 0, HIDDEN)])
def test_bad_shapes(shape):
    refused(_b64(torch.zeros(shape)), "shape")


def test_feature_cap():
    refused(_b64(torch.zeros(9, HIDDEN)), "1..8", max_feature_size=8)


def test_non_finite():
    t = torch.zeros(3, HIDDEN)
    t[1, 2] = float("nan")
    refused(_b64(t), "NaN")
    t[1, 2] = float("inf")
    refused(_b64(t), "NaN or infinite")


def test_size_cap():
    b64 = _b64(torch.randn(64, HIDDEN))
    refused(b64, "larger than 1024 bytes", max_bytes=1024)


@pytest.mark.parametrize("obj", [{"embeds": torch.randn(5, HIDDEN)}, [torch.randn(5, HIDDEN)],
                                 (torch.randn(5, HIDDEN),), 3.0, "text"])
def test_not_a_tensor(obj):
    refused(_b64(obj), "single tensor")


@pytest.mark.parametrize("b64", ["", "***", "QUJ", base64.b64encode(b"just bytes").decode(),
                                 base64.b64encode(pickle.dumps(torch.randn(2, 2).numpy())).decode()])
def test_not_a_torch_save_payload(b64):
    refused(b64, "base64|torch.save")


def test_compressed_archive_refused():
    buf = io.BytesIO()
    torch.save(torch.randn(4, HIDDEN), buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    refused(base64.b64encode(out.getvalue()).decode(), "zip format")


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_does_not_run(tmp_path):
    # Control: this payload does run code when unpickled without restrictions.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_RunsCode(str(control))))
    assert control.exists()

    marker = tmp_path / "pwned"
    refused(_b64(_RunsCode(str(marker))), "torch.save")  # inside torch.save's zip format
    refused(_b64({"t": torch.zeros(2, HIDDEN), "x": _RunsCode(str(marker))}), "torch.save")
    raw = base64.b64encode(pickle.dumps(_RunsCode(str(marker)))).decode()  # bare pickle
    refused(raw, "torch.save")
    assert not marker.exists()


def test_validate_in_memory_tensor():
    p = torch.nn.Parameter(torch.randn(4, HIDDEN))
    assert validate_image_embeds(p, HIDDEN, PARAM)[0].requires_grad is False

    class Sub(torch.Tensor):
        pass

    with pytest.raises(RequestError, match="single tensor"):
        validate_image_embeds(torch.randn(4, HIDDEN).as_subclass(Sub), HIDDEN, PARAM)


# -- sizes judged from metadata before any element is read (issue 7) -----------------------------

@pytest.mark.parametrize("t", [
    torch.zeros(1).expand(10**6, 10**6),  # hidden size wrong: refused from the shape
    torch.zeros(HIDDEN).expand(10**9, 1, HIDDEN),  # 10^9 images over a 64-byte storage
    torch.zeros(HIDDEN).expand(10**6, 4, HIDDEN),
])
def test_zero_stride_giants_are_refused_from_the_shape(t):
    with pytest.raises(RequestError) as e:
        validate_image_embeds(t, HIDDEN, PARAM)
    assert e.value.param == PARAM
    refused(_b64(t), "hidden size|images; at most|repeats")  # and through torch.save


@pytest.mark.parametrize("t", [
    torch.zeros(1, HIDDEN).expand(8000, HIDDEN),  # in bounds, but 512 kB claimed over 64 B
    torch.zeros(HIDDEN).expand(3, 2, HIDDEN),
    torch.zeros(4 * HIDDEN).as_strided((2, 8, HIDDEN), (HIDDEN, 1, 1)),  # overlapping rows
])
def test_views_that_repeat_their_storage_are_refused(t):
    refused(_b64(t), "repeats or overruns")


def test_a_slice_of_a_larger_storage_is_fine():
    big = torch.randn(10, 7, HIDDEN)
    out = validate_image_embeds(big[3:5], HIDDEN, PARAM)
    assert len(out) == 2 and torch.equal(out[1], big[4])
    out = load(_b64(big[2, 1:4]))  # torch.save keeps the whole storage behind the view
    assert torch.equal(out[0], big[2, 1:4])


def test_max_images():
    refused(_b64(torch.zeros(3, 2, HIDDEN)), "holds 3 images; at most 2", max_images=2)
    assert len(load(_b64(torch.zeros(2, 2, HIDDEN)), max_images=2)) == 2


def test_finite_in_float64_but_not_in_float32():
    refused(_b64(torch.full((2, HIDDEN), 1e300, dtype=torch.float64)), "infinite")


@pytest.mark.filterwarnings("ignore::UserWarning")  # nested and quantized are deprecated APIs
@pytest.mark.parametrize("make", [
    lambda: torch.nested.nested_tensor([torch.zeros(2, HIDDEN), torch.zeros(3, HIDDEN)]),
    lambda: torch.nested.nested_tensor([torch.zeros(2, HIDDEN), torch.zeros(3, HIDDEN)],
                                       layout=torch.jagged),
    lambda: torch.zeros(2, HIDDEN, device="meta"),
    lambda: torch.quantize_per_tensor(torch.zeros(2, HIDDEN), 0.1, 0, torch.qint8),
])
def test_other_tensor_kinds_in_memory(make):
    with pytest.raises(RequestError) as e:
        validate_image_embeds(make(), HIDDEN, PARAM)
    assert e.value.param == PARAM
