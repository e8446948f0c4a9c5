"""``python -m dsk ...``: the same command line as ``dsk`` (what ``torchrun -m dsk train RECIPE`` runs on each rank)."""

from dsk.cli import main

if __name__ == "__main__":
    main()
