"""Regenerate docs/recipe.md from the recipe schema's docstrings: `python scripts/gen_recipe_docs.py`."""

from pathlib import Path

from finetune.recipe.docs import markdown

out = Path(__file__).resolve().parents[1] / "docs" / "recipe.md"
out.write_text(markdown())
print(f"wrote {out}")
