"""What can be known about a dataset without torch: its sources (JSONL, caption folder,
image folder, HF dataset, DreamBooth folders), captions, parallel listing, the dataset index
stored with a run, image header reads, and the preflight that checks them before a GPU is
used. The launcher (`validate --data`) and the runner both use it."""
