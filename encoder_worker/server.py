"""The encoder process: EncodeRequest in; Embedding to decoder inboxes, EncodeDone to frontends.

The busy loop reads aloud as: drain inputs, step (one tower batch). Sockets live on the IO
threads of ``EncoderIO`` and decoding + preprocessing on a thread pool, so the loop only moves
queue items and runs the tower. Finished embeddings go to the LRU store, then out to every
``deliver_to`` address as one zero-copy frame, or, for an engine on this GPU, first of all as a
slot of the device ring (`encoder_worker/device_ring.py`), before the download to the host.
"""

from __future__ import annotations

import bisect
import logging
import os
import queue
import signal
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import msgspec
import torch

from encoder_worker.config import EncoderConfig
from encoder_worker.core import EncoderCore, Inputs
from encoder_worker.decode import MediaError
from encoder_worker.device_ring import make_ring
from encoder_worker.io_threads import EncoderIO, UserEmbeds
from encoder_worker.models import load_encoder
from encoder_worker.registry_client import FLUSH_S, Membership
from encoder_worker.store import EmbeddingStore
from protocol import timeline
from protocol.addresses import host_id, local_inbox_path
from protocol.codec import describe, tensor_ref
from protocol.messages import (
    BucketCounts,
    DeviceRef,
    Embedding,
    EncodeDone,
    EncodeRequest,
    EncoderHeartbeat,
    EncoderStats,
    Shutdown,
)
from protocol.registry import ItemFound, ItemLookup

log = logging.getLogger(__name__)

INTERNAL_ERROR = "internal error while encoding"
# Histogram bounds of the stats (they travel with the counts, so a frontend built with others
# still folds them): items per tower forward, and an item's seconds from arrival to publication.
BATCH_SIZE_BOUNDS = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]
LATENCY_BOUNDS = [0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0]


def _observe(hist: BucketCounts, value: float) -> None:
    hist.counts[bisect.bisect_left(hist.bounds, value)] += 1  # le: a value on a bound counts in
    hist.sum += value


class _Decoded(NamedTuple):
    key: str
    future: Future  # -> the model's input (see _Ready.pixels), or MediaError / a bug


class _Ready(NamedTuple):
    key: str
    pixels: Inputs  # [3, H, W] float32, or a variable-size model's patches; CPU
    since: float  # monotonic time it became ready (the batch deadline counts from the oldest)
    arrived: float  # monotonic time its first request arrived


