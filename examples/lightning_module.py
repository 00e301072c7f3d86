"""A Lightning `LightningModule` with trainmon: one callback, `callbacks=[TrainmonCallback()]`.

Automatic optimisation with AdamW, a per-step LR scheduler (linear warmup), `gradient_clip_val` and
`accumulate_grad_batches=2`. The model is a small GPT whose attention is
`F.scaled_dot_product_attention`, so the monitor samples attention statistics; the data are
synthetic counting sequences. The run directory goes under `default_root_dir`:
`<out>/trainmon/<utc-time>-<host>/`.

    python examples/lightning_module.py                  # 100 optimizer steps, under runs/
    python examples/lightning_module.py --steps 20 --out /tmp/runs
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch

from monitor.integrations.lightning import TrainmonCallback
from monitor.trainer.model import GPT, GPTConfig  # trainmon's small nanoGPT-shaped GPT: use your own model

VOCAB, SEQ = 64, 32


class LitGPT(pl.LightningModule):
    def __init__(self, lr: float = 1e-3, warmup: int = 40) -> None:
        super().__init__()
        self.lr, self.warmup = lr, warmup
        self.model = GPT(GPTConfig(vocab_size=VOCAB, block_size=SEQ, n_layer=2, n_head=4, n_embd=64))

    def training_step(self, batch, batch_idx):
        x, y = batch
        _, loss = self.model(x, y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=self.lr, betas=(0.9, 0.95))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / self.warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def counting_data(n: int = 512, batch_size: int = 8) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    seqs = (torch.randint(0, VOCAB, (n, 1), generator=g) + torch.arange(SEQ + 1)) % VOCAB
    dataset = torch.utils.data.TensorDataset(seqs[:, :-1], seqs[:, 1:])
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=g)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps")
    ap.add_argument("--out", default="runs", help="default_root_dir: parent of the run directories")
    args = ap.parse_args()

    pl.seed_everything(0, verbose=False)
    # The one added line: the callback (config= and run_dir= as in monitor.attach, both optional).
    callback = TrainmonCallback()
    trainer = pl.Trainer(
        default_root_dir=args.out, max_steps=args.steps, accumulate_grad_batches=2, gradient_clip_val=1.0,
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=False, callbacks=[callback],
    )
    trainer.fit(LitGPT(), counting_data())

    mon = callback.monitor  # the Monitor the callback ran; closed when fit() ended
    print(f"run directory: {mon.run_dir}")
    print(f"alerts: {len(mon.alerts)}")
    for alert in mon.alerts:
        print("  " + alert.line())


if __name__ == "__main__":
    main()
