"""`python -m launcher` == the `launcher` console script."""

from launcher.cli.main import main

if __name__ == "__main__":
    main()
