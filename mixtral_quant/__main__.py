"""``python -m mixtral_quant``: the command line, for launchers that take a module (torchrun -m)."""

from mixtral_quant.cli import main

main()
