"""How alive is the λ-MLP at initialisation? Hidden-unit activity and λ spread per layer on real text.

    python -m ldmole.cli.probe_lambda model=smollm2_135m task=arc_e data_dir=../shared/data \
        [method=ldmole_reference] [mole.lambda_input_norm=rms] [--num-examples 16] [--json OUT.json]

Builds the run's model exactly as train.py would (same composed config, same seed), runs the first
N evaluation examples without training, and prints for each decoder layer and module type: the
RMS of the λ-MLP's input, the fraction of (real token, hidden unit) pairs whose ReLU fires, and λ's
q05 / q50 / q95 over real tokens. A dead λ-MLP shows 0 active units and q05 = q95.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch

from ldmole import mole_layers
from ldmole.experiment.data import collate
from ldmole.experiment.run import Run
from ldmole.experiment.run_config import compose_config

QUANTILES = (0.05, 0.5, 0.95)


@torch.no_grad()
def probe(model, batches) -> dict[tuple[int, str], dict]:
    """Per (layer, module type): input RMS, active hidden fraction and λ quantiles over real tokens."""
    found: dict[tuple[int, str], dict[str, list]] = {}
    mask_of = {}

    def hook(layer):
        def record(module, args):
            x = args[0].float()
            keep = mask_of["mask"].reshape(-1)
            flat = x.reshape(-1, x.shape[-1])[keep]
            entry = found.setdefault((layer.layer_index, layer.module_type), {"rms": [], "active": [], "lam": []})
            entry["rms"].append(flat.square().mean(-1).sqrt())
            entry["active"].append((layer.lambda_mlp.hidden_activations(flat) > 0).float().mean(-1))
            entry["lam"].append(layer.lambda_mlp(flat))
        return record

    handles = [layer.register_forward_pre_hook(hook(layer)) for layer in mole_layers(model)
               if layer.lambda_mlp is not None]
    if not handles:
        raise ValueError("the method's router has no λ-MLP (use a sparsegen method such as ldmole or "
                         "ldmole_reference)")
    for batch in batches:
        mask_of["mask"] = batch["attention_mask"].bool()
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for handle in handles:
        handle.remove()
    result = {}
    for key, entry in sorted(found.items()):
        lam = torch.cat(entry["lam"])
        result[key] = {"input_rms": float(torch.cat(entry["rms"]).mean()),
                       "active_fraction": float(torch.cat(entry["active"]).mean()),
                       "lambda_quantiles": [round(float(q), 4) for q in torch.quantile(lam, torch.tensor(QUANTILES))]}
    return result


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="key=value run settings, as for train.py")
    parser.add_argument("--num-examples", type=int, default=16, help="evaluation examples to run (the first N)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    args = parser.parse_args(argv)
    try:
        config = compose_config(args.overrides)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    run = Run(config)
    features = run.features(run.task_data(eval_only=True).evaluation[: args.num_examples], truncate=True)
    batches = [collate(features[i : i + args.batch_size], run.pad_token_id)
               for i in range(0, len(features), args.batch_size)]
    model = run.mole_model().eval()
    try:
        table = probe(model, batches)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    mole = config.mole
    print(f"{config.model} · {config.task} · {config.method} (lambda_init={mole.lambda_init}, "
          f"lambda_input_norm={mole.lambda_input_norm}); {len(features)} examples")
    print(f"{'layer':>5} {'module':<10} {'input RMS':>9} {'active':>7}  λ q05 / q50 / q95")
    for (layer, module), row in table.items():
        q = row["lambda_quantiles"]
        print(f"{layer:>5} {module:<10} {row['input_rms']:>9.3f} {row['active_fraction']:>7.3f}  "
              f"{q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f}")
    if args.json:
        args.json.write_text(json.dumps([{"layer": k[0], "module": k[1], **v} for k, v in table.items()], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
