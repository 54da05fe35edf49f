"""Checkpoints: ``runner.checkpoint.state`` (what a checkpoint contains: weights, training
state, run info, ``LoopState``; imports torch), ``runner.checkpoint.publish`` (how it is
published: manifest last, listing, restore, set-aside, pruning) and
``runner.checkpoint.manifest`` (the manifest format). The last two are torch-free; this
package imports nothing so the launcher can use them without torch."""
