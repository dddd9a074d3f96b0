"""Training stages (`sft.py`, `dpo.py`: setup -> train -> save), the pipeline that runs a recipe's stages, the dry run
and the checks made before the first step (`preflight.py`). May import recipe, distributed, data, model, eval, run."""
