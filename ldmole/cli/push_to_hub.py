"""Upload an adapter folder (weights, config, adapter_info.json, model card, tokenizer files) to a hub model repository.

    ldmole-push-to-hub runs/.../adapter me/my-ldmole-adapter [--public] [--base-model-id OWNER/NAME]
        [--tokenizer-id OWNER/NAME]

Log in first (`huggingface-cli login`) or set HF_TOKEN. The repository is private unless --public; an
existing public repository is refused without --public (the upload would be public). Only the
adapter's own files are uploaded, never other files of the folder. An adapter trained on a local
base model (model_source=/data/Qwen3) needs --base-model-id: the hub id the uploaded
adapter_info.json records instead of the local path (the local folder is not changed).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    """Runs ldmole-push-to-hub; 2 with the reason on stderr when the folder or repository is refused."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", help="an adapter folder written by ldmole-train")
    parser.add_argument("repo_id", help="owner/name of the hub model repository (created when missing)")
    parser.add_argument("--public", action="store_true",
                        help="make a new repository public (needed to upload to an existing public one)")
    parser.add_argument("--base-model-id", default=None,
                        help="hub id of the base model to record instead of a local base model path")
    parser.add_argument("--tokenizer-id", default=None,
                        help="hub id of the tokenizer to record instead of a local tokenizer path (older folders)")
    args = parser.parse_args(argv)
    from ldmole.experiment.pretrained import push_to_hub

    ids = {key: value for key, value in (("base_model_id", args.base_model_id), ("tokenizer_id", args.tokenizer_id))
           if value is not None}
    try:
        print(push_to_hub(args.adapter, args.repo_id, private=not args.public, **ids))
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
