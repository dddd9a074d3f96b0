"""`python -m finetune ...` (and `accelerate launch -m finetune ...`) run the `ft` command line."""

from finetune.cli import main

main()
