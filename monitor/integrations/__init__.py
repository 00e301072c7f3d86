"""Framework integrations: one callback each, importing its framework only when imported itself.

- `monitor.integrations.transformers.TrainmonCallback`: Hugging Face `Trainer(callbacks=[...])`.
- `monitor.integrations.lightning.TrainmonCallback`: Lightning `Trainer(callbacks=[...])`, with
  `lightning.pytorch` or `pytorch_lightning`.
- Accelerate needs none: `monitor.attach` takes the prepared model, optimizer and scheduler.

Both callbacks take `config=` and `run_dir=` like `attach`, expose the running `Monitor` as
`.monitor`, and stop their trainer themselves when `halt_on` asks (never an exception out of
`train()`/`fit()`). A fault of the monitor's own while setting up is logged and training goes on
unmonitored; a bad `config` fails when the callback is built, before training starts.
"""
