"""The media classes of the hostile corpus: SSRF forms, file:// escapes, data: URLs, image bombs,
image_embeds payloads, uuid abuse, media counts and other modalities, and their byte builders."""

from __future__ import annotations

import base64
import io
import os
import pickle
import struct
import zlib
from typing import Any

import numpy as np
import torch
from hostile_cases import (
    CHAT,
    MB,
    Bodies,
    Case,
    dumps,
    image_part,
)
from PIL import Image

# -- media builders --------------------------------------------------------------------------------

def png_bytes(width: int = 24, height: int = 24, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png_declaring(width: int, height: int, rows: bytes = b"\x00" * 100) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` (the pixels never match)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
            + _chunk(b"IDAT", zlib.compress(rows, 9)) + _chunk(b"IEND", b""))


def thin_png(width: int, height: int) -> bytes:
    """A real, fully decodable grey PNG of any aspect ratio: a few hundred bytes."""
    row = b"\x00" + b"\x80" * width  # filter byte + one grey byte per pixel
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
            + _chunk(b"IDAT", zlib.compress(row * height, 9)) + _chunk(b"IEND", b""))


def jpeg_bytes(size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (size, size, 3), np.uint8)).save(
        buf, format="JPEG")
    return buf.getvalue()


def gif_frames(frames: int, size: int = 8) -> bytes:
    imgs = [Image.new("P", (size, size), i % 256) for i in range(frames)]
    buf = io.BytesIO()
    imgs[0].save(buf, format="GIF", save_all=True, append_images=imgs[1:], duration=10)
    return buf.getvalue()


def gif_declaring(width: int, height: int) -> bytes:
    """GIF89a whose logical screen is ``width`` x ``height`` with a 1x1 frame inside."""
    screen = struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return b"GIF89a" + screen + frame + b"\x3b"


def bmp_declaring(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 54 + 16, 0, 0, 54) + info + b"\0" * 16


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


class _Boom:
    """Unpickling this runs `touch marker`."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def saved(obj: Any, **kw: Any) -> str:
    buf = io.BytesIO()
    torch.save(obj, buf, **kw)
    return base64.b64encode(buf.getvalue()).decode()




def ssrf(b: Bodies) -> list[Case]:
    """Private, loopback and special addresses in every spelling; the host behind the loopback
    ones is live (a leak would answer 200), and it must never see a request."""
    port = b.ctx.ssrf_base.rsplit(":", 1)[1]
    p = "/img/a.png"
    urls = {
        "127.0.0.1": f"http://127.0.0.1:{port}{p}",
        "localhost": f"http://localhost:{port}{p}",
        "LOCALHOST.": f"http://LOCALHOST.:{port}{p}",
        "[::1]": f"http://[::1]:{port}{p}",
        "0.0.0.0": f"http://0.0.0.0:{port}{p}",
        "0": f"http://0:{port}{p}",
        "127.1": f"http://127.1:{port}{p}",
        "127.255.255.254": f"http://127.255.255.254:{port}{p}",
        "decimal 2130706433": f"http://2130706433:{port}{p}",
        "hex 0x7f000001": f"http://0x7f000001:{port}{p}",
        "octal 0177.0.0.1": f"http://0177.0.0.1:{port}{p}",
        "hex dotted 0x7f.0.0.1": f"http://0x7f.0.0.1:{port}{p}",
        "ipv4-mapped [::ffff:127.0.0.1]": f"http://[::ffff:127.0.0.1]:{port}{p}",
        "ipv4-mapped hex [::ffff:7f00:1]": f"http://[::ffff:7f00:1]:{port}{p}",
        "nat64 [64:ff9b::7f00:1]": f"http://[64:ff9b::7f00:1]:{port}{p}",
        "6to4 [2002:7f00:1::]": f"http://[2002:7f00:1::]:{port}{p}",
        "ipv4-compatible [::127.0.0.1]": f"http://[::127.0.0.1]:{port}{p}",
        "userinfo public@127.0.0.1": f"http://public.example.com@127.0.0.1:{port}{p}",
        "userinfo user:pass@localhost": f"http://user:pass@localhost:{port}{p}",
        "https loopback": f"https://127.0.0.1:{port}{p}",
        "uppercase scheme": f"HTTP://127.0.0.1:{port}{p}",
        "10.0.0.1": "http://10.0.0.1/a.png",
        "172.16.0.1": "http://172.16.0.1/a.png",
        "192.168.0.1": "http://192.168.0.1/a.png",
        "169.254.169.254 metadata": "http://169.254.169.254/latest/meta-data/",
        "100.64.0.1 shared": "http://100.64.0.1/a.png",
        "224.0.0.1 multicast": "http://224.0.0.1/a.png",
        "255.255.255.255": "http://255.255.255.255/a.png",
        "[fc00::1] unique local": "http://[fc00::1]/a.png",
        "[fe80::1] link-local": "http://[fe80::1]/a.png",
        "[::] unspecified": f"http://[::]:{port}{p}",
        "gopher scheme": f"gopher://127.0.0.1:{port}/_GET",
        "ftp scheme": "ftp://127.0.0.1/a.png",
        "javascript scheme": "javascript:alert(1)",
        "no host": "http:///a.png",
        "blank url": " ",
    }
    return [Case("ssrf", name, CHAT, b.media(image_part(url)), max_seconds=3)
            for name, url in urls.items()]


def file_urls(b: Bodies) -> list[Case]:
    d = b.ctx.media_dir
    allowed = d / "allowed"
    urls = {
        "/etc/passwd": "file:///etc/passwd",
        "/proc/self/environ": "file:///proc/self/environ",
        "/dev/zero": "file:///dev/zero",
        "outside the folder": f"file://{d}/secret.png",
        "via ..": f"file://{allowed}/../secret.png",
        "via percent-encoded ..": f"file://{allowed}/%2e%2e/secret.png",
        "via percent-encoded slash": f"file://{allowed}/..%2Fsecret.png",
        "sibling folder with the same prefix": f"file://{d}/allowed-evil/b.png",
        "symlink pointing outside": f"file://{allowed}/link.png",
        "symlinked folder pointing outside": f"file://{allowed}/outdir/secret.png",
        "FIFO": f"file://{allowed}/fifo",
        "directory": f"file://{allowed}/",
        "directory without slash": f"file://{allowed}",
        "missing file": f"file://{allowed}/missing.png",
        "not an image": f"file://{allowed}/notes.txt",
        "NUL byte": f"file://{allowed}/b.png%00.txt",
        "remote host": f"file://otherhost{allowed}/b.png",
        "relative path": "file:b.png",
        "query string": f"file://{allowed}/b.png?x=1",
    }
    return [Case("file_url", name, CHAT, b.media(image_part(url)), max_seconds=5)
            for name, url in urls.items()]


def data_urls(b: Bodies) -> list[Case]:
    ok = base64.b64encode(png_bytes()).decode()
    urls = {
        "text/plain mime": f"data:text/plain;base64,{ok}",
        "text/html mime": "data:text/html;base64," + base64.b64encode(b"<b>x</b>").decode(),
        "no mime": f"data:;base64,{ok}",
        "not base64": "data:image/png,rawbytes",
        "bad base64": "data:image/png;base64,@@@not base64@@@",
        "truncated base64": f"data:image/png;base64,{ok[:-3]}",
        "empty payload": "data:image/png;base64,",
        "svg": data_url(b'<svg xmlns="http://www.w3.org/2000/svg"/>', "image/svg+xml"),
        "eps (ghostscript)": data_url(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 1 1\n",
                                      "image/eps"),
        "ico": data_url(b"\0\0\1\0\1\0\x10\x10" + b"\0" * 40, "image/x-icon"),
        "21 MB payload": data_url(b"\0" * (21 * MB)),
    }
    return [Case("data_url", name, CHAT, b.media(image_part(url)), max_seconds=10)
            for name, url in urls.items()]


def image_bombs(b: Bodies) -> list[Case]:
    jpeg = jpeg_bytes()
    good_png = png_bytes(64, 64)
    images = {
        "PNG declaring 100000x100000": png_declaring(100_000, 100_000),
        "PNG declaring 2^31x2^31": png_declaring(2**31 - 1, 2**31 - 1),
        "PNG 100000x2 aspect ratio": thin_png(100_000, 2),
        "PNG 2x100000 aspect ratio": thin_png(2, 100_000),
        "PNG 30000x3 aspect ratio": thin_png(30_000, 3),
        "1x1": png_bytes(1, 1),
        "1x500": png_bytes(1, 500),
        "truncated JPEG": jpeg[:300],
        "JPEG with garbage scan": jpeg[:200] + os.urandom(64) * 8,
        "truncated PNG data": good_png[: len(good_png) // 2],
        "PNG with corrupt IDAT": png_declaring(64, 64, rows=b"\x07" * 10),
        "GIF declaring 60000x60000": gif_declaring(60_000, 60_000),
        "BMP declaring 50000x50000": bmp_declaring(50_000, 50_000),
        "non-image bytes": b"definitely not an image",
        "random bytes": os.urandom(4096),
        "zip bytes": b"PK\x03\x04" + b"\0" * 100,
    }
    return [Case("image_bomb", name, CHAT, b.media(image_part(data_url(data))), max_seconds=15)
            for name, data in images.items()]


def image_embeds(b: Bodies) -> list[Case]:
    h = b.ctx.hidden_size
    marker = str(b.ctx.marker)
    bad_sparse = torch.sparse_coo_tensor(torch.tensor([[0, 10**6], [0, 5]]), torch.ones(2),
                                         (16, h), check_invariants=False)
    legacy = io.BytesIO()
    torch.save(torch.zeros(16, h), legacy, _use_new_zipfile_serialization=False)
    payloads = {
        "raw pickle": base64.b64encode(pickle.dumps(_Boom(marker))).decode(),
        "pickle inside torch.save zip": saved({"x": _Boom(marker)}),
        "sparse with out-of-range indices": saved(bad_sparse),
        "valid sparse": saved(torch.zeros(16, h).to_sparse()),
        "int32 dtype": saved(torch.zeros(16, h, dtype=torch.int32)),
        "bool dtype": saved(torch.zeros(16, h, dtype=torch.bool)),
        "complex64 dtype": saved(torch.zeros(16, h, dtype=torch.complex64)),
        "wrong hidden size": saved(torch.zeros(16, h + 1)),
        "1-d tensor": saved(torch.zeros(h)),
        "4-d tensor": saved(torch.zeros(1, 1, 16, h)),
        "zero features": saved(torch.zeros(0, h)),
        "too many features": saved(torch.zeros(20_000, h)),
        "zero-stride giant view": saved(torch.zeros(1, 1, h).expand(10**7, 16384, h)),
        "zero-stride giant feature view": saved(torch.zeros(1, h).expand(10**9, h)),
        "two images in one part": saved(torch.zeros(2, 16, h)),
        "NaN": saved(torch.full((16, h), float("nan"))),
        "inf": saved(torch.full((16, h), float("inf"))),
        "not base64": "@@@ not base64 @@@",
        "empty string": "",
        "legacy non-zip torch.save": base64.b64encode(legacy.getvalue()).decode(),
        "a dict of tensors": saved({"a": torch.zeros(16, h)}),
        "a list of tensors": saved([torch.zeros(16, h)]),
        "a png instead": base64.b64encode(png_bytes()).decode(),
    }
    cases = [Case("image_embeds", name, CHAT, b.media({"type": "image_embeds",
                                                       "image_embeds": value}), max_seconds=15)
             for name, value in payloads.items()]
    cases.append(Case("image_embeds", "not a string", CHAT,
                      b.media({"type": "image_embeds", "image_embeds": [[0.0] * h] * 4})))
    return cases


def uuids(b: Bodies) -> list[Case]:
    img = data_url(png_bytes())
    table = {
        "empty uuid": image_part(img, uuid=""),
        "10k-char uuid": image_part(img, uuid="u" * 10_000),
        "numeric uuid": image_part(img, uuid=12345),
        "object uuid": image_part(img, uuid={"a": 1}),
        "list uuid": image_part(img, uuid=["a"]),
        "null image_url, unknown uuid": image_part(None, uuid="never-seen-before-1"),
        "null image_url, no uuid": image_part(None),
        "null image_embeds, unknown uuid": {"type": "image_embeds", "image_embeds": None,
                                            "uuid": "never-seen-before-2"},
        "null image_embeds, no uuid": {"type": "image_embeds", "image_embeds": None},
        "image_url missing": {"type": "image_url", "uuid": "x"},
        "image_url url null": {"type": "image_url", "image_url": {"url": None}},
        "image_url empty object": {"type": "image_url", "image_url": {}},
        "image_url a number": {"type": "image_url", "image_url": 5},
        "image_url empty string": {"type": "image_url", "image_url": ""},
        "image_url url a number": {"type": "image_url", "image_url": {"url": 5}},
    }
    cases = [Case("uuid", name, CHAT, b.media(part)) for name, part in table.items()]
    # A uuid-only reference before the item is ever sent, next to a real image.
    cases.append(Case("uuid", "uuid-only before the item, with another image", CHAT,
                      b.media(image_part(img), image_part(None, uuid="never-seen-before-3"))))
    return cases


def media_counts(b: Bodies) -> list[Case]:
    img = image_part(data_url(png_bytes()))
    emb = {"type": "image_embeds", "image_embeds": saved(torch.zeros(4, b.ctx.hidden_size))}
    return [
        Case("too_many", "3 images, limit 2", CHAT, b.media(img, img, img), param="messages"),
        Case("too_many", "100 images", CHAT, b.media(*[img] * 100), param="messages"),
        Case("too_many", "3 embeds", CHAT, b.media(emb, emb, emb), param="messages"),
        Case("too_many", "2 images + 1 uuid ref", CHAT,
             b.media(img, img, image_part(None, uuid="never-seen-before-4")), param="messages"),
        Case("too_many", "images across messages", CHAT, dumps(b.chat(messages=[
            {"role": "user", "content": [img, img]}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [img]}])), param="messages"),
    ]


def other_modalities(b: Bodies) -> list[Case]:
    wav = base64.b64encode(b"RIFF" + b"\0" * 40).decode()
    parts = {
        "input_audio": {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}},
        "audio_url": {"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64," + wav}},
        "video_url": {"type": "video_url", "video_url": {"url": "http://example.com/v.mp4"}},
        "input_video": {"type": "input_video", "input_video": "x"},
        "file part": {"type": "file", "file": {"file_data": wav}},
        "image_pil over HTTP": {"type": "image_pil", "image_pil": "x"},
    }
    return [Case("modality", name, CHAT, b.media(part)) for name, part in parts.items()]