class EncoderProc:
    def __init__(self, config: EncoderConfig, input_addr: str):
        self.config = config
        self.input_addr = input_addr
        self.encoder_id = f"encoder-{uuid.uuid4().hex[:8]}"
        dtype = getattr(torch, config.resolved_dtype())
        self.model = load_encoder(config.model, torch.device(config.resolved_device()), dtype)
        self.store = EmbeddingStore(config.store_bytes)
        self.stats = EncoderStats(
            batch_size=BucketCounts(BATCH_SIZE_BOUNDS, [0] * (len(BATCH_SIZE_BOUNDS) + 1)),
            latency=BucketCounts(LATENCY_BOUNDS, [0] * (len(LATENCY_BOUNDS) + 1)))
        self.waiters: dict[str, list[EncodeRequest]] = {}  # key in flight -> requests wanting it
        self.ready: list[_Ready] = []  # decoded, waiting for the tower
        self.arrived: dict[str, float] = {}  # key -> arrival of an item on the decode pool
        self.num_decoding = 0
        # Graphs are captured here, before the IO threads start: no heartbeat (so no traffic)
        # until they exist.
        self.core = EncoderCore(self.model, max_image_pixels=config.max_image_pixels,
                                min_image_side=config.min_image_side,
                                cuda_graphs=config.cuda_graphs)
        self.ring = make_ring(self.model.device, config.ring_bytes)
        self.pool = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="encoder-decode")
        self.running = True
        self.io = EncoderIO(input_addr, self._heartbeat, config.heartbeat_s)
        self.inbox = self.io.inbox  # requests from the socket, decode results from the pool
        # Each stored item's geometry, for a frontend that looks it up by key (ItemLookup).
        self.geometry: dict[str, dict[str, Any]] = {}
        self.leaving = False  # SIGTERM: leave the pool, drain, exit
        self.membership = Membership(config, self.encoder_id, input_addr)  # once it can serve

    # -- busy loop --------------------------------------------------------------------------

    def run(self) -> None:
        log.info("%s serving %s at %s", self.encoder_id, self.config.model, self.input_addr)
        while self.running:
            self._drain_inputs(self._wait_s())
            self._step()
            busy = bool(self.waiters or self.ready or self.num_decoding)
            if self.leaving and self.membership.drained(busy):
                time.sleep(FLUSH_S)
                return

    def leave(self) -> None:
        """SIGTERM: `run` says goodbye, finishes the work in hand and returns (a flag only:
        this runs in a signal handler)."""
        self.leaving = True

    def close(self) -> None:
        self.running = False
        self.membership.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.io.close()
        if self.ring is not None:
            self.ring.close()

    def _batch_due(self, now: float) -> bool:
        """Run the tower now: the batch is full, its oldest item waited long enough, or no
        decode is in flight that could still join it."""
        return (len(self.ready) >= self.config.max_batch_items or self.num_decoding == 0
                or now - self.ready[0].since >= self.config.max_wait_ms / 1000)

    def _wait_s(self) -> float:
        """How long the loop may block on its inbox: until the oldest ready item's deadline."""
        if not self.ready:
            return 0.1  # idle; wake now and then to notice ``running`` turned off
        now = time.monotonic()
        if self._batch_due(now):
            return 0.0
        return max(0.0, self.ready[0].since + self.config.max_wait_ms / 1000 - now)

    def _drain_inputs(self, wait_s: float) -> None:
        try:
            if wait_s > 0:
                self._handle(self.inbox.get(timeout=wait_s))
            while True:
                self._handle(self.inbox.get_nowait())
        except queue.Empty:
            pass

    def _handle(self, msg: Any) -> None:
        if isinstance(msg, _Decoded):
            self._on_decoded(msg)
        elif isinstance(msg, EncodeRequest):
            self._on_encode(msg)
        elif isinstance(msg, UserEmbeds):
            self._on_encode(msg.msg, msg)
        elif isinstance(msg, ItemLookup):
            held = msg.key in self.store
            self.io.send(msg.reply_to, ItemFound(msg.lookup_id, msg.key,
                                                 self.geometry.get(msg.key) if held else None,
                                                 held))
        elif isinstance(msg, Shutdown):
            self.running = False
        else:
            log.warning("unexpected %s on the encoder input", type(msg).__name__)

    def _on_encode(self, msg: EncodeRequest, user: UserEmbeds | None = None) -> None:
        self.stats.num_requests += 1
        self.membership.arrived()
        if msg.modality not in self.model.modalities:
            self._done([msg], 400, f"modality {msg.modality!r} is not supported by this model's "
                                   f"encoder ({', '.join(self.model.modalities)})")
            return
        tensor = self.store.get(msg.key)
        if tensor is None:
            self.stats.num_cache_misses += 1  # then joined, encoded or refused below
        if tensor is not None:
            self.stats.num_cache_hits += 1
            self._publish(msg.key, tensor, [msg], cache_hit=True)
        elif msg.key in self.waiters:
            self.waiters[msg.key].append(msg)  # the same item is already being encoded: join it
        elif user is not None:
            self._on_user_embeds(msg, user)
        elif msg.data is None:
            self._done([msg], 400, f"media item {msg.key} was sent by uuid only and is not in "
                                   "the embedding cache (any more): send its data again")
        else:
            self.waiters[msg.key] = [msg]
            self.arrived[msg.key] = time.monotonic()
            self.num_decoding += 1
            fut = self.pool.submit(self._decode, msg.data, msg.kwargs, msg.geometry,
                                   msg.modality)
            fut.add_done_callback(lambda f, key=msg.key: self.inbox.put(_Decoded(key, f)))

    def _decode(self, data: bytes, kwargs: dict[str, Any], geometry: dict[str, Any] | None,
                modality: str) -> tuple[Inputs, float]:
        """Decode-pool thread: `EncoderCore.prepare`, and the seconds it took (added to the
        stats by the loop thread, which owns them)."""
        t0 = time.perf_counter()
        inputs = self.core.prepare(data, kwargs, geometry, modality)
        return inputs, time.perf_counter() - t0

    def _on_decoded(self, msg: _Decoded) -> None:
        self.num_decoding -= 1
        arrived = self.arrived.pop(msg.key)
        try:
            pixels, seconds = msg.future.result()
            timeline.mark("decoded", msg.key)
            self.stats.decode_seconds += seconds
            self.ready.append(_Ready(msg.key, pixels, time.monotonic(), arrived))
        except MediaError as e:
            self._done(self.waiters.pop(msg.key), 400, e.message)
        except Exception:
            reqs = self.waiters.pop(msg.key)
            log.exception("decode failed for %s (requests %s)", msg.key,
                          ",".join(r.request_id for r in reqs))
            self._done(reqs, 500, INTERNAL_ERROR)

    def _on_user_embeds(self, msg: EncodeRequest, user: UserEmbeds) -> None:
        t, hidden = user.tensor, self.model.hidden_size
        if t is None:
            self._done([msg], 400, user.error)
        elif t.dim() != 2 or t.shape[0] < 1 or t.shape[1] != hidden or not t.is_floating_point():
            self._done([msg], 400, f"image embeddings must be floating [n, {hidden}], got "
                                   f"{t.dtype} {list(t.shape)}")
        else:
            t = t.to(self.model.dtype)  # [n, hidden], stored like the tower's own
            self.store.put(msg.key, t)
            self._publish(msg.key, t, [msg], cache_hit=False)

    def _step(self) -> None:
        """Run the tower over one batch of ready items, if one is due (`EncoderCore.batches`:
        one forward for a model that packs variable sizes, else one per input shape)."""
        if not self.ready or not self._batch_due(time.monotonic()):
            return
        batch = self.ready[:self.config.max_batch_items]
        del self.ready[:self.config.max_batch_items]
        for group in self.core.batches([r.pixels for r in batch]):
            self._encode([batch[i] for i in group])

    def _encode(self, group: list[_Ready]) -> None:
        t0 = time.monotonic()
        for item in group:
            timeline.mark("tower_start", item.key)
        try:
            outs = self.core.encode_batch_device([r.pixels for r in group])
            self._hand_over(group, outs)
            outs = self.core.to_host(outs)  # CPU, owned
        except Exception:
            ids = [r.request_id for g in group for r in self.waiters.get(g.key, [])]
            log.exception("encoding failed for requests %s", ",".join(ids))
            for item in group:
                self._done(self.waiters.pop(item.key), 500, INTERNAL_ERROR)
            return
        for item in group:
            timeline.mark("tower_done", item.key)  # the embeddings are on the host
        self.stats.num_encoded += len(group)
        self.stats.num_batches += 1
        st, now = self.stats, time.monotonic()
        _observe(st.batch_size, len(group))  # type: ignore[arg-type]
        st.queue_seconds += sum(t0 - r.since for r in group)
        st.tower_seconds += (now - t0) * len(group)
        for item, tensor in zip(group, outs):
            self.store.put(item.key, tensor)
            # Counted before it leaves (publishing is a queue put), so a scrape that follows
            # the reply sees it.
            seconds = time.monotonic() - item.arrived
            st.item_seconds += seconds
            _observe(st.latency, seconds)  # type: ignore[arg-type]
            self._publish(item.key, tensor, self.waiters.pop(item.key), cache_hit=False)

    # -- emit -------------------------------------------------------------------------------

    def _hand_over(self, group: list[_Ready], outs: list[torch.Tensor]) -> None:
        """Copy each output that an engine on this GPU waits for into the device ring and send
        that engine the slot, before anything is downloaded: its prefill can start while we
        download. (The bytes follow as for any engine: its cache's host copy.)"""
        if self.ring is None:
            return
        slots: list[tuple[str, torch.Tensor, DeviceRef, list[str]]] = []
        for item, out in zip(group, outs):
            dests = [d for d, on_gpu in self._routes(self.waiters[item.key]).items() if on_gpu]
            ref = self.ring.put(out) if dests else None  # None: no slot free now
            if ref is not None:
                slots.append((item.key, out, ref, dests))
        if not slots:
            return
        torch.cuda.current_stream(self.ring.device).synchronize()  # the slots are written
        for key, out, ref, dests in slots:
            tensor = describe(out, frame=0)  # no frame: the slot holds the bytes
            for dest in dests:
                self.io.send(dest, Embedding(key, tensor, meta={}, device=ref))
            self.stats.num_device_handoffs += len(dests)

    def _routes(self, reqs: list[EncodeRequest]) -> dict[str, bool]:
        """Each inbox the item goes to (`_route`), and whether it takes a slot of our ring: the
        inbox is the Unix-socket twin of an engine that runs on our GPU."""
        routes: dict[str, bool] = {}
        for r in reqs:
            for addr in r.deliver_to:
                dest = _route(r, addr)
                on_gpu = (self.ring is not None and dest != addr
                          and self.ring.gpu in r.deliver_gpus.get(dest, ()))
                routes[dest] = routes.get(dest, False) or on_gpu
        return routes

    def _publish(self, key: str, tensor: torch.Tensor, reqs: list[EncodeRequest],
                 cache_hit: bool) -> None:
        """Embedding (+ one zero-copy frame) to each destination once, then EncodeDone each.
        An engine `_hand_over` served takes these bytes as its cache's host copy."""
        ref, buf = tensor_ref(tensor, frame=2)
        emb = Embedding(key, ref, meta={})
        if not cache_hit and reqs[0].geometry is not None:
            self._remember(key, reqs[0].geometry)
        for addr in dict.fromkeys(_route(r, a) for r in reqs for a in r.deliver_to):
            self.io.send(addr, emb, [buf])  # once per inbox, in order
        for r in reqs:
            self.io.send(r.reply_to, EncodeDone(key, r.request_id, 200, cache_hit=cache_hit))

    def _remember(self, key: str, geometry: dict[str, Any]) -> None:
        self.geometry[key] = geometry
        if len(self.geometry) > 2 * len(self.store) + 64:  # forget evicted items in bulk
            self.geometry = {k: g for k, g in self.geometry.items() if k in self.store}

    def _done(self, reqs: list[EncodeRequest], status: int, message: str) -> None:
        """Report a failure to every request waiting on the item."""
        for r in reqs:
            self.stats.num_errors += 1
            log.info("%s %s: %d %s", r.request_id, r.key, status, message)
            self.io.send(r.reply_to, EncodeDone(r.key, r.request_id, status, message))

    def stats_snapshot(self) -> EncoderStats:
        """Called on the IO threads (heartbeats, the metrics server): the counters are ints and
        the histograms lists of ints, safe to read while the loop runs."""
        return msgspec.structs.replace(self.stats, store_bytes=self.store.bytes,
                                       store_items=len(self.store))

    def _heartbeat(self) -> EncoderHeartbeat:
        return EncoderHeartbeat(self.encoder_id, time.time(), self.stats_snapshot(),
                                addr=self.input_addr)


