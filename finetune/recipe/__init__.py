"""The recipe, bottom of the package: schema (`schema.py`), YAML reading with `extends:` (`loading.py`), `--set`
overrides (`overrides.py`), the reference docs (`docs.py`), Hub id checks and the fused-kernel support rules. Imports
nothing else of finetune but `finetune.errors`; no torch."""
