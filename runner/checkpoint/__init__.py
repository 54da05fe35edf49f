"""What a checkpoint holds (`state`: weights, training state, RNG, data position, loop
state; imports torch) and the weight files users load (`exporters`: LoRA in kohya / peft
format, TI embeddings). Publishing them is `kubetune.checkpoint.publish`'s job."""