def _route(req: EncodeRequest, addr: str) -> str:
    """Where to push ``req``'s embedding for inbox ``addr``: its Unix-socket twin when the
    engine is on this machine and the socket is reachable from here, else ``addr``."""
    local = req.deliver_local.get(addr)
    if local and req.deliver_host and req.deliver_host == host_id() and local_inbox_path(local):
        return local
    return addr


def run_encoder(config: EncoderConfig, input_addr: str,
                metrics_addr: tuple[str, int] | None = None) -> None:
    """Serve until a Shutdown message arrives (or the process is killed); with ``metrics_addr``
    (host, port), also serve this encoder's Prometheus metrics there."""
    if config.resolved_device().startswith("cuda"):
        # Here the CPU side of torch only stacks and copies; a thread per core would fight the
        # decode pool (H100 host, 640x480 JPEGs: 113 img/s with 16 torch threads, 221 with 2).
        torch.set_num_threads(2)
    else:
        # On CPU the tower and the decode pool share the cores: half each (2-core machine,
        # 640x480 JPEGs, tiny CLIP: 64 img/s with torch's default threads, 128 with 1).
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    proc = EncoderProc(config, input_addr)
    signal.signal(signal.SIGTERM, lambda *_: proc.leave())
    if metrics_addr is not None:
        # The names live with the frontend's, so a scrape of any role reads alike.
        from frontend.role_metrics import RoleCollector, serve_role_metrics

        serve_role_metrics(metrics_addr, RoleCollector(config.model,
                                                       encoder=proc.stats_snapshot))
    try:
        proc.run()
    finally:
        proc.close()
