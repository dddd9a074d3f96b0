"""The run folder: atomic files, the lock, checkpoints, resume and interrupts, the manifest, tracking, `ft runs` and
`ft report`. May import recipe, distributed, data, model and eval."""
