"""``python -m autopeft``: the same command line as ``autopeft`` (:func:`autopeft.cli.main`)."""

from autopeft.cli import main

if __name__ == "__main__":
    main()
