"""The training loop and its helpers: one optimizer step and the loop (`loop`), optimizer
and LR schedule (`optim`), noise and timesteps (`noise`), targets and loss weighting
(`losses`), EMA weights (`ema`), CUDA speed settings (`speed`), when work is due
(`cadence`), cached encoder outputs (`encoder_cache`) and validation images (`validation`)."""
