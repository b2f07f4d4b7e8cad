"""``hf-llmc run RECIPE.yaml``: run (or ``--check``, or describe with ``--schema``) a recipe."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config.errors import UsageError


def run(args: argparse.Namespace) -> int:
    from .recipes import check_switches, code_needs, load_recipe, plan_outputs, recipe_schema, run_recipe

    if args.schema:
        import yaml

        print(yaml.safe_dump(recipe_schema(), sort_keys=False, allow_unicode=True, width=100))
        return 0
    if not args.recipe:
        raise UsageError("give a RECIPE.yaml (or --schema)")
    recipe = load_recipe(args.recipe)
    rows = plan_outputs(recipe, args.out, overwrite=args.overwrite)  # every path resolved and checked
    if args.check:
        print(f"{Path(args.recipe).name}: {len(recipe.pairs)} pair(s), {len(recipe.steps)} step(s)")
        current = None
        for row in rows:
            if row["pair"] != current:
                current = row["pair"]
                a = row["a"] + (f"@{row['revision_a']}" if row["revision_a"] else "")
                b = row["b"] + (f"@{row['revision_b']}" if row["revision_b"] else "")
                print(f"{current}: {a} vs {b}")
            print(f"  {row['step']} ({row['kind']}) -> {row['output']}")
        for line in code_needs(recipe):
            print(line)
        print("recipe is valid")
        return 0
    check_switches(recipe, trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle)
    run_recipe(recipe, out=args.out, overwrite=args.overwrite, echo=print, trust_remote_code=args.trust_remote_code,
               allow_pickle=args.allow_pickle)
    return 0
