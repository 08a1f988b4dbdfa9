"""Train mmserve's built-in demo vision-language model on synthetic shape pictures, and export it.

    python deploy/demo_model/train.py --device cuda --out deploy/demo_model/checkpoint

The model is a standard HF LLaVA (`LlavaForConditionalGeneration`: CLIP ViT + gelu MLP projector
+ Llama LM), so mmserve and transformers both load it. Every training example is a fresh picture
from shapes.py, asked the way a chat request asks it: the prompt is exactly what the checkpoint's
chat template renders for one user message with add_generation_prompt=True, the loss covers only
the answer and the EOS token that follows it.

Reproducible: the data stream is a pure function of the example index, and every random choice
in here is seeded. `--state-out` also writes the raw weights in parts of under 16 MiB plus the
tokenizer, and `--export-from` turns such a folder into the checkpoint on another machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import deque
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repo root: the chat template lives in frontend/

import shapes  # noqa: E402

from frontend.random_model import CHATML_MM_TEMPLATE, IMAGE_TOKEN, SPECIAL_TOKENS  # noqa: E402

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PATCH = 8
NUM_IMAGE_TOKENS = (shapes.IMAGE_SIZE // PATCH) ** 2  # "default" strategy drops the CLS token
VOCAB_SIZE = 1024
SYSTEM_PROMPTS = ("You are a helpful assistant.", "You are a helpful assistant. Answer briefly.")

GENERIC_TEXT = """Hello! How can I help you today? Please describe what you see in this picture.
The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is.
Can you tell me about this photo? There is a small red car parked next to a tall tree.
Thank you very much. You're welcome. Yes, no, maybe; I don't know. Why? Because it is.
Is there a cat, a dog, a person or a house in the image? Where is it: left, right, top, bottom?
Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 and punctuation , . ; : ! ? ' " ( ) [ ] { } - + * / =
def main(): return 42  # code is text too. print("hello world")
Über café naïve — “quotes” 你好世界 こんにちは 🙂🚀 Grüße, señor, façade, smörgåsbord.
"""


# -- tokenizer, prompts ------------------------------------------------------------------------


def _task_text() -> list[str]:
    lines = []
    for key, variants in shapes.QUESTIONS.items():
        for q in variants:
            for kind in shapes.SHAPES:
                text = q.format(shape=kind) if key == "colour" else q
                lines += [text, text[0].lower() + text[1:]]
    for colour in shapes.COLOURS:
        lines.append(colour.capitalize() + ".")
        for kind in shapes.SHAPES:
            lines += [f"A {kind}.", f"a {colour} {kind}, an {colour} {kind} and"]
    lines += [n + "." for n in shapes.NUMBERS] + list(SYSTEM_PROMPTS)
    return lines


def build_tokenizer():
    """Byte-level BPE (any UTF-8 text tokenizes) whose merges favour the task's words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["\n".join(_task_text())] * 50 + [GENERIC_TEXT] * 10, trainer=trainer)
    return wrap_tokenizer(tok)


