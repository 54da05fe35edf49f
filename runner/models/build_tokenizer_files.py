"""Convert OpenAI CLIP's BPE vocabulary into Hugging Face ``CLIPTokenizer`` files.

Not used at runtime: run once by hand to (re)generate the files shipped in
``runner/assets/clip_tokenizer/``. The source is ``open_clip/bpe_simple_vocab_16e6.txt.gz``,
obtainable offline-friendly (no dependencies pulled) with::

    pip download --no-deps open-clip-torch -d /tmp/oc
    cd /tmp/oc && unzip -o *.whl open_clip/bpe_simple_vocab_16e6.txt.gz
    python -m runner.models.build_tokenizer_files \
        /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz runner/assets/clip_tokenizer

The conversion mirrors ``open_clip.tokenizer.SimpleTokenizer``: the vocabulary is the 256
byte-to-unicode symbols, the same with ``</w>``, one entry per merge, then the two special
tokens, giving 49,408 entries and 48,894 merges (the SD1.5 / SDXL tokenizers).
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from kubetune.humanize import count

NUM_MERGES = 49152 - 256 - 2
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte → printable unicode character table."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def convert(bpe_gz: Path) -> tuple[dict[str, int], list[str]]:
    """Return ``(vocab, merges)`` built from the gzipped open_clip BPE file."""
    with gzip.open(bpe_gz, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m.split()) for m in merges]
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_files(bpe_gz: Path, out_dir: Path) -> None:
    """Write ``vocab.json`` and ``merges.txt`` (with the HF version header) into ``out_dir``."""
    vocab, merges = convert(bpe_gz)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
    )
    print(
        f"wrote {count(len(vocab), 'vocab entry')} and {count(len(merges), 'merge')} to {out_dir}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bpe_gz", type=Path, help="path to bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("out_dir", type=Path, help="directory to write vocab.json/merges.txt")
    args = parser.parse_args(argv)
    write_files(args.bpe_gz, args.out_dir)


if __name__ == "__main__":
    main()
