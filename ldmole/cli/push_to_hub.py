"""Upload an adapter folder (weights, config, adapter_info.json, model card) to a hub model repository.

    ldmole-push-to-hub runs/.../adapter me/my-ldmole-adapter [--public]

Log in first (`huggingface-cli login`) or set HF_TOKEN. The repository is private unless --public.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", help="an adapter folder written by ldmole-train")
    parser.add_argument("repo_id", help="owner/name of the hub model repository (created when missing)")
    parser.add_argument("--public", action="store_true", help="make a new repository public")
    args = parser.parse_args(argv)
    from ldmole.experiment.pretrained import push_to_hub

    try:
        print(push_to_hub(args.adapter, args.repo_id, private=not args.public))
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
