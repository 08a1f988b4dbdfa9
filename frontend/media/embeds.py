"""User-supplied image embeddings (vLLM's ``image_embeds``: base64 of ``torch.save(tensor)``).

This is the one place the frontend unpickles client data, so the path is narrow on purpose:
- only the zip format of ``torch.save`` (>= 1.6), every entry stored uncompressed with honest
  sizes, so the payload cannot inflate past its own length (legacy raw pickles are refused);
- ``torch.load(weights_only=True)``: the restricted unpickler admits tensors and plain
  containers only, so a payload naming ``os.system`` or any other callable raises instead of
  running;
- sparse invariants checked while loading (a crafted sparse tensor can index out of bounds);
- then the value itself, judged from metadata before any element is read: one dense CPU
  floating tensor of the model's hidden size and bounded shape whose storage really holds every
  element it claims (no zero-stride blow-ups), and then all finite.
"""

from __future__ import annotations

import base64
import binascii
import io
import zipfile

import torch

from frontend.errors import RequestError

# Accepted element types; all become float32 (the encoder/decoder casts to the model dtype).
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Far above any real image's token count (LLaVA-1.5: 576), still bounding one item's KV cost.
DEFAULT_MAX_FEATURE_SIZE = 16384
# Images in one tensor; callers pass their per-prompt limit (one chat part carries one image).
DEFAULT_MAX_IMAGES = 64


def load_image_embeds(b64: str, hidden_size: int, param: str, max_bytes: int, *,
                      max_feature_size: int = DEFAULT_MAX_FEATURE_SIZE,
                      max_images: int = DEFAULT_MAX_IMAGES) -> list[torch.Tensor]:
    """Decode and validate ``image_embeds``: one float32 ``[feature_size, hidden]`` tensor per
    image. The payload may hold ``[feature, hidden]`` (one image) or ``[n, feature, hidden]``."""
    return validate_image_embeds(load_tensor(b64, param, max_bytes), hidden_size, param,
                                 max_feature_size=max_feature_size, max_images=max_images)


def load_tensor(b64: str, param: str, max_bytes: int) -> object:
    """The object in the base64 of ``torch.save(...)``, through the narrow path above (the
    caller validates what it is); ``param``'s last part names the field in messages."""
    what = param.rsplit(".", 1)[-1]
    if not isinstance(b64, str) or not b64:
        raise RequestError(f"{what} must be a base64 string of torch.save(tensor)", param)
    if len(b64) // 4 * 3 > max_bytes + 3:
        raise RequestError(f"{what} is larger than {max_bytes} bytes", param)
    try:
        raw = base64.b64decode("".join(b64.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{what} is not valid base64", param) from None
    if len(raw) > max_bytes:
        raise RequestError(f"{what} is larger than {max_bytes} bytes", param)
    _check_archive(raw, param)
    try:
        with torch.sparse.check_sparse_tensor_invariants():
            return torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except Exception:
        # Refused globals (UnpicklingError), truncated archives, bad storages: all the payload's
        # fault, and the loader's text is not for clients.
        raise RequestError(f"{what} is not a tensor saved with torch.save "
                           "(only plain tensors are accepted)", param) from None


def validate_image_embeds(obj: object, hidden_size: int, param: str, *,
                          max_feature_size: int = DEFAULT_MAX_FEATURE_SIZE,
                          max_images: int = DEFAULT_MAX_IMAGES) -> list[torch.Tensor]:
    """Check an in-memory embedding tensor (offline API, or after loading): see module doc.

    Everything is judged from metadata (type, layout, dtype, shape, strides, storage size)
    before any op reads an element or allocates: a zero-stride view can claim 10^12 elements
    over a 4-byte storage, and the first full pass over it would try to materialise them."""
    # type() not isinstance(): tensor subclasses can override any method we call below.
    if type(obj) not in (torch.Tensor, torch.nn.Parameter):
        raise RequestError(f"image_embeds must be a single tensor, got {type(obj).__name__}",
                           param)
    t: torch.Tensor = obj.detach()  # type: ignore[union-attr]
    if t.layout != torch.strided or t.is_nested or t.is_quantized or t.is_sparse:
        raise RequestError("image_embeds must be a dense tensor (sparse layouts are refused)",
                           param)
    if t.device.type != "cpu":
        raise RequestError("image_embeds must be a CPU tensor", param)
    if t.dtype not in FLOAT_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in FLOAT_DTYPES)
        raise RequestError(f"image_embeds dtype must be one of {names}, got "
                           f"{str(t.dtype).removeprefix('torch.')}", param)
    shape = list(t.shape)
    if len(shape) == 2:
        shape = [1, *shape]
    if len(shape) != 3:
        raise RequestError("image_embeds must have shape [feature_size, hidden_size] or "
                           f"[num_images, feature_size, hidden_size], got {list(t.shape)}", param)
    num_images, feature_size, hidden = shape
    if hidden != hidden_size:
        raise RequestError(f"image_embeds hidden size must be {hidden_size} (the model's), "
                           f"got {hidden}", param)
    if num_images > max_images:
        raise RequestError(f"image_embeds holds {num_images} images; at most {max_images} "
                           "may be given here", param)
    if num_images < 1 or not 1 <= feature_size <= max_feature_size:
        raise RequestError(f"image_embeds must hold at least one image of 1..{max_feature_size} "
                           f"features, got shape {list(t.shape)}", param)
    _check_storage(t, param)
    if t.ndim == 2:
        t = t.unsqueeze(0)
    # The count is bounded and the storage holds every element: copying is safe now. Checked
    # after the cast: a finite float64 like 1e300 is infinite in float32.
    t = t.resolve_conj().resolve_neg().to(torch.float32, memory_format=torch.contiguous_format,
                                          copy=True)
    if not bool(torch.isfinite(t).all()):
        raise RequestError("image_embeds contains NaN or infinite values (as float32)", param)
    return [img.contiguous() for img in t.unbind(0)]  # each [feature_size, hidden]


def _check_storage(t: torch.Tensor, param: str) -> None:
    """Refuse views that claim more elements than their storage holds (zero or overlapping
    strides) or reach past it: copying such a view would cost more than the payload."""
    item = t.element_size()
    if any(s < 0 for s in t.stride()) or t.storage_offset() < 0:
        raise RequestError("image_embeds has negative strides", param)
    try:
        storage_bytes = t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        raise RequestError("image_embeds must be a plain tensor with its own storage",
                           param) from None
    # Shapes are >= 1 here, so the last element's offset is the sum of (size - 1) * stride.
    last = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    if (last + 1) * item > storage_bytes or t.numel() * item > storage_bytes:
        raise RequestError("image_embeds is a view that repeats or overruns its storage "
                           "(zero or overlapping strides): send a contiguous tensor", param)


def _check_archive(raw: bytes, param: str) -> None:
    """torch.save's zip layout with only stored (uncompressed) entries no larger than ``raw``."""
    what = param.rsplit(".", 1)[-1]
    bad = RequestError(f"{what} must be the base64 of torch.save(tensor) (zip format)", param)
    if not zipfile.is_zipfile(io.BytesIO(raw)):
        raise bad
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, ValueError, OSError):
        raise bad from None
    total = 0
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
            raise bad
        total += info.file_size
    if not infos or total > len(raw):
        raise bad