def wrap_tokenizer(tok):
    """A `tokenizers.Tokenizer` -> the transformers tokenizer the checkpoint ships."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML_MM_TEMPLATE
    return fast


class PromptCache:
    """Token ids of prompts and answers; a few hundred distinct strings, each tokenized once."""

    def __init__(self, tok):
        self.tok = tok
        self.image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
        self.eos_id = tok.eos_token_id
        self._prompts: dict[tuple, list[int]] = {}
        self._answers: dict[str, list[int]] = {}

    def prompt(self, question: str, image_first: bool = True, system: str | None = None):
        key = (question, image_first, system)
        if key not in self._prompts:
            parts = [{"type": "image"}, {"type": "text", "text": question}]
            messages = [{"role": "user", "content": parts if image_first else parts[::-1]}]
            if system is not None:
                messages.insert(0, {"role": "system", "content": system})
            text = self.tok.apply_chat_template(messages, tokenize=False,
                                                add_generation_prompt=True)
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            assert ids.count(self.image_id) == 1, text
            at = ids.index(self.image_id)  # expand the placeholder as mmserve and HF's processor do
            self._prompts[key] = ids[:at] + [self.image_id] * NUM_IMAGE_TOKENS + ids[at + 1:]
        return self._prompts[key]

    def answer(self, answer: str) -> list[int]:
        if answer not in self._answers:
            self._answers[answer] = self.tok(answer, add_special_tokens=False)["input_ids"] + [
                self.eos_id]
        return self._answers[answer]


def prompt_format(index: int) -> tuple[bool, str | None]:
    """How example ``index`` is asked: image before or after the text (clients do both), and
    sometimes after a system prompt. Seeded apart from the picture's own stream."""
    rng = np.random.default_rng([index, 1])
    image_first = bool(rng.random() < 0.6)
    system = SYSTEM_PROMPTS[rng.integers(2)] if rng.random() < 0.1 else None
    return image_first, system


# -- model -------------------------------------------------------------------------------------


def build_config(tok):
    import transformers

    vision = transformers.CLIPVisionConfig(
        hidden_size=192, intermediate_size=768, num_hidden_layers=6, num_attention_heads=6,
        image_size=shapes.IMAGE_SIZE, patch_size=PATCH, projection_dim=192,
    )
    text = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    # Features from the last tower layer: a tower trained for this model needs no -2 trick.
    return transformers.LlavaConfig(
        vision_config=vision, text_config=text,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default", vision_feature_layer=-1,
        projector_hidden_act="gelu", tie_word_embeddings=False,
        image_seq_length=NUM_IMAGE_TOKENS,
    )


def build_model(tok, seed: int):
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(build_config(tok)).float()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def export_checkpoint(model, tok, out: Path) -> None:
    """save_pretrained the model, tokenizer (with chat template) and LLaVA processor."""
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    side = shapes.IMAGE_SIZE
    image_processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side},
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True,
    )
    processor = transformers.LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=PATCH,
        vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
        chat_template=CHATML_MM_TEMPLATE, num_additional_image_tokens=1,
    )
    processor.save_pretrained(out)


