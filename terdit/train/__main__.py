"""`python -m terdit.train`: terdit.train.train_cli.main, started by
terdit_common.entry (SIGTERM, and a Ctrl-C while the modules load, end in one line)."""
from terdit_common.entry import run_main


def main() -> None:
    run_main("terdit.train.train_cli")


if __name__ == "__main__":
    main()
