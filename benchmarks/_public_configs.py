"""Well-known public training configs reproduced at small scale on CPU, for the calibration table
(benchmarks/calibration.py): nanoGPT's `shakespeare_char` hyper-parameters (and the same without warmup),
and the Hugging Face Trainer's defaults for fine-tuning. Each trains into a fresh run directory and
returns it; nothing is downloaded (Python's own standard library sources are the text).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

# Quiet monitor: no Prometheus endpoint, no console lines; the attention probe at its default interval.
QUIET = {"metrics": {"enabled": False}, "console": {"enabled": False}, "attention": {"max_every": 10}}



def _text_batches(block_size: int, batch_size: int, seed: int):
    """Character-level text (Python's own standard library sources: nothing is downloaded), nanoGPT-style
    random windows; returns (vocab_size, get_batch(split))."""
    import torch

    from monitor.trainer.data import read_corpus

    text = read_corpus(None, 1_000_000)
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n = int(0.9 * len(data))
    splits = {"train": data[:n], "val": data[n:]}
    g = torch.Generator().manual_seed(seed)

    def get_batch(split: str):
        d = splits[split]
        ix = torch.randint(len(d) - block_size - 1, (batch_size,), generator=g)
        x = torch.stack([d[i:i + block_size] for i in ix])
        y = torch.stack([d[i + 1:i + 1 + block_size] for i in ix])
        return x, y

    return len(chars), get_batch


def nanogpt_shakespeare_char(run_dir: Path, *, warmup_iters: int = 100, max_iters: int = 300,
                             seed: int = 1337, n_layer: int = 2, n_embd: int = 64, block_size: int = 64,
                             batch_size: int = 8) -> Path:
    """nanoGPT's config/train_shakespeare_char.py hyper-parameters in a nanoGPT-shaped loop, shrunk for CPU.

    Kept from the config: AdamW lr 1e-3, betas (0.9, 0.99), weight decay 0.1 on >=2-D weights only, linear
    warmup over `warmup_iters` (100) iterations from lr/(warmup+1), cosine decay to min_lr 1e-4 at
    lr_decay_iters = max_iters, grad_clip 1.0, dropout 0.2, gradient_accumulation_steps 1, the LR written
    into param_groups every iteration (no scheduler object), an evaluation pass every eval_interval.
    Shrunk: 2 layers x 4 heads x 64 wide (6 x 6 x 384), context 64 (256), batch 8 (64), max_iters 300
    (5000: the 100-step warmup is kept, so it is a third of the run instead of 2%), eval every 200
    iterations on 4 batches (250, 200). Data: characters of Python's standard library instead of Shakespeare
    (nothing downloaded). About 10 s on one CPU thread.
    """
    import torch

    import monitor
    from monitor.trainer.model import GPT, GPTConfig

    learning_rate, min_lr, beta2, grad_clip, weight_decay = 1e-3, 1e-4, 0.99, 1.0, 0.1
    lr_decay_iters, eval_interval, eval_iters = max_iters, 200, 4
    torch.manual_seed(seed)
    vocab, get_batch = _text_batches(block_size=block_size, batch_size=batch_size, seed=seed)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=block_size, n_layer=n_layer, n_head=4, n_embd=n_embd,
                          dropout=0.2))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=learning_rate, betas=(0.9, beta2))
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # float32 on CPU: nanoGPT's scaler is then disabled

    def lr_at(it: int) -> float:
        if it < warmup_iters:
            return learning_rate * (it + 1) / (warmup_iters + 1)
        if it > lr_decay_iters:
            return min_lr
        ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)

    @torch.no_grad()
    def estimate_loss() -> None:
        model.eval()
        for split in ("train", "val"):
            for _ in range(eval_iters):
                model(*get_batch(split))
        model.train()

    mon = monitor.attach(model, optimizer, scaler=scaler, run_dir=run_dir, config=QUIET, max_steps=max_iters)
    try:
        X, Y = get_batch("train")
        for it in range(max_iters):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(it)
            if it % eval_interval == 0 and it > 0:
                estimate_loss()
            _, loss = model(X, Y)
            X, Y = get_batch("train")
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
    finally:
        mon.close()
    return run_dir


def nanogpt_no_warmup(run_dir: Path) -> Path:
    """The same config with warmup_iters = 0: the first update at the peak LR 1e-3, cosine from there; 200
    iterations (the verdict is decided in the first ~20)."""
    return nanogpt_shakespeare_char(run_dir, warmup_iters=0, max_iters=200)


def _counting(stride: int, vocab: int = 64, seq: int = 32, n: int = 1024):
    """Sequences counting up by `stride` (mod vocab) from random starts, as {input_ids, labels} examples."""
    import torch

    g = torch.Generator().manual_seed(stride)
    x = (torch.randint(0, vocab, (n, 1), generator=g) + stride * torch.arange(seq)) % vocab

    class Counting(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return n

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": x[i], "labels": x[i]}

    return Counting()


def hf_trainer_defaults(run_dir: Path, *, max_steps: int = 200, seed: int = 0) -> Path:
    """Hugging Face Trainer's defaults for fine-tuning: AdamW (0.9, 0.999, eps 1e-8, no weight decay), lr 5e-5,
    no warmup, linear decay to 0 over max_steps, max_grad_norm 1.0; nothing set but what a CPU run needs.

    The model is a tiny GPT-2 built from a config (no weights downloaded), first pre-trained here for 150
    steps (plain AdamW, lr 1e-3, unmonitored) on sequences that count up by one, then fine-tuned with the
    Trainer for `max_steps` (200) on sequences that count up by two: a fine-tuning run starts from a trained
    model. It behaves as fine-tuning does: the loss falls from ~4.7 to ~0.3, the pre-clip gradient norm
    starts near 5 (clipped to 1.0 on every step) and settles below 1 after ~160 steps.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PrinterCallback, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    from monitor.integrations.transformers import TrainmonCallback

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the Trainer's notices (loss_type, use_cpu) are noise here
    try:
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                           bos_token_id=0, eos_token_id=0, attn_implementation="sdpa"))
        pre = _counting(stride=1)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(seed)
        for _ in range(150):
            batch = [pre[int(i)]["input_ids"] for i in torch.randint(len(pre), (16,), generator=g)]
            x = torch.stack(batch)
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        args = TrainingArguments(output_dir=str(run_dir.parent / "hf-output"), max_steps=max_steps,
                                 per_device_train_batch_size=8, report_to="none", use_cpu=True,
                                 save_strategy="no", disable_tqdm=True, seed=seed)
        trainer = Trainer(model=model, args=args, train_dataset=_counting(stride=2),
                          callbacks=[TrainmonCallback(config=QUIET, run_dir=run_dir)])
        trainer.remove_callback(PrinterCallback)  # with disable_tqdm it prints every log dict to stdout
        trainer.train()
    finally:
        hf_logging.set_verbosity(verbosity)
    return run_dir