def save_state(model, tok, out: Path, limit: int = 15 * 2**20) -> None:
    """Weights as safetensors parts under ``limit`` bytes each, plus tokenizer.json."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    parts: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in model.state_dict().items():
        nbytes = t.numel() * t.element_size()
        if parts[-1] and size + nbytes > limit:
            parts.append({})
            size = 0
        parts[-1][name] = t.detach().cpu().contiguous()
        size += nbytes
    for i, part in enumerate(parts):
        save_file(part, out / f"weights-{i}.safetensors")
    tok.backend_tokenizer.save(str(out / "tokenizer.json"))


def load_state(folder: Path, seed: int = 0):
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    tok = wrap_tokenizer(Tokenizer.from_file(str(folder / "tokenizer.json")))
    model = build_model(tok, seed)
    state: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("weights-*.safetensors")):
        state.update(load_file(path))
    model.load_state_dict(state, strict=True)
    return model, tok


# -- data --------------------------------------------------------------------------------------


def render_batch(indices: list[int]):
    """Pool worker: pictures [B, H, W, 3] uint8, (category, question, answer) and the prompt
    format of each index."""
    samples = [shapes.training_sample(i) for i in indices]
    images = np.stack([np.asarray(s.image) for s in samples])
    return (images, [(s.category, s.question, s.answer) for s in samples],
            [prompt_format(i) for i in indices])


def render_seeds(seeds: list[tuple[int, str]]) -> tuple[np.ndarray, list[tuple[str, str, str]]]:
    samples = [shapes.make_sample(seed, cat) for seed, cat in seeds]
    return np.stack([np.asarray(s.image) for s in samples]), [
        (s.category, s.question, s.answer) for s in samples]


class Batches:
    """Training batches in index order, rendered ahead by a process pool (a bounded window, so
    a fast pool never piles up gigabytes of pictures)."""

    def __init__(self, pool, batch_size: int, window: int = 48):
        self.pool, self.batch_size, self.window = pool, batch_size, window
        self.pending: deque = deque()
        self.next_start = 0

    def _submit(self):
        indices = list(range(self.next_start, self.next_start + self.batch_size))
        self.pending.append(self.pool.apply_async(render_batch, (indices,)))
        self.next_start += self.batch_size

    def __next__(self):
        while len(self.pending) < self.window:
            self._submit()
        return self.pending.popleft().get()  # images, qa, formats


def to_tensors(cache: PromptCache, images: np.ndarray, qa, formats, device):
    """-> input_ids [B, T], labels [B, T] (-100 outside answers), pixel_values [B, 3, H, W]."""
    seqs, starts = [], []
    for (_, question, answer), (image_first, system) in zip(qa, formats):
        prompt = cache.prompt(question, image_first, system)
        seqs.append(prompt + cache.answer(answer))
        starts.append(len(prompt))
    width = max(map(len, seqs))
    ids = np.full((len(seqs), width), cache.tok.pad_token_id, dtype=np.int64)
    labels = np.full((len(seqs), width), -100, dtype=np.int64)
    for i, (seq, start) in enumerate(zip(seqs, starts)):
        ids[i, :len(seq)] = seq
        labels[i, start:len(seq)] = seq[start:]
    pixels = torch.from_numpy(images).to(device, non_blocking=True)  # [B, H, W, 3] uint8
    # CLIP rescale + normalize, as the checkpoint's processor does (resize/crop are no-ops).
    mean = torch.tensor(CLIP_MEAN, device=device)
    std = torch.tensor(CLIP_STD, device=device)
    pixels = ((pixels.float() / 255.0 - mean) / std).permute(0, 3, 1, 2).contiguous()
    return (torch.from_numpy(ids).to(device), torch.from_numpy(labels).to(device), pixels)


def loss_fn(model, ids, labels, pixels, autocast):
    with autocast:
        logits = model(input_ids=ids, pixel_values=pixels).logits  # [B, T, vocab]
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             target.reshape(-1), ignore_index=-100)
    return loss, logits, target


@torch.no_grad()
def heldout_accuracy(model, cache, heldout, device, autocast, batch_size=256) -> dict[str, float]:
    """Teacher-forced exact match: every answer token (and the EOS) is the argmax given the
    true prefix, which holds exactly when greedy decoding reproduces the answer."""
    model.eval()
    images, qa = heldout
    hits: dict[str, list[bool]] = {}
    for lo in range(0, len(qa), batch_size):
        chunk = qa[lo:lo + batch_size]
        ids, labels, pixels = to_tensors(cache, images[lo:lo + batch_size], chunk,
                                         [(True, None)] * len(chunk), device)
        _, logits, target = loss_fn(model, ids, labels, pixels, autocast)
        ok = ((logits.argmax(-1) == target) | (target == -100)).all(-1)
        for (category, _, _), good in zip(chunk, ok.tolist()):
            hits.setdefault(category, []).append(good)
    model.train()
    return {c: sum(v) / len(v) for c, v in sorted(hits.items())}


# -- training ----------------------------------------------------------------------------------


def lr_at(step: int, total: int, warmup: int, min_ratio: float = 0.05) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(args) -> None:
    t_start = time.time()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    # The pool forks before CUDA starts (a forked CUDA context is unusable).
    pool = get_context("fork").Pool(args.workers)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.use_deterministic_algorithms(True, warn_only=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    tok = build_tokenizer()
    cache = PromptCache(tok)
    model = build_model(tok, args.seed).to(device).train()
    num_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")

    seeds = [(shapes.heldout_seed(c, i), c) for c in shapes.CATEGORIES
             for i in range(args.eval_per_category)]
    chunks = [seeds[i:i + 256] for i in range(0, len(seeds), 256)]
    rendered = pool.map(render_seeds, chunks)
    heldout = (np.concatenate([r[0] for r in rendered]), [x for r in rendered for x in r[1]])

    log_path = args.log_dir / "train_log.jsonl"
    args.log_dir.mkdir(parents=True, exist_ok=True)
    log = log_path.open("w")

    def emit(record):
        print(json.dumps(record), flush=True)
        log.write(json.dumps(record) + "\n")
        log.flush()

    emit({"event": "start", "device": torch.cuda.get_device_name(device)
          if device.type == "cuda" else "cpu", "params": num_params, "torch": torch.__version__,
          "vocab": len(tok), "args": {k: str(v) for k, v in vars(args).items()}})
    batches = Batches(pool, args.batch_size)
    steps, decide_at = args.steps, min(100, args.warmup)
    t_train, running, timing_from = time.time(), [], None
    step = 0
    while step < steps:
        if step == 20:
            timing_from = time.time()
        if args.time_budget and step == decide_at and timing_from is not None:
            # Before the cosine starts, so the run equals one started with the lowered --steps.
            per_step = (time.time() - timing_from) / (decide_at - 20)
            left = args.time_budget - (time.time() - t_start) - 30  # export + final eval
            fits = decide_at + int(left / per_step) // 100 * 100
            if fits < steps:
                emit({"event": "steps_lowered", "from": steps, "to": fits,
                      "per_step_s": per_step})
                steps = fits
        images, qa, formats = next(batches)
        ids, labels, pixels = to_tensors(cache, images, qa, formats, device)
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_at(step, steps, args.warmup)
        loss, _, _ = loss_fn(model, ids, labels, pixels, autocast)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running.append(loss.detach())
        if (step + 1) % args.log_every == 0 or step + 1 == steps:
            emit({"step": step + 1, "loss": round(torch.stack(running).mean().item(), 5),
                  "lr": opt.param_groups[0]["lr"], "elapsed_s": round(time.time() - t_train, 1)})
            running = []
        if (step + 1) % args.eval_every == 0 and step + 1 < steps:
            emit({"step": step + 1, "heldout": heldout_accuracy(model, cache, heldout, device,
                                                                autocast)})
        step += 1
    train_s = time.time() - t_train
    final = heldout_accuracy(model, cache, heldout, device, autocast)
    pool.terminate()
    model = model.float().cpu()
    summary = {"event": "done", "steps": steps, "train_s": round(train_s, 1),
               "total_s": round(time.time() - t_start, 1), "heldout": final,
               "examples": steps * args.batch_size, "params": num_params}
    emit(summary)
    log.close()
    (args.log_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if args.state_out:
        save_state(model, tok, args.state_out)
    if args.out:
        export_checkpoint(model, tok, args.out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=str(HERE / "checkpoint"),
                   help="checkpoint folder (save_pretrained); '' skips it")
    p.add_argument("--state-out", type=Path, default=None,
                   help="also write weights in <16 MiB safetensors parts + tokenizer.json here")
    p.add_argument("--export-from", type=Path, default=None,
                   help="no training: export --out from a --state-out folder")
    p.add_argument("--log-dir", type=Path, default=None, help="default: --state-out or --out")
    p.add_argument("--steps", type=int, default=4800)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--eval-per-category", type=int, default=256)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; may lower --steps once, before the cosine decay starts")
    args = p.parse_args()
    args.out = Path(args.out) if args.out else None
    if args.export_from is not None:
        if args.out is None:
            p.error("--export-from needs --out")
        model, tok = load_state(args.export_from, args.seed)
        export_checkpoint(model, tok, args.out)
        return
    args.log_dir = args.log_dir or args.state_out or args.out
    train(args)


if __name__ == "__main__":
    main()
