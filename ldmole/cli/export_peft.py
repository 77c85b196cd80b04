"""Export a plain-LoRA adapter (method=lora) to PEFT's format.

    ldmole-export-peft runs/.../lora/seed42/adapter OUT_DIR [--base-model DIR_OR_HUB_ID]

Then ``PeftModel.from_pretrained(base_model, OUT_DIR)`` loads it. Mixture adapters cannot be
exported: PEFT's LoRA has one update per module and no router.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", help="an adapter folder written by ldmole-train (or a hub repository id)")
    parser.add_argument("out", type=Path, help="where PEFT's adapter_config.json and adapter_model.safetensors go")
    parser.add_argument("--base-model", default=None, help="another location of the base model")
    args = parser.parse_args(argv)
    from ldmole.experiment.adapter_info import AdapterInfo
    from ldmole.experiment.peft_export import export_peft_lora
    from ldmole.experiment.pretrained import from_pretrained

    try:
        model = from_pretrained(args.adapter, base_model=args.base_model)
        base = args.base_model or AdapterInfo.read(args.adapter).base_model
        print(export_peft_lora(model, args.out, base_model_name_or_path=base))
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
