"""`python -m bsafuse` runs the command line (also under torchrun)."""

from bsafuse.cli import main

if __name__ == "__main__":
    main()
