"""How a checkpoint is published and read back, torch-free: `manifest` (the manifest
format, sha256 of every file) and `publish` (upload the files, write the manifest last,
list, restore, set aside, prune). What a checkpoint holds is the runner's
(`runner.checkpoint.state`)."""
