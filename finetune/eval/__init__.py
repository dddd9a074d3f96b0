"""Evaluation: task metrics on held-out questions (exact match, contains-answer, concise rate) and greedy answers.
May import `finetune.recipe`, `finetune.data` and `finetune.model`."""
