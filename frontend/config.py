"""Configuration of the API tier (one frontend replica), built from the CLI in one place."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.addresses import LOOPBACK
from protocol.registry import check_registry_addr

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_MEDIA_BYTES = 20 * 1024 * 1024
# vLLM's default is "whatever the model supports"; a fixed small bound keeps one request's fetch,
# probe and encoder work predictable. Raise it per deployment for many-image models.
DEFAULT_LIMIT_MM_PER_PROMPT = {"image": 8, "video": 1, "audio": 4}
MODALITIES = ("image", "video", "audio")
CONTENT_FORMATS = ("auto", "string", "openai")
# media_io_kwargs keys understood per modality; anything else is a typo that would silently
# change nothing but the cache key.
# video: frames sampled per video, either a count or a rate (transformers' num_frames / fps).
_MEDIA_IO_KEYS = {"image": ("rgba_background_color",), "video": ("num_frames", "fps"),
                  "audio": ()}


# Each field is a flag of `mmserve frontend` and (but those the launcher sets) `mmserve serve`
# (protocol/config_flags.py); metadata keeps vLLM's flag names, comments are the help.
@dataclass(frozen=True)
class FrontendConfig:
    model: str  # local Hugging Face checkpoint folder (tokenizer, chat template, generation config)
    # Names clients may put in `model`; the first one is reported by /v1/models and in responses.
    served_model_name: tuple[str, ...] | list[str] | str | None = None
    host: str = LOOPBACK
    port: int = 8000
    engine_addr: str | None = None  # the engine core's input address (tcp://host:port)
    tokenizer: str | None = None  # None: the model folder
    chat_template: str | None = None  # a Jinja file (default: the tokenizer's own template)
    max_n: int = 16  # largest n (choices) a request may ask
    max_logprobs: int = 20
    response_role: str = "assistant"
    max_body_bytes: int = field(default=DEFAULT_MAX_BODY_BYTES, metadata={
        "flag": "--max-body-mb", "unit": 1 << 20, "help": "larger bodies answer 413 (MiB)"})
    engine_ready_timeout_s: float = 0.0  # how long a request waits for a starting engine (0: 503)
    # Where engines push outputs to this frontend; None: a free loopback port. Another host's
    # engine needs an address it can reach (explicit config, never a default).
    reply_addr: str | None = None
    encoder_addrs: tuple[str, ...] = ()  # input addresses of the encoder workers
    # The encoder pool's registry (`mmserve registry`): encoders that join it are routed to
    # beside encoder_addrs, and leave the routing when they leave it.
    encoder_registry: str | None = None
    # Share the port with other frontend replicas (SO_REUSEPORT: the kernel spreads connections).
    reuse_port: bool = False
    # -- media (see frontend/media/fetch.py) --
    # file:// URLs are served only from under this folder (None: file:// refused).
    allowed_local_media_path: str | None = None
    # Non-empty: only these hosts may be fetched, and they skip the private-address check.
    allowed_media_domains: tuple[str, ...] | list[str] = ()
    max_media_bytes: int = DEFAULT_MAX_MEDIA_BYTES  # per fetched/decoded item
    limit_mm_per_prompt: dict[str, int] = field(
        default_factory=lambda: dict(DEFAULT_LIMIT_MM_PER_PROMPT),
        metadata={"help": 'items per prompt and modality, JSON, e.g. \'{"image": 4}\''})
    # Per modality kwargs for media decoding; they enter the content key of each item.
    media_io_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict, metadata={
        "help": 'JSON, e.g. \'{"image": {"rgba_background_color": [0, 0, 0]}}\''})
    # Server-wide processor settings (vLLM's --mm-processor-kwargs, e.g. {"max_pixels": ...});
    # a request's own mm_processor_kwargs apply over them. The model's geometry checks the keys
    # when the media tier loads (`MediaPlaceholders.with_processor_kwargs`).
    mm_processor_kwargs: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "JSON processor settings for every request (a request's own mm_processor_kwargs "
                'apply over them), e.g. \'{"max_pixels": 1003520}\''})
    max_image_pixels: int = 50_000_000  # decompression-bomb bound on the declared width*height
    # Bounds on what a video's header declares (frontend/media/video.py), checked before any
    # frame is decoded; a video's bytes are bounded by max_media_bytes like an image's.
    max_video_frames: int = 18_000  # 10 minutes at 30 fps
    max_video_seconds: float = 600.0
    max_video_side: int = 8192
    # Bounds on what an audio clip's header declares (frontend/media/audio.py), checked before
    # any sample is decoded; a clip's bytes are bounded by max_media_bytes like an image's.
    max_audio_seconds: float = 600.0  # longest clip, in seconds
    min_audio_sample_rate: int = 1000  # lowest sample rate a clip may have (Hz)
    max_audio_sample_rate: int = 192_000  # highest sample rate a clip may have (Hz)
    max_audio_channels: int = 8  # most channels a clip may have (they are down-mixed to mono)
    # -- chat templates (see frontend/chat.py) --
    # How message content reaches the template: "string" (parts joined into one string, media as
    # the model's placeholder text), "openai" (a list of typed parts), or "auto" (read from the
    # template: one that loops over message['content'] gets parts).
    chat_template_content_format: str = field(default="auto",
                                              metadata={"choices": CONTENT_FORMATS})
    # A request's own `chat_template` runs only when this is set (then sandboxed, in a separate
    # process with time and output bounds); otherwise such a request is a 400.
    trust_request_chat_template: bool = False
    # -- request bounds --
    # Characters in one prompt (or rendered chat) before tokenization; None: 32 per token of the
    # context length, which no real prompt that fits the context can exceed.
    max_prompt_chars: int | None = None
    tokenizer_workers: int = 2  # threads (each with its own tokenizer copy) for tokenization
    http_header_timeout_s: float = field(default=10.0, metadata={
        "flag": "--http-header-timeout", "help": "seconds a client has to send a request's headers"})
    http_body_timeout_s: float = field(default=60.0, metadata={
        "flag": "--http-body-timeout", "help": "seconds a client has to send a request's body"})

    def __post_init__(self) -> None:
        if not Path(self.model).is_dir():
            raise ValueError(f"model: {self.model!r} is not a local checkpoint folder")
        names = self.served_model_name
        if names is None or names == [] or names == ():
            names = (self.model,)
        elif isinstance(names, str):
            names = (names,)
        names = tuple(names)
        if not all(isinstance(n, str) and n for n in names):
            raise ValueError("served_model_name: names must be non-empty strings")
        # Frozen: normalizing a field in __post_init__ needs object.__setattr__.
        object.__setattr__(self, "served_model_name", names)
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.engine_addr is not None and not self.engine_addr.startswith(
            ("tcp://", "ipc://", "inproc://")
        ):
            raise ValueError(f"engine_addr must be a zmq address (tcp://...), got {self.engine_addr!r}")
        if self.chat_template is not None and not Path(self.chat_template).is_file():
            raise ValueError(f"chat_template: no such file {self.chat_template!r}")
        if self.tokenizer is not None and not Path(self.tokenizer).is_dir():
            raise ValueError(f"tokenizer: {self.tokenizer!r} is not a folder")
        if self.max_n < 1:
            raise ValueError("max_n must be >= 1")
        if self.max_logprobs < 0:
            raise ValueError("max_logprobs must be >= 0")
        if not self.response_role:
            raise ValueError("response_role must be non-empty")
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be >= 1024")
        if self.reply_addr is not None and not self.reply_addr.startswith(("tcp://", "ipc://")):
            raise ValueError(f"reply_addr must be a zmq address (tcp://...), got {self.reply_addr!r}")
        if self.encoder_registry is not None:
            check_registry_addr(self.encoder_registry, "encoder_registry")
        if self.engine_ready_timeout_s < 0:
            raise ValueError("engine_ready_timeout_s must be >= 0")
        if self.chat_template_content_format not in CONTENT_FORMATS:
            raise ValueError(f"chat_template_content_format must be one of {CONTENT_FORMATS}, "
                             f"got {self.chat_template_content_format!r}")
        if self.max_prompt_chars is not None and self.max_prompt_chars < 1:
            raise ValueError("max_prompt_chars must be >= 1")
        if self.tokenizer_workers < 1:
            raise ValueError("tokenizer_workers must be >= 1")
        if not (self.http_header_timeout_s > 0 and self.http_body_timeout_s > 0):
            raise ValueError("http_header_timeout_s and http_body_timeout_s must be > 0")
        self._validate_media()

    def _validate_media(self) -> None:
        local = self.allowed_local_media_path
        if local is not None and not Path(local).is_dir():
            raise ValueError(f"allowed_local_media_path: {local!r} is not a folder")
        domains = self.allowed_media_domains
        if isinstance(domains, str):
            domains = (domains,)
        if not all(isinstance(d, str) and d.strip(".") for d in domains):
            raise ValueError("allowed_media_domains: hosts must be non-empty strings")
        # Host names compare case-insensitively and without the FQDN's trailing dot.
        object.__setattr__(self, "allowed_media_domains",
                           tuple(d.lower().rstrip(".") for d in domains))
        if self.max_media_bytes < 1:
            raise ValueError("max_media_bytes must be >= 1")
        if self.max_image_pixels < 1:
            raise ValueError("max_image_pixels must be >= 1")
        if self.max_video_frames < 1 or self.max_video_side < 1 or not self.max_video_seconds > 0:
            raise ValueError("max_video_frames, max_video_side and max_video_seconds must be > 0")
        if not self.max_audio_seconds > 0 or self.max_audio_channels < 1:
            raise ValueError("max_audio_seconds and max_audio_channels must be > 0")
        if not 1 <= self.min_audio_sample_rate <= self.max_audio_sample_rate:
            raise ValueError("min_audio_sample_rate must be in 1..max_audio_sample_rate")
        limits = self.limit_mm_per_prompt
        if not isinstance(limits, dict):
            raise ValueError("limit_mm_per_prompt must be a dict like {'image': 8}")
        for k, v in limits.items():
            if k not in MODALITIES:
                raise ValueError(f"limit_mm_per_prompt: unknown modality {k!r}")
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"limit_mm_per_prompt[{k!r}] must be an int >= 0")
        object.__setattr__(self, "limit_mm_per_prompt", dict(limits))
        kwargs = self.media_io_kwargs
        if not isinstance(kwargs, dict):
            raise ValueError("media_io_kwargs must be a dict like {'image': {...}}")
        clean: dict[str, dict[str, Any]] = {}
        for modality, kw in kwargs.items():
            if modality not in MODALITIES:
                raise ValueError(f"media_io_kwargs: unknown modality {modality!r}")
            if not isinstance(kw, dict):
                raise ValueError(f"media_io_kwargs[{modality!r}] must be a dict")
            known = _MEDIA_IO_KEYS.get(modality)
            for key in kw:
                if known is not None and key not in known:
                    raise ValueError(f"media_io_kwargs[{modality!r}]: unknown key {key!r}")
            clean[modality] = dict(kw)
        color = clean.get("image", {}).get("rgba_background_color")
        if color is not None:
            ok = isinstance(color, (list, tuple)) and len(color) == 3 and all(
                isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in color)
            if not ok:
                raise ValueError("media_io_kwargs['image']['rgba_background_color'] must be "
                                 "3 ints in 0..255")
            # A list, so that tuple and list spellings hash to the same content key.
            clean["image"]["rgba_background_color"] = list(color)
        _check_video_kwargs(clean.get("video", {}))
        object.__setattr__(self, "media_io_kwargs", clean)
        if not isinstance(self.mm_processor_kwargs, dict):
            raise ValueError("mm_processor_kwargs must be a dict like {'max_pixels': 1003520}")
        object.__setattr__(self, "mm_processor_kwargs", dict(self.mm_processor_kwargs))

    @property
    def model_name(self) -> str:
        """The primary served name."""
        return self.served_model_name[0]  # type: ignore[index]

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.model


def _check_video_kwargs(kw: dict[str, Any]) -> None:
    """``num_frames`` an int >= 1 or ``fps`` a number > 0, not both (transformers refuses both
    too: one sampling rule per video)."""
    frames, fps = kw.get("num_frames"), kw.get("fps")
    if frames is not None and fps is not None:
        raise ValueError("media_io_kwargs['video']: num_frames and fps are mutually exclusive")
    if frames is not None and (type(frames) is not int or frames < 1):
        raise ValueError("media_io_kwargs['video']['num_frames'] must be an int >= 1")
    if fps is not None and (type(fps) not in (int, float) or not 0 < fps <= 1000):
        raise ValueError("media_io_kwargs['video']['fps'] must be a number in (0, 1000]")
