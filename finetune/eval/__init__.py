"""Evaluation: task metrics (exact match, contains-answer, token F1, regex, choice accuracy), held-out loss, forgetting
against a base model, preference margins, and `ft eval`'s suite. May import `finetune.recipe`, `data` and `model`."""
