"""Base models: loading one from a hub name, a diffusers folder, a single ``.safetensors`` /
``.ckpt`` file or an object-store prefix (``loading``, ``single_file``), TI embedding files
(``embeddings``), the loaded components as a diffusers pipeline (``assemble``), and
kubetune's tiny offline models for tests and the quickstart (``builtin:tiny-sd`` /
``tiny-sdxl`` / ``tiny-flux``: ``tiny``, ``tiny_flux``, with tokenizer files built offline by
``build_tokenizer_files``)."""
