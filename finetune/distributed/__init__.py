"""Several processes: who am I (`process.py`), how the batch and the model are shared (`plan.py`), and the `--nproc`
launch through Accelerate (`launch.py`). May import `finetune.recipe`; nothing here imports torch at module level."""
