"""`python -m pipeline`: the CLI, as `accelerate launch ... -m pipeline train` and `torchrun -m pipeline` run it."""

from pipeline.cli import main

main()
