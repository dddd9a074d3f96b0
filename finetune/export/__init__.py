"""Export and share a finished run: adapter and verified merged exports, model cards, `ft generate`, the Hub upload.
May import every layer below it (recipe, distributed, data, model, eval, run, stages)."""
