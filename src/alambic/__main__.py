"""`python -m alambic`: the command line, as the launchers start it (`torchrun -m alambic run CONFIG`,
`accelerate launch -m alambic run CONFIG`, one process per rank)."""

from alambic.cli import main

if __name__ == "__main__":
    main()
